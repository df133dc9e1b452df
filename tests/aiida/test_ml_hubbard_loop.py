"""``eqml.hubbard.self_consistent`` on real pw.x / hp.x runs of AFM NiO (the ``test`` cutoffs, 3x3x3 k, q = Gamma).

The scenario is the product's own cycle, so the provenance is real end to end:

1. ``fallback_run``: two untrained models disagree (spread > 0 = ``uncertainty_threshold``), so the iteration runs
   hp.x instead, and its result comes out as ``new_labels``;
2. ``trained_model``: the ``eqml.train`` CalcJob trains on those labels;
3. ``ml_run``: the loop with that model converges without hp.x, then ``validate_with_dfpt`` runs one hp.x on the
   last scf; the output's provenance reaches the pw.x and hp.x runs of step 1.
"""
from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest

pytestmark = [pytest.mark.qe, pytest.mark.timeout(1800)]

AFM_MOMENTS = {'Ni1': 2.0, 'Ni2': -2.0, 'O': 0.0}  # Bohr magneton (aiida-quantumespresso's initial moments)
OVERRIDES = {
    'max_iterations': 4,
    'scf': {'kpoints_distance': 0.9},  # 3x3x3 on the 4-atom AFM-II cell
    'hubbard': {'qpoints_distance': 100.0, 'parallelize_atoms': False, 'parallelize_qpoints': False},
}


def loop_builder(qe_codes, structure, models, hp=True, **overrides):
    from aiida_quantumespresso.common.types import SpinType

    from aiida_eqml.workflows.hubbard.self_consistent import SelfConsistentMLHubbardWorkChain

    return SelfConsistentMLHubbardWorkChain.get_builder_from_protocol(
        qe_codes['pw'], structure, models, protocol='fast', hp_code=qe_codes['hp'] if hp else None,
        overrides={**OVERRIDES, **overrides}, spin_type=SpinType.COLLINEAR, initial_magnetic_moments=AFM_MOMENTS,
    )


def onsite_u(structure) -> dict[int, float]:
    return {p.atom_index: p.value for p in structure.hubbard.parameters if p.atom_index == p.neighbour_index}


@pytest.fixture(scope='module')
def untrained_models(aiida_profile, tmp_path_factory):
    """Two random-weight U models (seeds 0, 1) whose descriptor slots fit DFT+U NiO (Ni 3d, O 2p)."""
    from conftest_train import ensure_entry_points

    ensure_entry_points()
    from test_occupations import nio_structure, retrieved_folder
    from test_predict import hubbard_model_node

    from aiida_eqml.calculations.functions.occupations import extract_occupations

    structure = nio_structure(False).store()
    occupations = extract_occupations(retrieved=retrieved_folder('nio_u'), structure=structure)['occupations']
    folder = tmp_path_factory.mktemp('untrained')
    return [hubbard_model_node(folder, structure, occupations, seed) for seed in (0, 1)]


@pytest.fixture(scope='module')
def loop_structure():
    from test_occupations import nio_structure

    return nio_structure(False)  # AFM NiO, U(Ni 3d) = 5 eV, U(O 2p) = 1 eV


@pytest.fixture(scope='module')
def fallback_run(aiida_profile, qe_codes, pseudo_family, untrained_models, loop_structure):
    from aiida import orm
    from aiida.engine import run_get_node

    builder = loop_builder(qe_codes, loop_structure.clone(), untrained_models, meta_convergence=False)
    builder.uncertainty_threshold = orm.Float(0.0)
    return run_get_node(builder)


@pytest.fixture(scope='module')
def trained_model(fallback_run, tmp_path_factory):
    from aiida import orm
    from aiida.engine import run_get_node
    from conftest_train import local_computer

    from aiida_eqml.calculations.train import EqmlTrainCalculation, get_or_create_python_code

    results, _ = fallback_run
    builder = EqmlTrainCalculation.get_builder()
    computer = local_computer(str(tmp_path_factory.mktemp('train-work')), label='eqml-loop-localhost')
    builder.code = get_or_create_python_code(computer)
    builder.datasets = {'hp_labels': results['new_labels']}
    builder.config = orm.Dict({
        'model': {'cutoff': 3.5, 'hidden_irreps': '8x0e + 2x1o + 2x2e', 'num_layers': 1},
        'epochs': 60, 'batch_size': 1, 'split': {'train': [0], 'val': [], 'test': []}, 'progress': False,
    })
    builder.metadata.options.resources = {'num_machines': 1, 'num_mpiprocs_per_machine': 1}
    outputs, node = run_get_node(builder)
    assert node.is_finished_ok, (node.exit_status, node.exit_message)
    return outputs['model'], node


