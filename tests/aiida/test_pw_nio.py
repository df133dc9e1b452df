"""A real DFT+U PwCalculation of antiferromagnetic NiO through the embedded pw.x (QE 7.2 from qepy).

Built with our protocol helper (family, test cutoffs 30/120 Ry and withmpi=False injected), run with
``PwBaseWorkChain``; checks the parsed energy against QE's own output, the AFM site moments and the
Hubbard occupation matrices read back from the retrieved XML.
"""
from __future__ import annotations

import re

import numpy as np
import pytest
from qe_tools import CONSTANTS

# The Rydberg in eV that aiida-quantumespresso's parser uses (qe-tools: CODATA 2006, 13.6056917 eV; the
# 2018 value would differ by 1e-3 eV on this energy).
RY_TO_EV = CONSTANTS.ry_to_ev


@pytest.fixture(scope='module')
def nio_pw_calculation(qe_codes, nio_afm_hubbard_structure_factory):
    from aiida import orm
    from aiida.engine import run_get_node
    from aiida_quantumespresso.common.types import SpinType
    from aiida_quantumespresso.workflows.pw.base import PwBaseWorkChain

    from aiida_eqml.workflows.protocols import get_builder_from_protocol

    structure = nio_afm_hubbard_structure_factory()
    overrides = {'pw': {'parameters': {'CONTROL': {'tprnfor': False, 'tstress': False}}}}
    builder = get_builder_from_protocol(
        PwBaseWorkChain, qe_codes['pw'], structure, protocol='fast', overrides=overrides,
        spin_type=SpinType.COLLINEAR, initial_magnetic_moments={'Ni1': 2.0, 'Ni2': -2.0, 'O': 0.0},
    )
    # An explicit 3x3x3 mesh: cheap, and enough for a gapped AFM insulator (kpoints_distance 0.5 gives 5x5x5 here).
    builder.pop('kpoints_distance')
    builder.kpoints = orm.KpointsData()
    builder.kpoints.set_kpoints_mesh([3, 3, 3])
    _, workchain = run_get_node(builder)
    assert workchain.is_finished_ok, workchain.exit_message
    return workchain.called[-1]


@pytest.mark.qe
def test_energy_parsed_from_real_output(nio_pw_calculation):
    calc = nio_pw_calculation
    assert calc.process_type == 'aiida.calculations:quantumespresso.pw'
    parameters = calc.outputs.output_parameters.get_dict()
    system = calc.inputs.parameters.get_dict()['SYSTEM']
    assert (system['ecutwfc'], system['ecutrho']) == (30.0, 120.0)
    assert calc.inputs.kpoints.get_kpoints_mesh()[0] == [3, 3, 3]

    stdout = calc.outputs.retrieved.base.repository.get_object_content('aiida.out')
    assert 'Program PWSCF v.7.2' in stdout
    final_ry = float(re.findall(r'^!\s+total energy\s+=\s+(-?\d+\.\d+) Ry', stdout, re.M)[-1])
    assert parameters['energy'] == pytest.approx(final_ry * RY_TO_EV, abs=1e-5)
    assert parameters['energy_units'] == 'eV'
    # 18 (Ni) x 2 + 6 (O) x 2 valence electrons; a DFT+U scf of NiO at these cutoffs: about -709 Ry.
    assert parameters['number_of_electrons'] == pytest.approx(48.0)
    assert -715 * RY_TO_EV < parameters['energy'] < -700 * RY_TO_EV
    # The run really was DFT+U: QE echoes the Hubbard card it read and reports the U it applied.
    stdin = calc.base.repository.get_object_content('aiida.in')
    assert re.search(r'^HUBBARD\s*\{?ortho-atomic\}?', stdin, re.M) and re.search(r'U\s+Ni1-3d\s+5\.0', stdin)
    assert 'Hubbard projectors: ortho-atomic' in stdout
    assert re.search(r'U\(Ni1-3d\)\s+=\s+5\.0000', stdout) and re.search(r'U\(Ni2-3d\)\s+=\s+5\.0000', stdout)


@pytest.mark.qe
def test_antiferromagnetic_moments(nio_pw_calculation):
    calc = nio_pw_calculation
    parameters = calc.outputs.output_parameters.get_dict()
    assert abs(parameters['total_magnetization']) < 0.02
    assert parameters['absolute_magnetization'] > 2.5
    moments = calc.outputs.output_trajectory.get_array('atomic_magnetic_moments')[-1]
    kinds = [site.kind_name for site in calc.inputs.structure.sites]
    assert kinds == ['Ni1', 'Ni2', 'O', 'O']
    assert moments[0] > 1.0 and moments[1] < -1.0
    assert moments[0] == pytest.approx(-moments[1], abs=0.01)  # the two Ni are related by symmetry x spin flip
    assert np.all(np.abs(moments[2:]) < 0.05)


@pytest.mark.qe
def test_hubbard_occupations_readable(nio_pw_calculation):
    """The on-site 3d occupation matrices of the run, read back from its XML, match the traces QE printed."""
    calc = nio_pw_calculation
    occupations = {entry['atom_index']: entry for entry in calc.tools.get_occupations(reshape=True)}
    assert set(occupations) == {1, 2}  # Hubbard U only on Ni1 and Ni2
    stdout = calc.outputs.retrieved.base.repository.get_object_content('aiida.out')
    printed = {}
    for index, up, down, total in re.findall(
            r'Tr\[ns\(\s*(\d+)\)\] \(up, down, total\) =\s+(\S+)\s+(\S+)\s+(\S+)', stdout):
        printed[int(index)] = (float(up), float(down), float(total))  # the last block wins: the final one
    for index, entry in occupations.items():
        assert entry['manifold'].lower() == '3d'
        up, down = entry['occupations']['up'], entry['occupations']['down']
        for matrix in (up, down):
            assert matrix.shape == (5, 5)
            np.testing.assert_allclose(matrix, matrix.T, atol=1e-6)
            eigenvalues = np.linalg.eigvalsh(matrix)
            assert eigenvalues.min() > -0.02 and eigenvalues.max() < 1.02
        assert np.trace(up) == pytest.approx(printed[index][0], abs=2e-4)
        assert np.trace(down) == pytest.approx(printed[index][1], abs=2e-4)
        assert np.trace(up) + np.trace(down) == pytest.approx(8.2, abs=0.3)  # Ni2+ d8, with hybridisation
    # AFM: the majority channel of Ni1 is the minority channel of Ni2.
    np.testing.assert_allclose(np.trace(occupations[1]['occupations']['up']),
                               np.trace(occupations[2]['occupations']['down']), atol=1e-3)
    assert np.trace(occupations[1]['occupations']['up']) > np.trace(occupations[1]['occupations']['down']) + 1.0
