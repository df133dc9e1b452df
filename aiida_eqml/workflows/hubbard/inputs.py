"""Input validation of ``eqml.hubbard.self_consistent``: what is refused before anything is stored or run.

Port validators return a message naming the port and the value (AiiDA prefixes the port); ``validate_inputs`` checks
the inputs together (the models' domain against the structure and the run's protocol, the hp.x fallback's inputs).
"""
from __future__ import annotations

from aiida_eqml.workflows.hubbard.domain import (
    ModelDomainError,
    check_model_domain,
    is_onsite,
    parameter_key,
    run_protocol,
)

__all__ = ('at_least_one', 'non_negative', 'validate_hubbard_structure', 'validate_inputs')


def non_negative(node, port) -> str | None:
    """Counts, thresholds and tolerances (a tolerance of 0 runs exactly ``max_iterations``)."""
    if node.value < 0:
        return f'`{port.name}` must be >= 0, got {node.value}'


def at_least_one(node, port) -> str | None:
    if node.value < 1:
        return f'`{port.name}` must be >= 1, got {node.value}'


def validate_hubbard_structure(structure, _) -> str | None:
    """Refuse a structure without Hubbard parameters or with a negative on-site U: linear response gives U > 0 on the
    3d shells the models know, and a negative U would start the loop from an unphysical ground state."""
    parameters = structure.hubbard.parameters
    if not parameters:
        return '`hubbard_structure` has no Hubbard parameters: initialize U (and V) on its manifolds first'
    for parameter in parameters:
        key = parameter_key(parameter)
        if is_onsite(key) and parameter.value < 0:
            site = structure.sites[parameter.atom_index]
            return (f'`hubbard_structure`: U({site.kind_name} {parameter.atom_manifold}) on site '
                    f'{parameter.atom_index} is {parameter.value} eV; a starting U must be >= 0')


def validate_inputs(inputs, _):
    """Refuse, before anything is stored or run, what the models cannot predict and options that cannot work."""
    models = dict(inputs.get('models') or {})
    structure = inputs.get('hubbard_structure')
    scf = inputs.get('scf') or {}
    if not models or structure is None or 'pw' not in scf:
        return None  # the port checks report the missing input
    parameters = scf['pw']['parameters'].get_dict()
    nspin = parameters.get('SYSTEM', {}).get('nspin', 1)
    if nspin == 2 and 'starting_magnetization' not in parameters.get('SYSTEM', {}):
        return 'Missing `starting_magnetization` input in `scf.pw.parameters` while `nspin == 2`.'
    if nspin not in (1, 2):
        return f'nspin=`{nspin}` is not implemented in the `hp.x` code (needed for the fallback and for the labels).'
    distance = scf.get('kpoints_distance')
    protocol = run_protocol(parameters, distance.value if distance is not None else None,
                            structure.hubbard.projectors)
    try:
        check_model_domain(models, structure, protocol)
    except ModelDomainError as exception:
        return f'`models`: {exception}'
    if 'hubbard' not in inputs and ('uncertainty_threshold' in inputs or inputs.get('validate_with_dfpt', False)):
        return '`uncertainty_threshold` and `validate_with_dfpt` need hp.x: give the `hubbard` (HpWorkChain) inputs'
