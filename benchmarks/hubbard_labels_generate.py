"""Make the real hp.x labels of the Hubbard benchmark with the product's own label work chain.

FM rock-salt NiO, MnO, FeO, CoO (2-atom cells, U on TM 3d from 5 eV) at a/a0 = 0.96 ... 1.04, each through
``eqml.labels.hubbard`` (aiida-hubbard's SelfConsistentHubbardWorkChain per structure, harvested into an
``eqml.dataset`` with provenance). Needs a profile prepared by ``aiida-eqml local setup`` (or ``--pw-code``,
``--hp-code`` and ``--pseudo-family`` for other codes). Then::

    python benchmarks/hubbard_uv.py harvest --profile NAME    # every hp.x iteration in the profile + scf diagnostics
    python benchmarks/hubbard_uv.py train --ecutwfc 60 --quality-filter insulating

The labels of docs/benchmarks were made with these settings (60/240 Ry, ``kpoints_distance`` 0.75, q = Gamma,
one iteration, starting magnetization 1 on the TM): 20 structures in 33 min on one core. At the 30 Ry ``test``
cutoffs every FM cell is spuriously metallic and the labels are noise (docs/hubbard.md).

    python benchmarks/hubbard_labels_generate.py [--profile NAME] [--oxides Ni,Mn] [--strains 0.98,1.0]
        [--ecutwfc 60] [--iterations 1] [--dry-run]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

#: Cubic lattice constants (Angstrom) of the unstrained cells (experimental, rounded).
A0 = {"Ni": 4.17, "Mn": 4.44, "Co": 4.26, "Fe": 4.33}


def fm_rocksalt(tm: str, a: float, u_start: float = 5.0):
    """Ferromagnetic rock-salt primitive cell (TM at the origin, O at the body centre), U on TM 3d."""
    from aiida import orm
    from aiida_quantumespresso.data.hubbard_structure import HubbardStructureData

    cell = 0.5 * a * np.array([[0.0, 1.0, 1.0], [1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    structure = orm.StructureData(cell=cell.tolist())
    structure.append_atom(position=(0.0, 0.0, 0.0), symbols=tm, name=tm)  # Hubbard atom first (aiida-hubbard)
    structure.append_atom(position=(0.5 * a, 0.5 * a, 0.5 * a), symbols="O", name="O")
    hubbard = HubbardStructureData.from_structure(structure)
    hubbard.initialize_onsites_hubbard(tm, "3d", u_start)
    return hubbard


def build(args):
    from aiida import orm

    from aiida_eqml.local import load_stack_config
    from aiida_eqml.workflows.labels.hubbard import HubbardLabelsWorkChain

    stack = load_stack_config()
    codes = stack.load_codes() if stack is not None else {}
    pw = orm.load_code(args.pw_code) if args.pw_code else codes.get("pw")
    hp = orm.load_code(args.hp_code) if args.hp_code else codes.get("hp")
    if pw is None or hp is None:
        raise SystemExit("no pw.x / hp.x code: run `aiida-eqml local setup` or pass --pw-code and --hp-code")

    structures, magnetization = {}, {}
    for tm in args.oxides.split(","):
        for strain in (float(s) for s in args.strains.split(",")):
            key = f"{tm}O_fm_s{round(strain * 100):03d}"
            structures[key] = fm_rocksalt(tm, A0[tm] * strain)
            magnetization[key] = {tm: 1.0, "O": 0.0}
    overrides = {
        "max_concurrent": 1,  # serial pw.x / hp.x: one loop at a time on a small machine
        "hubbard_loop": {
            "max_iterations": args.iterations,
            "meta_convergence": False,
            "scf": {
                "kpoints_distance": 0.75,
                "pw": {"parameters": {"SYSTEM": {"ecutwfc": args.ecutwfc, "ecutrho": 4 * args.ecutwfc}}},
            },
            "hubbard": {"qpoints_distance": 100.0, "parallelize_atoms": False, "parallelize_qpoints": False},
        },
    }
    kwargs = {"pseudo_family": args.pseudo_family} if args.pseudo_family else {}
    return HubbardLabelsWorkChain.get_builder_from_protocol(
        pw, hp, structures, protocol="fast", overrides=overrides, starting_magnetization=magnetization, **kwargs
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default=None, help="AiiDA profile (default: the default profile)")
    parser.add_argument("--oxides", default="Ni,Mn,Fe,Co", help="transition metals of the monoxides")
    parser.add_argument("--strains", default="0.96,0.98,1.0,1.02,1.04", help="a/a0 of each cell")
    parser.add_argument("--ecutwfc", type=float, default=60.0, help="Ry; ecutrho = 4 ecutwfc (norm-conserving)")
    parser.add_argument("--iterations", type=int, default=1, help="hp.x iterations per structure")
    parser.add_argument("--pw-code"), parser.add_argument("--hp-code"), parser.add_argument("--pseudo-family")
    parser.add_argument("--dry-run", action="store_true", help="build the inputs and stop")
    args = parser.parse_args(argv)

    from aiida import load_profile

    load_profile(args.profile)
    builder = build(args)
    print(f"{len(builder.structures)} structures: {', '.join(sorted(builder.structures))}")
    if args.dry_run:
        return
    from aiida.engine import run_get_node

    start = time.time()
    results, node = run_get_node(builder)
    print(f"eqml.labels.hubbard pk={node.pk}: exit status {node.exit_status} after {time.time() - start:.0f} s")
    if "dataset" in results:
        print(f"dataset pk={results['dataset'].pk}: {results['dataset'].n_samples} labels")


if __name__ == "__main__":
    main()
