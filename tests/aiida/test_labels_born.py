"""``eqml.labels.born`` run for real: pw.x + ph.x (epsil only) on one rattled rocksalt MgO cell."""
from __future__ import annotations

import re

import numpy as np
import pytest

#: MgO rock-salt lattice constant (Angstrom).
MGO_A = 4.21
#: 2x2x2 k-points for the scf of the 2-atom cell, `test` cutoffs (30/120 Ry) of the fixture family.
FAST_OVERRIDES = {'scf': {'kpoints_distance': 1.3}}


@pytest.fixture
def eqml_entry_points(entry_points):
    from aiida.plugins.entry_point import get_entry_point_names

    if 'eqml.dataset' not in get_entry_point_names('aiida.data'):
        entry_points.add('aiida_eqml.data.dataset:EqmlDatasetData', 'aiida.data:eqml.dataset')
    return entry_points


def rattled_mgo():
    """Primitive rock-salt MgO with both atoms displaced by ~0.1 Angstrom (no symmetry left)."""
    from aiida import orm

    cell = 0.5 * MGO_A * (np.ones((3, 3)) - np.eye(3))
    structure = orm.StructureData(cell=cell.tolist())
    structure.append_atom(position=(0.10, -0.07, 0.04), symbols='Mg')
    structure.append_atom(position=(0.5 * MGO_A - 0.075, 0.5 * MGO_A + 0.055, 0.5 * MGO_A + 0.015), symbols='O')
    return structure


def born_charges_from_stdout(text: str, n_atoms: int) -> np.ndarray:
    """Z*[I, a, b] from ph.x's printed block "without acoustic sum rule": row ``Ea`` = (Z*_{a,x}, Z*_{a,y}, Z*_{a,z})
    with a the field (QE's ``zstareu(E, U, atom)``)."""
    block = text.split('without acoustic sum rule applied (asr)')[1]
    rows = re.findall(r'E[xyz]\s+\(\s*([-\d.]+)\s+([-\d.]+)\s+([-\d.]+)\s*\)', block)[: 3 * n_atoms]
    return np.array(rows, dtype=float).reshape(n_atoms, 3, 3)


def builder_for(qe_codes, structures, overrides=FAST_OVERRIDES):
    from aiida_eqml.workflows.labels.born import BornLabelsWorkChain

    return BornLabelsWorkChain.get_builder_from_protocol(
        qe_codes['pw'], qe_codes['ph'], structures, protocol='fast', overrides=overrides
    )


@pytest.mark.qe
def test_born_labels_real_run(aiida_profile, qe_codes, pseudo_family, eqml_entry_points):
    from aiida import orm
    from aiida.engine import run_get_node

    from aiida_eqml.data.dataset import EqmlDatasetData

    structure = rattled_mgo()
    builder = builder_for(qe_codes, {'mgo_rattled': structure})
    assert builder.scf.pw.parameters['SYSTEM']['occupations'] == 'fixed'
    assert builder.ph.ph.parameters['INPUTPH']['epsil'] is True
    assert builder.ph.ph.parameters['INPUTPH']['trans'] is False

    results, node = run_get_node(builder)
    assert node.is_finished_ok, (node.exit_status, node.exit_message)
    dataset_node = results['dataset']
    assert isinstance(dataset_node, EqmlDatasetData)
    assert dataset_node.target_names == ['born_charges', 'dielectric']
    sample = dataset_node.get_dataset().samples[0]
    assert sample.info['name'] == 'mgo_rattled'
    born = sample.node_targets['born_charges']
    dielectric = sample.graph_targets['dielectric']

    # The ph.x calculation ran the electric field only, at Gamma.
    ph_calcs = [n for n in node.called_descendants if isinstance(n, orm.CalcJobNode) and n.process_type.endswith('ph')]
    assert len(ph_calcs) == 1
    ph_calc = ph_calcs[0]
    stdout = ph_calc.outputs.retrieved.base.repository.get_object_content('aiida.out')
    assert 'End of electric fields calculation' in stdout
    assert 'ldisp = .false.' in ph_calc.base.repository.get_object_content('aiida.in')
    assert 'Diagonalizing the dynamical matrix' not in stdout  # no phonon was computed
    assert not any(key.startswith('dynamical_matrix') for key in ph_calc.outputs.output_parameters.keys())

    # Orientation: the harvested Z*_{I,ab} (a: field, b: displacement) is what ph.x prints (5 decimals);
    # the rattled cell makes Z* asymmetric by ~1e-2, so a transposition would fail this.
    printed = born_charges_from_stdout(stdout, 2)
    np.testing.assert_allclose(born, printed, atol=6e-6)
    assert np.abs(born[0] - born[0].T).max() > 1e-3

    # Physics: Mg is a cation, O an anion, both close to isotropic; eps_inf symmetric positive definite > 1.
    assert 1.5 < np.trace(born[0]) / 3 < 3.5
    assert -5.0 < np.trace(born[1]) / 3 < -1.5
    np.testing.assert_allclose(dielectric, dielectric.T, atol=1e-12)
    assert np.linalg.eigvalsh(dielectric).min() > 1.0
    parsed = np.asarray(ph_calc.outputs.output_parameters['dielectric_constant'])
    np.testing.assert_allclose(dielectric, 0.5 * (parsed + parsed.T), atol=1e-12)

    # Provenance: dataset <- harvest calcfunction <- the ph.x output parameters.
    creator = dataset_node.creator
    assert creator.process_label == 'harvest_born_labels'
    assert creator.inputs.mgo_rattled_parameters.pk == ph_calc.outputs.output_parameters.pk


def test_born_bad_inputs(aiida_profile, qe_codes, pseudo_family, eqml_entry_points):
    """Rejected in `setup`, before any QE runs: smeared occupations, phonons requested, no structures."""
    from aiida.engine import run_get_node

    overrides = {'scf': {'kpoints_distance': 1.3, 'pw': {'parameters': {'SYSTEM': {'occupations': 'smearing'}}}}}
    builder = builder_for(qe_codes, [rattled_mgo()], overrides=overrides)
    results, node = run_get_node(builder)
    assert node.exit_status == 302
    assert "occupations='fixed'" in node.exit_message and "'smearing'" in node.exit_message
    assert results == {} and not node.called

    builder = builder_for(
        qe_codes, [rattled_mgo()], overrides={'ph': {'ph': {'parameters': {'INPUTPH': {'trans': True}}}}}
    )
    results, node = run_get_node(builder)
    assert node.exit_status == 302 and 'trans=.false.' in node.exit_message
    assert results == {} and not node.called

    builder = builder_for(qe_codes, [rattled_mgo()])
    builder.structures = {}
    results, node = run_get_node(builder)
    assert node.exit_status == 300
    assert results == {}
