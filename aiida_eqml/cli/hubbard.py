"""``aiida-eqml hubbard run``: the self-consistent ML Hubbard loop of one structure file, from the shell.

    aiida-eqml hubbard run CoO.extxyz --model 1234 --magnetization Co1=3,Co2=-3 --run

Kinds come from the file's ASE tags (``Co`` with tag 1 -> kind ``Co1``); 3d transition metals get U on 3d (start
``--u-start``, by default the seeds of the reference label campaign: 3 eV for Ti, 5 eV for the others, so that the
shipped model's first prediction sees a ground state like the ones it was trained on), and when the models
predict V also V on their nearest O 2p neighbours, unless ``--hubbard`` names the manifolds (``--hubbard "Co 3d"``).
Each iteration is printed as it completes, then a table of the final values.
"""
from __future__ import annotations

import time

import click

from . import exception_text
from .local import _load_profile

TRANSITION_METALS_3D = ('Sc', 'Ti', 'V', 'Cr', 'Mn', 'Fe', 'Co', 'Ni', 'Cu', 'Zn')
#: Starting U (eV) of an element the label campaign has no seed for (``U_START_3D``).
U_START_DEFAULT = 5.0


def _parse_magnetization(text: str | None) -> dict[str, float]:
    moments = {}
    for item in filter(None, (text or '').split(',')):
        key, _, value = item.partition('=')
        try:
            moments[key.strip()] = float(value)
        except ValueError:
            raise click.BadParameter(
                f'{item!r}: expected KIND=MOMENT, e.g. Ni1=2', param_hint='--magnetization'
            ) from None
    return moments


def load_models(identifiers: tuple[str, ...]):
    """``eqml.model`` nodes of ``--model`` values: a pk / UUID, a model file, or a shipped reference name."""
    import os

    from aiida import orm

    from aiida_eqml.data.model import EqmlModelData

    identifiers = identifiers or ('hubbard-tmo',)
    nodes = []
    for identifier in identifiers:
        if os.path.isfile(identifier):
            nodes.append(EqmlModelData.get_or_create(identifier).store())
            continue
        try:
            node = orm.load_node(identifier)
        except Exception:  # not a pk/UUID: a reference model name
            node = None
        if node is not None:
            if not isinstance(node, EqmlModelData):
                raise click.BadParameter(f'node {identifier} is a {type(node).__name__}, not an eqml.model',
                                         param_hint='--model')
            nodes.append(node)
            continue
        from aiida_eqml.ml.hubbard.reference import reference_member_files

        try:
            paths = reference_member_files(identifier)
        except (ValueError, FileNotFoundError) as exception:
            raise click.BadParameter(str(exception), param_hint='--model') from None
        nodes.extend(EqmlModelData.get_or_create(path).store() for path in paths)
    return nodes


def build_structure(path: str, hubbard: tuple[str, ...], u_start: float | None, with_v: bool):
    """``HubbardStructureData`` of ``path``: U on ``hubbard`` (default every 3d TM's 3d) at ``u_start`` (default per
    element, ``U_START_3D``, else 5 eV) and, ``with_v``, V on the TM-O couples at ``V_START``."""
    import ase.io
    from aiida import orm
    from aiida_quantumespresso.data.hubbard_structure import HubbardStructureData

    from aiida_eqml.local.hubbard_materials import U_START_3D, V_START

    try:
        atoms = ase.io.read(path)
    except Exception as exception:
        raise click.BadParameter(f'{path}: cannot be read by ASE ({exception_text(exception)})',
                                 param_hint='STRUCTURE_FILE') from None
    structure = HubbardStructureData.from_structure(orm.StructureData(ase=atoms))
    sites = structure.sites
    kinds = {kind.name: kind.symbol for kind in structure.kinds}
    if hubbard:
        manifolds = {}
        for item in hubbard:
            name, _, manifold = item.strip().partition(' ')
            if not manifold:
                raise click.BadParameter(f'{item!r}: expected "KIND MANIFOLD", e.g. "Ni 3d"', param_hint='--hubbard')
            manifolds[name] = manifold.strip()
    else:
        manifolds = {symbol: '3d' for symbol in set(kinds.values()) if symbol in TRANSITION_METALS_3D}
    if not manifolds:
        raise click.BadParameter(f'{path}: no 3d transition metal; say which manifolds get U with --hubbard',
                                 param_hint='--hubbard')
    for index, site in enumerate(sites):
        manifold = manifolds.get(site.kind_name, manifolds.get(kinds[site.kind_name]))
        if manifold and not (with_v and kinds[site.kind_name] == 'O'):
            start = u_start if u_start is not None else U_START_3D.get(kinds[site.kind_name], U_START_DEFAULT)
            structure.append_hubbard_parameter(index, manifold, index, manifold, start, (0, 0, 0), 'U')
    if with_v and 'O' in kinds.values():
        for kind, symbol in kinds.items():
            if symbol in manifolds or kind in manifolds:
                structure.initialize_intersites_hubbard(kind, manifolds.get(kind, manifolds.get(symbol)), 'O', '2p',
                                                        V_START, 'V', use_kinds=True)
    return structure


