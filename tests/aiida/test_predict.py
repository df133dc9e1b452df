"""Prediction calcfunctions: equivariant tensors, ensembles, refusals, and provenance back to the DFT labels."""
from __future__ import annotations

import numpy as np
import pytest
from conftest_train import ensure_entry_points, random_model_file, tiny_dataset


@pytest.fixture(scope='module')
def model_nodes(aiida_profile, tmp_path_factory):
    """Two stored untrained models (seeds 0 and 1) of the tiny Born-charge / dielectric architecture."""
    from aiida_eqml.data.model import EqmlModelData

    ensure_entry_points()
    folder = tmp_path_factory.mktemp('models')
    return [EqmlModelData(filepath=random_model_file(folder / f'm{seed}.eqml', seed)[0]).store() for seed in (0, 1)]


def tio_structure(rotation=None):
    from aiida import orm

    sample = tiny_dataset(1, seed=11)[0]
    rotation = np.eye(3) if rotation is None else rotation
    structure = orm.StructureData(cell=(sample.cell @ rotation.T).tolist())
    for z, position in zip(sample.numbers, sample.positions @ rotation.T):
        structure.append_atom(position=tuple(position), symbols={8: 'O', 22: 'Ti'}[int(z)])
    return structure


def random_rotation(seed=5):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    return q * np.sign(np.linalg.det(q))


def test_tensors_are_cartesian_and_equivariant(model_nodes):
    from aiida_eqml.calculations.functions.predict import predict_tensors

    structure = tio_structure()
    result, node = predict_tensors.run_get_node(structure, model=model_nodes[0])
    assert node.is_finished_ok
    born, eps = result.get_array('born_charges'), result.get_array('dielectric')
    assert born.shape == (4, 3, 3) and eps.shape == (3, 3)
    np.testing.assert_allclose(eps, eps.T, atol=1e-5)  # ij=ji head: symmetric by construction
    assert np.abs(born).max() > 1e-3  # not trivially zero

    rotation = random_rotation()
    rotated = predict_tensors(tio_structure(rotation), model=model_nodes[0])
    np.testing.assert_allclose(rotated.get_array('born_charges'), rotation @ born @ rotation.T, atol=2e-4)
    np.testing.assert_allclose(rotated.get_array('dielectric'), rotation @ eps @ rotation.T, atol=2e-4)
    # Provenance: the prediction is created by the calcfunction whose inputs are the model and the structure.
    assert {link.node.uuid for link in node.base.links.get_incoming().all()} == {model_nodes[0].uuid, structure.uuid}
    assert result.base.attributes.get('model_uuids') == [model_nodes[0].uuid]


def test_ensemble_mean_and_spread(model_nodes):
    from aiida_eqml.calculations.functions.predict import predict_tensors

    structure = tio_structure()
    single = [predict_tensors(structure, model=node).get_array('born_charges') for node in model_nodes]
    ensemble = predict_tensors(structure, seed_0=model_nodes[0], seed_1=model_nodes[1])
    np.testing.assert_allclose(ensemble.get_array('born_charges'), np.mean(single, axis=0), atol=1e-6)
    np.testing.assert_allclose(ensemble.get_array('born_charges_std'), np.std(single, axis=0), atol=1e-6)
    assert ensemble.get_array('born_charges_std').max() > 0  # different seeds disagree


def test_unknown_species_refused_with_exit_code(model_nodes):
    from aiida import orm

    from aiida_eqml.calculations.functions.predict import predict_tensors

    structure = orm.StructureData(cell=(4.0 * np.eye(3)).tolist())
    structure.append_atom(position=(0, 0, 0), symbols='Ba')
    structure.append_atom(position=(2, 2, 2), symbols='Ti')
    result, node = predict_tensors.run_get_node(structure, model=model_nodes[0])
    assert node.exit_status == 310
    assert "trained on species ['O', 'Ti']" in node.exit_message and "element(s) ['Ba']" in node.exit_message
    assert result == {} and not node.base.links.get_outgoing().all()


# ====================================================================== provenance down to pw.x
SI_A = 5.43


def si_cell(scale, seed):
    from aiida import orm

    a = SI_A * scale
    cell = 0.5 * a * (np.ones((3, 3)) - np.eye(3))
    positions = np.array([[0.0, 0.0, 0.0], [0.25 * a] * 3]) + 0.04 * np.random.default_rng(seed).normal(size=(2, 3))
    structure = orm.StructureData(cell=cell.tolist())
    for position in positions:
        structure.append_atom(position=tuple(position), symbols='Si')
    return structure


