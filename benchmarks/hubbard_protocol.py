"""How much hp.x's U moves with the q and k meshes at one ground state: the reference protocol against aiida-hubbard's.

aiida-hubbard's ``balanced`` protocol on the 4-atom NiO AFM-II cell means 7x7x7 k (kpoints_distance 0.4) and a 4x4x4
q mesh (qpoints_distance 0.8) in every iteration of its loop: on this 2-core machine one such iteration is many
hours (one 5x5x5 smearing scf took 747 s; hp.x's cost grows with every irreducible q point times the k points),
so its loop is not run here. What is measured instead is each mesh's share of the difference, one setting at a
time, on the campaign's own ground state: the scf -> hp.x iteration of one campaign cell is re-run from the U_in of
its last label (its converged U), with hp.x's q mesh or the scf's k distance changed. The reference value is that
label's own U_out (same U_in, reference meshes); ``--run q=1`` repeats it as a reproducibility check. A U+V cell
(``--cell TiO2_rutile_s100``) is re-run from its *first* label instead, whose scf started from the campaign's seeds
of U and V, and V per couple (i, j, S) is compared too: there the q mesh is the question (docs/hubbard.md, "What hp.x
at q = Gamma returns").

    python benchmarks/hubbard_protocol.py --run q=2                 # hp.x on a 2x2x2 q mesh
    python benchmarks/hubbard_protocol.py --run q=2 --run k=0.6     # and the scf at aiida-hubbard's `fast` k
    python benchmarks/hubbard_protocol.py --run ecut=90             # the converged cutoff (90 / 360 Ry)

Each run is one ``eqml.labels.hubbard`` iteration (smearing scf, fixed-occupation scf, hp.x) in the profile, run in
this process. Writes ``docs/benchmarks/hubbard_protocol.json`` for NiO, ``hubbard_protocol_<cell>.json`` for another
cell (command, commit, the base label, per run: k and q meshes, U per Hubbard site and V per couple, their change
against the label, wall time, its own command and commit; runs of earlier invocations on the same cell are kept)
and prints a table.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
OUT = HERE.parent / 'docs' / 'benchmarks' / 'hubbard_protocol.json'
#: aiida-hubbard 0.7's protocol distances (aiida_hubbard/workflows/protocols/hubbard.yaml): scf k, hp.x q.
AIIDA_HUBBARD = {'fast': (0.6, 1.2), 'balanced': (0.4, 0.8), 'stringent': (0.2, 0.4)}


def mesh(structure, distance: float) -> list[int]:
    from aiida import orm

    kpoints = orm.KpointsData()
    kpoints.set_cell_from_structure(structure)
    kpoints.set_kpoints_mesh_from_density(distance, force_parity=False)
    return [int(n) for n in kpoints.get_kpoints_mesh()[0]]


def distance_for_mesh(structure, n) -> float:
    """The q distance that gives the mesh ``n`` (an int: n x n x n; or three ints) on this cell (hp.x's input here is
    a distance, as in aiida-hubbard's protocols). aiida's mesh is ceil(|b_i| / distance) per axis, so the candidates
    are the |b_i| / n_i; the largest that gives the mesh is taken."""
    from aiida import orm

    target = [n] * 3 if isinstance(n, int) else list(n)
    kpoints = orm.KpointsData()
    kpoints.set_cell_from_structure(structure)
    lengths = np.linalg.norm(kpoints.reciprocal_cell, axis=1)
    for distance in sorted({float(b / m) for b in lengths for m in target}, reverse=True):
        if mesh(structure, distance) == target:
            return distance
    raise SystemExit(f'--run q={n}: no distance gives a {"x".join(map(str, target))} q mesh on this cell '
                     f'(reciprocal vectors {np.round(lengths, 3).tolist()} 1/A)')


def parse_run(text: str) -> dict:
    """``q=2`` / ``k=0.6`` / ``ecut=90`` / ``q=2,k=0.6`` -> {'q': 2, 'k': 0.6}."""
    run = {}
    for item in text.split(','):
        name, _, value = item.partition('=')
        if name not in ('q', 'k', 'ecut') or not value:
            raise SystemExit(f'--run {text}: expected q=N or q=AxBxC, k=DISTANCE and/or ecut=RY, e.g. q=2, q=1x1x2, '
                             'k=0.6 or ecut=90')
        if name == 'q':
            parts = [int(x) for x in value.split('x')]
            run[name] = parts[0] if len(parts) == 1 else parts
        else:
            run[name] = float(value)
    return run


def onsite_u(structure) -> dict[int, float]:
    return {p.atom_index: p.value for p in structure.hubbard.parameters
            if p.atom_index == p.neighbour_index and tuple(p.translation) == (0, 0, 0)}


def intersite_v(sample) -> dict[str, float]:
    """``{"i-j-S1,S2,S3": V}`` of a label's finite hp.x V (empty for a U-only label)."""
    if 'hubbard_v' not in sample.edge_targets:
        return {}
    target = sample.edge_targets['hubbard_v']
    values = np.asarray(target.values, float).reshape(len(target.keys), -1)[:, 0]
    return {'{}-{}-{},{},{}'.format(*(int(x) for x in key)): float(v)
            for key, v in zip(target.keys, values) if np.isfinite(v)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--cell', default='NiO_rocksalt_afm2_s100',
                        help='campaign cell key (its last label is the base)')
    parser.add_argument('--run', action='append', required=True, help='q=N (hp.x mesh) and/or k=DISTANCE (scf)')
    parser.add_argument('--profile', default=None)
    parser.add_argument('--out', default=None,
                        help=f'JSON to write (default {OUT.name} for NiO_rocksalt_afm2_s100, else '
                             'hubbard_protocol_<cell>.json beside it)')
    args = parser.parse_args(argv)
    if args.out is None:
        default = OUT if args.cell == 'NiO_rocksalt_afm2_s100' else OUT.with_name(f'hubbard_protocol_{args.cell}.json')
        args.out = str(default)
    out = pathlib.Path(args.out)
    before = json.loads(out.read_text()) if out.exists() else None
    if before is not None and before.get('cell') != args.cell:  # checked before hours of DFT, not after
        raise SystemExit(f'{out} holds the runs of {before.get("cell")}, not {args.cell}: give another --out')

    from aiida import load_profile

    load_profile(args.profile)
    from aiida.engine import run_get_node
    from hubbard_campaign import DATA, build
    from hubbard_campaign import recover as harvest

    from aiida_eqml.local import load_stack_config
    from aiida_eqml.local.hubbard_materials import hubbard_structure
    from aiida_eqml.ml.dataset import Dataset
    from aiida_eqml.ml.hubbard.protocol import REFERENCE_PROTOCOL

    meta = json.loads((DATA / f'{args.cell}.json').read_text())
    samples = sorted(Dataset.load(DATA / f'{args.cell}.npz').samples, key=lambda s: s.info['iteration'])
    if meta.get('hubbard') == 'U':
        # the last label: its U_in (the U its perturbed scf ran with, on the Hubbard sites) is set on the structure
        base = samples[-1]
        u_in = {i: float(u) for i, (u, l) in
                enumerate(zip(base.node_attrs['hubbard_u_scf'], base.node_attrs['hubbard_l'])) if l >= 0}
        structure = hubbard_structure(meta['material'], meta['strain'])
        kinds = [site.kind_name for site in structure.sites]
        structure.clear_hubbard_parameters()
        for kind in sorted({kinds[i] for i in u_in}):  # one U per kind (QE's DFT+U card), the label's U_in
            structure.initialize_onsites_hubbard(kind, '3d', u_in[kinds.index(kind)], 'Ueff', use_kinds=True)
    else:
        # U+V: the first label, whose scf ran with the campaign's starting U and V, which the structure carries
        # again (the same seeds as benchmarks/hubbard_images.py); a last label's V_in would have to be set per couple
        base = samples[0]
        structure = hubbard_structure(meta['material'], meta['strain'])
        u_in = onsite_u(structure)
        seeded = np.asarray(base.node_attrs['hubbard_u_scf'], float)
        if not all(abs(seeded[i] - u) < 1e-6 for i, u in u_in.items()):
            raise SystemExit(f'{args.cell}: its first label did not start from the starting U the structure has now '
                             f'({u_in}): the materials table changed since the campaign')
    u_label = {i: float(v) for i, v in enumerate(base.node_targets['hubbard_u'][:, 0]) if np.isfinite(v)}
    v_label = intersite_v(base)

    codes = load_stack_config().load_codes()
    reference_k = REFERENCE_PROTOCOL['kpoints_distance']
    rows = []
    for text in args.run:
        run = parse_run(text)
        k_distance = run.get('k', reference_k)
        q = run.get('q', 1)
        q_mesh = [q] * 3 if isinstance(q, int) else q
        q_distance = 100.0 if q_mesh == [1, 1, 1] else distance_for_mesh(structure, q)
        key = f"{args.cell}_protocol_" + text.replace('=', '').replace(',', '_').replace('.', 'p')
        ecutwfc = run.get('ecut', REFERENCE_PROTOCOL['ecutwfc_ry'])
        builder = build(meta['material'], meta['strain'], key, codes, structure=structure, max_iterations=1,
                        qpoints_distance=q_distance, kpoints_distance=k_distance, ecutwfc=ecutwfc)
        start = time.time()
        _, node = run_get_node(builder)
        wall = time.time() - start
        finished = node.is_finished_ok and 'dataset' in node.outputs
        dataset = node.outputs.dataset if finished else harvest(args.cell, node)  # 1 iteration: exit 601 is fine
        if dataset is None:
            raise SystemExit(f'--run {text}: the iteration failed (pk {node.pk}, exit {node.exit_status}: '
                             f'{node.exit_message})')
        (sample,) = dataset.get_dataset().samples
        u = {i: float(v) for i, v in enumerate(sample.node_targets['hubbard_u'][:, 0]) if np.isfinite(v)}
        v = intersite_v(sample)
        rows.append({
            'run': text, 'k_distance': k_distance, 'k_mesh': mesh(structure, k_distance),
            'q_mesh': mesh(structure, q_distance),
            'q_distance': q_distance, 'ecutwfc_ry': ecutwfc, 'ecutrho_ry': 4 * ecutwfc,
            'u': u, 'd_u': {i: u[i] - u_label[i] for i in u if i in u_label},
            'd_u_rel': {i: (u[i] - u_label[i]) / u_label[i] for i in u if i in u_label},
            'v': v, 'd_v': {c: v[c] - v_label[c] for c in v if c in v_label},
            'v_only_here': sorted(set(v) - set(v_label)), 'v_only_in_label': sorted(set(v_label) - set(v)),
            'band_gap_ev': sample.info.get('band_gap_ev'), 'wall_s': wall, 'workchain_uuid': node.uuid,
        })
        print(f'{text}: U {u} (label {u_label}), {wall:.0f} s', flush=True)

    commit = subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True, cwd=HERE).stdout.strip()
    command = ' '.join(['python', 'benchmarks/hubbard_protocol.py', *(argv or sys.argv[1:])])
    for row in rows:
        row.update(command=command, commit=commit)
    if before is not None:  # runs of earlier invocations on the same cell are kept (each names its command and commit)
        kept = [r for r in before['runs'] if r['run'] not in {row['run'] for row in rows}]
        for r in kept:  # a file of the first version: its runs are of its top-level command
            r.setdefault('command', before['command'])
            r.setdefault('commit', before['commit'])
        rows = kept + rows
    payload = {
        'command': command, 'commit': commit,
        'cell': args.cell, 'protocol': REFERENCE_PROTOCOL,
        'base_label': {'name': base.info.get('name'), 'u_in': u_in, 'u_out': u_label, 'v_out': v_label,
                       'k_mesh': mesh(structure, reference_k), 'q_mesh': [1, 1, 1]},
        'aiida_hubbard_meshes': {name: {'k_mesh': mesh(structure, k), 'q_mesh': mesh(structure, q)}
                                 for name, (k, q) in AIIDA_HUBBARD.items()},
        'runs': rows,
    }
    out.write_text(json.dumps(payload, indent=1) + '\n')
    print('\n| run | k mesh | q mesh | U (eV) | U - label (eV) | wall s |\n|---|---|---|---|---|---|')
    for r in rows:
        print(f"| {r['run']} | {r['k_mesh']} | {r['q_mesh']} | "
              f"{', '.join(f'{v:.3f}' for v in r['u'].values())} | "
              f"{', '.join(f'{v:+.3f}' for v in r['d_u'].values())} | {r['wall_s']:.0f} |")
    for r in rows:
        for couple, v in sorted(r['v'].items()):
            label = v_label.get(couple)
            print(f"{r['run']} V {couple}: {v:+.3f} eV (label {'-' if label is None else f'{label:+.3f}'})")


if __name__ == '__main__':
    main()
