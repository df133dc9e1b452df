"""What hp.x at q = Gamma returns for V: a sum over each couple's periodic images, checked on a real supercell.

hp.x at q = Gamma perturbs an atom together with all its periodic images, so the V_ij it returns is
sum_S V(i, j + S), the q = 0 Fourier component of the real-space V, and on a cell whose images sit within the
interaction range it is not the nearest-neighbour V. If that is so, a supercell whose images of j have become distinct
atoms j', j'', ... must split the primitive cell's value: V_prim(i, j) = sum_j' V_super(i, j') at the same
ground state (same U / V inputs, same geometry). This script compares the first hp.x iteration of a campaign cell
(primitive, q = Gamma) with the first hp.x iteration of the DFPT loop on its supercell (same seeds: the same
Hamiltonian), which ``benchmarks/ml_vs_dfpt.py --materials NAME@AxBxC`` runs (or ``--supercell-workchain PK`` of
an ``eqml.labels.hubbard`` run on the supercell). It is the physics behind the ``v_sum_images`` readout of the
Hubbard models (``aiida_eqml.ml.graph.sum_over_images``).

    python benchmarks/hubbard_images.py --cell TiO2_rutile_s100 --supercell-workchain 95 --profile aiida-eqml

Writes ``docs/benchmarks/hubbard_images.json`` (command, commit, per primitive couple: V_prim, the supercell
couples and their values, their sum, and whether every image hp.x returned was found) and prints a table.
The two runs use the k mesh of the same k distance on each cell, which is not the same sampling of the primitive
cell's Brillouin zone, so the sum rule holds up to that difference, not to round-off.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
OUT = HERE.parent / 'docs' / 'benchmarks' / 'hubbard_images.json'


def primitive_index(super_structure, prim_cell: np.ndarray, prim_positions: np.ndarray) -> list[int]:
    """The primitive atom each supercell site is an image of (fractional coordinates modulo the primitive cell)."""
    prim_frac = np.linalg.solve(prim_cell.T, prim_positions.T).T % 1.0
    out = []
    for site in super_structure.sites:
        frac = np.linalg.solve(prim_cell.T, np.asarray(site.position)) % 1.0
        d = np.abs(prim_frac - frac)
        d = np.minimum(d, 1.0 - d).max(axis=1)
        if d.min() > 1e-4:
            raise SystemExit(f'supercell site at {site.position} is no image of a primitive atom')
        out.append(int(d.argmin()))
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--cell', required=True, help='campaign cell key of the primitive cell (its first label)')
    parser.add_argument('--supercell-workchain', type=int, required=True,
                        help='pk of the eqml.labels.hubbard run on the supercell (its first hp.x iteration)')
    parser.add_argument('--profile', default=None)
    parser.add_argument('--out', default=str(OUT))
    args = parser.parse_args(argv)

    from aiida import load_profile
    from aiida.orm import load_node

    load_profile(args.profile)
    from hubbard_campaign import DATA

    from aiida_eqml.calculations.functions.harvest import hubbard_values
    from aiida_eqml.ml.dataset import Dataset

    prim = sorted(Dataset.load(DATA / f'{args.cell}.npz').samples, key=lambda s: s.info['iteration'])[0]
    v_prim_label = prim.edge_targets['hubbard_v']
    v_prim = {(int(k[0]), int(k[1])): float(v) for k, v in zip(v_prim_label.keys, v_prim_label.values[:, 0])}
    u_prim = {i: float(u) for i, u in enumerate(prim.node_targets['hubbard_u'][:, 0]) if np.isfinite(u)}
    u_in_prim = {i: float(u) for i, u in enumerate(prim.node_attrs['hubbard_u_scf']) if u > 0}

    node = load_node(args.supercell_workchain)
    loop = [c for c in node.called if c.process_label == 'SelfConsistentHubbardWorkChain'][-1]
    first = [link for link in loop.base.links.get_outgoing(link_label_filter='iteration_%_hp').all()
             if link.node.is_finished_ok]
    if not first:
        raise SystemExit(f'pk {node.pk}: no finished hp.x iteration yet')
    hp = sorted(first, key=lambda link: link.link_label)[0].node
    super_in = hp.inputs.hp.parent_scf.creator.inputs.structure
    u_super, v_super = hubbard_values(hp.outputs.hubbard_structure)
    u_in_super, _ = hubbard_values(super_in)
    image_of = primitive_index(super_in, prim.cell, prim.positions)

    # the same Hamiltonian: the U inputs of the two scf runs agree on every image
    same_inputs = all(abs(u_in_super[a] - u_in_prim[image_of[a]]) < 1e-6 for a in u_in_super)
    rows = []
    for (i, j), value in sorted(v_prim.items()):
        # supercell couples (i', j') with i' the first image of i and j' any image of j: one value per couple
        i_super = image_of.index(i)
        couples = {}
        for (a, b, *_), v in v_super.items():
            if a == i_super and image_of[b] == j:
                couples.setdefault(b, v)
        total = float(sum(couples.values())) if couples else None
        # complete: every image of j in the supercell is a couple hp.x returned (it returns the first shell only,
        # so an image that the supercell moved beyond it has no value and the sum misses it)
        complete = len(couples) == len(super_in.sites) // len(prim.numbers)
        rows.append({'couple': [i, j], 'v_prim': value, 'supercell_couples': {str(b): v for b, v in couples.items()},
                     'v_super_sum': total, 'difference': None if total is None else total - value,
                     'complete': complete})
    # U_prim(i) = U(i) + sum over i's own images S != 0 of V(i, i + S): the supercell makes the nearest images distinct
    # atoms, so U_prim - U_super is the coupling of i to those images (hp.x's Ti-Ti V, which the labels do not keep)
    u_rows = [{'atom': i, 'u_prim': u, 'u_super': u_super.get(image_of.index(i)),
               'u_prim_minus_super': u - u_super[image_of.index(i)] if image_of.index(i) in u_super else None}
              for i, u in sorted(u_prim.items())]
    commit = subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True, cwd=HERE).stdout.strip()
    payload = {
        'command': ' '.join(['python', 'benchmarks/hubbard_images.py', *(argv or sys.argv[1:])]), 'commit': commit,
        'cell': args.cell, 'primitive_label': prim.info.get('name'), 'supercell_workchain_uuid': node.uuid,
        'supercell_hp_uuid': hp.uuid, 'n_atoms': {'primitive': len(prim.numbers), 'supercell': len(super_in.sites)},
        'same_u_inputs': same_inputs, 'v': rows, 'u': u_rows,
    }
    pathlib.Path(args.out).write_text(json.dumps(payload, indent=1) + '\n')
    print(f'{args.cell} (q = Gamma, {len(prim.numbers)} atoms) vs its {len(super_in.sites)}-atom supercell, '
          f'first hp.x of each, same U inputs: {same_inputs}')
    print('\n| couple (i, j) | V primitive (eV) | V supercell per image couple (eV) | sum | sum - primitive '
          '| all images |')
    print('|---|---|---|---|---|---|')
    for r in rows:
        images = ', '.join(f'{v:+.3f}' for v in r['supercell_couples'].values()) or '-'
        total = '-' if r['v_super_sum'] is None else f"{r['v_super_sum']:+.3f}"
        diff = '-' if r['difference'] is None else f"{r['difference']:+.3f}"
        print(f"| {tuple(r['couple'])} | {r['v_prim']:+.3f} | {images} | {total} | {diff} | "
              f"{'yes' if r['complete'] else 'no'} |")
    print('\n| atom | U primitive (eV) | U supercell (eV) | primitive - supercell |\n|---|---|---|---|')
    for r in u_rows:
        fmt = lambda x: '-' if x is None else f'{x:.3f}'  # noqa: E731
        print(f"| {r['atom']} | {fmt(r['u_prim'])} | {fmt(r['u_super'])} | {fmt(r['u_prim_minus_super'])} |")


if __name__ == '__main__':
    main()
