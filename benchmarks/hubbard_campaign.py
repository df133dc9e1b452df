"""The reference Hubbard label campaign: real hp.x U (and U+V) labels across six structure types, resumable.

Every cell of the plan (material x strain, ``aiida_eqml.local.hubbard_materials``) runs as one
``eqml.labels.hubbard`` work chain (aiida-hubbard's self-consistent scf -> hp.x cycle, each iteration one label)
at the campaign's protocol (``--protocol``: ``gamma``, the shipped labels at
``aiida_eqml.ml.hubbard.protocol.REFERENCE_PROTOCOL``, hp.x at q = Gamma; ``q222``, the next campaign at
``REFERENCE_PROTOCOL_Q222``, hp.x on a 2x2x2 q mesh), submitted to the daemon, at most ``--jobs`` at a time (serial
pw.x/hp.x: one core each). A finished cell is exported at once to ``benchmarks/data/hubbard_campaign/<key>.npz``
(``hubbard_campaign_q222/`` for ``q222``, and so on; its labels, each sample's info naming material, structure type,
iteration and protocol), ``<key>.json`` (pks, exit status, wall times per step) and ``archives/<key>.aiida``
(``verdi archive create`` of the cell's work chain: its pw.x and hp.x calculations, inputs and outputs; since the
fourteenth session, so that a cell's provenance outlives the profile of the day it ran in). Commit those files as
they arrive: re-running skips every cell that has them, so the campaign continues on another day on a fresh machine.
Cells whose loop failed get a ``.json`` with the failure and no ``.npz``; ``--retry-failed`` runs them again.
A cell still running when the machine goes (the end of a working session) is lost: its pw.x/hp.x job dies, the
restarted daemon finds its output missing (PwCalculation exit 305) and the loop fails, so ``--until HH:MM`` submits
only the cells whose estimate (the longest finished cell of the same material) ends before then.

    python benchmarks/hubbard_campaign.py plan                       # the cells, in order, and their state
    python benchmarks/hubbard_campaign.py run --jobs 2 [--only K,..] # submit / wait / export until done
    python benchmarks/hubbard_campaign.py run --until 10:00         # only cells expected to end by 10:00
    python benchmarks/hubbard_campaign.py export                     # export finished cells without submitting
    python benchmarks/hubbard_campaign.py archive                    # archives/<key>.aiida of exported cells here
    python benchmarks/hubbard_campaign.py merge OUT.npz              # one record of every exported label
    python benchmarks/hubbard_campaign.py summary                    # label counts vs the targets -> JSON
    python benchmarks/hubbard_campaign.py --protocol q222 run --only LiCoO2_layered_s100   # the 2x2x2 q campaign
    python benchmarks/hubbard_campaign.py --protocol q222 compare    # cells of both campaigns: Gamma vs 2x2x2 q
    python benchmarks/hubbard_campaign.py --protocol q333 compare --against q222   # 2x2x2 vs 3x3x3

Needs a profile made by ``aiida-eqml local setup`` and a running daemon (``verdi daemon start``).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
DOCS = HERE.parent / 'docs' / 'benchmarks'
#: Each campaign (one label protocol, ``aiida_eqml.ml.hubbard.protocol.CAMPAIGN_PROTOCOLS``) keeps its exported
#: cells and its summary apart: ``gamma`` is the shipped one (hp.x at q = Gamma), ``q222`` and ``q333`` on those q
#: meshes (docs/hubbard.md, "The q mesh, measured").
CAMPAIGN_FILES = {
    'gamma': (HERE / 'data' / 'hubbard_campaign', DOCS / 'hubbard_campaign.json'),
    'q222': (HERE / 'data' / 'hubbard_campaign_q222', DOCS / 'hubbard_campaign_q222.json'),
    'q333': (HERE / 'data' / 'hubbard_campaign_q333', DOCS / 'hubbard_campaign_q333.json'),
}
#: The campaign this process works on (``use_campaign``; ``--protocol``): its name, exported cells and summary.
CAMPAIGN = 'gamma'
DATA, SUMMARY = CAMPAIGN_FILES[CAMPAIGN]
EXTRA = 'eqml_hubbard_campaign'  # extras key on each submitted work chain: its cell key
#: Bumped when the cells' definition changes (3: U+V cells with U on every TM site and TM-O V, no U on O 2p), so
#: that work chains of an older definition in the profile are not taken for this one.
VERSION = 3
#: Strains of each material, in the order the campaign runs them: first every material at a0 (breadth first),
#: then the strained cells (0.94 / 1.06 added in the third session for more U labels of the cheap rock salts).
STRAINS = (1.00, 0.97, 1.03, 0.94, 1.06)
MAX_ITERATIONS = 3
#: Materials in campaign order: cheap and diverse first (U and U+V, magnetic and not), so that a short day of
#: running already covers several structure types.
ORDER = (
    'NiO-rocksalt-afm2', 'LiCoO2-layered', 'MnO-rocksalt-afm2', 'SrTiO3-perovskite', 'NiO2-layered',
    'CoO-rocksalt-afm2', 'TiO2-rutile', 'FeO-rocksalt-afm2', 'MnO2-rutile-afm', 'LiNiO2-layered', 'CoO2-layered',
    'NiO-rocksalt-fm', 'MnO-rocksalt-fm', 'Li2NiCoO4-layered', 'Sr3Ti2O7-ruddlesden-popper', 'TiO2-anatase',
    'BaTiO3-perovskite', 'CaTiO3-perovskite', 'NiTiO3-ilmenite-fm', 'MnTiO3-ilmenite-fm', 'Sr2TiO4-ruddlesden-popper',
)


def use_campaign(name: str) -> None:
    """Work on the campaign ``name`` from now on (module state: this is a script, one campaign per process)."""
    global CAMPAIGN, DATA, SUMMARY
    if name not in CAMPAIGN_FILES:
        raise SystemExit(f'--protocol {name!r}: the campaigns are {sorted(CAMPAIGN_FILES)}')
    CAMPAIGN = name
    DATA, SUMMARY = CAMPAIGN_FILES[name]


def protocol() -> dict:
    """The label protocol of the current campaign."""
    from aiida_eqml.ml.hubbard.protocol import CAMPAIGN_PROTOCOLS

    return CAMPAIGN_PROTOCOLS[CAMPAIGN]


def plan() -> list[tuple[str, str, float]]:
    """``[(key, material name, strain)]`` in campaign order."""
    from aiida_eqml.local.hubbard_materials import MATERIALS, material_key

    assert sorted(ORDER) == sorted(MATERIALS), 'ORDER must list every material once'
    return [(material_key(name, strain), name, strain) for strain in STRAINS for name in ORDER]


def state(key: str) -> str:
    if (DATA / f'{key}.npz').exists():
        return 'done'
    if (DATA / f'{key}.json').exists():
        return 'failed'
    return 'todo'


def build(name: str, strain: float, key: str, codes: dict, repeat: tuple[int, int, int] = (1, 1, 1), *,
          structure=None, max_iterations: int = MAX_ITERATIONS, qpoints_distance: float | None = None,
          kpoints_distance: float | None = None, ecutwfc: float | None = None):
    """The cell's ``eqml.labels.hubbard`` builder at the campaign's protocol (its hp.x q mesh included). The
    keywords change one setting for a sensitivity test (``benchmarks/hubbard_protocol.py``): a structure with other
    starting U, the number of iterations, the hp.x q distance (instead of the protocol's mesh) and the scf k distance,
    the wavefunction cutoff (Ry; the density cutoff kept at 4x)."""
    from aiida import orm

    from aiida_eqml.local.hubbard_materials import MATERIALS, hubbard_structure
    from aiida_eqml.workflows.labels.hubbard import HubbardLabelsWorkChain

    P = protocol()

    material = MATERIALS[name]
    structure = hubbard_structure(material, strain, repeat) if structure is None else structure
    magnetization = material.magnetization()
    overrides = {
        'max_concurrent': 1,
        'hubbard_loop': {
            'max_iterations': max_iterations,
            'meta_convergence': True,
            'tolerance_onsite': P['tolerance_onsite_ev'],
            'tolerance_intersite': P['tolerance_intersite_ev'],
            'scf': {
                'kpoints_distance': P['kpoints_distance'] if kpoints_distance is None else kpoints_distance,
                'kpoints_force_parity': False,
                'pw': {'parameters': {
                    'CONTROL': {'tstress': False, 'tprnfor': False},  # labels need neither
                    'SYSTEM': {'ecutwfc': P['ecutwfc_ry'] if ecutwfc is None else ecutwfc,
                               'ecutrho': P['ecutrho_ry'] if ecutwfc is None else 4 * ecutwfc,
                               'smearing': P['smearing'], 'degauss': P['degauss_ry']},
                    'ELECTRONS': {'conv_thr': P['conv_thr_per_atom_ry'] * len(structure.sites)},
                }},
            },
            # a distance larger than any reciprocal vector gives the 1x1x1 mesh; another mesh is set below
            'hubbard': {'qpoints_distance': 100.0 if qpoints_distance is None else qpoints_distance,
                        'parallelize_atoms': False, 'parallelize_qpoints': False},
        },
    }
    builder = HubbardLabelsWorkChain.get_builder_from_protocol(
        codes['pw'], codes['hp'], {key: structure}, protocol='fast', overrides=overrides,
        starting_magnetization={key: magnetization} if magnetization else None,
    )
    if qpoints_distance is None and list(P['hp_qpoints']) != [1, 1, 1]:
        # the protocol's mesh itself, the same on every strain (a distance would change it with the cell)
        qpoints = orm.KpointsData()
        qpoints.set_kpoints_mesh(list(P['hp_qpoints']))
        builder.hubbard_loop.hubbard.pop('qpoints_distance', None)
        builder.hubbard_loop.hubbard.qpoints = qpoints
    builder.metadata.label = f'hubbard campaign {key}' + ('' if CAMPAIGN == 'gamma' else f' ({CAMPAIGN})')
    return builder


def find_node(key: str):
    from aiida import orm

    filters = {f'extras.{EXTRA}': key, f'extras.{EXTRA}_version': VERSION}
    if CAMPAIGN != 'gamma':  # the same cell key in two campaigns: the protocol tells them apart
        filters[f'extras.{EXTRA}_protocol'] = protocol()['name']
    query = orm.QueryBuilder().append(orm.WorkflowNode, filters=filters, tag='w')
    nodes = sorted((row[0] for row in query.iterall()), key=lambda node: node.pk)
    return nodes[-1] if nodes else None


def _iteration_link(calc) -> str:
    """The loop's call-link label above a calculation, e.g. ``iteration_01_scf_smearing``."""
    from aiida.common.links import LinkType

    node = calc
    while node is not None:
        link = node.base.links.get_incoming(link_type=(LinkType.CALL_CALC, LinkType.CALL_WORK)).first()
        if link is None:
            return ''
        if re.match(r'iteration_\d+_', link.link_label):  # the loop's step, not PwBaseWorkChain's restart count
            return link.link_label
        node = link.node
    return ''


def wall_time(node) -> float:
    """Creation of the cell's work chain to the end of its last calculation (not ``mtime``: setting an extra later
    moves it)."""
    from aiida import orm

    ends = [n.mtime for n in node.called_descendants if isinstance(n, orm.CalcJobNode)]
    return round(((max(ends) if ends else node.mtime) - node.ctime).total_seconds(), 1)


def step_times(node) -> list[dict]:
    """Wall time of every CalcJob below ``node`` (creation to last modification), in order."""
    from aiida import orm

    calcs = sorted((n for n in node.called_descendants if isinstance(n, orm.CalcJobNode)), key=lambda n: n.pk)
    return [
        {'process': calc.process_label, 'step': _iteration_link(calc), 'pk': calc.pk, 'exit_status': calc.exit_status,
         'wall_s': round((calc.mtime - calc.ctime).total_seconds(), 1)}
        for calc in calcs
    ]


def recover(key: str, node):
    """``(labels, complete)`` of a cell whose labels work chain failed: harvested here from its self-consistent loop,
    so the DFT work is not repeated. A loop that finished (or stopped at max_iterations, 601) gives every iteration
    (``complete``); one that failed or died (an scf that would not converge, a job lost with the machine at the end
    of a session) gives the hp.x iterations that finished before (each is one label, as good as in a whole cycle;
    since the eleventh session). ``(None, False)`` if no hp.x iteration finished."""
    from aiida_eqml.workflows.labels.hubbard import HubbardLabelsWorkChain, harvest_loops

    loops = [child for child in node.called if child.process_label == 'SelfConsistentHubbardWorkChain']
    loop = loops[-1] if loops else None
    if loop is None or not HubbardLabelsWorkChain.finished_hp_iterations(loop):
        return None, False
    return harvest_loops({key: loop}), loop.is_finished_ok or loop.exit_status == 601


def export(key: str, name: str, strain: float, node) -> str:
    """Write ``<key>.npz`` (labels) and ``<key>.json`` (metadata) of a terminated cell; returns its state."""
    from aiida_eqml.local.hubbard_materials import MATERIALS
    from aiida_eqml.ml.hubbard.protocol import protocol_fingerprint

    material = MATERIALS[name]
    P = protocol()
    meta = {
        'key': key, 'material': name, 'structure_type': material.structure_type, 'order': material.order,
        'hubbard': material.hubbard, 'strain': strain, 'workchain_pk': node.pk, 'workchain_uuid': node.uuid,
        'exit_status': node.exit_status, 'exit_message': node.exit_message,
        'wall_s': wall_time(node), 'steps': step_times(node),
        'protocol': P, 'protocol_fingerprint': protocol_fingerprint(P),
    }
    DATA.mkdir(parents=True, exist_ok=True)
    if node.is_finished_ok and 'dataset' in node.outputs:
        dataset = node.outputs.dataset
    else:
        dataset, complete = recover(key, node)
        meta['partial'] = dataset is not None and not complete  # the loop died: its finished hp.x iterations only
    if dataset is not None:
        from aiida import orm

        from aiida_eqml.calculations.functions.harvest import scf_diagnostics

        record = dataset.get_dataset()
        for sample in record.samples:
            # the scf state with today's diagnostics (the stored ones predate the fix of non-polarized gaps)
            scf = orm.load_node(sample.info['scf_calculation_uuid'])
            sample.info.update(scf_diagnostics(scf.inputs.parameters.get_dict(),
                                               scf.outputs.output_parameters.get_dict(), scf.outputs.output_band))
            found = re.search(r'_iter(\d+)$', str(sample.info.get('name', '')))
            iteration = int(found.group(1)) if found else None
            sample.info.update({
                'material': name, 'structure_type': material.structure_type, 'strain': strain,
                'protocol': P, 'protocol_fingerprint': meta['protocol_fingerprint'],
                'campaign_key': key, 'iteration': iteration, 'dataset_uuid': dataset.uuid,
            })
        meta['n_samples'] = len(record)
        record.save(DATA / f'{key}.npz')
        status = 'done'
    else:
        status = 'failed'
    (DATA / f'{key}.json').write_text(json.dumps(meta, indent=1, default=str) + '\n')
    write_cell_archive(key, node)
    return status


def cell_archive(key: str) -> pathlib.Path:
    return DATA / 'archives' / f'{key}.aiida'


def write_cell_archive(key: str, node) -> pathlib.Path:
    """``archives/<key>.aiida``: the cell's work chain with everything it called, its inputs and outputs (AiiDA's
    default traversal rules), i.e. the provenance of its labels, which ``hubbard_reference_model.py --archive``
    imports when the profile it runs in is not the one the cell ran in."""
    from aiida.tools.archive import create_archive

    path = cell_archive(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    create_archive([node], filename=path, overwrite=True)
    return path


def archive_exported(args) -> None:
    """``archive``: write ``archives/<key>.aiida`` of every exported cell whose work chain is in this profile."""
    from aiida import orm
    from aiida.common.exceptions import NotExistent

    for meta_path in sorted(DATA.glob('*.json')):
        meta = json.loads(meta_path.read_text())
        key = meta['key']
        if cell_archive(key).exists() and not args.refresh:
            continue
        try:
            node = orm.load_node(meta['workchain_uuid'])
        except NotExistent:
            continue  # ran in another session's profile: its provenance is in an earlier archive, or lost
        path = write_cell_archive(key, node)
        print(f'{key}: {path.relative_to(HERE.parent)} ({path.stat().st_size / 2**20:.2f} MiB)')


def run(args) -> None:
    from aiida.engine import submit
    from sqlalchemy.exc import OperationalError

    from aiida_eqml.local import load_stack_config

    codes = load_stack_config().load_codes()
    if args.only:  # in the order given: a short session runs the cheap cells first
        by_key = {cell[0]: cell for cell in plan()}
        unknown = [key for key in args.only.split(',') if key not in by_key]
        if unknown:
            raise SystemExit(f'--only: unknown cell keys {unknown}')
        cells = [by_key[key] for key in args.only.split(',')]
    else:
        cells = plan()
    in_flight = {}
    for key, name, strain in cells:
        node = find_node(key)
        if state(key) == 'todo' and node is not None and not node.is_terminated:
            in_flight[key] = (name, strain, node)  # submitted by an earlier run of this script: wait for it
    queue = [c for c in cells if c[0] not in in_flight and (state(c[0]) == 'todo' or
                                                          (args.retry_failed and state(c[0]) == 'failed'))]
    print(f'{len(queue)} cells to run, {len(in_flight)} in flight', flush=True)
    while queue or in_flight:
        while queue and len(in_flight) < args.jobs:
            key, name, strain = queue.pop(0)
            if args.until is not None and (estimate := estimated_wall(name)) > args.until - time.time():
                # a cell cut off by the end of the session is lost (its running job dies with the machine)
                print(f'{time.strftime("%H:%M:%S")} skipped {key}: estimated {estimate:.0f} s, '
                      f'{args.until - time.time():.0f} s left before --until', flush=True)
                continue
            node = find_node(key)
            if node is None or (node.is_terminated and not (node.is_finished_ok and 'dataset' in node.outputs)):
                node = submit(build(name, strain, key, codes))
                node.base.extras.set_many({EXTRA: key, f'{EXTRA}_version': VERSION,
                                           f'{EXTRA}_protocol': protocol()['name']})
                print(f'{time.strftime("%H:%M:%S")} submitted {key}: pk {node.pk}', flush=True)
            in_flight[key] = (name, strain, node)
        try:
            for key in list(in_flight):
                name, strain, node = in_flight[key]
                if node.is_terminated:
                    status = export(key, name, strain, node)
                    wall = wall_time(node)
                    print(
                        f'{time.strftime("%H:%M:%S")} {key}: {status} (exit {node.exit_status}) in {wall:.0f} s',
                        flush=True,
                    )
                    del in_flight[key]
        except OperationalError as exc:  # SQLite busy (another process writing): the next poll reads again
            print(f'{time.strftime("%H:%M:%S")} storage busy, polling again: {str(exc).splitlines()[0]}', flush=True)
            from aiida.manage import get_manager

            get_manager().get_profile_storage().get_session().rollback()
        time.sleep(args.poll)


def estimated_wall(name: str) -> float:
    """A cell's expected wall time (s): the longest finished cell of the same material in this campaign, else the
    longest finished cell of the campaign (strains of one material cost about the same; others, unknown)."""
    walls = {}
    for path in DATA.glob('*.json'):
        meta = json.loads(path.read_text())
        if meta.get('exit_status') == 0 and meta.get('wall_s'):
            walls.setdefault(meta['material'], []).append(meta['wall_s'])
    return max(walls[name]) if name in walls else max((w for ws in walls.values() for w in ws), default=0.0)


def until_timestamp(text: str) -> float:
    """``HH:MM`` (this machine's clock) as the next such moment, as a Unix time."""
    import datetime

    try:
        hour, minute = (int(part) for part in text.split(':'))
        moment = datetime.datetime.now().replace(hour=hour, minute=minute, second=0, microsecond=0)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f'--until {text!r}: expected HH:MM ({exc})') from None
    if moment <= datetime.datetime.now():
        moment += datetime.timedelta(days=1)
    return moment.timestamp()


def show_plan(args) -> None:
    if args.markdown:
        from hubbard_campaign_report import markdown_table

        return markdown_table(sys.modules[__name__])
    for key, _name, _strain in plan():
        extra = ''
        if (DATA / f'{key}.json').exists():
            meta = json.loads((DATA / f'{key}.json').read_text())
            extra = f"{meta.get('n_samples', 0)} labels, {meta['wall_s']:.0f} s, exit {meta['exit_status']}"
        print(f'{key:34s} {state(key):7s} {extra}')


def export_finished(args) -> None:
    for key, name, strain in plan():
        node = find_node(key)
        if node is not None and node.is_terminated and (state(key) == 'todo' or args.refresh
                                                        or (args.failed and state(key) == 'failed')):
            print(key, export(key, name, strain, node))


def merge(args) -> None:
    from aiida_eqml.ml.dataset import Dataset

    records = [Dataset.load(path) for path in sorted(DATA.glob('*.npz'))]
    if not records:
        raise SystemExit(f'no exported labels in {DATA}')
    specs = {}
    for record in records:
        specs.update(record.target_specs)
    merged = Dataset([s for r in records for s in r.samples], specs)
    merged.save(args.out)
    print(f'{len(merged)} labels of {len(records)} cells -> {args.out}')


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--profile', default=None)
    parser.add_argument('--protocol', default='gamma', choices=sorted(CAMPAIGN_FILES),
                        help='the campaign: gamma (hp.x at q = Gamma, the shipped labels), q222 or q333 (q mesh)')
    sub = parser.add_subparsers(dest='command', required=True)
    p = sub.add_parser('plan')
    p.add_argument('--markdown', action='store_true', help='a table of the labelled cells')
    p.set_defaults(func=show_plan)
    p = sub.add_parser('export')
    p.add_argument('--refresh', action='store_true', help='export again the cells of this profile already exported')
    p.add_argument('--failed', action='store_true',
                   help="export again the cells recorded as failed: the hp.x iterations their loops finished")
    p.set_defaults(func=export_finished)
    p = sub.add_parser('archive', help='archives/<key>.aiida of every exported cell whose work chain is here')
    p.add_argument('--refresh', action='store_true', help='write the archives that exist again')
    p.set_defaults(func=archive_exported)
    p = sub.add_parser('run')
    p.add_argument('--jobs', type=int, default=2, help='cells in flight at once (one core each)')
    p.add_argument('--only', default='', help='comma-separated cell keys, run in this order')
    p.add_argument('--retry-failed', action='store_true')
    p.add_argument('--poll', type=float, default=20.0, help='seconds between checks')
    p.add_argument('--until', type=until_timestamp, default=None, metavar='HH:MM',
                   help='submit only cells expected to finish by then (e.g. the end of the session)')
    p.set_defaults(func=run)
    p = sub.add_parser('summary')
    p.set_defaults(func=lambda args: __import__('hubbard_campaign_report').summary(sys.modules[__name__], args))
    p = sub.add_parser('compare', help='cells labelled by this campaign and by another (--against, gamma unless '
                                       'told): their q mesh against this one')
    p.add_argument('--against', default='gamma', choices=sorted(CAMPAIGN_FILES))
    p.set_defaults(func=lambda args: __import__('hubbard_campaign_report').compare(sys.modules[__name__], args))
    p = sub.add_parser('merge')
    p.add_argument('out')
    p.set_defaults(func=merge)
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    use_campaign(args.protocol)
    from aiida import load_profile

    load_profile(args.profile)
    args.func(args)


if __name__ == '__main__':
    main()
