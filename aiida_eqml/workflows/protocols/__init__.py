"""Protocol defaults wired to the stack configured by ``aiida-eqml local setup``.

aiida-quantumespresso's protocols take the pseudo family from their YAML (``SSSP/1.3/PBEsol/efficiency``)
and offer no user-level default hook. Registering our family under an SSSP label would lie in the
provenance, so instead this module injects the configured family, its cutoffs (of the configured
stringency) and ``withmpi`` (from the code: the embedded QE is a serial build, the YAMLs say ``withmpi:
True``) into the ``overrides`` at every nesting level a work chain passes down. Values the caller puts in
``overrides`` always win.

    from aiida_hubbard.workflows.hubbard import SelfConsistentHubbardWorkChain
    from aiida_eqml.workflows.protocols import get_builder_from_protocol

    builder = get_builder_from_protocol(SelfConsistentHubbardWorkChain, pw_code, hp_code, hubbard_structure,
                                        protocol='fast', spin_type=SpinType.COLLINEAR, ...)

``protocol_overrides(WorkChainClass, *args, overrides=...)`` returns only the merged overrides, e.g. for a
work chain of ours that builds ``PwBaseWorkChain`` inputs per structure. A ``HubbardStructureData`` input
is checked against the pseudopotentials (:func:`aiida_eqml.local.check_hubbard_manifolds`) before any
builder is returned, so a manifold the pseudo lacks fails here and not in a queued job.
"""
from __future__ import annotations

import copy

__all__ = (
    'ProtocolLevels',
    'configured_pseudo_family',
    'get_builder_from_protocol',
    'protocol_levels',
    'protocol_overrides',
)


class ProtocolLevels:
    """Where, inside a work chain's ``overrides``, the pw/hp/ph levels sit (tuples of namespace keys).

    A pw level is the overrides of one ``PwBaseWorkChain`` (``pseudo_family``, ``pw.parameters`` ...); an hp
    (ph) level holds an ``hp`` (``ph``) calculation namespace. ``code_positions`` says which code argument
    (0-based among the ``AbstractCode`` positional arguments) runs each level type.
    """

    def __init__(self, pw=(), hp=(), ph=(), code_positions=None):
        self.pw = tuple(pw)
        self.hp = tuple(hp)
        self.ph = tuple(ph)
        self.code_positions = code_positions or {}


def protocol_levels(workchain_class) -> ProtocolLevels:
    """The :class:`ProtocolLevels` of a work chain class.

    Known: aiida-quantumespresso's ``PwBaseWorkChain``, ``PwRelaxWorkChain``, ``PhBaseWorkChain``,
    aiida-hubbard's ``HpWorkChain`` and ``SelfConsistentHubbardWorkChain``. Other classes (ours) may declare
    a class attribute ``eqml_protocol_levels`` holding a :class:`ProtocolLevels`.
    """
    from aiida_hubbard.workflows.hp.base import HpBaseWorkChain
    from aiida_hubbard.workflows.hp.main import HpWorkChain
    from aiida_hubbard.workflows.hubbard import SelfConsistentHubbardWorkChain
    from aiida_quantumespresso.workflows.ph.base import PhBaseWorkChain
    from aiida_quantumespresso.workflows.pw.base import PwBaseWorkChain
    from aiida_quantumespresso.workflows.pw.relax import PwRelaxWorkChain

    declared = getattr(workchain_class, 'eqml_protocol_levels', None)
    if declared is not None:
        return declared
    relax = (('base_relax',), ('base_init_relax',))
    known = {
        PwBaseWorkChain: ProtocolLevels(pw=[()], code_positions={'pw': 0}),
        PwRelaxWorkChain: ProtocolLevels(pw=relax, code_positions={'pw': 0}),
        PhBaseWorkChain: ProtocolLevels(ph=[()], code_positions={'ph': 0}),
        HpBaseWorkChain: ProtocolLevels(hp=[()], code_positions={'hp': 0}),
        HpWorkChain: ProtocolLevels(hp=[()], code_positions={'hp': 0}),
        SelfConsistentHubbardWorkChain: ProtocolLevels(
            pw=[('scf',)] + [('relax',) + level for level in relax], hp=[('hubbard',)],
            code_positions={'pw': 0, 'hp': 1},
        ),
    }
    for cls in workchain_class.__mro__:
        if cls in known:
            return known[cls]
    raise ValueError(
        f'{workchain_class.__name__} has no known protocol levels: give it a class attribute '
        '`eqml_protocol_levels = ProtocolLevels(pw=[...], hp=[...], ph=[...])`.'
    )


