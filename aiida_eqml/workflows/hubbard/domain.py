"""What a Hubbard model can be asked: its species, manifolds, heads and DFT protocol, checked before any job runs.

The self-consistent ML loop calls :func:`check_model_domain` in its first step: a structure with an element, a
Hubbard manifold (l of the shell) or a kind of parameter (V) the models were not trained on, U of an element or V of
an element pair without training labels, or a run at a DFT protocol other than the one of the training labels, is
refused with a message naming what differs — before a single pw.x runs. Convergence of the loop
(:func:`parameter_changes`) compares parameters by their identity ``(i, j, S, manifolds)``, never by their position
in a list (aiida-hubbard reorders one list and not the other).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiida_eqml.ml import orbitals

__all__ = ('ModelDomainError', 'check_model_domain', 'run_protocol', 'parameter_key', 'parameter_changes',
           'manifold_l')


class ModelDomainError(ValueError):
    """The models cannot be used for this structure / protocol; ``kind`` names the exit code of the loop."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def manifold_l(manifold: str) -> int:
    """``'3d'`` -> 2 (the last letter of a QE manifold label, e.g. ``3d``, ``2p``, ``3d-4s`` -> its first shell)."""
    try:
        return orbitals.manifold_l(manifold)
    except ValueError as error:
        raise ModelDomainError('manifold', str(error)) from None


def parameter_key(parameter) -> tuple:
    """Identity of a Hubbard parameter: (atom, neighbour, translation, atom manifold, neighbour manifold)."""
    return (int(parameter.atom_index), int(parameter.neighbour_index), tuple(int(t) for t in parameter.translation),
            parameter.atom_manifold, parameter.neighbour_manifold)


def is_onsite(key: tuple) -> bool:
    return key[0] == key[1] and key[2] == (0, 0, 0) and key[3] == key[4]


def parameter_values(parameters) -> dict[tuple, float]:
    """``{parameter_key: value}`` of a list of Hubbard parameters (``hubbard_structure.hubbard.parameters``)."""
    return {parameter_key(p): float(p.value) for p in parameters}


def parameter_changes(old_parameters, new_parameters) -> dict[tuple, float | None]:
    """``{key: |new - old|}`` for every parameter of ``new``; None where ``old`` has no such parameter."""
    old = parameter_values(old_parameters)
    return {parameter_key(p): (abs(float(p.value) - old[parameter_key(p)]) if parameter_key(p) in old else None)
            for p in new_parameters}


def run_protocol(scf_parameters: Mapping[str, Any], kpoints_distance: float | None, projectors: str,
                 hp_qpoints: list[int] | None = None) -> dict[str, Any]:
    """The label-defining fields (``aiida_eqml.ml.hubbard.protocol``) that a loop's inputs determine."""
    system = scf_parameters.get('SYSTEM', {})
    protocol = {
        'ecutwfc_ry': system.get('ecutwfc'), 'ecutrho_ry': system.get('ecutrho'),
        'smearing': system.get('smearing', 'cold'), 'degauss_ry': system.get('degauss', 0.01),
        'projectors': projectors,
    }
    if kpoints_distance is not None:
        protocol['kpoints_distance'] = kpoints_distance
    if hp_qpoints is not None:
        protocol['hp_qpoints'] = list(hp_qpoints)
    return {key: value for key, value in protocol.items() if value is not None}