@pytest.fixture(scope='module')
def ml_run(qe_codes, trained_model, loop_structure):
    from aiida import orm
    from aiida.engine import run_get_node

    builder = loop_builder(qe_codes, loop_structure.clone(), trained_model[0])
    builder.uncertainty_threshold = orm.Float(10.0)
    builder.validate_with_dfpt = orm.Bool(True)
    return run_get_node(builder)


def test_fallback_runs_hp_and_harvests_its_labels(fallback_run, untrained_models):
    results, node = fallback_run
    assert node.is_finished_ok, (node.exit_status, node.exit_message)
    history = results['history'].get_list()
    assert [record['source'] for record in history] == ['hp']
    assert history[0]['max_spread'] > 0.0  # the two random members disagree
    hp = node.base.links.get_outgoing(link_label_filter='iteration_01_hp').one().node
    assert hp.is_finished_ok
    # The loop uses hp.x's values, and the label carries them as targets with the occupations of the perturbed scf.
    hp_u = onsite_u(hp.outputs.hubbard_structure)
    assert onsite_u(results['hubbard_structure']) == pytest.approx(hp_u)
    assert 3.0 < hp_u[0] < 12.0 and hp_u[0] == pytest.approx(hp_u[1], abs=0.05)  # Ni1 ~ Ni2 (AFM symmetry)
    dataset = results['new_labels'].get_dataset()
    assert len(dataset) == 1
    np.testing.assert_allclose(dataset.samples[0].node_targets['hubbard_u'][:2, 0], [hp_u[0], hp_u[1]])
    np.testing.assert_allclose(dataset.samples[0].node_attrs['hubbard_u_scf'][:2], [5.0, 5.0])
    scf = hp.inputs.hp.parent_scf.creator
    harvest = results['new_labels'].creator
    assert harvest.inputs.iter01_scf_output_parameters.pk == scf.outputs.output_parameters.pk
    # what `aiida-eqml hubbard run --submit` prints while it follows the loop: the prediction, marked as replaced,
    # then the hp.x values the loop went on with
    from aiida_eqml.cli.hubbard import _print_progress

    printed = set()
    with contextlib.redirect_stdout(io.StringIO()) as out:
        _print_progress(node, printed)
    lines = out.getvalue().splitlines()
    assert printed == {(1, 'ml'), (1, 'hp')} and len(lines) == 2, lines
    assert lines[0].startswith('iteration 1 [ml prediction; spread ') and 'hp.x runs instead' in lines[0]
    assert lines[1].startswith('iteration 1 [hp.x, used]: U(') and f'= {hp_u[0]:.3f}' in lines[1]