SI_MODEL = {
    'cutoff': 3.0,
    'num_layers': 1,
    'hidden_irreps': '8x0e + 4x1o + 4x1e + 4x2e',
    'radial_hidden': [16],
    'num_radial_basis': 6,
    'heads': {
        'forces': {'level': 'node', 'tensor': 'i'},
        'stress': {'level': 'graph', 'tensor': 'ij=ji', 'reduce': 'mean'},
    },
}


@pytest.mark.qe
def test_prediction_provenance_reaches_the_dft_calculations(aiida_profile, qe_codes, pseudo_family, tmp_path):
    """pw.x labels -> harvested dataset -> eqml.train CalcJob -> eqml.model -> prediction: one connected graph."""
    from aiida import orm
    from aiida.engine import run_get_node

    from aiida_eqml.calculations.functions.predict import predict_tensors
    from aiida_eqml.calculations.train import EqmlTrainCalculation, get_or_create_python_code
    from aiida_eqml.data.model import EqmlModelData
    from aiida_eqml.workflows.labels.energies import EnergyLabelsWorkChain

    ensure_entry_points()
    builder = EnergyLabelsWorkChain.get_builder_from_protocol(
        qe_codes['pw'], [si_cell(0.98, 1), si_cell(1.02, 2), si_cell(1.0, 3)], protocol='fast',
        overrides={'pw_base': {'kpoints_distance': 1.1}},
    )
    labels, labels_node = run_get_node(builder)
    assert labels_node.is_finished_ok, labels_node.exit_message
    dataset = labels['dataset']

    train = EqmlTrainCalculation.get_builder()
    train.code = get_or_create_python_code(qe_codes['pw'].computer)
    train.datasets = {'si': dataset}
    train.config = orm.Dict({
        'model': SI_MODEL, 'epochs': 2, 'batch_size': 2, 'progress': False,
        'split': {'train': [0, 1], 'val': [2], 'test': []},
    })
    trained, train_node = run_get_node(train)
    assert train_node.is_finished_ok, (train_node.exit_status, train_node.exit_message)
    model = trained['model']
    assert model.species == ['Si'] and model.targets == ['forces', 'stress']

    new_structure = si_cell(1.01, 4)
    prediction, predict_node = predict_tensors.run_get_node(new_structure, model=model)
    assert predict_node.is_finished_ok
    forces = prediction.get_array('forces')
    assert forces.shape == (2, 3) and np.all(np.isfinite(forces))

    # The graph: prediction <- predict_tensors <- model <- eqml.train <- dataset <- harvest <- pw.x outputs
    # <- PwCalculation
    query = orm.QueryBuilder()
    query.append(orm.ArrayData, filters={'id': prediction.pk}, tag='prediction')
    query.append(orm.CalcJobNode, with_descendants='prediction', project='id', tag='calcs')
    ancestors = set(query.all(flat=True))
    pw_calcs = {
        calc.pk for calc in labels_node.called_descendants
        if isinstance(calc, orm.CalcJobNode) and calc.process_type == 'aiida.calculations:quantumespresso.pw'
    }
    assert len(pw_calcs) == 3
    assert pw_calcs <= ancestors  # every pw.x run that made a label
    assert train_node.pk in ancestors
    path = orm.QueryBuilder().append(orm.ArrayData, filters={'id': prediction.pk}, tag='p').append(
        EqmlModelData, with_descendants='p', project='id'
    ).all(flat=True)
    assert path == [model.pk]


# ====================================================================== Hubbard U / V
@pytest.fixture(scope='module')
def nio_occupations(aiida_profile):
    """AFM NiO (U on Ni 3d and O 2p) and the occupation matrices of its real QE 7.2 scf (fixture files)."""
    from test_occupations import nio_structure, retrieved_folder

    from aiida_eqml.calculations.functions.occupations import extract_occupations

    ensure_entry_points()
    structure = nio_structure(False).store()
    result = extract_occupations(retrieved=retrieved_folder('nio_u'), structure=structure)
    return structure, result['occupations']


