"""Hubbard U from real hp.x labels: harvest them from AiiDA, train an ensemble, report the errors.

Two steps::

    # 1. (AiiDA) every successful hp.x iteration of every SelfConsistentHubbardWorkChain in the profile
    #    -> eqml.occupations (extract_occupations) -> eqml.dataset (harvest_hubbard_labels) -> .npz
    AIIDA_PATH=/tmp/aiida-dev .venv/bin/python benchmarks/hubbard_uv.py harvest --profile eqml-dev

    # 2. (pure ML, no aiida) train N seeds on the training structures, predict the held-out ones
    .venv/bin/python benchmarks/hubbard_uv.py train

Outputs: ``docs/benchmarks/hubbard_labels.npz`` (the Hubbard dataset record, see
``aiida_eqml/ml/hubbard/records.py``), ``docs/benchmarks/hubbard_uv.json`` (metrics, per-site
predictions with ensemble spread, settings), ``docs/benchmarks/hubbard_uv_parity.png``.

One sample = one hp.x run: inputs are the occupation matrices of the scf hp.x perturbed and the U
that scf used; the target is the U hp.x returned. The split is by *structure* (all iterations of a
held-out structure are in the test set), so the test measures prediction on crystals not seen.

``harvest`` also stores, per sample, scalars of the pw.x scf that hp.x perturbed (cutoff, k mesh,
occupations, convergence, magnetization, electrons and band gap per spin channel: see
:func:`scf_diagnostics`). ``train --quality-filter insulating`` drops the labels whose perturbed
ground state is metallic in a spin channel (``aiida_eqml.ml.hubbard.records.hubbard_label_issues``);
``--ecutwfc 60`` keeps only the labels of one cutoff. Both only look at the scf, never at the label.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LABELS = ROOT / "docs" / "benchmarks" / "hubbard_labels.npz"
RESULTS = ROOT / "docs" / "benchmarks" / "hubbard_uv.json"
PARITY = ROOT / "docs" / "benchmarks" / "hubbard_uv_parity.png"
#: Unstrained lattice constants (Angstrom) of the label-generation runs (benchmarks/hubbard_labels_generate.py).
from hubbard_labels_generate import A0  # noqa: E402  (benchmarks/ is on sys.path when run as a script)


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
    """Scalars of the pw.x scf that hp.x perturbed (stored in ``Sample.info``; see
    ``aiida_eqml.calculations.functions.harvest.scf_diagnostics`` and ``hubbard_label_issues``)."""
    from aiida_eqml.calculations.functions.harvest import scf_diagnostics as diagnostics

    try:
        mesh = [int(x) for x in scf.inputs.kpoints.get_kpoints_mesh()[0]]
    except AttributeError:
        mesh = None
    return {
        "scf_pk": scf.pk,
        "kpoints_mesh": mesh,
        **diagnostics(scf.inputs.parameters.get_dict(), scf.outputs.output_parameters.get_dict(), scf.outputs.output_band),
    }


def harvest(profile: str, output: Path) -> None:
    from aiida import load_profile, orm

    load_profile(profile)
    from aiida_eqml.calculations.functions.harvest import harvest_hubbard_labels
    from aiida_eqml.calculations.functions.occupations import extract_occupations
    from aiida_eqml.workflows.labels.hubbard import HubbardLabelsWorkChain

    query = orm.QueryBuilder().append(
        orm.WorkChainNode, filters={"attributes.process_label": "SelfConsistentHubbardWorkChain"}, project="*"
    )
    labels, rows, diagnostics = {}, [], {}
    for (loop,) in sorted(query.all(), key=lambda row: row[0].pk):
        # Unfinished loops count too: each finished hp.x iteration is a complete label.
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
            a = _rocksalt_a(structure)
            key = f"{tm}O_{order}_a{round(a * 1000):d}_pk{loop.pk}_iter{iteration:02d}"
            labels[f"{key}_structure"] = structure
            labels[f"{key}_occupations"] = occupations
            labels[f"{key}_hubbard"] = hp_node.outputs.hubbard_structure
            diagnostics[key] = scf_diagnostics(scf)
            rows.append((key, loop.pk, iteration))
    if not labels:
        raise SystemExit("no finished hp.x iteration in this profile")
    node = harvest_hubbard_labels(**labels)
    dataset = node.get_dataset()
    # Benchmark metadata the split needs (composition, magnetic order, strain, loop / iteration).
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
    print(f"  {'sample':40s} {'ecut':>4s} {'occ':5s} {'conv':4s} {'steps':>5s} {'M':>6s} {'|M|':>5s} {'N_up':>6s} {'N_dn':>6s}"
          f" {'gap_up':>6s} {'gap_dn':>6s} {'d_up':>5s} {'d_dn':>5s} {'U_scf':>6s} {'U_hp':>6s}")
    for s in dataset.samples:
        u = s.node_targets["hubbard_u"][:, 0]
        i, d = s.info, s.node_attrs["occupations"][0]
        print(f"  {i['name']:40s} {i['ecutwfc']:4.0f} {i['occupations'][:5]:5s} {str(i['scf_converged']):4s} {i['scf_steps']:5d}"
              f" {i['total_magnetization']:6.2f} {i['absolute_magnetization']:5.2f} {i['electrons_up']:6.2f} {i['electrons_down']:6.2f}"
              f" {i['band_gap_up_ev']:6.2f} {i['band_gap_down_ev']:6.2f} {np.trace(d[0]):5.2f} {np.trace(d[1]):5.2f}"
              f" {s.node_attrs['hubbard_u_scf'][0]:6.3f} {u[0]:6.3f}")


# ============================================================================ train (pure ML)
def structure_key(sample) -> tuple:
    return (sample.info["element"], sample.info["order"], sample.info["strain"])


def choose_split(record, test_strains, val_fraction: float, seed: int) -> dict:
    """Test: every sample (all iterations) of the structures with a strain in ``test_strains``;
    validation: a seeded fraction of the remaining *structures*; train: the rest."""
    structures = sorted({structure_key(s) for s in record.samples})
    test = {k for k in structures if any(abs(k[2] - t) < 1e-3 for t in test_strains)}
    rest = [k for k in structures if k not in test]
    rng = np.random.default_rng(seed)
    n_val = int(round(val_fraction * len(rest)))
    val = {rest[i] for i in rng.permutation(len(rest))[:n_val]}
    split = {"train": [], "val": [], "test": []}
    for index, s in enumerate(record.samples):
        key = structure_key(s)
        split["test" if key in test else "val" if key in val else "train"].append(index)
    return split


def site_rows(record, predictions, indices):
    """One row per Hubbard site with a hp.x label: (sample, atom, truth, mean, std, U_scf, element)."""
    rows = []
    for i in indices:
        s = record.samples[i]
        truth = s.node_targets["hubbard_u"][:, 0]
        mean, std = predictions[i]["hubbard_u"]
        for atom in np.flatnonzero(np.isfinite(truth)):
            rows.append({
                "sample": s.info["name"], "atom": int(atom), "element": s.info["element"], "order": s.info["order"],
                "strain": s.info["strain"], "iteration": s.info["iteration"],
                "u_scf": float(s.node_attrs["hubbard_u_scf"][atom]), "u_hp": float(truth[atom]),
                "u_pred": float(mean[atom]), "u_std": float(std[atom]),
            })
    return rows


def add_baselines(table: dict) -> None:
    """Two baselines fitted on the training sites only, written into every row:

    * ``u_baseline``: the per-element mean U (what the model's normalisation shift alone gives);
    * ``u_linear_baseline``: per (element, magnetic order) a straight line U(a/a0) through the
      training strains (the mean where the training set has one strain only).
    """
    train_rows = table["train"]
    mean_by_element = {el: float(np.mean([r["u_hp"] for r in train_rows if r["element"] == el]))
                       for el in {r["element"] for r in train_rows}}
    lines = {}
    for key in {(r["element"], r["order"]) for r in train_rows}:
        x = np.array([r["strain"] for r in train_rows if (r["element"], r["order"]) == key])
        y = np.array([r["u_hp"] for r in train_rows if (r["element"], r["order"]) == key])
        lines[key] = np.polyfit(x, y, 1) if len(set(x.tolist())) > 1 else np.array([0.0, float(np.mean(y))])
    for rows in table.values():
        for r in rows:
            r["u_baseline"] = mean_by_element.get(r["element"], float("nan"))
            line = lines.get((r["element"], r["order"]))
            r["u_linear_baseline"] = float(np.polyval(line, r["strain"])) if line is not None else r["u_baseline"]


def errors(rows, key="u_pred") -> dict:
    if not rows:
        return {}
    truth = np.array([r["u_hp"] for r in rows])
    pred = np.array([r[key] for r in rows])
    return {
        "n_sites": len(rows),
        "mae_ev": float(np.mean(np.abs(pred - truth))),
        "rmse_ev": float(np.sqrt(np.mean((pred - truth) ** 2))),
        "max_abs_ev": float(np.max(np.abs(pred - truth))),
        "mare_percent": float(100 * np.mean(np.abs(pred - truth) / np.abs(truth))),
    }


def parity_plot(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 5))
    colors = {"Ni": "tab:green", "Mn": "tab:purple", "Co": "tab:blue", "Fe": "tab:red"}
    for subset, marker, filled in (("train", "o", False), ("val", "s", False), ("test", "D", True)):
        for r in table.get(subset, []):
            c = colors.get(r["element"], "k")
            ax.errorbar(r["u_hp"], r["u_pred"], yerr=r["u_std"], fmt=marker, ms=6 if filled else 5,
                        mfc=c if filled else "none", mec=c, ecolor=c, alpha=0.85)
    allv = [r[k] for rows in table.values() for r in rows for k in ("u_hp", "u_pred")]
    lo, hi = min(allv) - 0.3, max(allv) + 0.3
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    present = {r["element"] for rows in table.values() for r in rows}
    for el, c in colors.items():
        if el in present:
            ax.plot([], [], "o", color=c, label=el)
    ax.plot([], [], "o", mfc="none", mec="k", label="train (open)")
    ax.plot([], [], "D", color="k", label="held-out (filled)")
    ax.set_xlim(lo, hi), ax.set_ylim(lo, hi)
    ax.set_xlabel("U from hp.x (eV)")
    ax.set_ylabel("U predicted, ensemble mean +- std (eV)")
    ax.set_title("Hubbard U of TM 3d in strained rock-salt monoxides")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=130)


#: ``--quality-filter`` choices -> ``hubbard_label_issues`` criteria (None: no filter).
QUALITY_FILTERS = {
    "none": None,
    "insulating": {"channels": "both"},
    "majority-gap": {"channels": "majority"},
}


def select_labels(record, args):
    """Apply ``--ecutwfc`` (labels of one DFT setting only) and ``--quality-filter`` (physics of the scf
    hp.x perturbed, see ``hubbard_label_issues``; never the U label). Returns (kept record, report)."""
    from aiida_eqml.ml.hubbard.records import filter_hubbard_record

    report = {"n_harvested": len(record), "ecutwfc": args.ecutwfc, "quality_filter": args.quality_filter,
              "min_gap_ev": args.min_gap, "removed": {}}
    if args.ecutwfc is not None:
        keep = [i for i, s in enumerate(record.samples) if abs(s.info.get("ecutwfc", -1) - args.ecutwfc) < 1e-6]
        for i, s in enumerate(record.samples):
            if i not in keep:
                report["removed"][s.info["name"]] = [f"ecutwfc {s.info.get('ecutwfc')} Ry, not {args.ecutwfc:g}"]
        record = record.subset(keep)
    criteria = QUALITY_FILTERS[args.quality_filter]
    if criteria is not None:
        record, removed = filter_hubbard_record(record, min_gap_ev=args.min_gap, **criteria)
        report["removed"].update(removed)
    report["n_kept"] = len(record)
    if not len(record):
        raise SystemExit("every label was removed by the selection")
    print(f"{report['n_kept']} of {report['n_harvested']} labels kept (ecutwfc={args.ecutwfc}, "
          f"quality filter {args.quality_filter!r}, min gap {args.min_gap} eV)")
    for name, issues in report["removed"].items():
        print(f"  removed {name:40s} {'; '.join(issues)}")
    return record, report


def run_training(args) -> None:
    from aiida_eqml.ml.dataset import Dataset
    from aiida_eqml.ml.hubbard.ensemble import train_ensemble
    from aiida_eqml.ml.hubbard.models import hubbard_model_config
    from aiida_eqml.ml.hubbard.records import hubbard_training_dataset

    full = Dataset.load(args.labels)
    record, selection = select_labels(full, args)
    dataset, attrs = hubbard_training_dataset(record)
    split = choose_split(record, args.test_strains, args.val_fraction, args.seed)
    if not split["test"]:
        raise SystemExit(f"no structure with strain in {args.test_strains}: nothing held out")
    species = sorted({s.info["element"] for s in record.samples}) + ["O"]
    model_config = hubbard_model_config(species, attrs, cutoff=args.cutoff, predict_v=False)
    config = {
        "model": model_config,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "split": split,
        "seed": args.seed,
        "optimizer": {"learning_rate": args.learning_rate, "schedule": "cosine", "decay_rate": 0.02, "warmup_epochs": 10},
        "early_stopping": {"patience": 0},
        "progress": False,
    }
    t0 = time.time()
    ensemble, runs = train_ensemble(dataset, config, num_members=args.members, out_dir=None)
    train_seconds = time.time() - t0
    predictions = ensemble.predict(dataset)
    table = {k: site_rows(record, predictions, split[k]) for k in ("train", "val", "test")}

    add_baselines(table)
    metrics = {k: {"model": errors(rows), "element_mean_baseline": errors(rows, "u_baseline"),
                   "element_strain_linear_baseline": errors(rows, "u_linear_baseline"),
                   "mean_ensemble_std_ev": float(np.mean([r["u_std"] for r in rows])) if rows else None}
               for k, rows in table.items()}
    members = [{"seed": m["seed"], "final_train_loss": run.history[-1]["train_loss"]} for m, run in zip(ensemble.metadata, runs)]

    print(f"\n{len(record)} hp.x labels ({sum(len(v) for v in table.values())} Hubbard sites), "
          f"{len(split['train'])}/{len(split['val'])}/{len(split['test'])} train/val/test samples, "
          f"held-out strains {args.test_strains}; {args.members} members x {args.epochs} epochs in {train_seconds:.0f} s")
    print(f"{'subset':6s} {'sites':>5s} {'MAE eV':>8s} {'RMSE eV':>8s} {'MARE %':>7s} {'std eV':>7s} | {'baseline MAE':>12s} {'MARE %':>7s}")
    for k in ("train", "val", "test"):
        m, b, lb = (metrics[k][x] for x in ("model", "element_mean_baseline", "element_strain_linear_baseline"))
        if m:
            print(f"{k:6s} {m['n_sites']:5d} {m['mae_ev']:8.3f} {m['rmse_ev']:8.3f} {m['mare_percent']:7.2f} "
                  f"{metrics[k]['mean_ensemble_std_ev']:7.3f} | {b['mae_ev']:12.3f} {b['mare_percent']:7.2f}"
                  f" | linear-in-strain {lb['mae_ev']:.3f} eV {lb['mare_percent']:.2f} %")
    print("\nheld-out sites:")
    print(f"{'sample':40s} {'U_scf':>6s} {'U_hp':>6s} {'pred':>6s} {'std':>5s} {'base':>6s} {'linear':>6s}")
    for r in table["test"]:
        print(f"{r['sample']:40s} {r['u_scf']:6.3f} {r['u_hp']:6.3f} {r['u_pred']:6.3f} {r['u_std']:5.3f} {r['u_baseline']:6.3f} {r['u_linear_baseline']:6.3f}")

    out = {
        "description": "Hubbard U (TM 3d) from real hp.x labels (QE 7.2 via qepy, aiida-hubbard SelfConsistentHubbardWorkChain,"
        " see selection for which labels); ensemble of independently seeded small NequIP models on occupation descriptors",
        "labels_file": os.path.relpath(args.labels, ROOT),
        "n_samples": len(record),
        "selection": selection,
        "split": {k: [record.samples[i].info["name"] for i in v] for k, v in split.items()},
        "test_strains": list(args.test_strains),
        "model_config": model_config,
        "training": {k: config[k] for k in ("epochs", "batch_size", "optimizer", "seed")},
        "members": members,
        "train_seconds": train_seconds,
        "metrics": metrics,
        "sites": table,
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(out, indent=1))
    parity_plot(table, args.plot)
    if args.save_ensemble:
        ensemble.save(args.save_ensemble, metadata={"labels": out["labels_file"]})
    print(f"\nwrote {args.results} and {args.plot}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    h = sub.add_parser("harvest", help="AiiDA profile -> Hubbard dataset record (.npz)")
    h.add_argument("--profile", default="eqml-dev")
    h.add_argument("--output", type=Path, default=LABELS)
    t = sub.add_parser("train", help="train the ensemble and write the benchmark files")
    t.add_argument("--labels", type=Path, default=LABELS)
    t.add_argument("--results", type=Path, default=RESULTS)
    t.add_argument("--plot", type=Path, default=PARITY)
    t.add_argument("--test-strains", type=float, nargs="+", default=[0.98, 1.02])
    t.add_argument("--ecutwfc", type=float, default=None, help="keep only labels computed at this cutoff (Ry)")
    t.add_argument("--quality-filter", choices=sorted(QUALITY_FILTERS), default="none",
                   help="drop labels whose perturbed scf is metallic in either spin channel (insulating) "
                        "or in the majority channel (majority-gap); default: keep all")
    t.add_argument("--min-gap", type=float, default=0.0, help="band gap (eV) the quality filter requires")
    t.add_argument("--val-fraction", type=float, default=0.0)
    t.add_argument("--members", type=int, default=4)
    t.add_argument("--epochs", type=int, default=600)
    t.add_argument("--batch-size", type=int, default=4)
    t.add_argument("--learning-rate", type=float, default=5e-3)
    t.add_argument("--cutoff", type=float, default=4.0)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--save-ensemble", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.command == "harvest":
        harvest(args.profile, args.output)
    else:
        run_training(args)


if __name__ == "__main__":
    main()