def configured_pseudo_family(stack=None):
    """(family group, stringency) recorded by ``aiida-eqml local setup`` in the loaded profile."""
    from aiida_eqml.local import load_stack_config

    stack = stack or load_stack_config()
    if stack is None:
        raise ValueError(
            'No pseudopotential family is configured in this profile: run `aiida-eqml local setup` (or pass '
            '`pseudo_family=` / give `pseudo_family` in the overrides).'
        )
    return stack.load_pseudo_family(), stack.stringency


def _set_in(tree: dict, path: tuple, value: dict) -> None:
    for key in path:
        tree = tree.setdefault(key, {})
    tree.update(copy.deepcopy(value))


def _get_in(tree: dict | None, path: tuple):
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _split_arguments(args, kwargs):
    from aiida import orm

    codes = [value for value in args if isinstance(value, orm.AbstractCode)]
    candidates = list(args) + list(kwargs.values())
    structures = [value for value in candidates if isinstance(value, orm.StructureData)]
    return codes, (structures[0] if structures else None)


def protocol_overrides(workchain_class, *args, overrides=None, pseudo_family=None, stringency=None, **kwargs):
    """The ``overrides`` for ``workchain_class.get_builder_from_protocol(*args, **kwargs)`` with our defaults.

    :param args, kwargs: the arguments that will go to ``get_builder_from_protocol``: the codes (to read
        ``with_mpi``) and the structure (to compute the cutoffs of its elements) are taken from them.
    :param overrides: the caller's overrides; they take precedence over everything injected here.
    :param pseudo_family: label or group of the family to use instead of the configured one.
    :param stringency: cutoff stringency instead of the configured one.
    """
    from aiida import orm
    from aiida_quantumespresso.workflows.protocols.utils import recursive_merge

    levels = protocol_levels(workchain_class)
    codes, structure = _split_arguments(args, kwargs)
    injected: dict = {}

    if levels.pw:
        if pseudo_family is None:
            family, configured_stringency = configured_pseudo_family()
        else:
            family = pseudo_family if isinstance(pseudo_family, orm.Group) else orm.Group.collection.get(
                label=pseudo_family)
            configured_stringency = None
        stringency = stringency or configured_stringency
        pw_level = {'pseudo_family': family.label}
        if structure is not None and hasattr(family, 'get_recommended_cutoffs'):
            if stringency is not None and stringency not in family.get_cutoff_stringencies():
                raise ValueError(f'The pseudo family `{family.label}` has no cutoffs of stringency `{stringency}`; '
                                 f'it has {family.get_cutoff_stringencies()}.')
            ecutwfc, ecutrho = family.get_recommended_cutoffs(structure=structure, stringency=stringency, unit='Ry')
            pw_level['pw'] = {'parameters': {'SYSTEM': {'ecutwfc': ecutwfc, 'ecutrho': ecutrho}}}
        for path in levels.pw:
            _set_in(injected, path, pw_level)

    for kind in ('pw', 'hp', 'ph'):
        position = levels.code_positions.get(kind)
        if position is None or position >= len(codes):
            continue
        with_mpi = getattr(codes[position], 'with_mpi', None)
        if with_mpi is None:
            continue  # the code does not say: leave the protocol's choice
        for path in getattr(levels, kind):
            _set_in(injected, path + (kind, 'metadata', 'options'), {'withmpi': bool(with_mpi)})

    return recursive_merge(injected, copy.deepcopy(overrides or {}))


def get_builder_from_protocol(workchain_class, *args, overrides=None, pseudo_family=None, stringency=None,
                              **kwargs):
    """``workchain_class.get_builder_from_protocol(*args, **kwargs)`` with the configured stack's defaults.

    Raises :class:`aiida_eqml.local.HubbardManifoldError` (a ``ValueError``) before building anything if a
    ``HubbardStructureData`` argument asks for a Hubbard manifold the pseudopotentials do not have.
    """
    from aiida_quantumespresso.data.hubbard_structure import HubbardStructureData

    from aiida_eqml.local import check_hubbard_manifolds

    merged = protocol_overrides(workchain_class, *args, overrides=overrides, pseudo_family=pseudo_family,
                                stringency=stringency, **kwargs)
    _, structure = _split_arguments(args, kwargs)
    levels = protocol_levels(workchain_class)
    if isinstance(structure, HubbardStructureData) and levels.pw:
        from aiida import orm

        for path in levels.pw:
            level = _get_in(merged, path) or {}
            pseudos = _get_in(level, ('pw', 'pseudos'))
            if pseudos is None:
                family = orm.Group.collection.get(label=level['pseudo_family'])
                pseudos = family.get_pseudos(structure=structure)
            check_hubbard_manifolds(structure, pseudos)
    return workchain_class.get_builder_from_protocol(*args, overrides=merged, **kwargs)
