"""The data services of the production stack: PostgreSQL and RabbitMQ, each private to one folder, and their ports.

* :class:`PostgresService`: a private PostgreSQL cluster (``initdb`` of the Debian ``postgresql`` package, run as the
  ``postgres`` user) in ``<root>/postgres``, listening on 127.0.0.1 only, with a role and a database for AiiDA;
* :class:`RabbitMQService`: a private RabbitMQ node (``rabbitmq-server`` package) in ``<root>/rabbitmq`` with its own
  node name, AMQP port, Erlang distribution port and epmd port, ``consumer_timeout`` disabled as AiiDA requires;
* :class:`PortsConfig`: the six TCP ports of the stack (these two services and Slurm's) from one base port.

:class:`aiida_eqml.local.production.ProductionStack` puts them together with the Slurm cluster.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import secrets
import shutil
import subprocess

from .host import (
    ProductionError,
    _check_port,
    _pid_alive,
    _popen_daemon,
    _postgres_bindir,
    _read_pid,
    _terminate,
    _wait,
    _which,
    port_in_use,
)

__all__ = ('PortsConfig', 'PostgresService', 'RabbitMQService', 'RABBITMQ_BIN')

RABBITMQ_BIN = pathlib.Path('/usr/lib/rabbitmq/bin')


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
        # runuser lives in /usr/sbin, which a login PATH need not hold: found as every other system tool is
        runuser = _which('runuser')
        if runuser is None:
            raise ProductionError('`runuser` (util-linux) was not found on the PATH nor in /usr/sbin, /sbin: it runs '
                                  f'PostgreSQL as the `{self.user}` user')
        return subprocess.run([runuser, '-u', self.user, '--', *command], capture_output=True, text=True, **kwargs)

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
