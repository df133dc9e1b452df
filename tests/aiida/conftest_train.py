"""Shared helpers of the training / model / prediction tests (imported by those test files, not a pytest conftest).

- :func:`ensure_entry_points`: the plugin entry points of aiida-eqml, made visible to this process *and* to the
  processes it starts (daemon workers, subprocesses) through a ``.dist-info`` folder on ``sys.path``/``PYTHONPATH``.
  Only entry points the installed package does not register yet are added (so this keeps working, and adds nothing,
  once ``pyproject.toml`` lists them).
- :func:`tiny_dataset`: a few small Ti-O cells with smooth equivariant Born-charge / dielectric labels a model can
  learn in a few epochs (the same construction as ``tests/ml/test_training.py``).
- :func:`tiny_config`: a training config of a tiny NequIP model (seconds on a CPU).
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile

import numpy as np

#: group -> {name: object path}: what pyproject.toml should register (see the report of the training engineer).
EQML_ENTRY_POINTS = {
    'aiida.data': {
        'eqml.dataset': 'aiida_eqml.data.dataset:EqmlDatasetData',
        'eqml.model': 'aiida_eqml.data.model:EqmlModelData',
    },
    'aiida.calculations': {
        'eqml.train': 'aiida_eqml.calculations.train:EqmlTrainCalculation',
        'eqml.predict_tensors': 'aiida_eqml.calculations.functions.predict:predict_tensors',
        'eqml.predict_hubbard': 'aiida_eqml.calculations.functions.predict:predict_hubbard',
    },
    'aiida.parsers': {'eqml.train': 'aiida_eqml.parsers.train:EqmlTrainParser'},
    'aiida.workflows': {
        'eqml.train': 'aiida_eqml.workflows.train:EqmlTrainWorkChain',
        'eqml.train.ensemble': 'aiida_eqml.workflows.train:EqmlEnsembleTrainWorkChain',
    },
}

_DIST_DIR = None


def ensure_entry_points() -> str | None:
    """Register the missing aiida-eqml entry points for this process and its children; return the folder used."""
    global _DIST_DIR
    from importlib.metadata import entry_points

    from aiida.plugins import entry_point

    if _DIST_DIR is not None:
        return _DIST_DIR
    registered = {(ep.group, ep.name) for group in EQML_ENTRY_POINTS for ep in entry_points(group=group)}
    missing = {
        group: {name: value for name, value in names.items() if (group, name) not in registered}
        for group, names in EQML_ENTRY_POINTS.items()
    }
    missing = {group: names for group, names in missing.items() if names}
    if not missing:
        return None
    folder = tempfile.mkdtemp(prefix='eqml-entry-points-')
    dist_info = os.path.join(folder, 'aiida_eqml_test_entry_points-0.0.0.dist-info')
    os.makedirs(dist_info)
    with open(os.path.join(dist_info, 'METADATA'), 'w') as handle:
        handle.write('Metadata-Version: 2.1\nName: aiida-eqml-test-entry-points\nVersion: 0.0.0\n')
    with open(os.path.join(dist_info, 'entry_points.txt'), 'w') as handle:
        for group, names in missing.items():
            handle.write(f'[{group}]\n' + ''.join(f'{name} = {value}\n' for name, value in names.items()) + '\n')
    sys.path.append(folder)
    os.environ['PYTHONPATH'] = os.pathsep.join(filter(None, [os.environ.get('PYTHONPATH'), folder]))
    for cached in (entry_point.eps, entry_point.eps_select):
        cached.cache_clear()
    for name in dir(entry_point):  # the other lru_cache'd look-ups of the module
        function = getattr(entry_point, name)
        if callable(getattr(function, 'cache_clear', None)):
            function.cache_clear()
    _DIST_DIR = folder
    return folder


# ====================================================================== tiny data and config
TINY_SPECS = {
    'born_charges': {'level': 'node', 'tensor': 'ij', 'unit': 'e'},
    'dielectric': {'level': 'graph', 'tensor': 'ij=ji', 'unit': '1'},
}
_CHARGE = {8: -2.0, 22: 4.0}

TINY_MODEL = {
    'cutoff': 3.0,
    'num_layers': 1,
    'hidden_irreps': '8x0e + 4x1o + 4x1e + 4x2e',
    'radial_hidden': [16],
    'num_radial_basis': 6,
    'heads': {
        'born_charges': {'level': 'node', 'tensor': 'ij'},
        'dielectric': {'level': 'graph', 'tensor': 'ij=ji', 'reduce': 'mean'},
    },
}


def environment_tensors(numbers, positions, cell, cutoff=3.0):
    """Z_i = q_s I + sum_j w(r_ij) r^_ij r^_ij^T and a symmetric eps: smooth equivariant labels."""
    born = np.array([np.eye(3) * _CHARGE[int(z)] for z in numbers])
    for i in range(len(numbers)):
        for j in range(len(numbers)):
            for shift in np.ndindex(3, 3, 3):
                r = positions[j] - positions[i] + (np.array(shift) - 1) @ cell
                d = np.linalg.norm(r)
                if 1e-6 < d < cutoff:
                    born[i] += (1 + 0.5 * (numbers[j] == 22)) * (1 - d / cutoff) ** 2 * np.outer(r, r) / d**2
    eps = 5.0 * np.eye(3) + 0.1 * (born - born.mean(0)).mean(0)
    return born, 0.5 * (eps + eps.T)


def tiny_dataset(n_structures=4, n_atoms=4, seed=0, targets=('born_charges', 'dielectric')):
    from aiida_eqml.ml.dataset import Dataset, Sample

    rng = np.random.default_rng(seed)
    samples = []
    for k in range(n_structures):
        cell = np.eye(3) * 3.2 + rng.normal(0, 0.05, (3, 3))
        numbers = np.array([22] + [8] * (n_atoms - 1))
        positions = rng.uniform(0, 1, (n_atoms, 3)) @ cell
        born, eps = environment_tensors(numbers, positions, cell)
        node = {'born_charges': born} if 'born_charges' in targets else {}
        graph = {'dielectric': eps} if 'dielectric' in targets else {}
        samples.append(
            Sample(numbers, positions, cell, True, node_targets=node, graph_targets=graph, info={'name': f't{k}'})
        )
    return Dataset(samples, {name: spec for name, spec in TINY_SPECS.items() if name in targets})


def tiny_config(**overrides) -> dict:
    config = {
        'model': TINY_MODEL,
        'epochs': 3,
        'batch_size': 2,
        'seed': 3,
        'split': {'val_fraction': 0.25, 'test_fraction': 0.25},
        'optimizer': {'learning_rate': 1e-2, 'schedule': 'cosine'},
        'progress': False,
        'normalization': 'off',  # plumbing tests: raw-unit heads; the normalisation itself is tested in tests/ml
    }
    config.update(overrides)
    return config


def local_computer(workdir: str, label: str = 'eqml-test-localhost'):
    """A configured ``core.local`` / ``core.direct`` computer with its work directory in ``workdir``."""
    from aiida import orm
    from aiida.common.exceptions import NotExistent

    try:
        return orm.load_computer(label)
    except NotExistent:
        pass
    computer = orm.Computer(
        label=label, hostname='localhost', transport_type='core.local', scheduler_type='core.direct', workdir=workdir
    ).store()
    computer.set_minimum_job_poll_interval(0.5)
    computer.set_default_mpiprocs_per_machine(1)
    computer.configure(safe_interval=0)
    return computer


# ====================================================================== daemon scenarios (own profile, own process)
DAEMON_SCENARIO_SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
import conftest_train
result = conftest_train.daemon_scenario({root!r}, interrupt={interrupt!r}, epochs={epochs!r})
print('RESULT' + json.dumps(result))
"""


