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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hubbard_uv_harvest import harvest  # noqa: E402
from hubbard_uv_plots import learning_curve_plot, parity_plot  # noqa: E402
from hubbard_uv_scores import mean_std, pooled_summary, score_baselines, score_rows  # noqa: E402
from hubbard_uv_trainer import SIZES, Trainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CAMPAIGN = ROOT / "benchmarks" / "data" / "hubbard_campaign"
LABELS = ROOT / "docs" / "benchmarks" / "hubbard_labels.npz"
RESULTS = ROOT / "docs" / "benchmarks" / "hubbard_uv.json"

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
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "benchmarks/hubbard_uv*.py", "aiida_eqml/ml",
                                ":(exclude)aiida_eqml/ml/hubbard/reference"],
                               cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


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
            score = score_rows(val_rows, trainer.predict(result, val_rows))
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
        per_seed.append(score_rows(test_rows, predictions))
        for key, value in predictions.items():
            committee.setdefault(key, []).append(value)
    for r in test_rows:
        values = committee[(r["sample"], r["kind"], r["key"])]
        r["pred"], r["pred_std"] = float(np.mean(values)), float(np.std(values))
    committee_score = score_rows(test_rows, {k: float(np.mean(v)) for k, v in committee.items()})

    train_elements = {r["group"] for r in train_rows}
    entry = {"material": material, "n_test": len(split["test"]),
             "n_test_u": committee_score["U"]["n"], "n_test_v": committee_score["V"]["n"],
             "n_train_samples": len(split["train"]),
             "unseen_groups": sorted({r["group"] for r in test_rows} - train_elements),
             "unseen_species": unseen_species(record, split["train"], split["test"])}
    for kind, low in (("U", "u"), ("V", "v")):
        for metric in ("mae", "mare"):
            mean, std = mean_std([s[kind][metric] for s in per_seed])
            entry[f"{metric}_{low}"], entry[f"{metric}_{low}_std"] = mean, std
        entry[f"committee_mae_{low}"] = committee_score[kind]["mae"]
        entry[f"committee_mare_{low}"] = committee_score[kind]["mare"]
    entry["per_seed"] = [{"seed": s, **{f"{m}_{k.lower()}": sc[k][m] for k in ("U", "V") for m in ("mae", "mare")}}
                         for s, sc in zip(seeds, per_seed)]
    entry["baselines"] = score_baselines(train_rows, test_rows)
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
            score_baselines(train_rows, test_rows)
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
