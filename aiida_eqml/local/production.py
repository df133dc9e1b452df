"""A production-style AiiDA stack on one workstation: PostgreSQL, RabbitMQ and a single-host Slurm with a GPU.

What ``aiida-eqml local setup --production`` starts, and what the ``production`` test group starts in temporary
folders (``tests/production``):

* :class:`PostgresService`: a private PostgreSQL cluster (``initdb`` of the Debian ``postgresql`` package, run as the
  ``postgres`` user) in ``<root>/postgres``, listening on 127.0.0.1 only, with a role and a database for AiiDA;
* :class:`RabbitMQService`: a private RabbitMQ node (``rabbitmq-server`` package) in ``<root>/rabbitmq`` with its own
  node name, AMQP port, Erlang distribution port and epmd port, ``consumer_timeout`` disabled as AiiDA requires;
* :class:`SlurmCluster`: ``munged`` with a generated key, ``slurmctld`` and ``slurmd`` (``slurm-wlm`` package) from a
  generated ``slurm.conf`` in ``<root>/slurm``; one node (this host) with ``gpus`` generic resources ``gpu`` backed
  by fake character devices (``mknod``) so that ``--gres=gpu:1`` jobs are scheduled and get ``CUDA_VISIBLE_DEVICES``.
  Clients find it through ``SLURM_CONF`` (:meth:`SlurmCluster.environment`).

Every service uses non-default ports (so it never clashes with a system instance), keeps all its state under its
folder, is started only if it is not already answering (idempotent) and is stopped by :meth:`stop`.
:func:`create_production_profile` makes a ``core.psql_dos`` + ``core.rabbitmq`` profile on them and
:func:`ensure_slurm_computer` a ``core.slurm`` computer over the local transport.

Everything needs root (``slurmd`` does, and the packages come from apt); Debian/Ubuntu only.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import secrets
import shutil
import signal
import socket
import subprocess
import time

__all__ = (
    'ProductionError', 'PortsConfig', 'PostgresService', 'RabbitMQService', 'SlurmCluster', 'ProductionStack',
    'REQUIRED_PACKAGES', 'missing_packages', 'ensure_packages', 'create_production_profile', 'ensure_slurm_computer',
    'setup_production',
)

#: Debian package -> executables it provides (a missing one means the package is missing).
REQUIRED_PACKAGES = {
    'postgresql': ('initdb', 'pg_ctl'),
    'rabbitmq-server': ('/usr/lib/rabbitmq/bin/rabbitmq-server', '/usr/lib/rabbitmq/bin/rabbitmqctl'),
    'slurm-wlm': ('slurmctld', 'slurmd', 'sbatch', 'squeue', 'scancel', 'scontrol'),
    'munge': ('munged', 'mungekey'),
}
RABBITMQ_BIN = pathlib.Path('/usr/lib/rabbitmq/bin')


class ProductionError(RuntimeError):
    """The production stack cannot be set up or started as asked; the message says what to do."""


# ====================================================================== packages and ports
def _postgres_bindir() -> pathlib.Path | None:
    """Folder of ``initdb``/``pg_ctl`` (Debian keeps them out of the PATH, in /usr/lib/postgresql/<v>/bin)."""
    candidates = sorted(pathlib.Path('/usr/lib/postgresql').glob('*/bin/initdb'),
                        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    if candidates:
        return candidates[-1].parent
    found = shutil.which('initdb')
    return pathlib.Path(found).resolve().parent if found else None


def _which(executable: str) -> str | None:
    if executable in ('initdb', 'pg_ctl'):
        bindir = _postgres_bindir()
        return str(bindir / executable) if bindir and (bindir / executable).exists() else None
    if executable.startswith('/'):
        return executable if os.access(executable, os.X_OK) else None
    system = (pathlib.Path('/usr/sbin') / executable, pathlib.Path('/sbin') / executable)
    return shutil.which(executable) or next((str(p) for p in system if p.exists()), None)


def missing_packages() -> list[str]:
    """Debian packages of :data:`REQUIRED_PACKAGES` whose executables are not installed."""
    return [package for package, executables in REQUIRED_PACKAGES.items()
            if any(_which(executable) is None for executable in executables)]


def ensure_packages(install: bool = True, echo=print) -> list[str]:
    """Install the missing packages with apt (services are *not* started by the package scripts); return them.

    :raises ProductionError: if packages are missing and cannot be installed (not root, no apt, apt failed).
    """
    missing = missing_packages()
    if not missing:
        return []
    command = ['apt-get', 'install', '-y', '--no-install-recommends', *missing]
    if not install:
        raise ProductionError(f'Missing Debian packages {missing}: install them with `sudo {" ".join(command)}`.')
    if os.geteuid() != 0:
        raise ProductionError(f'Missing Debian packages {missing} and not running as root: run '
                              f'`sudo {" ".join(command)}` (or rerun this command with sudo).')
    if shutil.which('apt-get') is None:
        raise ProductionError(f'Missing packages {missing} and no apt-get on this machine: the production stack '
                              'needs a Debian/Ubuntu host (PostgreSQL, RabbitMQ, Slurm and munge from its packages).')
    echo(f'Installing the Debian packages {", ".join(missing)} (apt-get; their services are not started) ...')
    # policy-rc.d exit 101: the package scripts must not start system-wide instances on the default ports.
    policy = pathlib.Path('/usr/sbin/policy-rc.d')
    created_policy = False
    if not policy.exists():
        policy.write_text('#!/bin/sh\n# aiida-eqml: do not start services while installing packages\nexit 101\n')
        policy.chmod(0o755)
        created_policy = True
    env = dict(os.environ, DEBIAN_FRONTEND='noninteractive')
    try:
        proc = subprocess.run(command, env=env, capture_output=True, text=True)
        if proc.returncode != 0 and ('Unable to locate package' in proc.stderr or 'has no installation candidate'
                                     in proc.stderr or 'Failed to fetch' in proc.stderr):
            echo('apt-get install failed on the package lists: running apt-get update first ...')
            subprocess.run(['apt-get', 'update'], env=env, capture_output=True, text=True)
            proc = subprocess.run(command, env=env, capture_output=True, text=True)
    finally:
        if created_policy:
            policy.unlink()
    if proc.returncode != 0:
        raise ProductionError(f'`{" ".join(command)}` failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}')
    still = missing_packages()
    if still:
        raise ProductionError(f'apt-get installed {missing} but the executables of {still} are still missing')
    return missing


def port_in_use(port: int, host: str = '127.0.0.1') -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _wait(condition, timeout: float, what: str, poll: float = 0.25, log: pathlib.Path | None = None):
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            tail = ''
            if log is not None and log.exists():
                tail = '\n' + '\n'.join(log.read_text(errors='replace').splitlines()[-30:])
            raise ProductionError(f'timed out after {timeout:.0f} s waiting for {what}{tail}')
        time.sleep(poll)


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (our own child that exited) is not alive
        with open(f'/proc/{pid}/stat') as handle:
            return handle.read().split(')')[-1].split()[0] != 'Z'
    except OSError:
        return False


def _read_pid(path: pathlib.Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _terminate(pid: int | None, timeout: float = 30, sig=signal.SIGTERM) -> None:
    if not _pid_alive(pid):
        return
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return
    start = time.monotonic()
    while _pid_alive(pid) and time.monotonic() - start < timeout:
        time.sleep(0.1)
    if _pid_alive(pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _check_port(port: int, what: str) -> None:
    if port_in_use(port):
        raise ProductionError(f'Port {port} (for {what}) is in use by another program: choose other ports '
                              f'(`aiida-eqml local setup --production --base-port N`) or stop that program.')


def _popen_daemon(command, log: pathlib.Path, env=None, cwd=None) -> subprocess.Popen:
    """Start a long-running service in its own session (not killed with the caller's terminal)."""
    handle = open(log, 'ab')
    try:
        return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env, cwd=cwd)
    finally:
        handle.close()