def run_daemon_scenario(root, interrupt: bool, epochs: int = 20, timeout: int = 900) -> dict:
    """Run :func:`daemon_scenario` in a fresh interpreter whose AiiDA config lives in ``root`` (isolated from the
    broker-less profile of the pytest session); return its result dictionary."""
    import json
    import subprocess

    root = os.fspath(root)
    # `verdi` (which the daemon client launches) lives beside this interpreter, also when the venv is not activated.
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get('PATH', '')])
    env = dict(os.environ, AIIDA_PATH=root, JAX_PLATFORMS='cpu', PATH=path)
    script = DAEMON_SCENARIO_SCRIPT.format(
        tests=os.path.dirname(os.path.abspath(__file__)), root=root, interrupt=interrupt, epochs=epochs
    )
    proc = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or 'RESULT' not in proc.stdout:
        raise AssertionError(
            f'daemon scenario failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}'
        )
    return json.loads(proc.stdout.split('RESULT')[-1])


def _wait(condition, timeout: float, what: str, poll: float = 0.5):
    import time

    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise TimeoutError(f'timed out after {timeout} s waiting for {what}')
        time.sleep(poll)


def _stop_daemon(client, timeout: float = 180) -> None:
    """Stop the daemon and wait until it is gone (circus answers slowly on a loaded machine: generous timeouts)."""
    from aiida.engine.daemon.client import DaemonNotRunningException, DaemonTimeoutException

    try:
        client.stop_daemon(wait=True, timeout=int(timeout))
    except DaemonNotRunningException:
        return
    except DaemonTimeoutException:
        pass  # the stop command may have been delivered anyway: check below
    _wait(lambda: not client.is_daemon_running, timeout, 'the daemon to stop')


