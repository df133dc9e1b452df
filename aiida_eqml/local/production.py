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

This module is the entry point (:class:`ProductionStack`, :func:`create_production_profile`,
:func:`setup_production`) and re-exports the names of the modules it is built from: :mod:`aiida_eqml.local.host`
(packages, ports, daemon processes, :class:`ProductionError`), :mod:`aiida_eqml.local.services` (PostgreSQL,
RabbitMQ, :class:`PortsConfig`) and :mod:`aiida_eqml.local.slurm` (Slurm and its AiiDA computer).
"""
from __future__ import annotations

import json
import os
import pathlib

# Re-exported: every name of the production stack stays importable from here.
from .host import REQUIRED_PACKAGES, ProductionError, ensure_packages, missing_packages, port_in_use  # noqa: F401
from .services import RABBITMQ_BIN, PortsConfig, PostgresService, RabbitMQService  # noqa: F401
from .slurm import SlurmCluster, ensure_slurm_computer

__all__ = (
    'ProductionError', 'PortsConfig', 'PostgresService', 'RabbitMQService', 'SlurmCluster', 'ProductionStack',
    'REQUIRED_PACKAGES', 'missing_packages', 'ensure_packages', 'create_production_profile', 'ensure_slurm_computer',
    'setup_production',
)


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
