"""Anderson acceleration of the ML self-consistent Hubbard loop: iterations, wall time and the converged U / V with
``anderson_depth`` 0 (plain iteration, aiida-hubbard's) against 1, 2, ... on the same materials, model and machine.

Each loop is ``eqml.hubbard.self_consistent`` without hp.x (as the ML row of ``benchmarks/ml_vs_dfpt.py``, whose
``run_ml`` it calls), one after the other. Per material and depth: iterations, wall time, the sum of its scf times,
the converged U / V and their largest difference from plain iteration (the fixed point is the same; the difference
is the tolerance's worth of where each path stops), U per iteration. Writes ``docs/benchmarks/hubbard_mixing.json``
(command, commit, models' content hashes, rows) and ``hubbard_mixing.png`` (U of the first site against iteration),
and prints a Markdown table.

    python benchmarks/hubbard_mixing.py --materials TiO2-rutile,LiNiO2-layered,CoO-rocksalt-afm2 --depths 0 1 2
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
OUT = HERE.parent / 'docs' / 'benchmarks' / 'hubbard_mixing.json'


def largest_difference(values: dict, reference: dict) -> float | None:
    common = set(values) & set(reference)
    return max((abs(values[k] - reference[k]) for k in common), default=None)


def plot(rows: list[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    materials = list(dict.fromkeys(row['material'] for row in rows))
    fig, axes = plt.subplots(1, len(materials), figsize=(4 * len(materials), 3.2), squeeze=False)
    for ax, material in zip(axes[0], materials):
        for row in (r for r in rows if r['material'] == material):
            site = sorted(row['u_per_iteration'][0])[0]
            series = [it[site] for it in row['u_per_iteration']]
            ax.plot(range(1, len(series) + 1), series, marker='o', label=f"depth {row['anderson_depth']}")
        ax.set_title(material, fontsize=9)
        ax.set_xlabel('iteration')
        ax.set_ylabel(f'U (site {site}) / eV')
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--materials', required=True, help='comma-separated aiida_eqml.local.hubbard_materials names')
    parser.add_argument('--depths', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--model', action='append', default=None, help='eqml.model pk, model file or reference name')
    parser.add_argument('--profile', default=None)
    parser.add_argument('--out', default=str(OUT))
    args = parser.parse_args(argv)
    if 0 not in args.depths:
        raise SystemExit('--depths must include 0 (plain iteration, the reference of every row)')

    from aiida import load_profile

    load_profile(args.profile)
    from ml_vs_dfpt import run_ml

    from aiida_eqml.cli.hubbard import load_models
    from aiida_eqml.local import load_stack_config
    from aiida_eqml.local.hubbard_materials import MATERIALS

    codes = load_stack_config().load_codes()
    models = load_models(tuple(args.model or ('hubbard-tmo',)))
    rows = []
    for name in args.materials.split(','):
        if name not in MATERIALS:
            raise SystemExit(f'--materials: unknown material {name!r}; known: {", ".join(MATERIALS)}')
        plain = None
        for depth in sorted(args.depths):
            load_before = os.getloadavg()[0]
            ml = run_ml(name, models, codes, anderson_depth=depth)
            plain = plain or ml
            rows.append({
                'material': name, 'anderson_depth': depth, 'iterations': len(ml['iterations']),
                'wall_s': ml['wall_s'], 'scf_s': ml['scf_s'],
                'u': {str(k): v for k, v in ml['u'].items()},
                'v': {f'{k[0]}-{k[1]}-' + ','.join(map(str, k[2])): v for k, v in ml['v'].items()},
                'max_du_vs_plain_ev': largest_difference(ml['u'], plain['u']),
                'max_dv_vs_plain_ev': largest_difference(ml['v'], plain['v']),
                'u_per_iteration': [{str(k): v for k, v in it['u'].items()} for it in ml['iterations']],
                'workchain_pk': ml['pk'],
                'load_average': [load_before, os.getloadavg()[0]],
            })
            print(f"{name} depth {depth}: {len(ml['iterations'])} iterations, {ml['wall_s']:.0f} s", flush=True)
    commit = subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True, cwd=HERE).stdout.strip()
    command = ' '.join(['python', 'benchmarks/hubbard_mixing.py', *(argv or sys.argv[1:])])
    out = pathlib.Path(args.out)
    plot(rows, out.with_suffix('.png'))
    payload = {'command': command, 'commit': commit,
               'models_content_sha256': sorted(model.content_sha256 for model in models), 'rows': rows}
    out.write_text(json.dumps(payload, indent=1) + '\n')
    print('\n| material | depth | iterations | wall s | scf s | max dU vs plain (eV) | max dV vs plain (eV) |')
    print('|---|---|---|---|---|---|---|')
    fmt = lambda x: '-' if x is None else f'{x:.3f}'  # noqa: E731
    for r in rows:
        print(f"| {r['material']} | {r['anderson_depth']} | {r['iterations']} | {r['wall_s']:.0f} | {r['scf_s']:.0f} "
              f"| {fmt(r['max_du_vs_plain_ev'])} | {fmt(r['max_dv_vs_plain_ev'])} |")


if __name__ == '__main__':
    main()
