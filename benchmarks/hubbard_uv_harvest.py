"""``hubbard_uv.py harvest``: the older strain-path record (rock-salt NiO / MnO, docs/benchmarks/hubbard_labels.npz)
harvested from the AiiDA profile that ran ``benchmarks/hubbard_labels_generate.py``."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# ============================================================================ harvest (AiiDA)
def _rocksalt_a(structure) -> float:
    """Cubic rock-salt lattice constant from the volume: 4 formula units per a^3."""
    n_formula = len(structure.sites) / 2
    return float((4.0 * structure.get_cell_volume() / n_formula) ** (1.0 / 3.0))


def _existing_occupations(retrieved):
    """The ``eqml.occupations`` already extracted from this retrieved folder (re-running reuses it)."""
    from aiida.orm import CalcFunctionNode

    for link in retrieved.base.links.get_outgoing(node_class=CalcFunctionNode).all():
        node = link.node
        if node.process_label == "extract_occupations" and node.is_finished_ok:
            return node.outputs.occupations
    return None


def scf_diagnostics(scf) -> dict:
    """Scalars of the pw.x scf that hp.x perturbed (``aiida_eqml.calculations.functions.harvest.scf_diagnostics``)."""
    from aiida_eqml.calculations.functions.harvest import scf_diagnostics as diagnostics

    try:
        mesh = [int(x) for x in scf.inputs.kpoints.get_kpoints_mesh()[0]]
    except AttributeError:
        mesh = None
    return {
        "scf_pk": scf.pk,
        "kpoints_mesh": mesh,
        **diagnostics(
            scf.inputs.parameters.get_dict(), scf.outputs.output_parameters.get_dict(), scf.outputs.output_band
        ),
    }


def harvest(profile: str, output: Path) -> None:
    """The older strain-path record (``docs/benchmarks/hubbard_labels.npz``) from the dev profile's loops. The
    campaign's labels are exported per cell by ``benchmarks/hubbard_campaign.py`` instead."""
    from aiida import load_profile, orm

    load_profile(profile)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from hubbard_labels_generate import A0

    from aiida_eqml.calculations.functions.harvest import harvest_hubbard_labels
    from aiida_eqml.calculations.functions.occupations import extract_occupations
    from aiida_eqml.workflows.labels.hubbard import HubbardLabelsWorkChain

    query = orm.QueryBuilder().append(
        orm.WorkChainNode, filters={"attributes.process_label": "SelfConsistentHubbardWorkChain"}, project="*"
    )
    labels, rows, diagnostics = {}, [], {}
    for (loop,) in sorted(query.all(), key=lambda row: row[0].pk):
        for iteration, hp_node in HubbardLabelsWorkChain.finished_hp_iterations(loop):
            scf = hp_node.inputs.hp.parent_scf.creator
            structure = scf.inputs.structure
            occupations = _existing_occupations(scf.outputs.retrieved)
            if occupations is None:
                result, node = extract_occupations.run_get_node(retrieved=scf.outputs.retrieved, structure=structure)
                if not node.is_finished_ok:
                    print(f"skip loop {loop.pk} iteration {iteration}: {node.exit_message}", file=sys.stderr)
                    continue
                occupations = result["occupations"]
            tm = next(kind.symbol for kind in structure.kinds if kind.symbol != "O")
            order = "afm" if len(structure.sites) == 4 else "fm"
            key = f"{tm}O_{order}_a{round(_rocksalt_a(structure) * 1000):d}_pk{loop.pk}_iter{iteration:02d}"
            labels[f"{key}_structure"] = structure
            labels[f"{key}_occupations"] = occupations
            labels[f"{key}_hubbard"] = hp_node.outputs.hubbard_structure
            diagnostics[key] = scf_diagnostics(scf)
            rows.append((key, loop.pk, iteration))
    if not labels:
        raise SystemExit("no finished hp.x iteration in this profile")
    node = harvest_hubbard_labels(**labels)
    dataset = node.get_dataset()
    for sample in dataset.samples:
        name = sample.info["name"]
        tm, order, a_milli, pk, iteration = name.split("_")
        element = tm[:-1]
        a = int(a_milli[1:]) / 1000.0
        sample.info.update(
            {"element": element, "order": order, "a": a, "strain": round(a / A0[element], 3),
             "loop_pk": int(pk[2:]), "iteration": int(iteration[4:]), "dataset_node_uuid": node.uuid,
             **diagnostics[name]}
        )
    output.parent.mkdir(parents=True, exist_ok=True)
    dataset.save(output)
    print(f"{len(dataset)} hp.x labels from {len({r[1] for r in rows})} loops -> {output} (eqml.dataset pk {node.pk})")
