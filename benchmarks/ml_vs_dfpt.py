"""ML self-consistent Hubbard loop vs aiida-hubbard's DFPT loop, on materials the model never saw.

For each material (``aiida_eqml.local.hubbard_materials``, at a0), in one run on this machine, one after the other:
aiida-hubbard's ``SelfConsistentHubbardWorkChain`` (scf -> hp.x, the campaign's settings = the model's protocol) and
``eqml.hubbard.self_consistent`` with the model (no hp.x). Per material: both wall times and their ratio, the ML
loop's wall time over the sum of its own scf times (the floor), |U_ML - U_DFPT| / U_DFPT (and V), moments and gaps of
both final scf runs, iterations. Writes ``docs/benchmarks/ml_vs_dfpt.json`` (command, commit, protocol, materials),
prints a Markdown table, and plots U (V) against iteration for both loops (``docs/benchmarks/ml_vs_dfpt.png``).

    python benchmarks/ml_vs_dfpt.py --materials TiO2-rutile,CoO-rocksalt-afm2 --model hubbard-tmo
    python benchmarks/ml_vs_dfpt.py ... --reuse-campaign   # take the DFPT loop of the label campaign instead of
                                                           # running it again (same settings; its timing was taken
                                                           # under the campaign's load: the JSON says so)
    python benchmarks/ml_vs_dfpt.py ... --reuse-campaign Li2NiCoO4-layered   # only for that (costly) material
    python benchmarks/ml_vs_dfpt.py --materials TiO2-rutile@1x1x2 --keep-earlier   # add one row to the file

``--keep-earlier`` keeps the rows of an earlier invocation for the materials not run now (each row names its own
command and commit, and its per-iteration U / V for the plot when it has them), so a costly material can be added
on another day, on a machine whose AiiDA profile no longer holds the earlier loops.

A material in the model's training set is refused (held-out means a material the model never saw).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
OUT = HERE.parent / 'docs' / 'benchmarks'


def _onsite(structure) -> dict:
    return {p.atom_index: p.value for p in structure.hubbard.parameters
            if p.atom_index == p.neighbour_index and tuple(p.translation) == (0, 0, 0)}


def _intersite(structure) -> dict:
    return {(p.atom_index, p.neighbour_index, tuple(p.translation)): p.value for p in structure.hubbard.parameters
            if not (p.atom_index == p.neighbour_index and tuple(p.translation) == (0, 0, 0))}


def _mare(ml: dict, dfpt: dict):
    common = [k for k in dfpt if k in ml and dfpt[k]]
    return float(np.mean([abs(ml[k] - dfpt[k]) / abs(dfpt[k]) for k in common])) if common else None


def dfpt_from_campaign(key: str):
    """The campaign's DFPT loop of ``key``: wall time, per-iteration U/V and the state of the last scf."""
    from hubbard_campaign import DATA

    from aiida_eqml.ml.dataset import Dataset

    meta = json.loads((DATA / f'{key}.json').read_text())
    npz = DATA / f'{key}.npz'
    samples = Dataset.load(npz).samples if npz.exists() else []  # a cell stopped before its first hp.x: none
    iterations = []
    for sample in sorted(samples, key=lambda s: s.info['iteration']):
        u = {i: float(v) for i, v in enumerate(sample.node_targets['hubbard_u'][:, 0]) if np.isfinite(v)}
        v = {}
        if 'hubbard_v' in sample.edge_targets:
            edge = sample.edge_targets['hubbard_v']
            v = {
                (int(k[0]), int(k[1]), tuple(int(t) for t in k[2:])): float(x)
                for k, x in zip(edge.keys, edge.values[:, 0])
            }
        iterations.append({'u': u, 'v': v, 'info': sample.info})
    last = iterations[-1]['info'] if iterations else {}
    complete = meta.get('exit_status') == 0
    # A cell stopped before its loop converged (exit status None: killed) is timed by the sum of its steps, the one
    # it was stopped in up to the stop: a lower bound of what the whole DFPT loop costs (dfpt_complete false)
    wall = meta['wall_s'] if complete else sum(s['wall_s'] for s in meta['steps'])
    return {'wall_s': wall, 'complete': complete, 'iterations': iterations,
            'exit': None if complete else f'{meta.get("exit_status")}: {meta.get("exit_message")}',
            'u': iterations[-1]['u'] if iterations else {}, 'v': iterations[-1]['v'] if iterations else {},
            'absolute_magnetization': last.get('absolute_magnetization'), 'band_gap_ev': last.get('band_gap_ev'),
            'source': f'campaign cell {key} (workchain uuid {meta["workchain_uuid"]})'}


