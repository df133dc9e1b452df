"""Production scale: PostgreSQL + RabbitMQ storage/broker, a real Slurm with a GPU resource, load and faults.

Everything runs on services the fixtures start (``conftest.py``) and on the profile ``aiida-eqml local setup
--production`` makes; each scenario runs in its own interpreter (``scenarios.py``). Order matters only for time: the
load run (daemon, faults) comes after the single-job checks.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.production, pytest.mark.slow, pytest.mark.timeout(1500)]

#: Concurrent ML loops of the load run and daemon workers. 25 in CI: on the 2-core CI machine (shared, load ~8-11)
#: 25 loops with both faults take ~11 min, 50 would take ~20+ min, over the CI budget; the recorded run of
#: ``benchmarks/scale.py`` (docs/benchmarks/scale.json) has 50 (the issue asks for at least 50).
N_LOOPS = int(os.environ.get('EQML_PRODUCTION_LOOPS', '25'))
WORKERS = 2
#: Deadline of the load run: 900 s at 25 loops (a stall costs CI at most 15 min), 36 s a loop for more.
LOAD_DEADLINE_S = int(os.environ.get('EQML_PRODUCTION_LOAD_DEADLINE', str(max(900, 36 * N_LOOPS))))


def test_setup_production_is_idempotent_and_the_services_answer(production_stack, production_env):
    output = production_stack['setup_output']
    for expected in ('started postgres', 'started rabbitmq', 'started slurm', 'created profile eqml-production-test',
                     'configured computer slurm-local', 'registered code qe-7.2-pw@slurm-local'):
        assert expected in output, output[-3000:]
    # The rerun finds everything in place and changes nothing.
    assert production_stack['rerun_rc'] == 0, production_stack['rerun_output'][-3000:]
    assert 'nothing changed' in production_stack['rerun_output'], production_stack['rerun_output'][-3000:]

    env = production_env
    verdi = os.path.join(os.path.dirname(sys.executable), 'verdi')
    status = subprocess.run([verdi, '-p', production_stack['profile'], 'status'], env=env, capture_output=True,
                            text=True, timeout=120)
    text = status.stdout + status.stderr
    assert 'postgresql+psycopg://' in text and f'127.0.0.1:{production_stack["base_port"]}/' in text, text
    assert 'RabbitMQ v3' in text and f'127.0.0.1:{production_stack["base_port"] + 1}' in text, text
    assert '✘' not in text.split('daemon')[0], text  # config, profile, storage and broker all fine
    node = subprocess.run(['scontrol', 'show', 'node'], env=env, capture_output=True, text=True, timeout=60).stdout
    assert 'Gres=gpu:1' in node and 'State=IDLE' in node, node


def test_training_through_slurm_gpu_options_timeout_and_resume(run_scenario, scale_record):
    """``eqml.train`` (the work chain) on core.slurm with ``gpus: 1``: the submit script asks Slurm for the GPU and
    the walltime, the job sees ``CUDA_VISIBLE_DEVICES=0``; the first job, slower than its time limit (its training
    is frozen with SIGSTOP after the first checkpoint and its limit lowered to 1 minute), is killed by slurmctld
    (TIMEOUT) -> exit 120 with the checkpoint; the work chain resumes from it and the second job finishes."""
    result = run_scenario('train_timeout', epochs=8)
    first = result['calcs'][0] if result.get('calcs') else {}
    scale_record['faults'].append({
        'what': 'eqml.train job killed by slurmctld at its time limit (Slurm TIMEOUT)',
        'survived': bool(result['finished_ok'] and first.get('exit_status') == 120
                         and result.get('resumed_from_first_checkpoint')),
        'detail': f"Slurm state {result.get('slurm_state')}; first CalcJob exit {first.get('exit_status')} with its "
                  f"checkpoint; work chain resumed from it in job {len(result.get('calcs', []))} of "
                  f"{len(result.get('calcs', []))}, {result.get('epochs_run')}/{result.get('epochs')} epochs, "
                  f"finished_ok={result['finished_ok']}"})
    scale_record['checks']['gpu_submit_script'] = [line for line in first.get('submit_script', '').splitlines()
                                                   if line.startswith('#SBATCH')]
    scale_record['checks']['job_saw'] = first.get('devices')
    assert 'monitor_error' not in result, result
    assert result['finished_ok'], result
    first, second = result['calcs']
    for calc in (first, second):
        script = calc['submit_script']
        assert '#SBATCH --gres=gpu:1' in script and '#SBATCH --time=00:30:00' in script, script
        assert 'aiida-eqml walltime watchdog' in script and '-m\' \'aiida_eqml.ml.train_cli' in script, script
    assert first['devices'] == 'CUDA_VISIBLE_DEVICES=0\n' == second['devices'], result
    # Killed by Slurm at the (lowered) time limit: the walltime exit code, the checkpoint kept.
    assert result['slurm_state'] == 'TIMEOUT', result
    assert 'DUE TO TIME LIMIT' in result['first_scheduler_stderr'], result['first_scheduler_stderr']
    assert first['exit_status'] == 120 and 'checkpoint' in first['outputs'] and 'model' not in first['outputs'], first
    assert result['resumed_from_first_checkpoint'], result
    assert second['finished_ok'] and 'model' in second['outputs'], second
    assert result['epochs_run'] == result['epochs'] and result['model_species'] == ['O', 'Ti'], result


def test_scancelled_pw_job_is_recovered_by_the_restart_handler(run_scenario, production_stack, scale_record):
    """The ML self-consistent loop on core.slurm; its first pw.x job is cancelled with scancel while running."""
    result = run_scenario('scancel_pw', models_dir=os.path.join(production_stack['root'], 'models'))
    first = result['pw_calcs'][0] if result.get('pw_calcs') else {}
    scale_record['faults'].append({
        'what': 'pw.x job of an ML loop cancelled with scancel while running',
        'survived': bool(result['finished_ok'] and result.get('pw_per_base', [0])[-1] == 2),
        'detail': f"job {result.get('cancelled_job')} cancelled; PwCalculation exit {first.get('exit_status')} "
                  f"({first.get('exit_message')}); PwBaseWorkChain (on_unhandled_failure=restart_once) resubmitted "
                  f"it; loop finished_ok={result['finished_ok']}"})
    assert 'monitor_error' not in result, result
    assert result['cancelled_job'] == result['first_job_id'], result
    assert result['finished_ok'], result
    first = result['pw_calcs'][0]
    assert not first['finished_ok'] and first['exit_status'] > 0, first  # the cancelled job failed ...
    assert result['pw_per_base'][-1] == 2, result  # ... and was resubmitted once by its PwBaseWorkChain
    assert all(calc['finished_ok'] for calc in result['pw_calcs'][1:]), result['pw_calcs']
    assert {'hubbard_structure', 'history'} <= set(result['outputs'])


@pytest.mark.timeout(LOAD_DEADLINE_S + 1500)
def test_load_of_concurrent_ml_loops_with_daemon_sigkill_and_rabbitmq_restart(run_scenario, production_stack,
                                                                                 scale_record):
    """N_LOOPS ML loops through one 2-worker daemon; RabbitMQ restarted at 1/4 (daemon running), the daemon SIGKILLed
    at 1/2; after each fault the recovery of docs/production.md: verdi daemon stop, verdi process repair, start."""
    # 900 s (CI): a stall must not cost CI more than 15 min of its budget (the whole suite: ~40 min)
    result = run_scenario('load_run', limit=LOAD_DEADLINE_S + 600,
                          models_dir=os.path.join(production_stack['root'], 'models'), n_loops=N_LOOPS,
                          workers=WORKERS, stack_root=production_stack['stack_root'],
                          base_port=production_stack['base_port'], timeout=LOAD_DEADLINE_S)
    print(json.dumps({k: v for k, v in result.items() if k != 'failed'}, indent=1))
    keys = ('n_submitted', 'n_finished_ok', 'n_lost', 'n_duplicated', 'wall_s', 'per_hour', 'daemon_rss_mb')
    scale_record['workers'] = WORKERS
    scale_record['load'] = {**{key: result[key] for key in keys},
                            **{key: result.get(key) for key in ('daemon_rss_mb_median', 'pw_jobs', 'slurm_jobs_seen',
                                                                'n_orphaned_processes', 'events')},
                            'loop': 'eqml.hubbard.self_consistent, 2-atom FM NiO, Gamma, 25/100 Ry, one iteration '
                                    '(smearing + fixed scf = 2 pw.x jobs), 2 untrained U models at that protocol'}
    ok = result['n_finished_ok'] == result['n_submitted'] and not result['n_lost'] and not result['n_duplicated']
    end = (f"end: {result['n_finished_ok']}/{result['n_submitted']} finished ok, {result['n_lost']} lost, "
           f"{result['n_duplicated']} duplicated")
    for fault in result['faults']:
        repair = (f"`verdi daemon stop`, `verdi process repair` (recreated the task of {fault['tasks_recreated']} "
                  f"active processes without one, dropped {fault['tasks_dropped']} tasks of processes no longer "
                  f"active), `verdi daemon start {WORKERS}`")
        if 'processes_killed' in fault:
            detail = f"at {fault['at_finished']} loops finished; {fault['processes_killed']} processes killed; {repair}"
        else:
            detail = f"at {fault['at_finished']} loops finished, daemon running; then {repair}"
        scale_record['faults'].append({'what': fault['what'], 'survived': ok, 'detail': f'{detail}; {end}'})
    assert [fault['what'].split()[0] for fault in result['faults']] == ['RabbitMQ', 'daemon'], result['events']
    assert result['n_lost'] == 0, result
    assert result['n_duplicated'] == 0, result
    assert result['n_finished_ok'] == result['n_submitted'] == N_LOOPS, result
    assert result['daemon_rss_mb'] > 0


def test_read_only_repository_gives_a_clear_error_and_no_corrupt_node(run_scenario, scale_record):
    result = run_scenario('readonly_repository')
    scale_record['faults'].append({
        'what': 'repository made read-only (chattr +i) during a run',
        'survived': bool(result.get('readonly_error') and not result['broken_nodes']
                         and result['writable_again']['finished_ok']),
        'detail': f"error: {result.get('readonly_error')}; nodes with unreadable files afterwards: "
                  f"{len(result['broken_nodes'])}; the same run after making it writable: "
                  f"finished_ok={result['writable_again']['finished_ok']}"})
    assert result['chattr'][0] == 0, result['chattr']
    error = result.get('readonly_error') or (result.get('readonly_run') or {}).get('exception') or ''
    assert 'Operation not permitted' in error or 'Read-only' in error or 'Permission denied' in error, result
    assert 'direct_store' not in result and 'Operation not permitted' in result['direct_store_error'], result
    assert result['broken_nodes'] == [], result['broken_nodes']
    assert result['writable_again']['finished_ok'] and result['writable_again']['content'] == 'payload', result
