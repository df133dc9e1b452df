"""The steps of ``eqml.hubbard.self_consistent`` that build inputs or records (the outline stays readable).

Each function takes the running work chain (``wc``) and reads its context; none submits anything.
"""
from __future__ import annotations

import re

from aiida import orm
from aiida.common import AttributeDict
from aiida_hubbard.workflows.hp.main import HpWorkChain
from aiida_quantumespresso.utils.hubbard import HubbardUtils, is_intersite_hubbard
from aiida_quantumespresso.workflows.pw.base import PwBaseWorkChain
from aiida_quantumespresso.workflows.pw.relax import PwRelaxWorkChain

from aiida_eqml.workflows.hubbard.domain import is_onsite, manifold_l, parameter_key, parameter_values
from aiida_eqml.workflows.hubbard.fft_grid import with_symmetric_fft_grid
from aiida_eqml.workflows.labels.hubbard import OCCUP_TXT

#: aiida-hubbard's defaults for the two scf runs of an iteration.
SMEARING, DEGAUSS, CONV_THR_SMEARING, CONV_THR_FIXED = 'cold', 0.01, 1.0e-10, 1.0e-15


def pseudos_for(wc, structure) -> dict:
    """The scf pseudos keyed by the kinds of ``structure`` (hp.x may have split a kind into ``Ni1``/``Ni2``)."""
    pseudos = wc.inputs.scf.pw.pseudos
    result = {}
    for kind in structure.kinds:
        for key, pseudo in pseudos.items():
            if re.fullmatch(rf'{re.escape(kind.symbol)}\d*', re.sub(r'\d', '', key) or key):
                result[kind.name] = pseudo
                break
        else:
            raise ValueError(f'no pseudopotential in `scf.pw.pseudos` for kind {kind.name}')
    return result


def _retrieve_occupations(inputs) -> None:
    options = inputs.pw.setdefault('metadata', {}).setdefault('options', {})
    retrieve = list(options.get('additional_retrieve_list', []))
    if OCCUP_TXT not in retrieve:
        options['additional_retrieve_list'] = retrieve + [OCCUP_TXT]  # inter-site occupations (DFT+U+V)


def relax_inputs(wc) -> AttributeDict:
    inputs = AttributeDict(wc.exposed_inputs(PwRelaxWorkChain, namespace='relax'))
    inputs.structure = wc.ctx.current
    for name in ('base_init_relax', 'base_relax'):
        if name in inputs:
            parameters = inputs[name].pw.parameters.get_dict()
            if wc.ctx.magnetic_moments:
                parameters.setdefault('SYSTEM', {})['starting_magnetization'] = wc.ctx.magnetic_moments
            inputs[name].pw.parameters = orm.Dict(parameters)
            inputs[name].pw.pseudos = pseudos_for(wc, wc.ctx.current)
    inputs.clean_workdir = orm.Bool(False)
    inputs.metadata = {'call_link_label': f'iteration_{wc.ctx.iteration:02d}_relax'}
    return inputs