def _manifest_training_materials(member: pathlib.Path) -> set:
    """``training_materials`` of the ``ensemble.json`` beside a member file that it lists; empty when none does."""
    from aiida_eqml.ml.ensemble import ENSEMBLE_MANIFEST

    manifest = member.resolve().parent / ENSEMBLE_MANIFEST
    if not manifest.is_file():
        return set()
    content = json.loads(manifest.read_text())
    if member.name not in {entry.get('file') for entry in content.get('members') or []}:
        return set()
    return set((content.get('metadata') or {}).get('training_materials') or [])


def parse_material(spec: str) -> tuple[str, tuple[int, int, int]]:
    """``NAME`` or ``NAME@2x1x1`` (a supercell of the material) -> (name, repeat)."""
    name, _, repeat = spec.partition('@')
    if not repeat:
        return name, (1, 1, 1)
    try:
        factors = tuple(int(n) for n in repeat.lower().split('x'))
    except ValueError:
        factors = ()
    if len(factors) != 3 or min(factors) < 1:
        raise SystemExit(f'--materials {spec}: the supercell must read NAME@AxBxC with positive integers')
    return name, factors


def run_dfpt(name: str, key: str, codes: dict, repeat=(1, 1, 1)):
    from aiida.engine import run_get_node
    from hubbard_campaign import build

    builder = build(name, 1.0, key, codes, repeat)
    start = time.time()
    _, node = run_get_node(builder)
    return dfpt_summary(node, time.time() - start)


def dfpt_summary(node, wall: float | None = None):
    """Wall time, per-iteration U/V and the last scf's state of a DFPT loop (an ``eqml.labels.hubbard`` run, as
    ``run_dfpt`` starts it; ``wall``: as timed by the caller, else the campaign's creation-to-last-calculation
    time)."""
    from hubbard_campaign import wall_time

    from aiida_eqml.calculations.functions.harvest import scf_diagnostics

    wall = wall_time(node) if wall is None else wall
    loop = [c for c in node.called if c.process_label == 'SelfConsistentHubbardWorkChain'][-1]
    hps = sorted(loop.base.links.get_outgoing(link_label_filter='iteration_%_hp').all(), key=lambda l: l.link_label)
    iterations = [{'u': _onsite(l.node.outputs.hubbard_structure), 'v': _intersite(l.node.outputs.hubbard_structure)}
                  for l in hps if l.node.is_finished_ok]
    scf = hps[-1].node.inputs.hp.parent_scf.creator
    state = scf_diagnostics(scf.inputs.parameters.get_dict(), scf.outputs.output_parameters.get_dict(),
                            scf.outputs.output_band)
    exit_status = None if node.exit_status is None else f'{node.exit_status}: {node.exit_message}'
    return {'wall_s': wall, 'complete': node.is_finished_ok, 'exit': exit_status, 'iterations': iterations,
            'u': iterations[-1]['u'],
            'v': iterations[-1]['v'], 'absolute_magnetization': state['absolute_magnetization'],
            'band_gap_ev': state['band_gap_ev'],
            'source': f'run here: eqml.labels.hubbard pk {node.pk} (uuid {node.uuid})'}


def run_ml(name: str, models, codes: dict, repeat=(1, 1, 1), anderson_depth: int = 0):
    from aiida import orm
    from aiida.engine import run_get_node
    from aiida_quantumespresso.common.types import SpinType

    from aiida_eqml.local.hubbard_materials import MATERIALS, hubbard_structure
    from aiida_eqml.workflows.hubbard.self_consistent import SelfConsistentMLHubbardWorkChain

    material = MATERIALS[name]
    moments = material.magnetization()
    kwargs = {'spin_type': SpinType.COLLINEAR, 'initial_magnetic_moments': {k: 5 * m for k, m in moments.items()}} \
        if moments else {}
    builder = SelfConsistentMLHubbardWorkChain.get_builder_from_protocol(
        codes['pw'], hubbard_structure(material, repeat=repeat), models, protocol='balanced', **kwargs)
    builder.anderson_depth = orm.Int(anderson_depth)
    start = time.time()
    _, node = run_get_node(builder)
    return ml_summary(name, node, time.time() - start)