def test_ml_loop_converges_and_reaches_the_dft_labels(ml_run, trained_model, fallback_run):
    from aiida import orm

    from aiida_eqml.calculations.functions.predict import hubbard_record_from_nodes
    from aiida_eqml.ml.predict import Predictor

    results, node = ml_run
    assert node.is_finished_ok, (node.exit_status, node.exit_message)
    history = results['history'].get_list()
    assert {record['source'] for record in history} == {'ml'} and history[-1]['converged']
    assert 2 <= len(history) <= 4 and not any(r['converged'] for r in history[:-1])
    assert not node.base.links.get_outgoing(link_label_filter='iteration_%_hp').all()  # no hp.x inside the loop
    from aiida_eqml.cli.hubbard import _print_progress

    with contextlib.redirect_stdout(io.StringIO()) as out:
        _print_progress(node, set())
    lines = out.getvalue().splitlines()  # one prediction per iteration, none replaced
    assert [line.split(' [')[0] for line in lines] == [f'iteration {r["iteration"]}' for r in history], lines
    assert all('[ml prediction]:' in line for line in lines), lines
    # its labels were on Ni 3d and O 2p, the parameters the loop asks, so the element check let it run
    assert trained_model[0].read()[2]['hubbard']['u_species'] == ['Ni', 'O']

    # Each scf ran with the previous iteration's prediction, and from the previous ground state. The insulator's
    # later iterations skip the smearing scf: the fixed-occupation scf restarts from the last one, with the band count
    # and the (zero) total magnetization of iteration 1's smearing scf.
    links = node.base.links
    smearing_1 = links.get_outgoing(link_label_filter='iteration_01_scf_smearing').one().node
    fixed_1 = links.get_outgoing(link_label_filter='iteration_01_scf_fixed_magnetic').one().node
    fixed_2 = links.get_outgoing(link_label_filter='iteration_02_scf_fixed_magnetic').one().node
    assert not links.get_outgoing(link_label_filter='iteration_02_scf_smearing').all()
    assert set(history[1]['steps']) == {'scf_fixed', 'prediction'}
    predicted_1 = {row['atoms'][0]: row['value'] for row in history[0]['parameters']}
    assert onsite_u(fixed_2.inputs.pw.structure) == pytest.approx(predicted_1)
    assert fixed_2.inputs.pw.parent_folder.pk == fixed_1.outputs.remote_folder.pk
    system_2 = fixed_2.inputs.pw.parameters['SYSTEM']
    assert fixed_2.inputs.pw.parameters['ELECTRONS']['startingpot'] == 'file' and system_2['occupations'] == 'fixed'
    assert system_2['tot_magnetization'] == 0
    assert system_2['nbnd'] == smearing_1.outputs.output_parameters['number_of_bands']

    # The output is the model's own fixed point: predicting again from the last scf's occupations, through the
    # ML layer directly, gives the output U (to float32 rounding), and it moved away from the starting 5 eV.
    last = node.base.links.get_outgoing(link_label_filter=f'iteration_{len(history):02d}_occupations').one().node
    occupations = last.outputs.occupations
    record = hubbard_record_from_nodes(last.inputs.structure, occupations)
    again = Predictor([trained_model[0].load()]).predict_hubbard(record)[0]
    output_u = onsite_u(results['hubbard_structure'])
    assert output_u[0] == pytest.approx(float(again['hubbard_u'][0]), abs=1e-4)
    assert abs(output_u[0] - 5.0) > 0.3

    # Physics of the last scf: an AFM insulator, gapped in both spin channels, opposite Ni moments.
    final = history[-1]
    assert final['is_insulator'] and final['band_gap_up_ev'] > 0 and final['band_gap_down_ev'] > 0
    moments = final['atomic_magnetic_moments']
    assert moments[0] > 1.0 and moments[1] == pytest.approx(-moments[0], abs=0.02)
    assert abs(final['total_magnetization']) < 0.05

    # Provenance: output <- prediction <- model <- training CalcJob <- hp.x labels <- the pw.x and hp.x runs.
    query = orm.QueryBuilder().append(orm.Node, filters={'id': results['hubbard_structure'].pk}, tag='out')
    query.append(orm.CalcJobNode, with_descendants='out', project='attributes.process_label')
    ancestors = set(query.all(flat=True))
    assert {'EqmlTrainCalculation', 'PwCalculation', 'HpCalculation'} <= ancestors
    model_node, train_node = trained_model
    hp_fallback = fallback_run[1].base.links.get_outgoing(link_label_filter='iteration_01_hp').one().node
    hp_calcs = [n.pk for n in hp_fallback.called_descendants if isinstance(n, orm.CalcJobNode)]
    query = orm.QueryBuilder().append(orm.Node, filters={'id': results['hubbard_structure'].pk}, tag='out')
    query.append(orm.CalcJobNode, with_descendants='out', filters={'id': {'in': hp_calcs}}, project='id')
    assert query.count() >= 1


