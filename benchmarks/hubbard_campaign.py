"""The reference Hubbard label campaign: real hp.x U (and U+V) labels across six structure types, resumable.

Every cell of the plan (material x strain, ``aiida_eqml.local.hubbard_materials``) runs as one
``eqml.labels.hubbard`` work chain (aiida-hubbard's self-consistent scf -> hp.x cycle, each iteration one label)
at the reference protocol (``aiida_eqml.ml.hubbard.protocol.REFERENCE_PROTOCOL``), submitted to the daemon, at
most ``--jobs`` at a time (serial pw.x/hp.x: one core each). A finished cell is exported at once to
``benchmarks/data/hubbard_campaign/<key>.npz`` (its labels, each sample's info naming material, structure type,
iteration and protocol) and ``<key>.json`` (pks, exit status, wall times per step). Commit those files as they
arrive: re-running skips every cell that has them, so the campaign continues on another day on a fresh machine.
Cells whose loop failed get a ``.json`` with the failure and no ``.npz``; ``--retry-failed`` runs them again.

    python benchmarks/hubbard_campaign.py plan                       # the cells, in order, and their state
    python benchmarks/hubbard_campaign.py run --jobs 2 [--only K,..] # submit / wait / export until done
    python benchmarks/hubbard_campaign.py export                     # export finished cells without submitting
    python benchmarks/hubbard_campaign.py merge OUT.npz              # one record of every exported label
    python benchmarks/hubbard_campaign.py summary                    # label counts vs the targets -> JSON

Needs a profile made by ``aiida-eqml local setup`` and a running daemon (``verdi daemon start``).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import re
import subprocess
import sys
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
DATA = HERE / 'data' / 'hubbard_campaign'
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
)


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
          structure=None, max_iterations: int = MAX_ITERATIONS, qpoints_distance: float = 100.0,
          kpoints_distance: float | None = None, ecutwfc: float | None = None):
    """The cell's ``eqml.labels.hubbard`` builder at the reference protocol. The keywords change one setting for a
    sensitivity test (``benchmarks/hubbard_protocol.py``): a structure with other starting U, the number of
    iterations, the hp.x q and scf k distances, the wavefunction cutoff (Ry; the density cutoff kept at 4x)."""
    from aiida_eqml.local.hubbard_materials import MATERIALS, hubbard_structure
    from aiida_eqml.ml.hubbard.protocol import REFERENCE_PROTOCOL as P
    from aiida_eqml.workflows.labels.hubbard import HubbardLabelsWorkChain

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
            # q = Gamma: a distance larger than any reciprocal vector gives the 1x1x1 mesh.
            'hubbard': {'qpoints_distance': qpoints_distance, 'parallelize_atoms': False, 'parallelize_qpoints': False},
        },
    }
    builder = HubbardLabelsWorkChain.get_builder_from_protocol(
        codes['pw'], codes['hp'], {key: structure}, protocol='fast', overrides=overrides,
        starting_magnetization={key: magnetization} if magnetization else None,
    )
    builder.metadata.label = f'hubbard campaign {key}'
    return builder


def find_node(key: str):
    from aiida import orm

    query = orm.QueryBuilder().append(
        orm.WorkflowNode, filters={f'extras.{EXTRA}': key, f'extras.{EXTRA}_version': VERSION}, tag='w')
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
    """The labels of a cell whose labels work chain failed after its self-consistent loop finished (e.g. in its
    harvest): harvested here from the loop, so the DFT work is not repeated. None if the loop itself failed."""
    from aiida_eqml.workflows.labels.hubbard import HubbardLabelsWorkChain, harvest_loops

    loops = [child for child in node.called if child.process_label == 'SelfConsistentHubbardWorkChain']
    if not loops:
        return None
    loop = loops[-1]
    if not (loop.is_finished_ok or loop.exit_status == 601) or not HubbardLabelsWorkChain.finished_hp_iterations(loop):
        return None
    return harvest_loops({key: loop})


def export(key: str, name: str, strain: float, node) -> str:
    """Write ``<key>.npz`` (labels) and ``<key>.json`` (metadata) of a terminated cell; returns its state."""
    from aiida_eqml.local.hubbard_materials import MATERIALS
    from aiida_eqml.ml.hubbard.protocol import REFERENCE_PROTOCOL, protocol_fingerprint

    material = MATERIALS[name]
    meta = {
        'key': key, 'material': name, 'structure_type': material.structure_type, 'order': material.order,
        'hubbard': material.hubbard, 'strain': strain, 'workchain_pk': node.pk, 'workchain_uuid': node.uuid,
        'exit_status': node.exit_status, 'exit_message': node.exit_message,
        'wall_s': wall_time(node), 'steps': step_times(node),
        'protocol': REFERENCE_PROTOCOL, 'protocol_fingerprint': protocol_fingerprint(REFERENCE_PROTOCOL),
    }
    DATA.mkdir(parents=True, exist_ok=True)
    dataset = node.outputs.dataset if node.is_finished_ok and 'dataset' in node.outputs else recover(key, node)
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
                'protocol': REFERENCE_PROTOCOL, 'protocol_fingerprint': meta['protocol_fingerprint'],
                'campaign_key': key, 'iteration': iteration, 'dataset_uuid': dataset.uuid,
            })
        meta['n_samples'] = len(record)
        record.save(DATA / f'{key}.npz')
        status = 'done'
    else:
        status = 'failed'
    (DATA / f'{key}.json').write_text(json.dumps(meta, indent=1, default=str) + '\n')
    return status


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
            node = find_node(key)
            if node is None or (node.is_terminated and not (node.is_finished_ok and 'dataset' in node.outputs)):
                node = submit(build(name, strain, key, codes))
                node.base.extras.set_many({EXTRA: key, f'{EXTRA}_version': VERSION})
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


def show_plan(args) -> None:
    if args.markdown:
        return markdown_table()
    for key, _name, _strain in plan():
        extra = ''
        if (DATA / f'{key}.json').exists():
            meta = json.loads((DATA / f'{key}.json').read_text())
            extra = f"{meta.get('n_samples', 0)} labels, {meta['wall_s']:.0f} s, exit {meta['exit_status']}"
        print(f'{key:34s} {state(key):7s} {extra}')


def markdown_table() -> None:
    """The labelled cells as a Markdown table (docs/hubbard_campaign.md is pasted from this)."""
    from aiida_eqml.ml.dataset import Dataset
    from aiida_eqml.ml.hubbard.records import hubbard_label_issues

    print('| cell | type | iterations | wall (s) | scf smearing / fixed / hp.x per iteration (s) | gap (eV) '
          '| U (eV) per iteration | V (eV) | flagged |')
    print('|---|---|---|---|---|---|---|---|---|')
    for key, _name, _strain in plan():
        if state(key) != 'done':
            continue
        meta = json.loads((DATA / f'{key}.json').read_text())
        record = Dataset.load(DATA / f'{key}.npz')
        samples = sorted(record.samples, key=lambda s: s.info['iteration'] or 0)
        steps = {}
        for step in meta['steps']:
            kind = step['step'].split('_', 2)[-1].replace('_magnetic', '')
            steps.setdefault(kind, []).append(step['wall_s'])
        timing = ' / '.join(
            f"{sum(v) / len(v):.0f}"
            for k, v in sorted(steps.items(), key=lambda kv: ('smearing' not in kv[0], 'hp' in kv[0]))
        )
        u = ', '.join(f"{np.nanmax(s.node_targets['hubbard_u']):.2f}" for s in samples)
        v = samples[-1].edge_targets.get('hubbard_v')
        v_text = f"{float(np.mean(v.values)):.2f}" if v is not None and len(v.keys) else '-'
        gap = min(samples[-1].info['band_gap_up_ev'], samples[-1].info['band_gap_down_ev'])
        flagged = sum(bool(hubbard_label_issues(s.info)) for s in samples)
        print(f"| {key} | {meta['structure_type']} {meta['order']} {meta['hubbard']} | {len(samples)} | "
              f"{meta['wall_s']:.0f} | {timing} | {gap:.2f} | {u} | {v_text} | {flagged}/{len(samples)} |")


def export_finished(args) -> None:
    for key, name, strain in plan():
        node = find_node(key)
        if node is not None and node.is_terminated and (state(key) == 'todo' or args.refresh):
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


#: The issue's targets for the campaign: materials with usable labels, U labels, symmetry-distinct V labels.
TARGETS = {'materials': 8, 'u_labels': 120, 'v_distinct_labels': 30}
SUMMARY = HERE.parent / 'docs' / 'benchmarks' / 'hubbard_campaign.json'


def summary(args) -> None:
    """Counts per cell and in total (all labels, and the usable ones: scf passing the quality filter), against
    :data:`TARGETS`; writes ``docs/benchmarks/hubbard_campaign.json`` with the command line and the commit."""
    from aiida_eqml.ml.dataset import Dataset
    from aiida_eqml.ml.hubbard.evaluation import distinct_v_couples
    from aiida_eqml.ml.hubbard.protocol import REFERENCE_PROTOCOL
    from aiida_eqml.ml.hubbard.records import hubbard_label_issues

    cells, materials = [], set()
    totals = dict.fromkeys(('hp_runs', 'hp_runs_usable', 'u_labels', 'u_usable', 'v_labels', 'v_usable',
                            'v_distinct_labels', 'v_distinct_usable', 'wall_s'), 0)
    for key, name, strain in plan():
        entry = {'key': key, 'material': name, 'strain': strain, 'state': state(key)}
        if entry['state'] != 'todo':
            meta = json.loads((DATA / f'{key}.json').read_text())
            entry.update(wall_s=meta['wall_s'], exit_status=meta['exit_status'])
            totals['wall_s'] += meta['wall_s'] or 0
        if entry['state'] == 'done':
            counts = dict.fromkeys(('n_samples', 'n_flagged', 'u', 'v', 'v_distinct'), 0)
            for sample in Dataset.load(DATA / f'{key}.npz').samples:
                usable = not hubbard_label_issues(sample.info)
                u = sample.node_targets.get('hubbard_u')
                n_u = int(np.isfinite(u).sum()) if u is not None else 0
                v = sample.edge_targets.get('hubbard_v')
                n_v = int(np.isfinite(v.values).sum()) if v is not None else 0
                n_distinct = distinct_v_couples(sample)
                counts['n_samples'] += 1
                counts['n_flagged'] += not usable
                counts['u'] += n_u
                counts['v'] += n_v
                counts['v_distinct'] += n_distinct
                for field, value in (
                    ('hp_runs', 1),
                    ('u_labels', n_u),
                    ('v_labels', n_v),
                    ('v_distinct_labels', n_distinct),
                ):
                    totals[field] += value
                    if usable:
                        totals[field.replace('_labels', '_usable') if field != 'hp_runs' else 'hp_runs_usable'] += value
                if usable and (n_u or n_v):
                    materials.add(name)
            entry.update(counts)
        cells.append(entry)
    totals['materials_usable'] = sorted(materials)
    met = {'materials': len(materials) >= TARGETS['materials'], 'u_labels': totals['u_usable'] >= TARGETS['u_labels'],
           'v_distinct_labels': totals['v_distinct_usable'] >= TARGETS['v_distinct_labels']}
    commit = subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True, cwd=HERE).stdout.strip()
    payload = {
        'command': ' '.join(['python', 'benchmarks/hubbard_campaign.py', *args.argv]),
        'commit': commit, 'protocol': REFERENCE_PROTOCOL, 'targets': TARGETS, 'targets_met': met,
        'counting': 'usable = the perturbed scf passes hubbard_label_issues (converged, gapped in both spin channels); '
                    'V symmetry-distinct: per hp.x run, couples in distinct (spglib orbit pair, bond length) classes '
                    '(aiida_eqml.ml.hubbard.evaluation.distinct_v_couples)',
        'totals': totals, 'cells': cells,
    }
    SUMMARY.write_text(json.dumps(payload, indent=1) + '\n')
    print(
        f"{len(cells)} cells: {sum(c['state'] == 'done' for c in cells)} done, "
        f"{sum(c['state'] == 'failed' for c in cells)} failed; {totals['hp_runs']} hp.x runs "
        f"({totals['hp_runs_usable']} usable); U {totals['u_usable']} usable of {totals['u_labels']}; "
        f"V {totals['v_usable']} usable of {totals['v_labels']}, symmetry-distinct {totals['v_distinct_usable']} "
        f"usable of {totals['v_distinct_labels']}; {len(materials)} materials with usable "
        f"labels; targets met: {met} -> {SUMMARY}"
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--profile', default=None)
    sub = parser.add_subparsers(dest='command', required=True)
    p = sub.add_parser('plan')
    p.add_argument('--markdown', action='store_true', help='a table of the labelled cells')
    p.set_defaults(func=show_plan)
    p = sub.add_parser('export')
    p.add_argument('--refresh', action='store_true', help='export again the cells of this profile already exported')
    p.set_defaults(func=export_finished)
    p = sub.add_parser('run')
    p.add_argument('--jobs', type=int, default=2, help='cells in flight at once (one core each)')
    p.add_argument('--only', default='', help='comma-separated cell keys, run in this order')
    p.add_argument('--retry-failed', action='store_true')
    p.add_argument('--poll', type=float, default=20.0, help='seconds between checks')
    p.set_defaults(func=run)
    p = sub.add_parser('summary')
    p.set_defaults(func=summary)
    p = sub.add_parser('merge')
    p.add_argument('out')
    p.set_defaults(func=merge)
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    from aiida import load_profile

    load_profile(args.profile)
    args.func(args)


if __name__ == '__main__':
    main()
