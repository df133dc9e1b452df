"""``eqml.labels.energies`` run for real with the embedded pw.x on two rattled, strained Si cells."""
from __future__ import annotations

import numpy as np
import pytest

#: Si diamond lattice constant (Angstrom).
SI_A = 5.43
#: pw.x settings of the tests: 2x2x2 k-points (nosym) at the `test` cutoffs (30/120 Ry) of the fixture family.
FAST_OVERRIDES = {'pw_base': {'kpoints_distance': 1.1}}


@pytest.fixture
def eqml_entry_points(entry_points):
    from aiida.plugins.entry_point import get_entry_point_names

    if 'eqml.dataset' not in get_entry_point_names('aiida.data'):
        entry_points.add('aiida_eqml.data.dataset:EqmlDatasetData', 'aiida.data:eqml.dataset')
    return entry_points


def si_cell(scale: float, seed: int):
    """Primitive diamond Si, lattice scaled by ``scale``, atoms rattled by ~0.03 Angstrom."""
    from aiida import orm

    a = SI_A * scale
    cell = 0.5 * a * (np.ones((3, 3)) - np.eye(3))
    positions = np.array([[0.0, 0.0, 0.0], [0.25 * a] * 3])
    positions += 0.03 * np.random.default_rng(seed).normal(size=positions.shape)
    structure = orm.StructureData(cell=cell.tolist())
    for position in positions:
        structure.append_atom(position=tuple(position), symbols='Si')
    return structure


def builder_for(qe_codes, structures, **kwargs):
    from aiida_eqml.workflows.labels.energies import EnergyLabelsWorkChain

    overrides = kwargs.pop('overrides', FAST_OVERRIDES)
    return EnergyLabelsWorkChain.get_builder_from_protocol(
        qe_codes['pw'], structures, protocol='fast', overrides=overrides, **kwargs
    )


@pytest.mark.qe
def test_energy_labels_real_run(aiida_profile, qe_codes, pseudo_family, eqml_entry_points):
    from aiida import orm
    from aiida.engine import run_get_node

    from aiida_eqml.data.dataset import EqmlDatasetData

    compressed, expanded = si_cell(0.97, seed=1), si_cell(1.03, seed=2)
    builder = builder_for(qe_codes, [compressed, expanded])
    builder.max_concurrent = orm.Int(1)  # two rounds of the submission loop
    assert builder.pw_base.pw.parameters['SYSTEM']['ecutwfc'] == 30.0  # the `test` stringency of the fixture stack

    results, node = run_get_node(builder)
    assert node.is_finished_ok, (node.exit_status, node.exit_message)
    dataset_node = results['dataset']
    assert isinstance(dataset_node, EqmlDatasetData)
    assert dataset_node.n_samples == 2
    assert dataset_node.target_names == ['energy', 'forces', 'stress']
    dataset = dataset_node.get_dataset()

    children = {
        link.link_label: link.node for link in node.base.links.get_outgoing(link_label_filter='structure_%').all()
    }
    assert sorted(children) == ['structure_0000', 'structure_0001']
    first, second = children['structure_0000'], children['structure_0001']
    # max_concurrent=1: the second pw.x was only submitted once the first had finished.
    assert second.ctime > first.called_descendants[-1].mtime

    for sample, child, structure in zip(dataset.samples, (first, second), (compressed, expanded)):
        assert child.is_finished_ok
        np.testing.assert_allclose(sample.positions, structure.get_ase().positions, atol=1e-12)
        assert sample.graph_targets['energy'][0] == pytest.approx(child.outputs.output_parameters['energy'], abs=1e-8)
        forces = sample.node_targets['forces']
        assert np.abs(forces).max() > 0.05  # rattled atoms feel forces (eV/Angstrom)
        np.testing.assert_allclose(forces.sum(axis=0), 0.0, atol=1e-3)  # translation invariance
        stress = sample.graph_targets['stress']
        np.testing.assert_allclose(stress, stress.T, atol=1e-12)
        qe_stress_gpa = child.outputs.output_trajectory.get_array('stress')[-1]
        np.testing.assert_allclose(stress, -0.5 * (qe_stress_gpa + qe_stress_gpa.T) / 160.21766208, atol=1e-9)

    # ASE sign: the compressed cell pushes outwards, i.e. has the more negative stress.
    pressure_like = [np.trace(s.graph_targets['stress']) for s in dataset.samples]
    assert pressure_like[0] < pressure_like[1]
    assert pressure_like[0] < 0

    # Provenance: dataset <- harvest calcfunction <- outputs of every pw.x calculation.
    ancestors = orm.QueryBuilder().append(EqmlDatasetData, filters={'id': dataset_node.pk}, tag='dataset').append(
        orm.CalcJobNode, with_descendants='dataset', project='id'
    ).all(flat=True)
    pw_calcs = [calc.pk for child in (first, second) for calc in child.called if isinstance(calc, orm.CalcJobNode)]
    assert set(pw_calcs) <= set(ancestors)
    assert dataset_node.creator.process_label == 'harvest_energy_labels'