def test_skipping_the_smearing_scf_leaves_the_parameters_unchanged(ml_run, qe_codes, trained_model, loop_structure):
    """The measurement behind the default: with aiida-hubbard's smearing scf in every iteration, the first two
    iterations predict the same U (the fixed-occupation scf reaches the same ground state either way)."""
    from aiida import orm
    from aiida.engine import run_get_node

    builder = loop_builder(qe_codes, loop_structure.clone(), trained_model[0], hp=False, max_iterations=2)
    builder.smearing_every_iteration = orm.Bool(True)
    results, node = run_get_node(builder)
    assert node.exit_status in (0, 601), (node.exit_status, node.exit_message)  # 601: not converged in 2
    every = results['history'].get_list()
    skipped = ml_run[0]['history'].get_list()
    assert set(every[1]['steps']) == {'scf_smearing', 'scf_fixed', 'prediction'}
    for with_smearing, without in zip(every, skipped[:2]):
        values = {tuple(row['atoms']): row['value'] for row in without['parameters']}
        assert {tuple(row['atoms']): row['value'] for row in with_smearing['parameters']} == pytest.approx(
            values, abs=2e-3)
        assert with_smearing['total_energy_ev'] == pytest.approx(without['total_energy_ev'], abs=1e-3)


def test_validation_compares_with_hp_at_the_same_ground_state(ml_run):
    results, node = ml_run
    comparison = results['dfpt_comparison'].get_dict()
    validation = node.base.links.get_outgoing(link_label_filter='validation_hp').one().node
    last = len(results['history'].get_list())
    last_scf = node.base.links.get_outgoing(link_label_filter=f'iteration_{last:02d}_scf_fixed_magnetic').one().node
    assert validation.inputs.hp.parent_scf.pk == last_scf.outputs.remote_folder.pk  # the ground state predicted from
    dfpt_u = onsite_u(validation.outputs.hubbard_structure)
    rows = {row['atoms'][0]: row for row in comparison['parameters'] if row['kind'] == 'U'}
    output_u = onsite_u(results['hubbard_structure'])
    for atom in (0, 1):
        assert rows[atom]['ml'] == pytest.approx(output_u[atom]) and rows[atom]['dfpt'] == pytest.approx(dfpt_u[atom])
        assert rows[atom]['abs_diff'] == pytest.approx(abs(output_u[atom] - dfpt_u[atom]))
    # The model was trained on one hp.x label, at U_scf = 5 eV; at the converged U the ground state differs and a
    # one-label model cannot know how hp.x's answer moves with it: measured 0.07-0.50 eV, bounded loosely.
    assert 0.0 < comparison['mae_u'] < 1.5
    u_rows = [row for row in comparison['parameters'] if row['kind'] == 'U']  # Ni1, Ni2 and the O 2p site
    assert comparison['mare_u'] == pytest.approx(np.mean([row['abs_diff'] / abs(row['dfpt']) for row in u_rows]))
    # The validation label joins the new labels.
    assert len(results['new_labels'].get_dataset()) == 1