def ml_summary(name: str, node, wall: float | None = None):
    """Wall time, scf floor, per-iteration U/V and the last scf's state of a finished ML loop (``wall``: as timed by
    the caller, else the node's creation-to-last-change time)."""
    if not node.is_finished_ok:
        raise RuntimeError(f'{name}: ML loop pk {node.pk} exit {node.exit_status}: {node.exit_message}')
    results = node.outputs
    wall = (node.mtime - node.ctime).total_seconds() if wall is None else wall
    history = results['history'].get_list()
    scf_s = sum(
        step['wall_s'] for record in history for name_, step in record['steps'].items() if name_.startswith('scf')
    )
    iterations = []
    for record in history:
        iterations.append({
            'u': {row['atoms'][0]: row['value'] for row in record['parameters'] if row['kind'] == 'U'},
            'v': {(row['atoms'][0], row['atoms'][1], tuple(row['translation'])): row['value']
                  for row in record['parameters'] if row['kind'] == 'V'}})
    last = history[-1]
    first_prediction = history[0]['steps'].get('prediction', {}).get('wall_s')
    return {
        'wall_s': wall,
        'scf_s': scf_s,
        'first_prediction_s': first_prediction,
        'iterations': iterations,
        'u': _onsite(results['hubbard_structure']),
        'v': _intersite(results['hubbard_structure']),
        'absolute_magnetization': last['absolute_magnetization'],
        'band_gap_ev': last['band_gap_ev'],
        'pk': node.pk,
    }


def iteration_series(iterations: list[dict]) -> list[dict]:
    """Per iteration ``{"u": {atom: eV}, "v": {"i-j-t1,t2,t3": eV}}`` with string keys, for the json."""
    return [{'u': {str(k): v for k, v in it['u'].items()},
             'v': {f'{k[0]}-{k[1]}-' + ','.join(map(str, k[2])): v for k, v in it['v'].items()}}
            for it in iterations]