def hubbard_model_node(folder, structure, occupations, seed, species=('Ni', 'O')):
    """An untrained U model whose descriptor slots fit the NiO record (random weights, seeded)."""
    import jax

    from aiida_eqml.calculations.functions.predict import hubbard_record_from_nodes
    from aiida_eqml.data.model import EqmlModelData
    from aiida_eqml.ml.dataset import build_graphs
    from aiida_eqml.ml.graph import PaddingBuckets
    from aiida_eqml.ml.hubbard.models import hubbard_model_config
    from aiida_eqml.ml.hubbard.records import hubbard_training_dataset
    from aiida_eqml.ml.modelfile import save_model
    from aiida_eqml.ml.models import build_model

    dataset, attrs = hubbard_training_dataset(hubbard_record_from_nodes(structure, occupations))
    model = build_model(hubbard_model_config(list(species), attrs, cutoff=3.5, predict_v=False))
    graphs = build_graphs(dataset, {**model.config, 'species': ['Ni', 'O']})
    params = model.init(jax.random.PRNGKey(seed), PaddingBuckets()(graphs))
    path = folder / f'u{seed}.eqml'
    save_model(path, model.config, params, {'target_specs': dataset.target_specs})
    return EqmlModelData(filepath=path).store()


def test_predict_hubbard_u(nio_occupations, tmp_path):
    from aiida_eqml.calculations.functions.predict import predict_hubbard

    structure, occupations = nio_occupations
    members = [hubbard_model_node(tmp_path, structure, occupations, seed) for seed in (0, 1)]
    result, node = predict_hubbard.run_get_node(structure, occupations, seed_0=members[0], seed_1=members[1])
    assert node.is_finished_ok, node.exit_message
    predicted, spread = result['hubbard_structure'], result['spread'].get_dict()
    # U on Ni1, Ni2 and the O kind (aiida-quantumespresso keeps one on-site parameter per kind with use_kinds)
    assert spread['n_members'] == 2 and len(spread['parameters']) == len(structure.hubbard.parameters) == 3
    u = {entry['atom_index']: entry for entry in spread['parameters']}
    # AFM: Ni2's occupations are Ni1's with the spins swapped; the descriptors are spin-swap invariant, so one U.
    assert u[0]['mean'] == pytest.approx(u[1]['mean'], abs=1e-4)
    assert all(entry['std'] > 0 for entry in spread['parameters'])  # two seeds disagree
    assert all(entry['input'] in (5.0, 1.0) for entry in spread['parameters'])
    # The new structure carries the ensemble means, everything else as in the input.
    for before, after in zip(structure.hubbard.parameters, predicted.hubbard.parameters):
        assert (after.atom_index, after.atom_manifold, after.hubbard_type) == (
            before.atom_index,
            before.atom_manifold,
            before.hubbard_type,
        )
        assert after.value == pytest.approx(u[after.atom_index]['mean'])
    assert predicted.get_ase() == structure.get_ase()
    inputs = {link.node.uuid for link in node.base.links.get_incoming().all()}
    assert inputs == {structure.uuid, occupations.uuid, members[0].uuid, members[1].uuid}


def test_predict_hubbard_refuses_unknown_species(nio_occupations, tmp_path):
    from aiida_eqml.calculations.functions.predict import predict_hubbard

    structure, occupations = nio_occupations
    foreign = hubbard_model_node(tmp_path, structure, occupations, 0, species=('Mn', 'Ni'))  # knows no O
    result, node = predict_hubbard.run_get_node(structure, occupations, model=foreign)
    assert node.exit_status == 310 and "element(s) ['O']" in node.exit_message
    assert result == {}