def test_inputs_outside_the_models_domain_are_refused_before_anything_runs(
    aiida_profile, qe_codes, pseudo_family, untrained_models, loop_structure, tmp_path
):
    from aiida import orm
    from aiida.engine import run_get_node
    from conftest import make_nio_afm_hubbard_structure

    from aiida_eqml.data.model import EqmlModelData
    from aiida_eqml.ml.hubbard.protocol import REFERENCE_PROTOCOL
    from aiida_eqml.ml.modelfile import read_model_file, save_model

    def refused(builder, *phrases):
        before = orm.QueryBuilder().append(orm.ProcessNode).count()
        with pytest.raises(ValueError) as info:
            run_get_node(builder)
        assert orm.QueryBuilder().append(orm.ProcessNode).count() == before  # nothing stored, nothing ran
        for phrase in phrases:
            assert phrase in str(info.value)

    # An element the models never saw (Ni -> Mn).
    mno = make_nio_afm_hubbard_structure()
    mno = mno.__class__(cell=mno.cell, sites=[(('Mn' if s.kind_name.startswith('Ni') else 'O'),
                                              s.kind_name.replace('Ni', 'Mn'), s.position) for s in mno.sites])
    for kind in ('Mn1', 'Mn2'):
        mno.initialize_onsites_hubbard(kind, '3d', 5.0, 'Ueff', use_kinds=True)
    builder = loop_builder(qe_codes, loop_structure, untrained_models, hp=False)
    builder.hubbard_structure = mno
    builder.scf.pw.parameters = orm.Dict({**builder.scf.pw.parameters.get_dict(), 'SYSTEM': {
        **builder.scf.pw.parameters['SYSTEM'], 'starting_magnetization': {'Mn1': 0.5, 'Mn2': -0.5, 'O': 0.0}}})
    refused(builder, "element(s) ['Mn']")

    # V parameters for a model without a V head.
    with_v = loop_structure.clone()
    with_v.append_hubbard_parameter(0, '3d', 2, '2p', 1.0, (-1, 0, 0), 'V')
    builder = loop_builder(qe_codes, with_v, untrained_models, hp=False)
    refused(builder, 'no inter-site V')

    # A model trained at another DFT protocol (the reference 60/240 Ry; the test stack runs 30/120 Ry).
    exported = tmp_path / 'exported.eqml'
    untrained_models[0].export(exported)
    config, params, metadata = read_model_file(exported)
    path = tmp_path / 'reference-protocol.eqml'
    save_model(path, config, params, {**metadata, 'protocol': REFERENCE_PROTOCOL})
    foreign = EqmlModelData(filepath=path).store()
    builder = loop_builder(qe_codes, loop_structure, foreign, hp=False)
    assert builder.scf.pw.parameters['SYSTEM']['ecutwfc'] == 60.0  # the builder follows the model's protocol ...
    parameters = builder.scf.pw.parameters.get_dict()
    parameters['SYSTEM'].update({'ecutwfc': 30.0, 'ecutrho': 120.0})  # ... a user who changes it is refused
    builder.scf.pw.parameters = orm.Dict(parameters)
    refused(builder, 'ecutwfc_ry: model 60.0, run 30.0', 'eqml-hubbard-reference-v1')

    # U of an element that no training label carried: the models know Ni 3d and (from their slots) l = 1, but a model
    # whose labels were all on Ni says nothing about U(O 2p), which the structure asks.
    path = tmp_path / 'ni-labels-only.eqml'
    save_model(path, config, params, {**metadata, 'hubbard': {**metadata.get('hubbard', {}), 'u_species': ['Ni']}})
    ni_only = EqmlModelData(filepath=path).store()
    refused(loop_builder(qe_codes, loop_structure, ni_only, hp=False), "trained on U labels of ['Ni']",
            "asks U of ['O']")

    # A fallback threshold without hp.x inputs.
    builder = loop_builder(qe_codes, loop_structure, untrained_models, hp=False)
    builder.uncertainty_threshold = orm.Float(0.1)
    refused(builder, 'need hp.x')


def test_metal_takes_the_smearing_only_path(aiida_profile, qe_codes, pseudo_family, untrained_models):
    """FM NiO at the 30 Ry test cutoffs is a (spurious) metal in its majority channel (docs/hubbard.md)."""
    from aiida.engine import run_get_node
    from aiida_quantumespresso.common.types import SpinType

    from aiida_eqml.local.hubbard_materials import hubbard_structure
    from aiida_eqml.workflows.hubbard.self_consistent import SelfConsistentMLHubbardWorkChain

    structure = hubbard_structure('NiO-rocksalt-fm')
    structure.initialize_onsites_hubbard('O', '2p', 1.0, 'Ueff', use_kinds=True)
    builder = SelfConsistentMLHubbardWorkChain.get_builder_from_protocol(
        qe_codes['pw'], structure, untrained_models, protocol='fast',
        overrides={'meta_convergence': False, 'scf': {'kpoints_distance': 0.9}},
        spin_type=SpinType.COLLINEAR, initial_magnetic_moments={'Ni': 2.0, 'O': 0.0},
    )
    results, node = run_get_node(builder)
    assert node.is_finished_ok, (node.exit_status, node.exit_message)
    (record,) = results['history'].get_list()
    assert not record['is_insulator'] and min(record['band_gap_up_ev'], record['band_gap_down_ev']) == 0.0
    assert set(record['steps']) == {'scf_smearing', 'prediction'}
    labels = [link.link_label for link in node.base.links.get_outgoing().all()]
    assert not any('scf_fixed' in label for label in labels)