@dataclasses.dataclass
class PortsConfig:
    """The TCP ports of the stack: ``base`` + fixed offsets (one number to choose, all off the default ports)."""

    base: int = 25400

    @property
    def postgres(self) -> int:
        return self.base

    @property
    def amqp(self) -> int:
        return self.base + 1

    @property
    def rabbitmq_dist(self) -> int:
        return self.base + 2

    @property
    def epmd(self) -> int:
        return self.base + 3

    @property
    def slurmctld(self) -> int:
        return self.base + 4

    @property
    def slurmd(self) -> int:
        return self.base + 5


# ====================================================================== PostgreSQL
class PostgresService:
    """A private PostgreSQL cluster in ``root`` (owned by the ``postgres`` user), on 127.0.0.1:``port``.

    Local (socket) connections authenticate by peer (the ``postgres`` OS user administers), TCP ones by password
    (scram-sha-256): the AiiDA role gets a generated password kept in ``root/credentials.json`` (mode 600).
    """

    def __init__(self, root, port: int, durable: bool = True, user: str = 'postgres'):
        self.root = pathlib.Path(root)
        self.port = int(port)
        self.durable = durable  # False: fsync off (tests: faster, data lost on a power cut)
        self.user = user
        self.data = self.root / 'data'
        self.log = self.root / 'postgres.log'
        self.credentials_file = self.root / 'credentials.json'

    def _as_postgres(self, command, **kwargs):
        return subprocess.run(['runuser', '-u', self.user, '--', *command], capture_output=True, text=True, **kwargs)

    def is_running(self) -> bool:
        bindir = _postgres_bindir()
        if bindir is None or not (self.data / 'PG_VERSION').exists():
            return False
        proc = subprocess.run([str(bindir / 'pg_isready'), '-h', '127.0.0.1', '-p', str(self.port)],
                              capture_output=True, text=True)
        return proc.returncode == 0

    def start(self, echo=print) -> bool:
        """Initialise (once) and start the cluster; return True if it was started now."""
        bindir = _postgres_bindir()
        if bindir is None:
            raise ProductionError('PostgreSQL is not installed: `sudo apt-get install postgresql`.')
        if self.is_running():
            return False
        _check_port(self.port, 'PostgreSQL')
        self.root.mkdir(parents=True, exist_ok=True)
        shutil.chown(self.root, self.user, self.user)
        self.root.chmod(0o700)
        if not (self.data / 'PG_VERSION').exists():
            echo(f'Initialising a PostgreSQL cluster in {self.data} ...')
            proc = self._as_postgres([str(bindir / 'initdb'), '-D', str(self.data), '-U', 'postgres',
                                      '--auth-local=peer', '--auth-host=scram-sha-256', '--encoding=UTF8',
                                      '--locale=C.UTF-8', *([] if self.durable else ['--no-sync'])])
            if proc.returncode != 0:
                raise ProductionError(f'initdb failed: {proc.stdout[-2000:]}{proc.stderr[-2000:]}')
        options = f'-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1'
        if not self.durable:
            options += ' -c fsync=off -c synchronous_commit=off -c full_page_writes=off'
        echo(f'Starting PostgreSQL on 127.0.0.1:{self.port} ...')
        proc = self._as_postgres([str(bindir / 'pg_ctl'), '-D', str(self.data), '-l', str(self.log), '-o', options,
                                  '-w', '-t', '120', 'start'])
        if proc.returncode != 0:
            tail = self.log.read_text(errors='replace')[-2000:] if self.log.exists() else ''
            raise ProductionError(f'PostgreSQL did not start: {proc.stdout[-1000:]}{proc.stderr[-1000:]}\n{tail}')
        return True

    def stop(self) -> None:
        bindir = _postgres_bindir()
        if bindir is None or not (self.data / 'postmaster.pid').exists():
            return
        self._as_postgres([str(bindir / 'pg_ctl'), '-D', str(self.data), '-m', 'fast', '-w', '-t', '60', 'stop'])

    def psql(self, sql: str, database: str = 'postgres') -> str:
        proc = self._as_postgres(['psql', '-h', str(self.root), '-p', str(self.port), '-d', database, '-v',
                                  'ON_ERROR_STOP=1', '-tAc', sql])
        if proc.returncode != 0:
            raise ProductionError(f'psql failed on `{sql[:80]}`: {proc.stderr.strip()}')
        return proc.stdout.strip()

    def credentials(self, role: str = 'aiida') -> dict:
        """``{'username', 'password'}`` of ``role`` (generated once, kept in ``credentials.json``)."""
        stored = {}
        if self.credentials_file.exists():
            stored = json.loads(self.credentials_file.read_text())
        if role not in stored:
            stored[role] = secrets.token_urlsafe(18)
            self.credentials_file.write_text(json.dumps(stored))
            self.credentials_file.chmod(0o600)
        return {'username': role, 'password': stored[role]}

    def ensure_database(self, name: str, role: str = 'aiida') -> tuple[dict, bool]:
        """The role (with its password) and the database owned by it; return (connection dict, created)."""
        credentials = self.credentials(role)
        created = False
        if self.psql(f"SELECT 1 FROM pg_roles WHERE rolname = '{role}'") != '1':
            self.psql(f"CREATE ROLE \"{role}\" LOGIN PASSWORD '{credentials['password']}'")
            created = True
        else:  # keep the password of credentials.json (the cluster may come from an earlier setup)
            self.psql(f"ALTER ROLE \"{role}\" PASSWORD '{credentials['password']}'")
        if self.psql(f"SELECT 1 FROM pg_database WHERE datname = '{name}'") != '1':
            self.psql(f'CREATE DATABASE "{name}" OWNER "{role}" ENCODING \'UTF8\' TEMPLATE template0')
            created = True
        return {'database_hostname': '127.0.0.1', 'database_port': self.port, 'database_name': name,
                'database_username': role, 'database_password': credentials['password']}, created