def scf_inputs(wc, fixed: bool) -> AttributeDict:
    """Smearing scf (restarting from the previous iteration's ground state when there is one), or the
    fixed-occupation scf on top of it (aiida-hubbard's ``run_scf_fixed``)."""
    ctx = wc.ctx
    inputs = AttributeDict(wc.exposed_inputs(PwBaseWorkChain, namespace='scf'))
    inputs.pw = AttributeDict(inputs.pw)
    parameters = inputs.pw.parameters.get_dict()
    for namespace in ('CONTROL', 'SYSTEM', 'ELECTRONS'):
        parameters.setdefault(namespace, {})
    control, system, electrons = parameters['CONTROL'], parameters['SYSTEM'], parameters['ELECTRONS']
    control['calculation'] = 'scf'
    if ctx.magnetic_moments:
        system['starting_magnetization'] = dict(ctx.magnetic_moments)
    label = f'iteration_{ctx.iteration:02d}_scf_smearing'
    if not fixed:
        system['occupations'] = 'smearing'
        system.setdefault('smearing', SMEARING)
        system.setdefault('degauss', DEGAUSS)
        electrons.setdefault('conv_thr', CONV_THR_SMEARING)
        if ctx.restart_folder is not None:
            inputs.pw.parent_folder = ctx.restart_folder
            electrons.update({'startingpot': 'file', 'startingwfc': 'file'})
    else:
        # The band count and magnetization of the last smearing scf (this iteration's, or an earlier one's when
        # it was skipped: should_run_scf_smearing), the ground state of the last scf run.
        previous = ctx.scf_smearing.outputs.output_parameters.get_dict()
        control['restart_mode'] = 'from_scratch'
        system.update({'nbnd': previous['number_of_bands'], 'occupations': 'fixed'})
        for key in ('degauss', 'smearing', 'starting_magnetization'):
            system.pop(key, None)
        electrons.setdefault('conv_thr', CONV_THR_FIXED)
        electrons.update({'startingpot': 'file', 'startingwfc': 'file'})
        if ctx.is_magnetic:
            system['tot_magnetization'] = round(previous['total_magnetization'])  # integer checked before
        inputs.pw.parent_folder = ctx.scf_smearing.outputs.remote_folder if ctx.smeared else ctx.restart_folder
        label = f'iteration_{ctx.iteration:02d}_scf_fixed' + ('_magnetic' if ctx.is_magnetic else '')
        if ctx.lost_gap:  # the second fixed scf of an iteration (after the smearing scf it skipped at first)
            label += '_after_smearing'
    if 'hubbard' in wc.inputs:  # hp.x may run on this ground state (fallback, validation): a grid it accepts
        parameters = with_symmetric_fft_grid(parameters, ctx.current)
    inputs.pw.parameters = orm.Dict(parameters)
    inputs.pw.structure = ctx.current
    inputs.pw.pseudos = pseudos_for(wc, ctx.current)
    _retrieve_occupations(inputs)
    inputs.metadata = {'call_link_label': label}
    return inputs


def warm_up_prediction(wc) -> None:
    """Start loading and compiling the models for this loop's structure while its first scf runs
    (:func:`aiida_eqml.calculations.functions.predict.warm_up_hubbard`)."""
    from aiida_eqml.calculations.functions.predict import warm_up_hubbard

    structure = wc.ctx.current
    hubbard_l, couples = {}, []
    try:
        for p in structure.hubbard.parameters:
            hubbard_l[p.atom_index] = manifold_l(p.atom_manifold)
            hubbard_l[p.neighbour_index] = manifold_l(p.neighbour_manifold)
            if not is_onsite(parameter_key(p)):
                couples.append((p.atom_index, p.neighbour_index, *p.translation))
    except ValueError as exception:  # the input validation has already refused what it cannot read
        wc.logger.warning(f'no prediction warm-up: {exception}')
        return
    warm_up_hubbard(structure, dict(wc.inputs.models), hubbard_l, couples)


def predict(wc):
    """Occupations of the last scf -> ``predict_hubbard`` (+ one U per kind for DFT+U); ``(structure, spread)``,
    or ``'occupations: message'`` / ``'prediction: message'``."""
    from aiida_eqml.calculations.functions.occupations import extract_occupations
    from aiida_eqml.calculations.functions.predict import predict_hubbard
    from aiida_eqml.workflows.hubbard.functions import onsite_by_kind

    ctx, iteration = wc.ctx, wc.ctx.iteration
    scf = ctx.last_scf
    structure = scf.inputs.pw.structure
    results, node = extract_occupations.run_get_node(
        retrieved=scf.outputs.retrieved, structure=structure,
        metadata={'call_link_label': f'iteration_{iteration:02d}_occupations'})
    if not node.is_finished_ok:
        return f'occupations: {node.exit_message}'
    ctx.occupations = results['occupations']
    models = {label: model for label, model in wc.inputs.models.items()}
    results, node = predict_hubbard.run_get_node(
        hubbard_structure=structure, occupations=ctx.occupations, **models,
        metadata={'call_link_label': f'iteration_{iteration:02d}_prediction'})
    record_step(ctx.record, 'prediction', node)
    if not node.is_finished_ok:
        return f'prediction: {node.exit_message}'
    predicted = results['hubbard_structure']
    if not is_intersite_hubbard(predicted.hubbard):
        predicted = onsite_by_kind(predicted, metadata={'call_link_label': f'iteration_{iteration:02d}_onsite_by_kind'})
    return predicted, results['spread']