def plot(rows: list[dict], path: pathlib.Path) -> None:
    """U (and V), mean over the sites (couples), against iteration for both loops of every row that has them."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    rows = [row for row in rows if row.get('iterations')]  # rows kept from before the series were stored: none
    if not rows:
        return
    fig, axes = plt.subplots(1, len(rows), figsize=(4 * len(rows), 3.2), squeeze=False)
    for ax, row in zip(axes[0], rows):
        for loop, style in (('dfpt', 'o-'), ('ml', 's--')):
            values = [np.mean(list(it['u'].values())) for it in row['iterations'][loop] if it['u']]
            ax.plot(range(1, len(values) + 1), values, style, label=f'U {loop}')
            v_values = [np.mean(list(it['v'].values())) for it in row['iterations'][loop] if it['v']]
            if v_values:
                ax.plot(range(1, len(v_values) + 1), v_values, style, label=f'V {loop}', alpha=0.6)
        ax.set_title(row['material'])
        ax.set_xlabel('iteration')
        ax.set_ylabel('eV')
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument(
        '--materials', required=True,
        help='comma-separated names of aiida_eqml.local.hubbard_materials, NAME@2x1x1 for a supercell of one'
    )
    parser.add_argument('--model', action='append', default=None, help='eqml.model pk, model file or reference name')
    parser.add_argument('--reuse-campaign', nargs='?', const='all', default=None, metavar='MATERIALS',
                        help='take the DFPT loop from the label campaign: for every material, or for these '
                             '(comma-separated; the others run both loops here)')
    parser.add_argument('--ml-workchain', action='append', default=[], metavar='MATERIAL=PK',
                        help='take the ML loop of MATERIAL from this finished eqml.hubbard.self_consistent run (with '
                             'the same models) instead of running it (e.g. one run beside the campaign cell)')
    parser.add_argument('--dfpt-workchain', action='append', default=[], metavar='MATERIAL=PK',
                        help='take the DFPT loop of MATERIAL from this finished eqml.labels.hubbard run (one this '
                             'script ran before) instead of running it')
    parser.add_argument('--keep-earlier', action='store_true',
                        help='keep the rows of the existing --out file for the materials not run now')
    parser.add_argument('--profile', default=None)
    parser.add_argument('--out', default=str(OUT / 'ml_vs_dfpt.json'))
    args = parser.parse_args(argv)

    from aiida import load_profile
    from aiida.orm import load_node

    load_profile(args.profile)
    from aiida_eqml.cli.hubbard import load_models
    from aiida_eqml.local import load_stack_config
    from aiida_eqml.local.hubbard_materials import MATERIALS, material_key, supercell_sites
    from aiida_eqml.ml.hubbard.protocol import REFERENCE_PROTOCOL
    from aiida_eqml.workflows.hubbard.builder import models_protocol

    codes = load_stack_config().load_codes()
    models = load_models(tuple(args.model or ('hubbard-tmo',)))
    from aiida_eqml.ml.hubbard.reference import REFERENCE_MODELS, reference_metadata

    trained_on = set()
    for identifier in args.model or ('hubbard-tmo',):
        if identifier in REFERENCE_MODELS:
            trained_on |= set(reference_metadata(identifier).get('training_materials') or [])
        elif os.path.isfile(identifier):
            # a member file of an ensemble directory (hubbard_reference_model.py --out): its manifest names the
            # training materials, which the member file itself does not
            trained_on |= _manifest_training_materials(pathlib.Path(identifier))
    for model in models:
        trained_on |= set(model.read()[2].get('training_materials') or [])
        trained_on |= set((model.base.extras.get('eqml_reference', {}) or {}).get('training_materials') or [])
    ml_nodes = {}
    for entry in args.ml_workchain:
        material, _, pk = entry.partition('=')
        node = load_node(int(pk))
        # the same predictions: config + weights (content_sha256), whichever nodes hold them
        used = sorted(model.content_sha256 or model.uuid for model in node.inputs.models.values())
        if used != sorted(model.content_sha256 or model.uuid for model in models):
            raise SystemExit(f'--ml-workchain {entry}: that loop ran with other models than --model')
        ml_nodes[material] = node
    dfpt_nodes = {material: load_node(int(pk)) for material, _, pk in
                  (entry.partition('=') for entry in args.dfpt_workchain)}
    rows = []
    for spec in args.materials.split(','):
        name, repeat = parse_material(spec)
        if name in trained_on:
            raise SystemExit(f'{name} is in the model\'s training materials: not a held-out material')
        if name not in MATERIALS:
            raise SystemExit(f'--materials {spec}: unknown material {name!r}; known: {", ".join(MATERIALS)}')
        supercell = repeat != (1, 1, 1)
        key = material_key(name, 1.0) + ('_' + 'x'.join(map(str, repeat)) if supercell else '')
        reuse = not supercell and (args.reuse_campaign == 'all' or name in (args.reuse_campaign or '').split(','))
        load_before = os.getloadavg()[0]
        if spec in dfpt_nodes:
            dfpt = dfpt_summary(dfpt_nodes[spec])
        else:
            dfpt = dfpt_from_campaign(key) if reuse else run_dfpt(name, key, codes, repeat)
        load_between = os.getloadavg()[0]
        if spec in ml_nodes:
            ml = ml_summary(spec, ml_nodes[spec])
        else:
            ml = run_ml(name, models, codes, repeat)
        load_after = os.getloadavg()[0]
        n_atoms = len(supercell_sites(MATERIALS[name], repeat)[1])
        moment, complete = dfpt['absolute_magnetization'], dfpt['complete']
        rows.append(
            {
                'material': spec,
                'n_atoms': n_atoms,
                'supercell': list(repeat) if supercell else None,
                'dfpt_s': dfpt['wall_s'],
                'ml_s': ml['wall_s'],
                'speedup': dfpt['wall_s'] / ml['wall_s'],
                'ml_over_scf_floor': ml['wall_s'] / ml['scf_s'],
                # against the DFPT loop's converged values only: the iterate of a loop that stopped or failed
                # is not what the ML loop should reach (it is kept in the json's dfpt_u_last_iteration)
                'mare_u': _mare(ml['u'], dfpt['u']) if complete else None,
                'mare_v': _mare(ml['v'], dfpt['v']) if complete else None,
                'd_moment_rel': (abs(ml['absolute_magnetization'] - moment) / moment
                                 if complete and moment is not None and moment > 0.1 else None),
                'd_gap_ev': (abs(ml['band_gap_ev'] - dfpt['band_gap_ev'])
                             if complete and dfpt['band_gap_ev'] is not None else None),
                'iterations_ml': len(ml['iterations']),
                'iterations_dfpt': len(dfpt['iterations']),
                'dfpt_source': dfpt['source'],
                # false: the DFPT loop was stopped before it converged; dfpt_s, speedup are then lower bounds
                'dfpt_complete': dfpt['complete'],
                'dfpt_exit': dfpt.get('exit'),
                'dfpt_u_last_iteration': None if complete else {str(k): v for k, v in dfpt['u'].items()},
                'ml_u': {str(k): v for k, v in ml['u'].items()},
                'dfpt_reused': reuse or spec in dfpt_nodes,
                'ml_workchain_pk': ml['pk'],
                'ml_reused': spec in ml_nodes,
                # 1-min load average of the machine (2 cores) before / after each loop: the times are only comparable
                # at similar load (a reused campaign loop ran with another cell beside it)
                'load_average': {
                    'dfpt': None if reuse or spec in dfpt_nodes else [load_before, load_between],
                    'ml': None if spec in ml_nodes else [load_between, load_after],
                },
                'ml_first_prediction_s': ml['first_prediction_s'],
                'iterations': {'dfpt': iteration_series(dfpt['iterations']),
                               'ml': iteration_series(ml['iterations'])},
            }
        )
        print(f'{spec}: DFPT {dfpt["wall_s"]:.0f} s, ML {ml["wall_s"]:.0f} s', flush=True)
    commit = subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True, cwd=HERE).stdout.strip()
    command = ' '.join(['python', 'benchmarks/ml_vs_dfpt.py', *(argv or sys.argv[1:])])
    for row in rows:
        row.update(command=command, commit=commit)
    out = pathlib.Path(args.out)
    if args.keep_earlier and out.exists():
        before = json.loads(out.read_text())
        if before.get('models_content_sha256') != sorted(model.content_sha256 for model in models):
            raise SystemExit(f'--keep-earlier: {out} was made with other models; its rows are not comparable')
        run_now = {row['material'] for row in rows}
        kept = [r for r in before['materials'] if r['material'] not in run_now]
        for r in kept:  # a row of a file from before rows named their own command and commit: the file's
            r.setdefault('command', before['command'])
            r.setdefault('commit', before['commit'])
        rows = kept + rows
    plot(rows, out.with_suffix('.png'))
    payload = {
        'command': command, 'commit': commit,
        'protocol': models_protocol({f'm{i}': m for i, m in enumerate(models)}) or REFERENCE_PROTOCOL,
        'reuse_campaign': args.reuse_campaign,
        'models_content_sha256': sorted(model.content_sha256 for model in models),
        'materials': rows,
    }
    out.write_text(json.dumps(payload, indent=1) + '\n')
    print('\n| material | atoms | DFPT s | ML s | speedup | ML / scf floor | MARE U | MARE V | d moment | d gap eV '
          '| it ML/DFPT |')
    print('|---|---|---|---|---|---|---|---|---|---|---|')
    fmt = lambda x, p='.3f': '-' if x is None else format(x, p)  # noqa: E731
    for r in payload['materials']:
        bound = '' if r['dfpt_complete'] else '>= '  # a stopped DFPT loop: its time and the speedup are lower bounds
        print(f"| {r['material']} | {r['n_atoms']} | {bound}{r['dfpt_s']:.0f} | {r['ml_s']:.0f} | "
              f"{bound}{r['speedup']:.2f} | "
              f"{r['ml_over_scf_floor']:.2f} | {fmt(r['mare_u'])} | {fmt(r['mare_v'])} | {fmt(r['d_moment_rel'])} | "
              f"{fmt(r['d_gap_ev'])} | {r['iterations_ml']}/{r['iterations_dfpt']} |")


if __name__ == '__main__':
    main()