# ====================================================================== RabbitMQ
class RabbitMQService:
    """A private RabbitMQ node in ``root`` (its own node name, cookie, ports; no plugins)."""

    def __init__(self, root, port: int, dist_port: int, epmd_port: int):
        self.root = pathlib.Path(root)
        self.port, self.dist_port, self.epmd_port = int(port), int(dist_port), int(epmd_port)
        self.nodename = f'eqml{self.port}@localhost'
        self.log = self.root / 'server.log'
        self.pid_file = self.root / 'rabbitmq.pid'

    def environment(self) -> dict:
        return dict(
            os.environ,
            HOME=str(self.root / 'home'),  # the Erlang cookie of this node lives here
            RABBITMQ_NODENAME=self.nodename, RABBITMQ_NODE_IP_ADDRESS='127.0.0.1', RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port), ERL_EPMD_PORT=str(self.epmd_port),
            RABBITMQ_MNESIA_BASE=str(self.root / 'mnesia'), RABBITMQ_LOG_BASE=str(self.root / 'log'),
            RABBITMQ_CONFIG_FILE=str(self.root / 'rabbitmq.conf'),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(self.root / 'advanced.config'),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.root / 'enabled_plugins'), RABBITMQ_CONF_ENV_FILE='/dev/null',
            RABBITMQ_PID_FILE=str(self.pid_file),
        )

    def _ctl(self, *args, timeout: float = 120):
        return subprocess.run([str(RABBITMQ_BIN / 'rabbitmqctl'), '-n', self.nodename, *args], env=self.environment(),
                              capture_output=True, text=True, timeout=timeout)

    def is_running(self) -> bool:
        return _pid_alive(_read_pid(self.pid_file)) and port_in_use(self.port)

    def start(self, echo=print, timeout: float = 180) -> bool:
        if self.is_running():
            return False
        if not (RABBITMQ_BIN / 'rabbitmq-server').exists():
            raise ProductionError('RabbitMQ is not installed: `sudo apt-get install rabbitmq-server`.')
        for port, what in ((self.port, 'RabbitMQ AMQP'), (self.dist_port, 'RabbitMQ distribution')):
            _check_port(port, what)
        for folder in ('home', 'mnesia', 'log'):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        # AiiDA's processes can hold a task for days: no consumer timeout (RabbitMQ >= 3.8.15 defaults to 30 min).
        (self.root / 'rabbitmq.conf').write_text(
            f'listeners.tcp.default = 127.0.0.1:{self.port}\nloopback_users = none\n')
        (self.root / 'advanced.config').write_text('[{rabbit, [{consumer_timeout, undefined}]}].\n')
        (self.root / 'enabled_plugins').write_text('[].\n')
        self.pid_file.unlink(missing_ok=True)
        echo(f'Starting RabbitMQ node {self.nodename} on 127.0.0.1:{self.port} ...')
        _popen_daemon([str(RABBITMQ_BIN / 'rabbitmq-server')], self.log, env=self.environment(), cwd=self.root)
        _wait(self.pid_file.exists, timeout, 'the RabbitMQ pid file', log=self.log)
        proc = self._ctl('wait', '--timeout', str(int(timeout)), str(self.pid_file), timeout=timeout + 30)
        if proc.returncode != 0 or not port_in_use(self.port):
            raise ProductionError(f'RabbitMQ did not start: {proc.stdout[-1500:]}{proc.stderr[-1500:]}\n'
                                  + (self.log.read_text(errors='replace')[-2000:] if self.log.exists() else ''))
        return True

    def stop(self, timeout: float = 60) -> None:
        pid = _read_pid(self.pid_file)
        if _pid_alive(pid):
            try:
                self._ctl('stop', str(self.pid_file), timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
            _terminate(pid, timeout=10)
        if shutil.which('epmd'):  # the epmd this node started on its own port
            subprocess.run(['epmd', '-port', str(self.epmd_port), '-kill'], capture_output=True,
                           env=dict(os.environ, ERL_EPMD_PORT=str(self.epmd_port)))

    def restart(self, echo=print) -> None:
        self.stop()
        _wait(lambda: not port_in_use(self.port), 60, 'the RabbitMQ port to be released')
        self.start(echo=echo)

    def broker_config(self) -> dict:
        return {'broker_protocol': 'amqp', 'broker_username': 'guest', 'broker_password': 'guest',
                'broker_host': '127.0.0.1', 'broker_port': self.port, 'broker_virtual_host': '',
                'broker_parameters': {}}


# ====================================================================== Slurm
class SlurmCluster:
    """``munged`` + ``slurmctld`` + ``slurmd`` of a one-node cluster (this host) configured in ``root``.

    :param cpus: CPUs the node offers to jobs (may exceed the real cores: tiny jobs are mostly waiting).
    :param gpus: generic resources ``gpu`` on the node, each a fake character device ``root/dev/nvidia<i>``
        (a copy of /dev/null: nothing computes on it, but Slurm schedules ``--gres=gpu:N`` and sets
        ``CUDA_VISIBLE_DEVICES`` exactly as on a GPU node).
    """

    def __init__(self, root, ctld_port: int, slurmd_port: int, cpus: int = 8, gpus: int = 1,
                 memory_mb: int = 8000, cluster_name: str = 'eqml'):
        self.root = pathlib.Path(root)
        self.ctld_port, self.slurmd_port = int(ctld_port), int(slurmd_port)
        self.cpus, self.gpus, self.memory_mb = int(cpus), int(gpus), int(memory_mb)
        self.cluster_name = cluster_name
        self.nodename = socket.gethostname().split('.')[0]
        self.conf = self.root / 'slurm.conf'
        self.munge_socket = self.root / 'munge' / 'munge.socket'

    def environment(self) -> dict:
        """What a client (sbatch, squeue, the AiiDA daemon) needs in its environment to reach this cluster."""
        return {'SLURM_CONF': str(self.conf)}

    def _env(self) -> dict:
        return dict(os.environ, **self.environment())

    def _pid(self, name: str) -> int | None:
        return _read_pid(self.root / f'{name}.pid')

    def is_running(self) -> bool:
        if not all(_pid_alive(self._pid(name)) for name in ('munged', 'slurmctld', 'slurmd')):
            return False
        proc = subprocess.run(['sinfo', '-h', '-N', '-o', '%T'], env=self._env(), capture_output=True, text=True)
        return proc.returncode == 0 and proc.stdout.strip() in ('idle', 'mixed', 'allocated', 'completing')

    def write_config(self) -> None:
        (self.root / 'state').mkdir(parents=True, exist_ok=True)
        (self.root / 'spool').mkdir(parents=True, exist_ok=True)
        (self.root / 'log').mkdir(parents=True, exist_ok=True)
        devices = self.root / 'dev'
        devices.mkdir(exist_ok=True)
        for index in range(self.gpus):
            device = devices / f'nvidia{index}'
            if not device.exists():
                os.mknod(device, 0o666 | 0o020000, os.makedev(1, 3))  # a character device like /dev/null
        r = self.root
        self.conf.write_text(f"""# generated by aiida-eqml (aiida_eqml.local.production): one node, this host
ClusterName={self.cluster_name}
SlurmctldHost={self.nodename}(127.0.0.1)
SlurmctldPort={self.ctld_port}
SlurmdPort={self.slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
SlurmUser=root
SlurmdUser=root
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
ReturnToService=2
SlurmdParameters=config_overrides
KillWait=5
MinJobAge=7200
MessageTimeout=30
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName={self.nodename} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.memory_mb} Gres=gpu:{self.gpus} \
State=UNKNOWN
PartitionName=main Nodes={self.nodename} Default=YES MaxTime=INFINITE State=UP
""")
        (self.root / 'gres.conf').write_text(
            ''.join(f'NodeName={self.nodename} Name=gpu File={devices}/nvidia{i}\n' for i in range(self.gpus)))

    def start(self, echo=print, timeout: float = 120) -> bool:
        if self.is_running():
            return False
        for executable in ('munged', 'mungekey', 'slurmctld', 'slurmd'):
            if _which(executable) is None:
                raise ProductionError(f'`{executable}` is missing: `sudo apt-get install slurm-wlm munge`.')
        if os.geteuid() != 0:
            raise ProductionError('slurmd must run as root: rerun with sudo.')
        self.stop()  # leftovers of an earlier, partly started cluster
        for port, what in ((self.ctld_port, 'slurmctld'), (self.slurmd_port, 'slurmd')):
            _check_port(port, what)
        self.root.mkdir(parents=True, exist_ok=True)
        munge = self.munge_socket.parent
        munge.mkdir(exist_ok=True)
        munge.chmod(0o755)
        key = munge / 'munge.key'
        if not key.exists():
            proc = subprocess.run([_which('mungekey'), '--create', '--keyfile', str(key)], capture_output=True,
                                  text=True)
            if proc.returncode != 0:
                raise ProductionError(f'mungekey failed: {proc.stderr}')
        self.write_config()
        echo(f'Starting munged, slurmctld (port {self.ctld_port}) and slurmd (port {self.slurmd_port}) '
             f'from {self.conf} ...')
        proc = subprocess.run(
            [_which('munged'), '--force', f'--socket={self.munge_socket}', f'--key-file={key}',
             f'--pid-file={self.root}/munged.pid', f'--log-file={munge}/munged.log', f'--seed-file={munge}/munged.seed',
             '--num-threads=10'], capture_output=True, text=True)
        if proc.returncode != 0:
            raise ProductionError(f'munged did not start: {proc.stderr}')
        _popen_daemon([_which('slurmctld'), '-D', '-f', str(self.conf)], self.root / 'log' / 'slurmctld.out',
                      env=self._env())
        _popen_daemon([_which('slurmd'), '-D', '-f', str(self.conf)], self.root / 'log' / 'slurmd.out', env=self._env())
        _wait(self.is_running, timeout, 'the Slurm node to be idle', poll=0.5, log=self.root / 'log' / 'slurmctld.log')
        return True

    def stop(self) -> None:
        if _pid_alive(self._pid('slurmctld')) and shutil.which('scancel'):
            subprocess.run(['scancel', '--full', '-u', 'root'], env=self._env(), capture_output=True, timeout=30)
        for name in ('slurmd', 'slurmctld'):
            _terminate(self._pid(name), timeout=20)
        if _pid_alive(self._pid('munged')):
            subprocess.run([_which('munged') or 'munged', '--stop', f'--socket={self.munge_socket}'],
                           capture_output=True)
            _terminate(self._pid('munged'), timeout=5)

    def run(self, *command, check: bool = True) -> str:
        proc = subprocess.run(list(command), env=self._env(), capture_output=True, text=True, timeout=60)
        if check and proc.returncode != 0:
            raise ProductionError(f'`{" ".join(command)}` failed: {proc.stderr.strip()}')
        return proc.stdout


# ====================================================================== the stack
class ProductionStack:
    """The three services under one folder; ``state.json`` there records what a setup chose (ports)."""

    def __init__(self, root, base_port: int = 25400, durable: bool = True, cpus: int = 8, gpus: int = 1):
        self.root = pathlib.Path(root).absolute()
        self.ports = PortsConfig(base_port)
        self.postgres = PostgresService(self.root / 'postgres', self.ports.postgres, durable=durable)
        self.rabbitmq = RabbitMQService(self.root / 'rabbitmq', self.ports.amqp, self.ports.rabbitmq_dist,
                                        self.ports.epmd)
        self.slurm = SlurmCluster(self.root / 'slurm', self.ports.slurmctld, self.ports.slurmd, cpus=cpus, gpus=gpus)

    def start(self, echo=print) -> list[str]:
        """Start what is not running (idempotent); on a failure stop what this call started and raise."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)  # the postgres user must reach its folder
        started = []
        try:
            for name in ('postgres', 'rabbitmq', 'slurm'):
                if getattr(self, name).start(echo=echo):
                    started.append(name)
        except BaseException:
            for name in reversed(started):
                getattr(self, name).stop()
            raise
        state = {'base_port': self.ports.base, 'slurm_conf': str(self.slurm.conf)}
        (self.root / 'state.json').write_text(json.dumps(state))
        return started

    def stop(self) -> None:
        for service in (self.slurm, self.rabbitmq, self.postgres):
            try:
                service.stop()
            except Exception:  # noqa: BLE001 - stop the others anyway
                pass

    def environment(self) -> dict:
        return self.slurm.environment()


def create_production_profile(stack: ProductionStack, name: str, email: str = 'aiida@localhost',
                              set_default: bool = False, echo=print):
    """A ``core.psql_dos`` + ``core.rabbitmq`` profile ``name`` on the stack (returned as is if it exists)."""
    from aiida.manage.configuration import create_profile, get_config

    config = get_config(create=True)
    if name in config.profile_names:
        return config.get_profile(name), False
    connection, _ = stack.postgres.ensure_database(f'aiida_{name}'.replace('-', '_'))
    echo(f'Creating the AiiDA profile `{name}` (core.psql_dos on 127.0.0.1:{stack.postgres.port}, '
         f'core.rabbitmq on 127.0.0.1:{stack.rabbitmq.port}) ...')
    storage_config = {
        'database_engine': 'postgresql_psycopg', **connection,
        'repository_uri': f'file://{stack.root / "repository" / name}',
    }
    profile = create_profile(config, storage_backend='core.psql_dos', storage_config=storage_config,
                             broker_backend='core.rabbitmq', broker_config=stack.rabbitmq.broker_config(), name=name,
                             email=email)
    config.set_option('runner.poll.interval', 1, scope=profile.name)
    # The warning is about RabbitMQ's consumer timeout (>= 3.8.15), which this node disables (advanced.config).
    config.set_option('warnings.rabbitmq_version', False, scope=profile.name)
    if set_default or config.default_profile_name is None:
        config.set_default_profile(profile.name)
    config.store()
    return profile, True


def ensure_slurm_computer(label: str, workdir, cpus: int = 8, poll_interval: float = 2.0, echo=print):
    """A ``core.slurm`` computer over the ``core.local`` transport (this host); return (computer, changed)."""
    from aiida import orm
    from aiida.common.exceptions import NotExistent

    changed = False
    try:
        computer = orm.load_computer(label)
    except NotExistent:
        echo(f'Setting up the computer `{label}` (local transport, Slurm scheduler, workdir {workdir}) ...')
        computer = orm.Computer(label=label, hostname='localhost', transport_type='core.local',
                                scheduler_type='core.slurm', workdir=str(workdir),
                                description='This host through its own Slurm (aiida-eqml local setup --production).')
        computer.store()
        computer.set_minimum_job_poll_interval(poll_interval)
        computer.set_default_mpiprocs_per_machine(1)
        changed = True
    if computer.scheduler_type != 'core.slurm' or computer.transport_type != 'core.local':
        raise ProductionError(f'The computer `{label}` exists with {computer.transport_type}/'
                              f'{computer.scheduler_type}, not core.local/core.slurm: pass another --computer label.')
    if not computer.is_configured:
        computer.configure(safe_interval=0)
        changed = True
    return computer, changed


def default_production_root() -> pathlib.Path:
    default = pathlib.Path.home() / '.aiida-eqml' / 'production'
    return pathlib.Path(os.environ.get('AIIDA_EQML_PRODUCTION_ROOT', default))


def setup_production(root=None, profile_name: str = 'aiida-eqml-production', computer_label: str = 'slurm-local',
                     base_port: int = 25400, install: bool = True, cpus: int | None = None, gpus: int = 1,
                     stringency: str = 'normal', system_slurm_conf: bool = True, echo=print) -> list[str]:
    """``aiida-eqml local setup --production``: packages, services, profile, Slurm computer and the QE codes.

    Idempotent: a rerun with everything in place (services up, profile and computer present) changes nothing. The
    profile is *not* made the default one unless there is none: use it with ``verdi -p <name>`` or
    ``verdi profile set-default <name>``.
    """
    from aiida.manage.configuration import load_profile

    from aiida_eqml.local.stack import setup_local_stack

    changes = []
    installed = ensure_packages(install=install, echo=echo)
    if installed:
        changes.append(f'installed {", ".join(installed)}')
    # AIIDA_EQML_PRODUCTION_FSYNC=0 (the test suite): PostgreSQL without fsync, faster and not crash-safe.
    durable = os.environ.get('AIIDA_EQML_PRODUCTION_FSYNC', '1') != '0'
    stack = ProductionStack(root or default_production_root(), base_port=base_port, durable=durable,
                            cpus=cpus or (os.cpu_count() or 1), gpus=gpus)
    started = stack.start(echo=echo)
    changes += [f'started {name}' for name in started]
    if system_slurm_conf:
        system = pathlib.Path('/etc/slurm/slurm.conf')
        if not system.exists():
            system.parent.mkdir(parents=True, exist_ok=True)
            system.symlink_to(stack.slurm.conf)
            changes.append(f'linked {system} -> {stack.slurm.conf}')
        elif system.resolve() != stack.slurm.conf.resolve():
            echo(f'Note: {system} exists and is not ours: export SLURM_CONF={stack.slurm.conf} before '
                 '`verdi daemon start` (and in your shell for squeue/sbatch).')
    os.environ.update(stack.environment())
    profile, created = create_production_profile(stack, profile_name, echo=echo)
    if created:
        changes.append(f'created profile {profile_name}')
    load_profile(profile_name, allow_switch=True)
    _, changed = ensure_slurm_computer(computer_label, stack.root / 'scratch' / profile_name, cpus=stack.slurm.cpus,
                                       echo=echo)
    if changed:
        changes.append(f'configured computer {computer_label}')
    changes += setup_local_stack(profile_name=profile_name, computer_label=computer_label, stringency=stringency,
                                 echo=echo)
    return changes