def check_model_domain(model_nodes: Mapping[str, Any], hubbard_structure, protocol: Mapping[str, Any] | None) -> dict:
    """Raise :class:`ModelDomainError` unless every model can predict every parameter of the structure.

    :param model_nodes: ``{link label: EqmlModelData}`` (one model or the members of an ensemble).
    :param protocol: :func:`run_protocol` of the loop, compared on the fields both sides define.
    :return: ``{'predicts_v': bool, 'protocol_checked': [fields], 'model_protocol': dict | None}``.
    """
    from aiida_eqml.ml.hubbard.protocol import protocol_differences

    if not model_nodes:
        raise ModelDomainError('ensemble', 'no model given in `models`')
    symbols = sorted({kind.symbol for kind in hubbard_structure.kinds})
    parameters = list(hubbard_structure.hubbard.parameters)
    if not parameters:
        raise ModelDomainError('manifold', 'the structure has no Hubbard parameters: initialize U (and V) first')
    needs_v = any(not is_onsite(parameter_key(p)) for p in parameters)
    needed_ls = {manifold_l(p.atom_manifold) for p in parameters} | {
        manifold_l(p.neighbour_manifold) for p in parameters
    }
    needed_pairs = {(manifold_l(p.atom_manifold), manifold_l(p.neighbour_manifold))
                    for p in parameters if not is_onsite(parameter_key(p))}
    site_symbol = [hubbard_structure.get_kind(site.kind_name).symbol for site in hubbard_structure.sites]
    needed_u_species = {site_symbol[p.atom_index] for p in parameters if is_onsite(parameter_key(p))}
    needed_v_pairs = {tuple(sorted((site_symbol[p.atom_index], site_symbol[p.neighbour_index])))
                      for p in parameters if not is_onsite(parameter_key(p))}
    reference = None
    for label in sorted(model_nodes):
        node = model_nodes[label]
        where = f'model `{label}` (eqml.model pk={node.pk})'
        unknown = sorted(set(symbols) - set(node.species))
        if unknown:
            raise ModelDomainError('species', f'{where} was trained on species {node.species}; the structure contains '
                                              f'element(s) {unknown} it has never seen')
        targets = sorted(node.targets)
        if 'hubbard_u' not in targets:
            raise ModelDomainError('heads', f'{where} predicts {targets}, not Hubbard U (`hubbard_u`)')
        if needs_v and 'hubbard_v' not in targets:
            raise ModelDomainError(
                'heads',
                f'{where} predicts no inter-site V but the structure has V parameters; use a '
                'U+V model or remove the V parameters',
            )
        _, _, metadata = node.read()
        slots = metadata.get('hubbard') or {}
        trained_ls = {int(l) for l in slots.get('manifold_ls', [])}
        if trained_ls and not needed_ls <= trained_ls:
            raise ModelDomainError(
                'manifold',
                f'{where} was trained on Hubbard manifolds with l = {sorted(trained_ls)}; '
                f'the structure asks for l = {sorted(needed_ls - trained_ls)}',
            )
        trained_pairs = {tuple(int(l) for l in pair) for pair in slots.get('pair_ls', [])}
        if needs_v and trained_pairs and not needed_pairs <= trained_pairs:
            raise ModelDomainError(
                'manifold',
                f'{where} was trained on V between manifolds {sorted(trained_pairs)}; the '
                f'structure has {sorted(needed_pairs - trained_pairs)}',
            )
        # Which elements carried the labels (models trained since the fifth session record it; older ones do not,
        # and are checked on species and l only): a descriptor of l cannot tell a Co 3d site from a Ni 3d one.
        if 'u_species' in slots:
            unlabelled = sorted(needed_u_species - set(slots['u_species']))
            if unlabelled:
                raise ModelDomainError('species', f'{where} was trained on U labels of {slots["u_species"]}; the '
                                                  f'structure asks U of {unlabelled}')
        if needs_v and 'v_species_pairs' in slots:
            unlabelled = sorted(needed_v_pairs - {tuple(pair) for pair in slots['v_species_pairs']})
            if unlabelled:
                pairs = ', '.join('-'.join(pair) for pair in unlabelled)
                trained = ', '.join('-'.join(pair) for pair in slots['v_species_pairs']) or 'none'
                raise ModelDomainError('species', f'{where} was trained on V labels of the element pairs {trained}; '
                                                  f'the structure asks V of {pairs}')
        model_protocol = metadata.get('protocol')
        if reference is None:
            reference = (targets, model_protocol)
        elif (targets, model_protocol) != reference:
            raise ModelDomainError('ensemble', f'{where} differs from the other members in its heads or protocol')
    model_protocol = reference[1]
    checked = []
    if model_protocol and protocol:
        common = {key for key in protocol if key in model_protocol}
        differences = protocol_differences({k: model_protocol[k] for k in common}, {k: protocol[k] for k in common})
        if differences:
            raise ModelDomainError(
                'protocol',
                f'the models were trained on labels of protocol '
                f'{model_protocol.get("name", "?")!r}; this run differs in ' + '; '.join(differences),
            )
        checked = sorted(common)
    return {'predicts_v': needs_v, 'protocol_checked': checked, 'model_protocol': model_protocol}