@pytest.mark.qe
def test_failed_pw_stops_with_named_exit_code(aiida_profile, qe_codes, pseudo_family, eqml_entry_points):
    from aiida import orm
    from aiida.engine import run_get_node

    overrides = {
        'pw_base': {
            'kpoints_distance': 1.1,
            'max_iterations': 1,  # no restart by the PwBaseWorkChain handlers
            'pw': {'parameters': {'ELECTRONS': {'electron_maxstep': 1}}},  # cannot converge in one step
        }
    }
    builder = builder_for(qe_codes, [si_cell(1.0, seed=3), si_cell(1.0, seed=4)], overrides=overrides)
    builder.max_concurrent = orm.Int(1)
    results, node = run_get_node(builder)
    assert node.exit_status == 401
    assert '`structure_0000`' in node.exit_message and 'PwBaseWorkChain' in node.exit_message
    assert 'dataset' not in results
    # The failure stopped the queue: the second structure never ran.
    assert [link.link_label for link in node.base.links.get_outgoing(link_label_filter='structure_%').all()] == [
        'structure_0000'
    ]


def test_bad_inputs_exit_codes(aiida_profile, qe_codes, pseudo_family, eqml_entry_points):
    """No QE runs here: the inputs are rejected in `setup`."""
    from aiida import orm
    from aiida.engine import run_get_node

    builder = builder_for(qe_codes, [si_cell(1.0, seed=5)])
    del builder.structures['structure_0000']
    results, node = run_get_node(builder)
    assert node.exit_status == 300
    assert 'No structures' in node.exit_message
    assert results == {}

    builder = builder_for(qe_codes, [si_cell(1.0, seed=6)])
    mgo = orm.StructureData(cell=(2.1 * (np.ones((3, 3)) - np.eye(3))).tolist())
    mgo.append_atom(position=(0, 0, 0), symbols='Mg')
    mgo.append_atom(position=(2.1, 2.1, 2.1), symbols='O')
    builder.structures['mgo'] = mgo
    results, node = run_get_node(builder)
    assert node.exit_status == 301
    assert '`mgo`' in node.exit_message and "['Mg', 'O']" in node.exit_message
    assert results == {}
    assert not node.called

    with pytest.raises(ValueError, match='max_concurrent'):
        builder = builder_for(qe_codes, [si_cell(1.0, seed=7)])
        builder.max_concurrent = orm.Int(0)
        run_get_node(builder)


def test_structures_from_list_dict_and_group(aiida_profile):
    from aiida import orm

    from aiida_eqml.workflows.labels import structures_to_namespace

    first, second = si_cell(1.0, seed=8).store(), si_cell(1.0, seed=9).store()
    assert structures_to_namespace([first, second]) == {'structure_0000': first, 'structure_0001': second}
    group = orm.Group(label='eqml-test-structures').store()
    group.add_nodes([second, first, orm.Int(1).store()])  # order of addition does not matter, non-structures skipped
    assert structures_to_namespace(group) == {'structure_0000': first, 'structure_0001': second}
    assert structures_to_namespace({'si_a': first}) == {'si_a': first}
    with pytest.raises(ValueError, match='`si-a` is not a valid link label'):
        structures_to_namespace({'si-a': first})
    with pytest.raises(TypeError, match='`structure_0000` is a Int, not a StructureData'):
        structures_to_namespace([orm.Int(3)])
    empty = orm.Group(label='eqml-test-empty').store()
    with pytest.raises(ValueError, match='group `eqml-test-empty` holds no StructureData'):
        structures_to_namespace(empty)
