"""The daemon is stopped in the middle of an ML Hubbard loop and started again: the loop completes.

Runs in its own interpreter and AiiDA profile with a ZeroMQ broker (as ``test_daemon_restart.py``): the pytest session
profile has no broker. The profile gets the embedded stack (the QE virtualenv is reused, ``test`` cutoffs), an
untrained two-member model of DFT+U NiO, and the loop (AFM NiO, smearing + fixed scf, one iteration) is
submitted; the daemon is stopped while the first pw.x job runs, the job ends while nothing watches it, the daemon is
started again: the same job must be picked up (not resubmitted) and the loop must finish.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.qe, pytest.mark.timeout(1800)]

SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
sys.path.insert(0, {tests_root!r})
import test_ml_hubbard_loop_daemon as scenario
print('RESULT' + json.dumps(scenario.scenario({root!r})))
"""


def scenario(root: str) -> dict:
    from pathlib import Path

    from aiida import orm
    from aiida.engine import submit
    from aiida_quantumespresso.common.types import SpinType
    from conftest_train import _stop_daemon, _wait, daemon_log_tail, daemon_profile, restart_daemon, wait_after_restart

    result = {'events': []}
    with daemon_profile(root, 'eqml-loop-daemon-test') as (_, client, broker):
        from test_occupations import nio_structure, retrieved_folder
        from test_predict import hubbard_model_node

        from aiida_eqml.calculations.functions.occupations import extract_occupations
        from aiida_eqml.local import load_stack_config, setup_local_stack
        from aiida_eqml.workflows.hubbard.self_consistent import SelfConsistentMLHubbardWorkChain

        setup_local_stack(stringency='test', echo=lambda message: None)
        codes = load_stack_config().load_codes()
        structure = nio_structure(False).store()
        occupations = extract_occupations(retrieved=retrieved_folder('nio_u'), structure=structure)['occupations']
        folder = Path(root) / 'models'
        folder.mkdir(exist_ok=True)
        models = [hubbard_model_node(folder, structure, occupations, seed) for seed in (0, 1)]
        builder = SelfConsistentMLHubbardWorkChain.get_builder_from_protocol(
            codes['pw'], nio_structure(False), models, protocol='fast',
            overrides={'meta_convergence': False, 'scf': {'kpoints_distance': 0.9}},  # one iteration: untrained models
            spin_type=SpinType.COLLINEAR, initial_magnetic_moments={'Ni1': 2.0, 'Ni2': -2.0, 'O': 0.0},
        )
        node = submit(builder)

        def first_pw():
            calcs = sorted((n for n in node.called_descendants if isinstance(n, orm.CalcJobNode)), key=lambda n: n.pk)
            return calcs[0] if calcs and calcs[0].get_job_id() is not None else None

        _wait(lambda: node.is_terminated or first_pw() is not None, 600, 'the first pw.x job to be submitted')
        calc = first_pw()
        job_id = calc.get_job_id()
        _stop_daemon(client)
        result['events'].append(f'pw.x job {job_id} submitted; daemon stopped')
        output = os.path.join(calc.get_remote_workdir(), 'aiida.out')

        def job_done():
            return os.path.exists(output) and 'JOB DONE' in open(output, errors='replace').read()

        result['job_running_when_daemon_stopped'] = not job_done()
        _wait(job_done, 900, 'the pw.x job to end while the daemon is down')
        result['state_while_daemon_down'] = str(node.process_state.value)
        restart_daemon(client, broker)
        wait_after_restart(node, client, 1200, 'the loop to finish after the restart')
        result.update(
            finished_ok=node.is_finished_ok, exit_status=node.exit_status, exit_message=node.exit_message,
            job_id_before=job_id, job_id_after=calc.get_job_id(), calc_exit_status=calc.exit_status,
            scf_calcs=len([n for n in node.called_descendants if n.process_label == 'PwCalculation']),
            iterations=len(node.outputs.history.get_list()) if 'history' in node.outputs else 0,
            outputs=sorted(node.outputs),
        )
        if not node.is_finished_ok:
            result['daemon_log'] = daemon_log_tail(client)
    return result


def test_daemon_stopped_during_an_ml_loop_and_restarted(tmp_path):
    root = os.fspath(tmp_path)
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get('PATH', '')])
    env = dict(os.environ, AIIDA_PATH=root, JAX_PLATFORMS='cpu', PATH=path)
    here = os.path.dirname(os.path.abspath(__file__))
    script = SCRIPT.format(tests=here, tests_root=os.path.dirname(here), root=root)
    proc = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True, text=True, timeout=1700)
    assert proc.returncode == 0 and 'RESULT' in proc.stdout, f'{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}'
    result = json.loads(proc.stdout.split('RESULT')[-1])
    assert result['job_running_when_daemon_stopped'], result['events']
    assert result['state_while_daemon_down'] == 'waiting'  # nothing advanced the loop while the daemon was down
    assert result['finished_ok'], result
    assert result['job_id_after'] == result['job_id_before'] and result['calc_exit_status'] == 0  # picked up, not rerun
    assert result['iterations'] == 1 and {'hubbard_structure', 'history'} <= set(result['outputs'])
    assert result['scf_calcs'] == 2  # the smearing and the fixed-occupation scf of the iteration, none repeated