def format_iteration(record: dict) -> str:
    values = ', '.join(f"{row['label']} = {row['value']:.3f}" + (f" ± {row['std']:.3f}" if row.get('std') else '')
                       for row in record['parameters'])
    return f"iteration {record['iteration']} [{record['source']}]: {values}"


def _print_progress(node, printed: set) -> None:
    """Print every finished step of a running loop not printed yet: each iteration's prediction (mean ± spread)
    and, where the spread exceeded the loop's uncertainty threshold, that iteration's hp.x values, which are the ones
    the loop goes on with (``printed`` holds ``(iteration, 'ml' | 'hp')``)."""
    from aiida.common.links import LinkType

    from aiida_eqml.workflows.hubbard.functions import parameter_table

    threshold = node.inputs.uncertainty_threshold.value if 'uncertainty_threshold' in node.inputs else None
    lines = []  # (iteration, 0 for the prediction / 1 for hp.x, text): printed in that order
    for link in node.base.links.get_outgoing(link_label_filter='iteration_%_prediction').all():
        iteration = int(link.link_label.split('_')[1])
        if (iteration, 'ml') in printed or not link.node.is_finished_ok:
            continue
        printed.add((iteration, 'ml'))
        spread = link.node.outputs.spread.get_dict()['parameters']
        values = ', '.join(
            f"{'U' if e['kind'] == 'U' else 'V'}{e['atom_index']}"
            f"{'' if e['kind'] == 'U' else '-' + str(e['neighbour_index'])}"
            f" = {e['mean']:.3f} ± {e['std']:.3f}"
            for e in spread
        )
        largest = max((e['std'] for e in spread), default=0.0)
        fallback = threshold is not None and largest > threshold
        note = f'; spread {largest:.3f} > {threshold} eV: hp.x runs instead' if fallback else ''
        lines.append((iteration, 0, f'iteration {iteration} [ml prediction{note}]: {values}'))
    hp_links = node.base.links.get_outgoing(link_type=LinkType.CALL_WORK, link_label_filter='iteration_%_hp').all()
    for link in hp_links:
        iteration = int(link.link_label.split('_')[1])
        if (iteration, 'hp') in printed or not link.node.is_finished_ok or 'hubbard_structure' not in link.node.outputs:
            continue
        printed.add((iteration, 'hp'))
        values = ', '.join(f"{row['label']} = {row['value']:.3f}"
                           for row in parameter_table(link.node.outputs.hubbard_structure))
        lines.append((iteration, 1, f'iteration {iteration} [hp.x, used]: {values}'))
    for *_, text in sorted(lines):
        click.echo(text)


def print_summary(node) -> None:
    click.echo(f'\n{node.process_label}<{node.pk}>: {"finished" if node.is_finished_ok else "failed"} '
               f'(exit {node.exit_status}{": " + node.exit_message if node.exit_message else ""})')
    if 'history' not in node.outputs:
        return
    history = node.outputs.history.get_list()
    for record in history:
        click.echo(format_iteration(record) + (' (converged)' if record.get('converged') else ''))
    click.echo('\nparameter                              value (eV)   spread   source')
    last = history[-1]
    for row in last['parameters']:
        std = f"{row['std']:.3f}" if row.get('std') is not None else '-'
        click.echo(f"{row['label']:38s} {row['value']:10.3f}   {std:>6s}   {last['source']}")
    def number(value, digits=2):
        return '?' if value is None else f'{value:.{digits}f}'

    click.echo(f"last scf: {'insulator' if last['is_insulator'] else 'metal'}, gap up/down "
               f"{number(last['band_gap_up_ev'])}/{number(last['band_gap_down_ev'])} eV, "
               f"|M| {number(last['absolute_magnetization'])}, E = {number(last['total_energy_ev'], 4)} eV")
    if 'dfpt_comparison' in node.outputs:
        comparison = node.outputs.dfpt_comparison.get_dict()
        click.echo('\nvalidation (hp.x at the converged point)   ML      DFPT    |diff|')
        for row in comparison['parameters']:
            click.echo(f"{row['label']:40s} {row['ml']:7.3f} {row['dfpt']:7.3f} {row['abs_diff']:7.3f}")
        for kind in ('u', 'v'):
            if comparison.get(f'mare_{kind}') is not None:
                click.echo(f"mean absolute relative error of {kind.upper()}: {100 * comparison[f'mare_{kind}']:.1f} %")


@click.group()
def hubbard():
    """Self-consistent Hubbard parameters with machine-learned hp.x (eqml.hubbard.self_consistent)."""


