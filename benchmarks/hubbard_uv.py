"""Hubbard U / V from real hp.x labels: an honest leave-one-material-out evaluation against three baselines.

    # (AiiDA) every hp.x iteration of every SelfConsistentHubbardWorkChain of a profile -> one record (.npz)
    AIIDA_PATH=/tmp/aiida-dev .venv/bin/python benchmarks/hubbard_uv.py harvest --profile eqml-dev

    # (pure ML) the evaluation on the campaign labels (benchmarks/data/hubbard_campaign/*.npz, merged in-process)
    .venv/bin/python benchmarks/hubbard_uv.py evaluate                      # full: 3 seeds, 2 x 2 candidates
    .venv/bin/python benchmarks/hubbard_uv.py evaluate --seeds 1 --epochs 20 --sizes tiny \\
        --learning-curve none --out /tmp/hubbard_uv.json                     # a cheap check of the pipeline
    .venv/bin/python benchmarks/hubbard_uv.py evaluate --labels docs/benchmarks/hubbard_labels.npz ...

What ``evaluate`` does (functions in ``aiida_eqml.ml.hubbard.evaluation``):

* **labels**: one sample = one hp.x run (an iteration of a self-consistent cycle). Samples whose perturbed scf fails
  the quality filter (``hubbard_label_issues``: not converged, or metallic in a spin channel) stay in the record,
  flagged in the output, and are neither trained on nor scored.
* **leave one material out**: a material is composition + structure type + magnetic order (``info['material']``,
  e.g. ``NiO-rocksalt-afm2``); each is held out in turn with all its strains and iterations.
* **model selection** only inside the training materials: candidates (``--residual`` x ``--v-sum-images`` x
  ``--u-sum-images`` x ``--spin-order`` x ``--scf-inputs`` x ``--sizes`` x ``--epochs``; residual: learn U - U_scf
  and V - V_scf, the change hp.x makes to the scf's parameters; U summed over images: a site's U holds its coupling to
  its own periodic images; spin order: the site descriptor carries the local magnetic order; scf inputs no: the
  descriptors without U_scf / V_scf) are trained with the first seed on the training materials less a validation
  split *of materials* (one material, or a strain cell when only one training material exists); for U the
  candidate with the lowest validation MARE of U, for V the one with the lowest of V, is retrained on all training
  materials with every seed (``--seeds``) and scored on the held-out material.
* **reported per held-out material**: MAE and MARE of U and V, mean and spread (std) over seeds, the seed-committee
  errors, and the same numbers for three baselines fitted on the same training materials: per-element mean,
  previous iteration (U_in / V_in: the U / V of the perturbed scf, the paper's baseline) and a per-element straight
  line in the trace of the on-site occupation matrix.
* **summary**: MAREs pooled over every held-out label (each label is held out exactly once), model (mean over
  seeds) and best baseline, over the held-out materials inside the model's domain: a material with an element that
  no training material holds, or a U element / TM-O pair that no training material labels, is refused by the ML loop
  before it runs, so it is scored and listed (``unseen_species``, ``unseen_groups``,
  ``summary.out_of_domain_materials``) but pooled only in ``summary_including_out_of_domain``.
* **learning curve** (``--learning-curve``): error on each held-out material against the number of training
  materials (random subsets of the others, first seed, the candidate selected for that material); draws outside
  the held-out material's domain are skipped and counted.

Outputs: ``--out`` (default ``docs/benchmarks/hubbard_uv.json``) and the plots beside it
(``<stem>_parity.png``, ``<stem>_learning_curve.png``). Every number in the json is written by this script, with
the command line and git commit.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CAMPAIGN = ROOT / "benchmarks" / "data" / "hubbard_campaign"
LABELS = ROOT / "docs" / "benchmarks" / "hubbard_labels.npz"
RESULTS = ROOT / "docs" / "benchmarks" / "hubbard_uv.json"

#: Model sizes among which the selection picks (``--sizes``); overrides of ``SMALL_HUBBARD_CONFIG``.
SIZES = {
    "tiny": {
        "num_layers": 1,
        "hidden_irreps": "8x0e + 2x1o + 2x1e + 2x2e",
        "radial_hidden": [8, 8],
        "readout_product_mul": 2,
    },
    "small": {},
    "medium": {
        "hidden_irreps": "32x0e + 8x1o + 8x1e + 8x2e + 4x2o",
        "radial_hidden": [32, 32],
        "readout_product_mul": 8,
    },
}


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


# ============================================================================ labels
def load_labels(paths) -> tuple:
    """One record from ``paths`` (npz files or directories of them; default: the campaign's per-cell files), merged
    as ``hubbard_campaign.py merge`` does (samples in file-name order, target specs united). Returns
    ``(record, [files])``."""
    from aiida_eqml.ml.dataset import Dataset

    files = []
    for path in paths or [CAMPAIGN]:
        path = Path(path)
        files += sorted(path.glob("*.npz")) if path.is_dir() else [path]
    if not files:
        raise SystemExit(f"no label files in {paths or [CAMPAIGN]}")
    records = [Dataset.load(f) for f in files]
    specs = {}
    for record in records:
        specs.update(record.target_specs)
    return Dataset([s for r in records for s in r.samples], specs), files


def git_commit() -> str:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        # the code that makes the numbers; not the shipped reference models, which hubbard_reference_model.py
        # writes into aiida_eqml/ml/hubbard/reference/ itself (a retrained model would mark its own commit dirty)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "benchmarks/hubbard_uv.py", "aiida_eqml/ml",
                                ":(exclude)aiida_eqml/ml/hubbard/reference"],
                               cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ============================================================================ training (pure ML)
class Trainer:
    """Trains one model on a subset of the usable samples and predicts U / V rows of others. Descriptors are built
    once for the whole record with fixed slots, so every split reads the occupations the same way."""

    def __init__(self, record, args):
        import ase.data

        from aiida_eqml.ml.hubbard.records import hubbard_training_dataset, record_manifolds

        self.record = record
        self.args = args
        self.manifold_ls, self.pair_ls = record_manifolds(record)
        # one descriptor set per (--spin-order, --scf-inputs) choice: with or without the local magnetic order, and
        # with or without the scf's own U / V
        self._descriptors = {
            (order, scf): hubbard_training_dataset(record, self.manifold_ls, self.pair_ls, spin_order=order,
                                                   scf_inputs=scf)
            for order in sorted(set(args.spin_order)) for scf in sorted(set(args.scf_inputs))
        }
        self.species = [ase.data.chemical_symbols[z] for z in record.atomic_numbers]
        self.seconds = 0.0
        self.runs = 0

    def fit(self, indices, candidate: dict, seed: int):
        from aiida_eqml.ml.hubbard.models import hubbard_model_config
        from aiida_eqml.ml.hubbard.training import residual_targets
        from aiida_eqml.ml.training import train

        descriptors, attrs = self._descriptors[(bool(candidate.get("spin_order", False)),
                                                bool(candidate.get("scf_inputs", True)))]
        subset = descriptors.subset(indices)
        if candidate.get("residual"):
            subset = residual_targets(subset)  # learn U - U_scf (aiida_eqml.ml.hubbard.training)
        has_v = any("hubbard_v" in s.edge_targets and np.isfinite(s.edge_targets["hubbard_v"].values).any()
                    for s in subset.samples)
        model = hubbard_model_config(self.species, attrs, cutoff=self.args.cutoff, predict_u=True,
                                     predict_v=has_v and bool(self.pair_ls),
                                     v_sum_images=bool(candidate.get("v_sum_images")),
                                     u_sum_images=bool(candidate.get("u_sum_images")), **SIZES[candidate["size"]])
        config = {
            "model": model, "epochs": int(candidate["epochs"]), "batch_size": min(self.args.batch_size, len(subset)),
            "split": {"train": list(range(len(subset))), "val": [], "test": []}, "seed": int(seed),
            "optimizer": {"learning_rate": self.args.learning_rate, "schedule": "cosine", "decay_rate": 0.02,
                          "warmup_epochs": min(10, max(0, int(candidate["epochs"]) // 10))},
            "early_stopping": {"patience": 0}, "progress": False,
        }
        t0 = time.time()
        result = train(subset, config, None)
        self.seconds += time.time() - t0
        self.runs += 1
        result.residual = bool(candidate.get("residual"))
        result.spin_order = bool(candidate.get("spin_order", False))
        result.scf_inputs = bool(candidate.get("scf_inputs", True))
        return result

    def predict(self, result, rows) -> dict:
        """``{(sample, kind, key): prediction}`` for the rows."""
        from aiida_eqml.ml.hubbard.models import predict_hubbard

        samples = sorted({r["sample"] for r in rows})
        if not samples:
            return {}
        descriptors = self._descriptors[(result.spin_order, result.scf_inputs)][0]
        out = predict_hubbard(result.model, result.params, descriptors.subset(samples),
                              residual=getattr(result, "residual", False))
        values = {}
        for index, entry in zip(samples, out):
            if "hubbard_u" in entry:
                for atom, value in enumerate(np.asarray(entry["hubbard_u"]).reshape(-1)):
                    values[(index, "U", (atom,))] = float(value)
            if "hubbard_v" in entry:
                keys, v = entry["hubbard_v"]
                for key, value in zip(np.asarray(keys).tolist(), np.asarray(v).reshape(-1)):
                    values[(index, "V", tuple(int(x) for x in key))] = float(value)
        return {
            (r["sample"], r["kind"], r["key"]): values.get((r["sample"], r["kind"], r["key"]), float("nan"))
            for r in rows
        }


def _score(rows, predictions) -> dict:
    from aiida_eqml.ml.hubbard.evaluation import errors

    out = {}
    for kind in ("U", "V"):
        sel = [r for r in rows if r["kind"] == kind]
        out[kind] = errors([r["truth"] for r in sel], [predictions[(r["sample"], r["kind"], r["key"])] for r in sel])
    return out


def _baselines(train_rows, test_rows) -> dict:
    from aiida_eqml.ml.hubbard.evaluation import BASELINES, pooled_errors

    out = {}
    for name, make in BASELINES.items():
        predict = make(train_rows)
        for r in test_rows:
            r[f"baseline_{name}"] = predict(r)
        pooled = pooled_errors(test_rows, f"baseline_{name}")
        out[name] = {"mae_u": pooled["U"]["mae"], "mare_u": pooled["U"]["mare"],
                     "mae_v": pooled["V"]["mae"], "mare_v": pooled["V"]["mare"]}
    return out


def _stats(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return float(np.mean(values)), float(np.std(values))


def pooled_summary(entries, held_out_rows, n_seeds) -> dict:
    """MAREs pooled over every held-out label of ``entries``; seed spread of the pooled MARE from the per-seed
    pooled errors; baselines on the same labels."""
    from aiida_eqml.ml.hubbard.evaluation import pooled_errors

    summary = {"materials": [e["material"] for e in entries]}
    for kind, low in (("U", "u"), ("V", "v")):
        sel = [r for r in held_out_rows if r["kind"] == kind]
        per_seed = []
        for k in range(n_seeds):
            # per-material per-seed MAREs weighted by label counts = the pooled per-seed MARE
            num = sum(e["per_seed_scores"][k][kind]["mare"] * e["per_seed_scores"][k][kind]["n"]
                      for e in entries if e["per_seed_scores"][k][kind]["n"])
            den = sum(e["per_seed_scores"][k][kind]["n"] for e in entries)
            per_seed.append(num / den if den else None)
        summary[f"mare_{low}"], summary[f"mare_{low}_std"] = _stats(per_seed)
        summary[f"committee_mare_{low}"] = pooled_errors(held_out_rows, "pred")[kind]["mare"]
        summary[f"mae_{low}_committee"] = pooled_errors(held_out_rows, "pred")[kind]["mae"]
        baselines = {name: pooled_errors(held_out_rows, f"baseline_{name}")[kind]["mare"] for name in
                     ("element_mean", "previous_iteration", "occupation_linear")} if sel else {}
        summary[f"baselines_mare_{low}"] = baselines
        finite = {k: v for k, v in baselines.items() if v is not None}
        summary[f"mare_{low}_best_baseline"] = min(finite.values()) if finite else None
        summary[f"best_baseline_{low}"] = min(finite, key=finite.get) if finite else None
        summary[f"n_held_out_{low}"] = len(sel)
    # The first iteration's labels only: their scf ran with the campaign's seeds, so U_scf / V_scf say nothing
    # about the label there. From the second iteration on U_scf is the previous label, which a model reading it
    # can follow on the DFPT loop's ground states but not in the ML loop, where U_scf is its own last prediction.
    first = [r for r in held_out_rows if r.get("iteration") == 1]
    summary["first_iteration"] = {
        f"{name}_mare_{low}": pooled_errors(first, field)[kind]["mare"]
        for name, field in (("model", "pred"), ("element_mean", "baseline_element_mean"),
                            ("previous_iteration", "baseline_previous_iteration"),
                            ("occupation_linear", "baseline_occupation_linear"))
        for kind, low in (("U", "u"), ("V", "v"))
    }
    summary["first_iteration"].update({"n_u": sum(r["kind"] == "U" for r in first),
                                       "n_v": sum(r["kind"] == "V" for r in first)})
    summary["material_mean_mare_u"] = _stats([e["mare_u"] for e in entries])[0]
    summary["material_mean_mare_v"] = _stats([e["mare_v"] for e in entries])[0]
    return summary


def evaluate_material(trainer, split, flags, candidates, seeds, args) -> tuple[dict, list[dict]]:
    """Selection, final training over seeds, scores and baselines for one held-out material."""
    from aiida_eqml.ml.hubbard.evaluation import choose_per_target, label_table, unseen_species, validation_split

    record = trainer.record
    material = split["material"]
    train_rows = label_table(record, split["train"], flags)
    test_rows = label_table(record, split["test"], flags)
    fit, val, unit = validation_split(record, split["train"], args.val_fraction, seed=args.seed)
    selection = {"validation_unit": unit, "n_fit_samples": len(fit), "n_val_samples": len(val), "candidates": []}
    if len(candidates) > 1 and val:
        val_rows = label_table(record, val, flags)
        for candidate in candidates:
            result = trainer.fit(fit, candidate, seeds[0])
            score = _score(val_rows, trainer.predict(result, val_rows))
            selection["candidates"].append(
                {
                    **candidate,
                    "val_mare_u": score["U"]["mare"],
                    "val_mare_v": score["V"]["mare"],
                    "val_mae_u": score["U"]["mae"],
                    "val_mae_v": score["V"]["mae"],
                }
            )
        chosen = choose_per_target(selection["candidates"])
    else:
        chosen = {"U": 0, "V": 0}
        selection["note"] = "one candidate" if len(candidates) == 1 else "no validation split possible: first candidate"
    # U's choice is "chosen": the learning curve and the shipped model (one network, both heads) follow it
    selection["chosen"], selection["chosen_v"] = candidates[chosen["U"]], candidates[chosen["V"]]
    selection["scoring"] = "per target: U on val_mare_u, V on val_mare_v"

    per_seed, committee = [], {}
    for seed in seeds:
        fits = {k: trainer.fit(split["train"], candidates[k], seed) for k in sorted(set(chosen.values()))}
        predictions = {}
        for kind in ("U", "V"):
            predictions.update(trainer.predict(fits[chosen[kind]], [r for r in test_rows if r["kind"] == kind]))
        per_seed.append(_score(test_rows, predictions))
        for key, value in predictions.items():
            committee.setdefault(key, []).append(value)
    for r in test_rows:
        values = committee[(r["sample"], r["kind"], r["key"])]
        r["pred"], r["pred_std"] = float(np.mean(values)), float(np.std(values))
    committee_score = _score(test_rows, {k: float(np.mean(v)) for k, v in committee.items()})

    train_elements = {r["group"] for r in train_rows}
    entry = {"material": material, "n_test": len(split["test"]),
             "n_test_u": committee_score["U"]["n"], "n_test_v": committee_score["V"]["n"],
             "n_train_samples": len(split["train"]),
             "unseen_groups": sorted({r["group"] for r in test_rows} - train_elements),
             "unseen_species": unseen_species(record, split["train"], split["test"])}
    for kind, low in (("U", "u"), ("V", "v")):
        for metric in ("mae", "mare"):
            mean, std = _stats([s[kind][metric] for s in per_seed])
            entry[f"{metric}_{low}"], entry[f"{metric}_{low}_std"] = mean, std
        entry[f"committee_mae_{low}"] = committee_score[kind]["mae"]
        entry[f"committee_mare_{low}"] = committee_score[kind]["mare"]
    entry["per_seed"] = [{"seed": s, **{f"{m}_{k.lower()}": sc[k][m] for k in ("U", "V") for m in ("mae", "mare")}}
                         for s, sc in zip(seeds, per_seed)]
    entry["baselines"] = _baselines(train_rows, test_rows)
    entry["selection"] = selection
    entry["per_seed_scores"] = per_seed  # pooled over materials in the summary
    return entry, test_rows


def learning_curve(trainer, splits, flags, chosen, sizes, args) -> list[dict]:
    """Per number k of training materials: model and baseline MARE on each held-out material, training on k others
    drawn at random (seeded), first seed, the candidate selected for that material in the main evaluation. A draw
    that lacks a species (or pair) of the held-out material is skipped and counted: the loop would refuse it."""
    from aiida_eqml.ml.hubbard.evaluation import label_table, material_of, pooled_errors, unseen_species

    record = trainer.record
    points = []
    for k in sizes:
        rows_all, skipped, drawn = [], 0, 0
        for split in splits:
            others = sorted({material_of(record.samples[i]) for i in split["train"]})
            if k > len(others):
                continue
            rng = np.random.default_rng([args.seed, k, drawn])
            drawn += 1
            picked = {others[j] for j in rng.permutation(len(others))[:k]}
            train = [i for i in split["train"] if material_of(record.samples[i]) in picked]
            train_rows, test_rows = label_table(record, train, flags), label_table(record, split["test"], flags)
            if ({r["group"] for r in test_rows} - {r["group"] for r in train_rows}
                    or unseen_species(record, train, split["test"])):
                skipped += 1  # a species or pair the draw lacks: outside the model's domain (the loop refuses it)
                continue
            result = trainer.fit(train, chosen[split["material"]], args.seed)
            predictions = trainer.predict(result, test_rows)
            for r in test_rows:
                r["pred"] = predictions[(r["sample"], r["kind"], r["key"])]
            _baselines(train_rows, test_rows)
            rows_all += test_rows
        if not rows_all:
            continue
        point = {"n_train_materials": int(k), "n_held_out_labels": len(rows_all),
                 "n_held_out_materials": drawn - skipped, "n_out_of_domain_draws": skipped}
        for field, name in (("pred", "model"), ("baseline_element_mean", "element_mean"),
                            ("baseline_occupation_linear", "occupation_linear"),
                            ("baseline_previous_iteration", "previous_iteration")):
            pooled = pooled_errors(rows_all, field)
            point[name] = {"mare_u": pooled["U"]["mare"], "mare_v": pooled["V"]["mare"],
                           "mae_u": pooled["U"]["mae"], "mae_v": pooled["V"]["mae"]}
        points.append(point)
        print(f"  learning curve: {k} training materials: model MARE U {point['model']['mare_u']}", flush=True)
    return points


# ============================================================================ plots
def parity_plot(rows, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in ("U", "V") if any(r["kind"] == k for r in rows)]
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.2 * len(kinds), 5), squeeze=False)
    materials = sorted({r["material"] for r in rows})
    colors = {m: plt.cm.tab20(i % 20) for i, m in enumerate(materials)}
    for ax, kind in zip(axes[0], kinds):
        sel = [r for r in rows if r["kind"] == kind]
        for m in materials:
            pts = [r for r in sel if r["material"] == m]
            if pts:
                ax.errorbar([r["truth"] for r in pts], [r["pred"] for r in pts], yerr=[r["pred_std"] for r in pts],
                            fmt="o", ms=4, color=colors[m], label=m, alpha=0.85)
        values = [r[k] for r in sel for k in ("truth", "pred") if np.isfinite(r[k])]
        lo, hi = min(values) - 0.2, max(values) + 0.2
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set_xlim(lo, hi), ax.set_ylim(lo, hi)
        ax.set_xlabel(f"{kind} from hp.x (eV)")
        ax.set_ylabel(f"{kind} predicted, held-out material (seed mean +- std, eV)")
        ax.set_title(f"{title}: {kind}")
        ax.legend(fontsize=6, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def learning_curve_plot(points, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in ("u", "v") if any(p["model"][f"mare_{k}"] is not None for p in points)]
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.2 * len(kinds), 4), squeeze=False)
    x = [p["n_train_materials"] for p in points]
    for ax, kind in zip(axes[0], kinds):
        for name, style in (
            ("model", "o-"),
            ("element_mean", "s--"),
            ("occupation_linear", "^--"),
            ("previous_iteration", "v:"),
        ):
            y = [100 * p[name][f"mare_{kind}"] if p[name][f"mare_{kind}"] is not None else np.nan for p in points]
            ax.plot(x, y, style, label=name)
        ax.set_xlabel("training materials")
        ax.set_ylabel(f"MARE {kind.upper()} on the held-out material (%)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


# ============================================================================ evaluate
def run_evaluation(args) -> dict:
    from aiida_eqml.ml.hubbard.evaluation import label_flags, label_table, material_of, material_splits
    from aiida_eqml.ml.hubbard.protocol import record_protocol

    t_start = time.time()
    commit = git_commit()  # the code that runs: taken at the start, not when the hours of training are over
    record, files = load_labels(args.labels)
    if args.ecutwfc is not None:  # an old record of two cutoffs: keep one DFT setting
        record = record.subset(
            [i for i, s in enumerate(record.samples) if abs(s.info.get("ecutwfc", -1) - args.ecutwfc) < 1e-6]
        )
    protocol = record_protocol(record)
    flags = label_flags(record, min_gap_ev=args.min_gap)
    usable_rows = label_table(record, None, flags)
    all_materials = sorted({material_of(s) for s in record.samples})
    splits = material_splits(record, flags, args.materials)
    usable_materials = sorted({r["material"] for r in usable_rows})
    print(
        f"{len(record)} samples from {len(files)} files, {len(flags)} flagged by the quality filter; "
        f"{sum(r['kind'] == 'U' for r in usable_rows)} U and {sum(r['kind'] == 'V' for r in usable_rows)} V labels "
        "usable; "
        f"materials {usable_materials}",
        flush=True,
    )
    if len(usable_materials) < 2:
        raise SystemExit("leave-one-material-out needs at least two materials with usable labels")
    candidates = [{"size": size, "epochs": int(epochs), "residual": residual, "v_sum_images": images,
                   "u_sum_images": u_images, "spin_order": order, "scf_inputs": scf}
                  for residual in args.residual for images in args.v_sum_images for u_images in args.u_sum_images
                  for order in args.spin_order for scf in args.scf_inputs for size in args.sizes
                  for epochs in args.epochs]
    seeds = [args.seed + k for k in range(args.seeds)]
    trainer = Trainer(record, args)

    entries, held_out_rows, chosen = [], [], {}
    for split in splits:
        if not split["train"]:
            continue
        t0 = time.time()
        entry, rows = evaluate_material(trainer, split, flags, candidates, seeds, args)
        entry["seconds"] = time.time() - t0
        chosen[split["material"]] = entry["selection"]["chosen"]
        entries.append(entry)
        held_out_rows += rows
        print(f"{entry['material']:28s} n_test {entry['n_test']:3d}  U MAE {entry['mae_u']} MARE {entry['mare_u']}"
              f"  V MARE {entry['mare_v']}  baselines U MARE "
              + " ".join(f"{k}={v['mare_u']}" for k, v in entry["baselines"].items())
              + f"  ({entry['seconds']:.0f} s, {entry['selection']['chosen']})", flush=True)

    # The loop refuses a material with a species (or pair) absent from the model's training labels, so such a held-out
    # material is outside the model's domain: scored and listed, but the summary pools the materials in its domain.
    # (An element without labels counts too, e.g. the Sr of SrTiO3: since the eleventh session; before, only the U / V
    # elements were checked, and SrTiO3 was pooled although the loop would refuse its models.)
    in_domain = [e for e in entries if not e["unseen_groups"] and not e["unseen_species"]]
    domain_names = {e["material"] for e in in_domain}
    summary = pooled_summary(in_domain, [r for r in held_out_rows if r["material"] in domain_names], len(seeds))
    summary["out_of_domain_materials"] = sorted(e["material"] for e in entries if e["material"] not in domain_names)
    summary_all = pooled_summary(entries, held_out_rows, len(seeds))
    for e in entries:
        e.pop("per_seed_scores")

    curve = []
    if args.learning_curve != ["none"]:
        max_k = len(usable_materials) - 1
        ks = sorted({int(k) for k in args.learning_curve if int(k) <= max_k}) if args.learning_curve != ["auto"] else \
            sorted({k for k in (1, 2, 3, 4, 6, 8, 12, 16, 24) if k < max_k} | {max_k})
        curve = learning_curve(trainer, [s for s in splits if s["train"]], flags, chosen, ks, args)

    out_path = Path(args.out)
    stem = out_path.with_suffix("")
    plots = {"parity": f"{stem}_parity.png", "learning_curve": f"{stem}_learning_curve.png" if curve else None}
    result = {
        "description": (
            "Hubbard U/V from hp.x labels: leave-one-material-out evaluation of an E(3)-equivariant model "
            "on occupation-matrix descriptors against three baselines (benchmarks/hubbard_uv.py)"
        ),
        "command": " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
        "commit": commit,
        "protocol": protocol or {},
        "label_files": [os.path.relpath(f, ROOT) if str(f).startswith(str(ROOT)) else str(f) for f in files],
        "n_samples": len(record),
        "n_labels": {"U": sum(r["kind"] == "U" for r in usable_rows), "V": sum(r["kind"] == "V" for r in usable_rows)},
        "quality_filter": {
            "criteria": {"require_converged": True, "min_gap_ev": args.min_gap, "channels": "both"},
            "n_flagged": len(flags),
            "flagged": {record.samples[i].info.get("name", str(i)): issues for i, issues in flags.items()},
        },
        "materials": usable_materials,
        "materials_all": all_materials,
        "settings": {
            "seeds": seeds,
            "candidates": candidates,
            "val_fraction": args.val_fraction,
            "cutoff": args.cutoff,
            "learning_rate": args.learning_rate,
            "batch_size": args.batch_size,
            "sizes": {k: SIZES[k] for k in args.sizes},
            "ecutwfc": args.ecutwfc,
        },
        "leave_one_material_out": entries,
        "summary": summary,
        "summary_including_out_of_domain": summary_all,
        "learning_curve": curve,
        "held_out_labels": [{k: (list(v) if k == "key" else v) for k, v in r.items()} for r in held_out_rows],
        "plots": {
            k: (os.path.relpath(v, ROOT) if v and str(Path(v).resolve()).startswith(str(ROOT)) else v)
            for k, v in plots.items()
        },
        "timing": {"train_runs": trainer.runs, "train_seconds": trainer.seconds, "wall_seconds": time.time() - t_start},
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1, default=float) + "\n")
    parity_plot(held_out_rows, Path(plots["parity"]), "held-out materials")
    if curve:
        learning_curve_plot(curve, Path(plots["learning_curve"]))
    print(
        f"\nsummary: MARE U {summary['mare_u']} "
        f"(best baseline {summary['best_baseline_u']} {summary['mare_u_best_baseline']}),"
        f" MARE V {summary['mare_v']} (best baseline {summary['best_baseline_v']} {summary['mare_v_best_baseline']})"
    )
    print(f"wrote {out_path}, {plots['parity']}" + (f", {plots['learning_curve']}" if curve else ""))
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    h = sub.add_parser("harvest", help="AiiDA profile -> the older strain-path record (.npz)")
    h.add_argument("--profile", default="eqml-dev")
    h.add_argument("--output", type=Path, default=LABELS)
    e = sub.add_parser("evaluate", help="leave-one-material-out evaluation -> json + plots")
    e.add_argument(
        "--labels",
        nargs="+",
        default=None,
        help=f"npz files or directories (default {os.path.relpath(CAMPAIGN, ROOT)})",
    )
    e.add_argument("--out", default=str(RESULTS))
    e.add_argument(
        "--materials", nargs="+", default=None, help="hold out only these materials (training uses all others)"
    )
    e.add_argument("--seeds", type=int, default=3)
    e.add_argument("--seed", type=int, default=0, help="first seed (also of the validation and learning-curve draws)")
    e.add_argument("--epochs", type=int, nargs="+", default=[300, 600], help="candidate epoch counts for the selection")
    e.add_argument(
        "--sizes", nargs="+", choices=sorted(SIZES), default=["small", "medium"], help="candidate model sizes"
    )
    e.add_argument("--residual", nargs="+", type=lambda v: {"yes": True, "no": False}[v], default=[False, True],
                   metavar="{yes,no}", help="candidate targets: absolute U/V (no) and/or U - U_scf, V - V_scf (yes)")
    e.add_argument("--v-sum-images", nargs="+", type=lambda v: {"yes": True, "no": False}[v], default=[False],
                   metavar="{yes,no}", help="candidate V readouts: the V head per couple (no) and/or summed over the "
                                            "couple's periodic images, as hp.x at q = Gamma sums them (yes)")
    e.add_argument("--u-sum-images", nargs="+", type=lambda v: {"yes": True, "no": False}[v], default=[False],
                   metavar="{yes,no}", help="candidate U readouts: the node head (no) and/or plus an edge head summed "
                                            "over the site's edges to its own periodic images (yes)")
    e.add_argument("--spin-order", nargs="+", type=lambda v: {"yes": True, "no": False}[v], default=[False],
                   metavar="{yes,no}", help="candidate site descriptors: without (no) and/or with (yes) the local "
                                            "magnetic order (aiida_eqml.ml.hubbard.spin_order)")
    e.add_argument("--scf-inputs", nargs="+", type=lambda v: {"yes": True, "no": False}[v], default=[True],
                   metavar="{yes,no}", help="candidate descriptors: with (yes) and/or without (no) the U_scf / V_scf "
                                            "the perturbed scf ran with")
    e.add_argument("--val-fraction", type=float, default=0.25, help="fraction of the training materials for validation")
    e.add_argument("--learning-curve", nargs="+", default=["auto"],
                   help="numbers of training materials, 'auto' (1, 2, 4, ... all) or 'none'")
    e.add_argument(
        "--min-gap", type=float, default=0.0, help="band gap (eV) the quality filter requires per spin channel"
    )
    e.add_argument("--ecutwfc", type=float, default=None, help="keep only labels at this cutoff (Ry; older record)")
    e.add_argument("--cutoff", type=float, default=4.0)
    e.add_argument("--batch-size", type=int, default=4)
    e.add_argument("--learning-rate", type=float, default=5e-3)
    args = parser.parse_args(argv)
    if args.command == "harvest":
        harvest(args.profile, args.output)
    else:
        run_evaluation(args)


if __name__ == "__main__":
    main()