def hp_inputs(wc, label: str) -> AttributeDict:
    """hp.x on the last scf, with the structure that scf ran with (what hp.x must perturb)."""
    inputs = AttributeDict(wc.exposed_inputs(HpWorkChain, namespace='hubbard'))
    inputs.hp = AttributeDict(inputs.hp)
    structure = wc.ctx.last_scf.inputs.pw.structure
    if 'radial_analysis' in wc.inputs and is_intersite_hubbard(structure.hubbard):
        from qe_tools import CONSTANTS  # as aiida-hubbard: the V shell radius from a neighbour analysis

        analysis = wc.inputs.radial_analysis.get_dict()
        radius = HubbardUtils(structure).get_intersites_radius(**analysis)
        parameters = inputs.hp.parameters.get_dict()
        parameters.setdefault('INPUTHP', {}).update({'num_neigh': 100, 'rmax': radius / CONSTANTS.bohr_to_ang})
        inputs.hp.parameters = orm.Dict(parameters)
    inputs.hp.parent_scf = wc.ctx.last_scf.outputs.remote_folder
    inputs.hp.hubbard_structure = structure
    inputs.clean_workdir = orm.Bool(False)  # the loop cleans everything at the end
    inputs.metadata = {'call_link_label': label}
    return inputs


def relabelled_hp_structure(wc, node):
    """hp.x's structure, with kinds split where hp.x found inequivalent sites (U only, as aiida-hubbard)."""
    from aiida_hubbard.calculations.functions.structure_relabel_kinds import structure_relabel_kinds

    structure = node.outputs.hubbard_structure
    if is_intersite_hubbard(structure.hubbard) or 'hubbard' not in node.outputs:
        return structure
    if all(site['type'] == site['new_type'] for site in node.outputs.hubbard.get_dict()['sites']):
        return structure
    moments = orm.Dict(wc.ctx.magnetic_moments) if wc.ctx.magnetic_moments else None
    result = structure_relabel_kinds(structure, node.outputs.hubbard, moments)
    if moments is not None:
        wc.ctx.magnetic_moments = result['starting_magnetization'].get_dict()
    wc.report('hp.x found inequivalent sites of one kind: kinds relabelled')
    return result['hubbard_structure']


def has_gap_in_each_channel(scf) -> bool:
    """Whether a fixed-occupation pw.x run has a positive gap in each spin channel: its filled and empty bands do
    not overlap anywhere on the k mesh (:func:`aiida_eqml.ml.hubbard.records.spin_channel_gaps`; unknown, e.g.
    no empty band, counts as no)."""
    import math

    from aiida_eqml.calculations.functions.harvest import scf_diagnostics

    state = scf_diagnostics(scf.inputs.pw.parameters.get_dict(), scf.outputs.output_parameters.get_dict(),
                            scf.outputs.output_band)
    gaps = (state['band_gap_up_ev'], state['band_gap_down_ev'])
    return all(math.isfinite(gap) and gap > 0.0 for gap in gaps)


def record_step(record: dict, name: str, node) -> None:
    record['steps'][name] = {'pk': node.pk, 'wall_s': round((node.mtime - node.ctime).total_seconds(), 2)}


def iteration_record(wc, changes: dict) -> dict:
    """The history entry of an iteration: parameters (input, new value, spread, change), state of the last scf."""
    from aiida_eqml.calculations.functions.harvest import scf_diagnostics
    from aiida_eqml.workflows.hubbard.functions import parameter_table

    ctx = wc.ctx
    spread = {}
    for entry in ctx.spread.get_dict().get('parameters', []):
        spread[(entry['atom_index'], entry['neighbour_index'], tuple(entry['translation']), *entry['manifolds'])] = (
            entry
        )
    inputs = parameter_values(ctx.current.hubbard.parameters)
    rows = []
    for row, parameter in zip(parameter_table(ctx.predicted), ctx.predicted.hubbard.parameters):
        key = parameter_key(parameter)
        ml = spread.get(key, {})
        rows.append({**row, 'input': inputs.get(key), 'ml': ml.get('mean'), 'std': ml.get('std'),
                     'change': changes.get(key)})
    scf = ctx.last_scf
    output = scf.outputs.output_parameters.get_dict()
    state = scf_diagnostics(scf.inputs.pw.parameters.get_dict(), output, scf.outputs.output_band)
    moments = None
    if (
        'output_trajectory' in scf.outputs
        and 'atomic_magnetic_moments' in scf.outputs.output_trajectory.get_arraynames()
    ):
        moments = [float(m) for m in scf.outputs.output_trajectory.get_array('atomic_magnetic_moments')[-1]]
    known = [c for k, c in changes.items() if c is not None]
    return {
        'source': 'hp' if ctx.use_hp else 'ml',
        'parameters': rows,
        'max_change_u': max((c for k, c in changes.items() if c is not None and is_onsite(k)), default=None),
        'max_change_v': max((c for k, c in changes.items() if c is not None and not is_onsite(k)), default=None),
        'new_parameters': len(changes) - len(known),
        'is_insulator': bool(ctx.is_insulator),
        'total_energy_ev': output.get('energy'),
        'atomic_magnetic_moments': moments,
        **{key: state[key] for key in ('total_magnetization', 'absolute_magnetization', 'band_gap_up_ev',
                                       'band_gap_down_ev', 'band_gap_ev', 'scf_converged', 'scf_steps')},
    }