def test_cli_refuses_a_species_the_models_lack(aiida_profile, qe_codes, pseudo_family, untrained_models, tmp_path):
    """``aiida-eqml hubbard run`` on a structure file: kinds from the ASE tags, U on the 3d metal, and the models'
    domain check reported as a clear error before anything runs."""
    import ase.io
    from aiida import orm
    from click.testing import CliRunner

    from aiida_eqml.cli.main import cli
    from aiida_eqml.local.hubbard_materials import hubbard_structure

    atoms = hubbard_structure('MnO-rocksalt-afm2').get_ase()  # tags 1 / 2 on the two Mn sublattices
    path = tmp_path / 'MnO.extxyz'
    ase.io.write(path, atoms)
    before = orm.QueryBuilder().append(orm.ProcessNode).count()
    result = CliRunner().invoke(cli, [
        'hubbard', 'run', str(path), '--model', str(untrained_models[0].pk), '--no-hp',
        '--magnetization', 'Mn1=4,Mn2=-4', '--profile', aiida_profile.name,
    ])
    assert result.exit_code != 0
    assert "element(s) ['Mn']" in result.output, result.output
    assert orm.QueryBuilder().append(orm.ProcessNode).count() == before


@pytest.fixture(scope='module')
def mixed_run(qe_codes, trained_model, loop_structure):
    """The trained model's loop with Anderson mixing (depth 1), held from converging (tolerance 0) for 3 iterations
    so that iteration 3 runs on an extrapolated input. (The trained model's map is nearly flat: plain iteration
    converges in 2 at any tolerance, so acceleration itself is measured by benchmarks/hubbard_mixing.py and on
    known maps in test_hubbard_mixing.py; here the wiring and provenance are real.)"""
    from aiida import orm
    from aiida.engine import run_get_node

    builder = loop_builder(qe_codes, loop_structure.clone(), trained_model[0], hp=False, max_iterations=3,
                           tolerance_onsite=0.0)
    builder.anderson_depth = orm.Int(1)
    return run_get_node(builder)


def test_anderson_mixing_feeds_the_extrapolated_input_to_the_next_scf(mixed_run, ml_run):
    from aiida import orm

    results, node = mixed_run
    assert node.exit_status == 601, (node.exit_status, node.exit_message)  # tolerance 0: never converged
    history = results['history'].get_list()
    # iteration 1: one point, plain step; 2: extrapolated; 3 (the last): the prediction, never an unevaluated input
    assert [r['next_input'] for r in history] == ['output', 'anderson', 'output']
    mixing = node.base.links.get_outgoing(link_label_filter='anderson_iteration_02').one().node
    assert mixing.process_label == 'anderson_mixed'
    extrapolated = mixing.outputs.result
    # iteration 3's scf ran on the extrapolated structure (provenance), and its history shows those inputs
    scf_inputs = [calc.inputs.structure.pk for calc in node.called_descendants
                  if isinstance(calc, orm.CalcJobNode) and calc.process_label == 'PwCalculation']
    assert extrapolated.pk in scf_inputs
    assert {row['atoms'][0]: row['input'] for row in history[2]['parameters']} == pytest.approx(
        onsite_u(extrapolated), abs=1e-9)
    # the extrapolation stays within 10 residuals of the prediction it extrapolates from
    residual = max(abs(row['value'] - row['input']) for row in history[1]['parameters'])
    predicted = {row['atoms'][0]: row['value'] for row in history[1]['parameters']}
    assert all(abs(onsite_u(extrapolated)[k] - predicted[k]) <= 10 * residual + 1e-9 for k in predicted)
    # the output is the last prediction, and the same fixed point as plain iteration (ml_run)
    assert onsite_u(results['hubbard_structure']) == pytest.approx(
        {row['atoms'][0]: row['value'] for row in history[-1]['parameters']}, abs=1e-9)
    assert onsite_u(results['hubbard_structure']) == pytest.approx(
        onsite_u(ml_run[0]['hubbard_structure']), abs=0.01)
