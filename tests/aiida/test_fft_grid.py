"""The FFT grid hp.x needs: one size on the axes a symmetry mixes (:mod:`aiida_eqml.workflows.hubbard.fft_grid`).

Anatase TiO2's body-centred primitive cell at 240 Ry: pw.x 7.2 chose (60, 60, 54) (measured in the campaign's first
anatase runs, `FFT dimensions` of the scf output) and hp.x then stopped in scale_sym_ops. The sizes here are checked
against that measured choice, so the estimate of pw.x's own grid is pw.x's, not a guess that agrees with itself.
"""
import pytest


def test_anatase_gets_one_size_and_other_cells_keep_pw_x_choice(aiida_profile):
    from aiida_eqml.local.hubbard_materials import MATERIALS, hubbard_structure
    from aiida_eqml.workflows.hubbard import fft_grid

    anatase = hubbard_structure('TiO2-anatase').get_ase()
    # pw.x's own per-axis sizes (start size, then enlarged for the 1/4 translations along a1 and a2): measured
    base = fft_grid._axis_sizes(anatase.cell[:], 240.0)
    assert [fft_grid._good_fft_order(n, d) for n, d in zip(base, (4, 4, 1))] == [60, 60, 54]
    assert fft_grid.symmetric_fft_grid(anatase, 240.0) == {'nr1': 60, 'nr2': 60, 'nr3': 60}

    # cells whose grid pw.x already makes consistent are left to pw.x (their labels stay as they were)
    for name in MATERIALS:
        if name != 'TiO2-anatase':
            assert fft_grid.symmetric_fft_grid(hubbard_structure(name).get_ase(), 240.0) == {}, name


@pytest.mark.parametrize('n, divisor, expected', [(51, 1, 54), (51, 4, 60), (49, 1, 50), (61, 2, 64), (7, 1, 8)])
def test_good_fft_order(n, divisor, expected):
    from aiida_eqml.workflows.hubbard.fft_grid import _good_fft_order

    assert _good_fft_order(n, divisor) == expected


def test_with_symmetric_fft_grid_keeps_a_users_grid_and_leaves_other_cells(aiida_profile):
    from aiida_eqml.local.hubbard_materials import hubbard_structure
    from aiida_eqml.workflows.hubbard.fft_grid import with_symmetric_fft_grid

    anatase, rocksalt = hubbard_structure('TiO2-anatase'), hubbard_structure('NiO-rocksalt-afm2')
    parameters = {'SYSTEM': {'ecutwfc': 60.0, 'ecutrho': 240.0}, 'ELECTRONS': {'conv_thr': 1e-8}}
    with_grid = with_symmetric_fft_grid(parameters, anatase)
    assert with_grid['SYSTEM'] == {'ecutwfc': 60.0, 'ecutrho': 240.0, 'nr1': 60, 'nr2': 60, 'nr3': 60}
    assert with_grid['ELECTRONS'] == parameters['ELECTRONS'] and 'nr1' not in parameters['SYSTEM']  # a copy
    assert with_symmetric_fft_grid(parameters, rocksalt) is parameters
    users = {'SYSTEM': {'ecutrho': 240.0, 'nr1': 64, 'nr2': 64, 'nr3': 64}}
    assert with_symmetric_fft_grid(users, anatase) is users


def test_labels_work_chain_gives_each_structure_its_grid(aiida_profile, qe_codes, pseudo_family):
    """``eqml.labels.hubbard`` shares one scf parameter set across its structures; the grid is set per structure
    when each loop's inputs are made (anatase gets one size on all axes, rock salt nothing)."""
    from aiida.engine.utils import instantiate_process
    from aiida.manage import get_manager

    from aiida_eqml.local.hubbard_materials import hubbard_structure
    from aiida_eqml.workflows.hubbard.fft_grid import symmetric_fft_grid
    from aiida_eqml.workflows.labels.hubbard import HubbardLabelsWorkChain

    structures = {'anatase': hubbard_structure('TiO2-anatase'), 'nio': hubbard_structure('NiO-rocksalt-afm2')}
    overrides = {'hubbard_loop': {'scf': {'pw': {'parameters': {'SYSTEM': {'ecutwfc': 60.0, 'ecutrho': 240.0}}}}}}
    builder = HubbardLabelsWorkChain.get_builder_from_protocol(
        qe_codes['pw'], qe_codes['hp'], structures, protocol='fast', overrides=overrides)
    process = instantiate_process(get_manager().get_runner(), builder)
    systems = {key: process.get_item_inputs(key, structure).scf.pw.parameters.get_dict()['SYSTEM']
               for key, structure in process.inputs.structures.items()}
    assert systems['anatase']['ecutrho'] == 240.0
    assert {k: systems['anatase'][k] for k in ('nr1', 'nr2', 'nr3')} == {'nr1': 60, 'nr2': 60, 'nr3': 60}
    assert symmetric_fft_grid(structures['nio'].get_ase(), 240.0) == {}
    assert not any(key in systems['nio'] for key in ('nr1', 'nr2', 'nr3'))


def test_ml_loop_scf_gets_the_grid_only_when_hp_x_may_run(aiida_profile, qe_codes, pseudo_family):
    """The ML loop sets the grid on each scf (its current structure) when it has hp.x inputs (fallback,
    validation); without them no hp.x runs and pw.x keeps its own grid."""
    from aiida.engine.utils import instantiate_process
    from aiida.manage import get_manager

    from aiida_eqml.cli.hubbard import load_models
    from aiida_eqml.local.hubbard_materials import hubbard_structure
    from aiida_eqml.workflows.hubbard.self_consistent import SelfConsistentMLHubbardWorkChain
    from aiida_eqml.workflows.hubbard.steps import scf_inputs

    anatase = hubbard_structure('TiO2-anatase')
    models = load_models(('hubbard-tmo',))
    grids = {}
    for hp in (True, False):
        builder = SelfConsistentMLHubbardWorkChain.get_builder_from_protocol(
            qe_codes['pw'], anatase, models, hp_code=qe_codes['hp'] if hp else None)
        process = instantiate_process(get_manager().get_runner(), builder)
        process.ctx.iteration, process.ctx.magnetic_moments, process.ctx.restart_folder = 1, None, None
        process.ctx.current = process.inputs.hubbard_structure
        system = scf_inputs(process, fixed=False).pw.parameters.get_dict()['SYSTEM']
        grids[hp] = tuple(system.get(key) for key in ('nr1', 'nr2', 'nr3'))
        assert system['ecutrho'] == 240.0  # the shipped model's protocol
    assert grids == {True: (60, 60, 60), False: (None, None, None)}