def next_input(wc, converged: bool):
    """The structure the next iteration's scf uses and how it was made (``'output'`` or ``'anderson'``): the
    prediction (plain iteration, and always once converged) or its Anderson extrapolation over the iterations since
    the last relaxation that have the same parameters (:mod:`aiida_eqml.workflows.hubbard.mixing`)."""
    from aiida_eqml.workflows.hubbard.mixing import anderson_mixed

    ctx = wc.ctx
    depth = wc.inputs.anderson_depth.value
    keys = [parameter_key(p) for p in ctx.predicted.hubbard.parameters]
    same = [parameter_key(p) for p in ctx.current.hubbard.parameters] == keys
    if ctx.relaxed or not same:  # another map (new geometry) or another parameter set: start the history again
        ctx.iterates = []
    if same:
        ctx.iterates = [*ctx.iterates, (ctx.current, ctx.predicted)][-(depth + 1):]
    last = ctx.iteration >= wc.inputs.max_iterations.value  # the output is then this prediction, as without mixing
    if converged or last or depth < 1 or len(ctx.iterates) < 2:
        return ctx.predicted, 'output'
    iterates = {}
    for n, (structure_in, structure_out) in enumerate(ctx.iterates):
        iterates[f'input_{n:02d}'], iterates[f'output_{n:02d}'] = structure_in, structure_out
    mixed = anderson_mixed(orm.Int(depth), **iterates,
                           metadata={'call_link_label': f'anderson_iteration_{ctx.iteration:02d}'})
    wc.report(f'iteration {ctx.iteration}: next input by Anderson mixing over {len(ctx.iterates)} iterations')
    return mixed, 'anderson'


def iteration_line(record: dict) -> str:
    values = ', '.join(
        f"{row['label']} = {row['value']:.3f}" + (f" ± {row['std']:.3f}" if row.get('std') is not None else '')
        for row in record['parameters'])
    return f"iteration {record['iteration']} [{record['source']}]: {values}" + (
        ' (converged)' if record['converged'] else ''
    )


def harvest_hp_labels(wc):
    """Every hp.x run of the loop as labels (``harvest_hubbard_labels``), or an error message."""
    from aiida_eqml.calculations.functions.harvest import harvest_hubbard_labels

    labels = {}
    for index, (iteration, _, occupations, hp_node) in enumerate(wc.ctx.hp_labels):
        scf_calc = hp_node.inputs.hp.parent_scf.creator
        key = f'iter{iteration:02d}' + ('_validation' if index == len(wc.ctx.hp_labels) - 1 and 'validation' in
                                       wc.ctx else '')
        labels.update({
            f'{key}_structure': scf_calc.inputs.structure, f'{key}_occupations': occupations,
            f'{key}_hubbard': hp_node.outputs.hubbard_structure, f'{key}_scf_parameters': scf_calc.inputs.parameters,
            f'{key}_scf_output_parameters': scf_calc.outputs.output_parameters,
            f'{key}_scf_bands': scf_calc.outputs.output_band,
        })
    try:
        return harvest_hubbard_labels(**labels, metadata={'call_link_label': 'harvest_new_labels'})
    except Exception as exception:  # the harvest's own messages name the label and field
        return f'{type(exception).__name__}: {exception}'


def clean_workdir(wc) -> None:
    cleaned = []
    for node in wc.node.called_descendants:
        if isinstance(node, orm.CalcJobNode):
            try:
                node.outputs.remote_folder._clean()
                cleaned.append(str(node.pk))
            except (OSError, KeyError, AttributeError):
                pass
    if cleaned:
        wc.report(f'cleaned remote folders of calculations: {" ".join(cleaned)}')