class BrokerService:
    """The ZeroMQ broker service of a test profile, run beside its daemon (as aiida's own test fixtures do)."""

    def __init__(self, broker):
        self._broker = broker
        self._process = None

    def start(self, timeout: float = 180) -> None:
        import subprocess

        self._broker._service_dir.mkdir(parents=True, exist_ok=True)
        self._process = subprocess.Popen(
            [sys.executable, '-m', 'aiida.brokers.zeromq.service', '--service-dir', str(self._broker._service_dir)],
            start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        _wait(self._broker.check_service_reachable, timeout, 'the ZeroMQ broker service')

    def stop(self, timeout: float = 60) -> None:
        import signal
        import subprocess

        if self._process is None:
            return
        self._process.send_signal(signal.SIGINT)
        try:
            self._process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None


def restart_daemon(client, broker: BrokerService) -> None:
    """Start the stopped daemon again the way ``verdi daemon start`` does for a user, whose broker the daemon
    supervises: broker first, then the worker.

    Why the broker too: aiida-core 2.9's ZeroMQ broker finds a dead worker by pinging it after a disconnect event,
    and a worker whose socket is still routable at that moment keeps its tasks assigned; a new worker would then
    never receive the process (a hang, seen once in CI). A restarted broker moves every unacknowledged task back
    to pending from its persistent queue, which is the recovery a user's ``verdi daemon start`` performs.
    """
    broker.stop()
    broker.start()
    client.start_daemon(number_workers=1)


def wait_after_restart(node, client, timeout: float, what: str) -> None:
    """Wait until ``node`` terminates; on timeout, fail with the process state, the broker's queues and the
    daemon log (what a hang needs to be diagnosed from a CI log)."""
    try:
        _wait(lambda: node.is_terminated, timeout, what)
    except TimeoutError as exc:
        from aiida.manage import get_manager

        try:
            status = get_manager().get_broker().probe_service_status()
        except Exception as error:  # noqa: BLE001 - diagnostics only
            status = repr(error)
        raise TimeoutError(
            f'{exc}; process state {node.process_state}, status {node.process_status!r}; broker {status}; '
            f'daemon log tail:\n{daemon_log_tail(client)}'
        ) from None


@contextlib.contextmanager
def daemon_profile(root: str, name: str):
    """A fresh SQLite profile with a ZeroMQ broker in ``root``, loaded, with the broker service and a one-worker
    daemon running; yields ``(profile, daemon client, broker service)`` and stops all on exit.

    The broker runs beside the daemon (as aiida's own test fixtures do): stopping the daemon stops its workers
    only; :func:`restart_daemon` restarts both, as a user's ``verdi daemon start`` does.
    """
    from aiida.engine.daemon.client import get_daemon_client
    from aiida.manage import get_manager
    from aiida.manage.configuration import create_profile, get_config, load_profile

    config = get_config(create=True)
    profile = create_profile(
        config, storage_backend='core.sqlite_dos', storage_config={'filepath': os.path.join(root, 'storage')},
        broker_backend='core.zeromq', broker_config={}, name=name, email='test@localhost', is_test_profile=True,
    )
    config.set_default_profile(profile.name, overwrite=True)
    config.store()
    load_profile(profile.name, allow_switch=True)
    ensure_entry_points()  # PYTHONPATH now carries them to the daemon workers started below
    broker = BrokerService(get_manager().get_broker())
    client = get_daemon_client(profile.name)
    try:
        broker.start()
        client.start_daemon(number_workers=1)
        yield profile, client, broker
    finally:
        try:
            _stop_daemon(client)
        except Exception:  # noqa: BLE001 - already stopped, or not stoppable: the scenario's result says so
            pass
        broker.stop()


def daemon_log_tail(client, size: int = 4000) -> str:
    try:
        with open(client.daemon_log_file) as handle:
            return handle.read()[-size:]
    except OSError:
        return ''


def daemon_scenario(root: str, interrupt: bool, epochs: int) -> dict:
    """Submit a training to a real daemon (ZeroMQ broker beside it) and wait for it.

    ``interrupt=False``: submit the ``eqml.train`` CalcJob and wait. ``interrupt=True``: submit the ``eqml.train``
    work chain, stop the daemon while the training job runs, wait until the job has ended on the computer, start the
    daemon again and wait: the daemon must pick the job up (not resubmit it), retrieve and parse it.
    """
    from aiida import orm
    from aiida.engine import submit

    result = {'events': []}
    with daemon_profile(root, 'eqml-daemon-test') as (_, client, broker):
        from aiida_eqml.calculations.train import EqmlTrainCalculation, get_or_create_python_code
        from aiida_eqml.data.dataset import EqmlDatasetData
        from aiida_eqml.workflows.train import EqmlTrainWorkChain

        computer = local_computer(os.path.join(root, 'work'))
        code = get_or_create_python_code(computer)
        dataset = EqmlDatasetData.get_or_create(tiny_dataset(4))
        if not interrupt:
            builder = EqmlTrainCalculation.get_builder()
            builder.code = code
            builder.datasets = {'tio': dataset}
            builder.config = orm.Dict(tiny_config(epochs=epochs))
            node = submit(builder)
            _wait(lambda: node.is_terminated, 600, 'the CalcJob to finish')
            calc = node
        else:
            builder = EqmlTrainWorkChain.get_builder()
            builder.train.code = code
            builder.train.datasets = {'tio': dataset}
            builder.train.config = orm.Dict(tiny_config(epochs=epochs))
            builder.train.metadata.options.resources = {'num_machines': 1, 'num_mpiprocs_per_machine': 1}
            node = submit(builder)
            _wait(
                lambda: node.is_terminated or (node.called and node.called[0].get_job_id() is not None),
                300,
                'the training job to be submitted',
            )
            if node.is_terminated:
                raise RuntimeError(f'the work chain ended before its job ran: {node.exit_status} {node.exception}')
            calc = node.called[0]
            job_id = calc.get_job_id()
            result['events'].append(f'job {job_id} submitted; stopping the daemon')
            _stop_daemon(client)
            workdir = calc.get_remote_workdir()
            marker = os.path.join(workdir, 'train_exit_status')
            result['job_running_when_daemon_stopped'] = not os.path.exists(marker)
            _wait(lambda: os.path.exists(marker), 600, 'the training job to end while the daemon is down')
            result['state_while_daemon_down'] = str(calc.process_state.value)
            result['events'].append('training process ended while the daemon was down; starting the daemon')
            restart_daemon(client, broker)
            wait_after_restart(node, client, 600, 'the work chain to finish after the restart')
            result['job_id_before'] = job_id
            result['job_id_after'] = calc.get_job_id()
            result['n_calcs'] = len([n for n in node.called if isinstance(n, orm.CalcJobNode)])
        result.update(
            finished_ok=node.is_finished_ok,
            exit_status=node.exit_status,
            exit_message=node.exit_message,
            outputs=sorted(node.outputs),
            calc_exit_status=calc.exit_status,
            exception=node.exception,
            calc_exception=calc.exception,
        )
        if 'model' in node.outputs:
            model = node.outputs.model
            result['model'] = {'species': model.species, 'targets': model.targets, 'sha256': model.sha256}
            result['epochs_run'] = node.outputs.metrics['epochs_run']
        if not result.get('finished_ok'):
            result['daemon_log'] = daemon_log_tail(client)
    return result


def random_model_file(path, seed: int = 0, model_config: dict | None = None, metadata: dict | None = None):
    """Save an untrained model (random weights, seeded) of ``model_config`` (default: TINY_MODEL on O, Ti) to ``path``;
    return ``(path, a padded batch of the tiny dataset)``."""
    import jax

    from aiida_eqml.ml.dataset import make_batches
    from aiida_eqml.ml.modelfile import save_model
    from aiida_eqml.ml.models import build_model

    model = build_model(model_config or {**TINY_MODEL, 'species': ['O', 'Ti']})
    dataset = tiny_dataset(2)
    batch = make_batches(dataset, model.config, 2)[0]
    params = model.init(jax.random.PRNGKey(seed), batch.graph)
    save_model(path, model.config, params, {'target_specs': dataset.target_specs, **(metadata or {})})
    return path, batch