def test_hubbard_model_trained_by_the_calcjob_predicts_u_and_v(aiida_profile, tmp_path):
    """Real DFT+U+V occupations -> harvested U/V labels -> ``eqml.train`` CalcJob -> ``predict_hubbard``.

    The training process recognises the Hubbard record by itself (no heads or descriptor irreps in the config),
    and writes the descriptor slots into the model file, where the prediction reads them.
    """
    from aiida import orm
    from aiida.engine import run_get_node
    from conftest import make_nio_afm_hubbard_structure
    from conftest_train import local_computer
    from test_occupations import nio_structure, retrieved_folder

    from aiida_eqml.calculations.functions.harvest import harvest_hubbard_labels
    from aiida_eqml.calculations.functions.occupations import extract_occupations
    from aiida_eqml.calculations.functions.predict import predict_hubbard
    from aiida_eqml.calculations.train import EqmlTrainCalculation, get_or_create_python_code

    ensure_entry_points()
    structure = nio_structure(True).store()
    occupations = extract_occupations(retrieved=retrieved_folder('nio_uv'), structure=structure)['occupations']
    labels = make_nio_afm_hubbard_structure()  # what hp.x returns: new U on both Ni, new V on both couples
    labels.clear_hubbard_parameters()
    for atom in (0, 1):
        labels.append_hubbard_parameter(atom, '3d', atom, '3d', 6.4, (0, 0, 0), 'U')
    labels.append_hubbard_parameter(0, '3d', 2, '2p', 0.9, (-1, 0, 0), 'V')
    labels.append_hubbard_parameter(1, '3d', 2, '2p', 0.9, (0, 0, 1), 'V')
    dataset = harvest_hubbard_labels(nio_structure=structure, nio_occupations=occupations, nio_hubbard=labels.store())

    builder = EqmlTrainCalculation.get_builder()
    builder.code = get_or_create_python_code(local_computer(str(tmp_path / 'work'), label='eqml-hubbard-localhost'))
    builder.datasets = {'nio': dataset}
    builder.config = orm.Dict({
        'model': {'cutoff': 3.5, 'hidden_irreps': '8x0e + 2x1o + 2x2e', 'num_layers': 1},
        'epochs': 60, 'batch_size': 1, 'split': {'train': [0], 'val': [], 'test': []}, 'progress': False,
    })
    builder.metadata.options.resources = {'num_machines': 1, 'num_mpiprocs_per_machine': 1}
    trained, train_node = run_get_node(builder)
    assert train_node.is_finished_ok, (train_node.exit_status, train_node.exit_message)
    model = trained['model']
    assert sorted(model.targets) == ['hubbard_u', 'hubbard_v']
    _, _, metadata = model.read()
    # Ni 3d and O 2p; the couples in both directions (occup.txt gives n^IJ and n^JI)
    # (and which elements carried the labels: U on Ni, V on Ni-O, what the loop's domain check reads)
    assert metadata['hubbard'] == {'manifold_ls': [1, 2], 'pair_ls': [[1, 2], [2, 1]], 'u_species': ['Ni'],
                                   'v_species_pairs': [['Ni', 'O']]}

    result, node = predict_hubbard.run_get_node(structure, occupations, model=model)
    assert node.is_finished_ok, node.exit_message
    values = {(p.atom_index, p.neighbour_index): p.value for p in result['hubbard_structure'].hubbard.parameters}
    assert set(values) == {(0, 0), (1, 1), (0, 2), (1, 2)}  # the parameters of the input structure, new values
    assert values[(0, 0)] == pytest.approx(6.4, abs=0.15) and values[(1, 1)] == pytest.approx(6.4, abs=0.15)  # U
    assert values[(0, 2)] == pytest.approx(0.9, abs=0.15) and values[(1, 2)] == pytest.approx(0.9, abs=0.15)  # V
    # Provenance: the prediction's model was made by the training CalcJob from the harvested dataset.
    assert node.inputs.model.creator.pk == train_node.pk and train_node.inputs.datasets.nio.pk == dataset.pk
    assert dataset.creator.inputs.nio_occupations.pk == occupations.pk


def test_meaningless_structures_are_refused_with_313(model_nodes):
    """No atoms, a NaN cell, atoms on top of each other: exit 313 with the field named, never zeros or numbers."""
    from aiida import orm

    from aiida_eqml.calculations.functions.predict import predict_tensors

    empty = orm.StructureData(cell=(4 * np.eye(3)).tolist())
    overlapping = tio_structure()
    first = overlapping.sites[0]
    overlapping.append_atom(position=tuple(np.asarray(first.position) + 1e-3), symbols='O')
    for structure, phrase in ((empty, 'no atoms'), (overlapping, 'overlapping')):
        result, node = predict_tensors.run_get_node(structure, model=model_nodes[0])
        assert node.exit_status == 313, (node.exit_status, node.exit_message)
        assert phrase in node.exit_message.lower() and result == {}


def test_predict_hubbard_refuses_a_model_without_hubbard_heads(nio_occupations, model_nodes):
    from aiida_eqml.calculations.functions.predict import predict_hubbard

    structure, occupations = nio_occupations
    result, node = predict_hubbard.run_get_node(structure, occupations, model=model_nodes[0])
    assert node.exit_status == 314 and 'none of' in node.exit_message and result == {}