@hubbard.command('run')
@click.argument('structure_file', type=click.Path(exists=True, dir_okay=False))
@click.option('-m', '--model', 'models', multiple=True,
              help='eqml.model pk/UUID, model file, or reference name; repeat for an ensemble [default: hubbard-tmo].')
@click.option('--protocol', type=click.Choice(['fast', 'balanced', 'stringent']), default='balanced', show_default=True,
              help="aiida-hubbard's protocol names: the convergence tolerances.")
@click.option('--hubbard', 'hubbard_manifolds', multiple=True, help='"KIND MANIFOLD" that gets U, e.g. "Ni 3d".')
@click.option('--magnetization', default=None, help='Starting moments (Bohr magneton) per kind: Ni1=2,Ni2=-2.')
@click.option('--u-start', type=click.FloatRange(min=0.0), default=None,
              help="Starting U (eV) of every site [default: the label campaign's seeds, Ti 3, others 5].")
@click.option('--hp/--no-hp', 'use_hp', default=True, show_default=True,
              help='hp.x for the uncertainty fallback and --validate (needs the hp.x code).')
@click.option('--validate', is_flag=True, help='One hp.x at the converged point: ML vs DFPT per parameter.')
@click.option('--uncertainty-threshold', type=click.FloatRange(min=0.0), default=None,
              help='Spread (eV) above which hp.x runs instead (0: hp.x in every iteration).')
@click.option('--max-iterations', type=click.IntRange(min=1), default=None)
@click.option('--anderson-depth', type=click.IntRange(min=0), default=0, show_default=True,
              help='Anderson acceleration of the U/V iteration over this many past iterations (0: plain iteration).')
@click.option('--submit/--run', 'submit', default=False, show_default=True,
              help='Submit to the daemon (and follow it) or run in this process.')
@click.option('-p', '--profile', 'profile_name', default=None)
def run(structure_file, models, protocol, hubbard_manifolds, magnetization, u_start, use_hp, validate,
        uncertainty_threshold, max_iterations, anderson_depth, submit, profile_name):
    """Run the ML self-consistent loop on STRUCTURE_FILE (any ASE-readable format) and print each iteration."""
    _load_profile(profile_name)
    from aiida import orm
    from aiida.engine import run_get_node
    from aiida.engine import submit as submit_process
    from aiida_quantumespresso.common.types import SpinType

    from aiida_eqml.local import load_stack_config
    from aiida_eqml.workflows.hubbard.self_consistent import SelfConsistentMLHubbardWorkChain

    stack = load_stack_config()
    if stack is None:
        raise click.ClickException('no codes configured: run `aiida-eqml local setup` (or give your own codes there)')
    codes = stack.load_codes()
    nodes = load_models(models)
    predicts_v = all('hubbard_v' in node.targets for node in nodes)
    structure = build_structure(structure_file, hubbard_manifolds, u_start, predicts_v)
    moments = _parse_magnetization(magnetization)
    unknown = sorted(set(moments) - set(structure.get_kind_names()))
    if unknown:
        raise click.BadParameter(f'kinds {unknown} are not in {structure_file} (kinds: {structure.get_kind_names()})',
                                 param_hint='--magnetization')
    if moments:  # aiida-quantumespresso wants a moment for every kind: the unnamed ones start at 0
        moments = {kind: moments.get(kind, 0.0) for kind in structure.get_kind_names()}
    kwargs = {'spin_type': SpinType.COLLINEAR, 'initial_magnetic_moments': moments} if moments else {}
    overrides = {'max_iterations': max_iterations} if max_iterations else {}
    try:
        builder = SelfConsistentMLHubbardWorkChain.get_builder_from_protocol(
            codes['pw'], structure, nodes, protocol=protocol, hp_code=codes.get('hp') if use_hp else None,
            overrides=overrides, **kwargs)
    except ValueError as exception:
        raise click.ClickException(str(exception)) from None
    if use_hp:
        builder.validate_with_dfpt = orm.Bool(validate)
        if uncertainty_threshold is not None:
            builder.uncertainty_threshold = orm.Float(uncertainty_threshold)
    builder.anderson_depth = orm.Int(anderson_depth)
    builder.metadata.label = f'ML self-consistent Hubbard: {structure_file}'
    start = time.time()
    try:
        if submit:
            node = submit_process(builder)
            click.echo(f'submitted {node.process_label}<{node.pk}>')
            printed: set = set()
            while not node.is_terminated:
                _print_progress(node, printed)
                time.sleep(5)
            _print_progress(node, printed)
        else:
            _, node = run_get_node(builder)
    except ValueError as exception:  # the input validation: what the models cannot predict, named
        raise click.ClickException(str(exception)) from None
    print_summary(node)
    click.echo(f'wall time: {time.time() - start:.0f} s')
    if not node.is_finished_ok:
        raise SystemExit(node.exit_status or 1)
