"""Fixtures of the ``production`` test group: real PostgreSQL, RabbitMQ and Slurm, started and stopped here.

- ``production_stack`` (session): installs the Debian packages if missing (apt-get; a clear *failure*, never a skip,
  if that is impossible), then runs ``aiida-eqml local setup --production`` itself in a temporary folder with free
  non-default ports: PostgreSQL, RabbitMQ, munged + slurmctld + slurmd (one node, 8 CPU slots, one ``gpu`` gres on a
  fake character device), a ``core.psql_dos`` + ``core.rabbitmq`` profile in a temporary AiiDA config folder
  (``AIIDA_PATH``; the user's config and default profile are never touched), the ``slurm-local`` computer
  (``core.slurm`` over the local transport) and the QE codes on it. On teardown, also after a failure: every service
  is stopped and the folder removed.
- ``run_scenario``: runs a function of ``scenarios.py`` in a fresh interpreter on that profile and returns its result.
- ``scale_record`` (session): the tests put their measurements here; with ``EQML_SCALE_JSON=<path>`` (what
  ``benchmarks/scale.py`` sets) they are written there at the end of the session in the schema of
  ``docs/benchmarks/scale.json``.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
PROFILE = 'eqml-production-test'


def _free_base_port() -> int:
    from aiida_eqml.local.production import port_in_use

    for base in range(27400, 40000, 17):
        if not any(port_in_use(base + offset) for offset in range(6)):
            return base
    raise RuntimeError('no 6 consecutive free TCP ports found between 27400 and 40000')


def scenario_env(info: dict) -> dict:
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get('PATH', '')])
    env = dict(os.environ, AIIDA_PATH=info['aiida_path'], SLURM_CONF=info['slurm_conf'], PATH=path,
               JAX_PLATFORMS='cpu')
    env.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(info['root'], 'xla-cache'))
    env.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')
    return env


@pytest.fixture(scope='session')
def production_stack():
    """``{'root', 'aiida_path', 'slurm_conf', 'base_port', 'profile', 'setup_output', 'setup_s'}`` of the stack."""
    import time

    from aiida_eqml.local.production import ProductionError, ProductionStack, ensure_packages

    try:
        installed = ensure_packages(install=True, echo=lambda message: print(message, flush=True))
    except ProductionError as exception:
        pytest.fail(f'the production test group needs PostgreSQL, RabbitMQ, Slurm and munge: {exception}',
                    pytrace=False)
    root = tempfile.mkdtemp(prefix='eqml-production-')
    os.chmod(root, 0o755)  # the postgres user must reach its data folder inside
    base_port = _free_base_port()
    info = {'root': root, 'aiida_path': os.path.join(root, 'aiida'), 'stack_root': os.path.join(root, 'stack'),
            'slurm_conf': os.path.join(root, 'stack', 'slurm', 'slurm.conf'), 'base_port': base_port,
            'profile': PROFILE, 'installed_packages': installed}
    command = [os.path.join(os.path.dirname(sys.executable), 'aiida-eqml'), 'local', 'setup', '--production',
               '--root', info['stack_root'], '--base-port', str(base_port), '--profile', PROFILE,
               '--stringency', 'test', '--no-system-slurm-conf', '--cpus', '8', '--gpus', '1']
    env = dict(scenario_env(info), AIIDA_EQML_PRODUCTION_FSYNC='0')
    stack = ProductionStack(info['stack_root'], base_port=base_port)
    try:
        start = time.monotonic()
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        info['setup_s'] = round(time.monotonic() - start, 1)
        info['setup_output'] = proc.stdout + proc.stderr
        if proc.returncode != 0:
            pytest.fail(f'`aiida-eqml local setup --production` failed (exit {proc.returncode}):\n'
                        f'{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}', pytrace=False)
        start = time.monotonic()
        again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        info['rerun_s'] = round(time.monotonic() - start, 1)
        info['rerun_output'] = again.stdout + again.stderr
        info['rerun_rc'] = again.returncode
        yield info
    finally:
        stack.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope='session')
def production_env(production_stack) -> dict:
    """The environment of a client of the stack (AIIDA_PATH of the test profile, SLURM_CONF, verdi on the PATH)."""
    return scenario_env(production_stack)


@pytest.fixture(scope='session')
def scale_record(production_stack):
    """``{'load': {...}, 'faults': [...], ...}`` filled by the tests; written to ``$EQML_SCALE_JSON`` if set."""
    import datetime
    import platform
    import time

    record = {'faults': [], 'checks': {}}
    start = time.monotonic()
    yield record
    path = os.environ.get('EQML_SCALE_JSON')
    if not path:
        return
    repo = os.path.dirname(os.path.dirname(HERE))
    commit = os.environ.get('EQML_SCALE_COMMIT') or subprocess.run(
        ['git', 'rev-parse', 'HEAD'], cwd=repo, capture_output=True, text=True).stdout.strip()
    dirty = '' if os.environ.get('EQML_SCALE_COMMIT') else subprocess.run(
        ['git', 'status', '--porcelain', '--', 'aiida_eqml', 'tests/production'], cwd=repo, capture_output=True,
        text=True).stdout.strip()
    document = {
        'command': os.environ.get('EQML_SCALE_COMMAND', 'python benchmarks/scale.py'),
        'commit': commit + ('-dirty' if dirty else ''),
        'date': datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds'),
        'machine': {'cpus': os.cpu_count(), 'platform': platform.platform(),
                    'load_average_at_end': list(os.getloadavg())},
        'profile': {'storage': 'core.psql_dos (PostgreSQL 15)', 'broker': 'core.rabbitmq (RabbitMQ 3.10)',
                    'workers': record.get('workers'), 'computer': 'core.slurm over core.local (slurm-wlm 22.05, '
                    'one node, 8 CPU slots, gres gpu:1 on a fake device)'},
        'setup_s': production_stack.get('setup_s'), 'setup_rerun_s': production_stack.get('rerun_s'),
        'installed_packages': production_stack.get('installed_packages'),
        'load': record.get('load'),
        'faults': record['faults'],
        'checks': record['checks'],
        'group_wall_s': round(time.monotonic() - start + (production_stack.get('setup_s') or 0), 1),
    }
    with open(path, 'w') as handle:
        json.dump(document, handle, indent=1)
        handle.write('\n')


@pytest.fixture(scope='session')
def run_scenario(production_stack):
    def run(name: str, limit: float = 900, **kwargs) -> dict:
        kwargs.setdefault('profile', production_stack['profile'])
        proc = subprocess.run([sys.executable, os.path.join(HERE, 'scenarios.py'), name, json.dumps(kwargs)],
                              env=scenario_env(production_stack), capture_output=True, text=True, timeout=limit)
        if proc.returncode != 0 or 'RESULT' not in proc.stdout:
            raise AssertionError(f'scenario {name} failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n'
                                 f'{proc.stderr[-6000:]}')
        return json.loads(proc.stdout.split('RESULT')[-1])

    return run
