"""BaTiO3 response benchmark (issues 3 and 11): learning curves of Z*, Raman tensors and the dielectric tensor.

    python benchmarks/bto_response.py --data ../shared/data/bto400              # full run (GPU)
    python benchmarks/bto_response.py --sizes 4 --epochs 2 --seeds 0 1 \
        --out-json /tmp/bto.json --out-png /tmp/bto.png                         # CPU smoke check
    python benchmarks/bto_response.py --routes direct --targets dielectric \
        --section dielectric_validated                                          # eps_inf (graph level)

Protocol (issue 11; the split is in ``bto_protocol.py``)
--------------------------------------------------------
* The bto400 records are read and validated by :func:`aiida_eqml.ml.datasets.bto.load_bto400`
  with only the targets benchmarked here, in its mask mode: a structural fault excludes a record,
  a faulty label is set to NaN. The split is made once over the structures and each target drops
  the records without a valid label from its sets (``bto_protocol.split_for_target``): six records
  have an unphysical *dielectric* tensor, so the dielectric runs on 24 training, the shared 4
  validation and 6 test structures (00048 and 00049 are test files without a valid eps_inf), while
  Z* and Raman keep all 40 (28 / 4 / 8).
* Test set: the last 8 valid files by index, used once, after every choice is made (the JSON
  lists the file names). Validation set: the 4 valid files just before them (``--n-val``), the
  same at every size and seed, never trained on. Training sets: the first ``n`` of the rest by
  file index (nested), ``n`` in ``--sizes``; 40 valid records leave 28, so the largest size is
  ``all`` = 28 (n = 32 no longer fits).
* Every choice is made on the validation set: the parameters kept are those of the epoch with the
  lowest validation loss (:func:`aiida_eqml.ml.training.train`, which also stops early with
  ``--patience``), and with several ``--lr`` values each (route, target, size) keeps the one with
  the lowest mean validation MAE over seeds; only the kept models see the test set.
* ``--seeds`` (default 0 1 2) change the model initialisation and the batch order; each row of
  the JSON has the mean and sample std over seeds of the test, validation and training MAE and
  every seed's values; the section records the command line and the git commit.
* Reference: each species' mean tensor over the whole training pool
  (:func:`species_mean_baseline`), the issue's 0.36 e / 1.6 1/Angstrom; target is 10x lower.
  The dielectric tensor (one per structure, one composition) has the training mean tensor instead and a
  linear probe on structure-only displacement features at every size (``bto_references.py``).
* Routes: ``direct`` (an irreps readout of the tensor, per-species shift of its ``0e`` part from
  the training set; for eps_inf a graph head ``0e + 2e``, the mean over atoms, read out as the
  symmetric Cartesian tensor: the head of :func:`aiida_eqml.ml.targets.head_spec`) and
  ``derivative`` (the tensor as a derivative of a field-dependent energy E(R, F):
  Z* = -d2E/dF dtau, chi = -(1/(4 pi eps0 Omega)) d3E/dF2 dtau, see ``response.py``).
  One model per (route, target, size, seed, learning rate); the same number of optimiser steps at
  every size (``--epochs`` is the epoch count of the largest size, smaller sets run
  proportionally more epochs) so that small sets are not under-trained.

Sections written before issue 11 (``learning_curves``, ``learning_curves_cpu_long``) had no
validation set (best epoch on the training loss) and one seed; ``--plot-only`` still draws them,
labelled as the older protocol. Nothing here assumes a CPU: jax picks the default backend (the
printed ``device`` field says which).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bto_protocol import (  # noqa: E402
    N_TEST,
    N_VAL,
    UNITS,
    choose_learning_rate,
    device_info,
    markdown_table,
    merge_json,
    plot,
    plot_from_json,
    protocol_record,
    resolve_sizes,
    split_for_target,
    split_protocol,
    summarize,
)
from bto_references import reference_baselines  # noqa: E402

from aiida_eqml.ml.targets import head_spec  # noqa: E402

TARGETS = {
    # dataset target -> (direct head spec from the target registry, derivative quantity or None)
    "born_charges": (head_spec("born_charges"), "born_charges"),
    "raman_tensors": (head_spec("raman_tensors"), "raman"),
    # graph level 0e + 2e; eps_inf is intensive, so the mean of the atoms' contributions (a sum would grow with the
    # cell). No derivative route here: d2E/dF2 would need an energy scale for a graph target and its own tests.
    "dielectric": ({**head_spec("dielectric"), "reduce": "mean"}, None),
}

# NequIP-style model shared by both routes (and by benchmarks/bto_throughput.py).
MODEL_CONFIG = {
    "architecture": "nequip",
    "cutoff": 5.0,
    "num_layers": 2,
    "hidden_irreps": "32x0e + 8x0o + 16x1o + 8x1e + 8x2e + 4x2o",
    "sh_lmax": 2,
    "num_radial_basis": 8,
    "radial_hidden": [32, 32],
}


def model_config_for(route: str, target: str, energy_scale: float | None = None, overrides: dict | None = None) -> dict:
    head, quantity = TARGETS[target]
    config = {**MODEL_CONFIG, **(overrides or {})}
    if route == "direct":
        config["heads"] = {target: dict(head)}
    elif route == "derivative":
        config["heads"] = {target: {"route": "derivative", "quantity": quantity}}
        if energy_scale is not None:
            # The energy head has no label, so training.compute_normalization leaves it at scale 1.
            # Setting the scale makes O(1) network outputs give derivatives of the target's size
            # (and, since derivative heads inherit this scale, the loss is still dimensionless).
            config["normalization"] = {"energy": {"scale": float(energy_scale)}}
    else:
        raise ValueError(f"route must be 'direct' or 'derivative', got {route!r}")
    return config


def round_sig(x: float, digits: int = 2) -> float:
    """Normalisation constants rounded to ``digits`` significant digits.

    They only condition the optimisation, and rounded they come out identical for most training
    sets, so the jitted steps have identical HLO and the persistent compilation cache
    (``--jit-cache``) compiles each (route, target) once instead of once per size.
    """
    if not np.isfinite(x) or x == 0:
        return float(x)
    return float(f"{x:.{digits - 1}e}")


def derivative_energy_scale(train_set, target: str) -> float:
    """Energy scale for the derivative route, from the training labels only.

    Z* = -d2E/dF dtau: an O(1) net times scale s gives Z* ~ s, so s = RMS(Z*).
    chi = -(1/(4 pi eps0 Omega)) d3E/dF2 dtau: s = RMS(chi) * 4 pi eps0 Omega (Omega ~ 1730 A^3
    for the 135-atom cell, so a few hundred eV).
    """
    from aiida_eqml.ml.response import EPS0

    values = np.concatenate([s.node_targets[target].reshape(s.n_atoms, -1) for s in train_set])
    rms = float(np.sqrt(np.nanmean(values**2)))
    if target == "born_charges":
        return round_sig(rms)
    volume = float(np.mean([abs(np.linalg.det(s.cell)) for s in train_set]))
    return round_sig(rms * 4.0 * math.pi * EPS0 * volume)


def mean_neighbours(dataset, indices, cutoff: float) -> float:
    """Mean edges per atom of the training structures (geometry only, no labels)."""
    from aiida_eqml.ml.graph import graph_from_atoms

    counts = []
    for i in indices:
        atoms = dataset[i].to_ase()
        graph = graph_from_atoms(atoms, cutoff, sorted(set(atoms.get_chemical_symbols())))
        counts.append(graph.n_edge[0] / len(atoms))
    return float(np.mean(counts))


def run_one(dataset, route, target, train_idx, val_idx, epochs, batch_size, lr, seed, log, avg_num_neighbors,
            model_overrides=None, patience=0):
    """One training on ``train_idx`` with ``val_idx`` as validation set (best epoch, early stopping); the test set
    is not passed: ``(TrainResult, record without test values)``, see :func:`test_record`."""
    from aiida_eqml.ml.training import compute_normalization, train

    train_set = dataset.subset(train_idx)
    scale = derivative_energy_scale(train_set, target) if route == "derivative" else None
    model_config = model_config_for(route, target, scale, model_overrides)
    if route == "direct":
        # Training-set normalisation: the per-species mean of the 0e part as a shift (the model
        # applies only 0e shifts, to stay equivariant) and the RMS of the rest as the scale; both
        # rounded (see round_sig) so that sizes with near-identical statistics share compiled steps.
        import ase.data

        species = [ase.data.chemical_symbols[z] for z in dataset.atomic_numbers]
        norm = compute_normalization(train_set, {**model_config, "species": species})[target]
        scale = round_sig(norm["scale"])
        # 3 digits cost a node tensor ~1e-3 of its mean, far below its spread; eps_inf (mean ~5.11) spreads only
        # ~0.05 between structures, so a 3-digit shift would be off by ~0.005, a quarter of the mean-tensor MAE
        digits = 7 if TARGETS[target][0]["level"] == "graph" else 3
        shift = [[round_sig(v, digits) for v in row] for row in norm["species_shift"]]
        model_config["normalization"] = {target: {"scale": scale, "species_shift": shift}}
    # Neighbours per atom, fixed here (training.py would average over the training graphs,
    # which differ in the last digits between sizes); rounded for the same reason as above.
    model_config["avg_num_neighbors"] = round_sig(avg_num_neighbors, 2)
    config = {
        "model": model_config,
        "targets": {target: {"weight": 1.0}},
        "seed": seed,  # model initialisation and batch order
        "epochs": epochs,
        "batch_size": batch_size,
        "split": {"train": list(train_idx), "val": list(val_idx), "test": []},
        "optimizer": {"name": "adam", "learning_rate": lr, "schedule": "cosine", "decay_rate": 0.01,
                      "warmup_epochs": 0, "clip_norm": 10.0},
        "early_stopping": {"patience": patience},
        "progress": False,
    }
    t0 = time.perf_counter()
    result = train(dataset, config)
    seconds = time.perf_counter() - t0
    val, train_metrics = result.metrics["val"][target], result.metrics["train"][target]
    log(f"  {route:10s} {target:14s} n={len(train_idx):3d} seed {seed} lr {lr:g}: val MAE {val['mae']:.4f} "
        f"{UNITS[target]} (train {train_metrics['mae']:.4f}), best epoch {result.best_epoch}/{len(result.history)}, "
        f"{seconds:.1f} s")
    return result, {
        "seed": seed,
        "learning_rate": lr,
        "epochs_run": len(result.history),
        "best_epoch": result.best_epoch,
        "stopped_early": result.stopped_early,
        "val_mae": val["mae"],
        "val_rmse": val["rmse"],
        "train_mae": train_metrics["mae"],
        "final_train_loss": result.history[-1]["train_loss"],
        "best_val_loss": min(h["val_loss"] for h in result.history),
        "normalization_scale": scale,
        "wall_s": seconds,
        # compile vs run (issue 11): epoch 1 holds the jit compilation of the step and of the evaluation (one padded
        # shape each), later epochs only run them; first_epoch_s - later_epoch_s is the compile time (to the spread
        # of the later epochs)
        "first_epoch_s": result.history[0]["time_s"],
        "later_epoch_s": float(np.median([h["time_s"] for h in result.history[1:]])) if len(result.history) > 1
        else None,
    }


def test_record(dataset, result, target, test_idx, batch_size) -> dict:
    """Test metrics of a kept model (its best-validation parameters): called once per reported model."""
    from aiida_eqml.ml.dataset import make_batches
    from aiida_eqml.ml.train_steps import evaluate

    test_set = dataset.subset(test_idx)
    batch_config = {**result.model_config, "heads": {target: result.model_config["heads"][target]}}
    test = evaluate(result.model, result.params, test_set, make_batches(test_set, batch_config, batch_size))[target]
    return {
        "test_mae": test["mae"],
        "test_rmse": test["rmse"],
        "test_relative_rmse": test["relative_rmse"],
        "test_mae_per_species": {k: v["mae"] for k, v in test.get("per_species", {}).items()},
    }


def parse_args(argv):
    repo = Path(__file__).resolve().parents[1]
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(repo.parent / "shared" / "data" / "bto400"), help="bto400 directory")
    p.add_argument("--sizes", default="4,8,16,all",
                   help="training set sizes, comma separated; 'all': every training structure (28 of bto400)")
    p.add_argument("--epochs", type=int, default=100, help="epochs at the largest size (same step count at every size)")
    p.add_argument("--routes", default="direct,derivative")
    p.add_argument("--targets", default="born_charges,raman_tensors")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, nargs="+", default=[5e-3],
                   help="learning rate(s); with several, each (route, target, size) keeps the one of lowest mean "
                        "validation MAE over seeds")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="seeds (model initialisation and batch order); mean and std over them")
    p.add_argument("--seed", type=int, help="one seed (the same as --seeds SEED)")
    p.add_argument("--n-val", type=int, default=N_VAL,
                   help="validation structures: this many valid files just before the test set")
    p.add_argument("--patience", type=int, default=0,
                   help="early stopping after this many epochs without a lower validation loss (0: off; the "
                        "parameters of the best validation epoch are kept either way)")
    p.add_argument("--model", default="{}", type=json.loads,
                   help="JSON overrides of the model config, e.g. '{\"num_layers\": 3, \"sh_lmax\": 3}'")
    p.add_argument("--section", default="learning_curves_validated",
                   help="section of --out-json this run writes (other sections are kept)")
    p.add_argument("--out-json", default=str(repo / "docs" / "benchmarks" / "bto_response.json"))
    p.add_argument("--out-png", default=str(repo / "docs" / "benchmarks" / "bto_response_learning_curves.png"))
    p.add_argument("--jit-cache", default=os.path.join(os.path.expanduser("~"), ".cache", "aiida_eqml_bench_jit"),
                   help="persistent jax compilation cache ('' to disable)")
    p.add_argument("--device-info", action="store_true", help="print the jax backend/devices and exit")
    p.add_argument("--plot-only", action="store_true",
                   help="redraw --out-png from every learning-curve section of --out-json (no training)")
    args = p.parse_args(argv)
    if args.seed is not None:
        args.seeds = [args.seed]
    args.seeds = list(dict.fromkeys(args.seeds))
    args.lr = list(dict.fromkeys(args.lr))
    args.routes = [r.strip() for r in args.routes.split(",") if r.strip()]
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    bad = [r for r in args.routes if r not in ("direct", "derivative")] + [t for t in args.targets if t not in TARGETS]
    if bad or not args.routes or not args.targets:
        p.error(f"bad --routes/--targets: {bad}; routes direct,derivative; targets {list(TARGETS)}")
    no_derivative = [t for t in args.targets if TARGETS[t][1] is None]
    if "derivative" in args.routes and no_derivative:
        p.error(f"--routes derivative: no derivative route for {no_derivative} here (use --routes direct)")
    if not isinstance(args.model, dict) or set(args.model) & {"heads", "species", "normalization"}:
        p.error("--model must be a JSON object of model sizes (not heads/species/normalization)")
    return p, args


def main(argv=None) -> int:
    p, args = parse_args(argv)
    if args.plot_only:
        plot_from_json(Path(args.out_json), args.out_png)
        print(f"wrote {args.out_png}")
        return 0
    if args.jit_cache:
        import jax

        jax.config.update("jax_compilation_cache_dir", args.jit_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    info = device_info()
    if args.device_info:
        print(json.dumps(info, indent=1))
        return 0
    routes, targets, seeds = args.routes, args.targets, args.seeds
    model_config = {**MODEL_CONFIG, **args.model}

    from aiida_eqml.ml.datasets.bto import load_bto400

    log = lambda msg: print(msg, flush=True)  # noqa: E731
    log(f"device: {info['backend']} {info['device']} x{info['num_devices']} (jax {info['jax']})")
    t_load = time.perf_counter()
    # mask mode: a faulty label becomes NaN and the record stays, so the split below is over the structures
    dataset, report = load_bto400(args.data, targets=tuple(targets), on_fault="mask")
    log(str(report))
    try:
        pool, val_idx, test_idx = split_protocol(dataset, N_TEST, args.n_val)  # the shared split
        splits = {t: split_for_target(dataset, t, N_TEST, args.n_val) for t in targets}
        for t in targets:
            splits[t]["sizes"] = resolve_sizes(args.sizes, len(splits[t]["pool"]))
    except ValueError as exc:
        p.error(f"{exc} ({len(dataset)} valid records)")
    if args.batch_size > min(min(s["sizes"]) for s in splits.values()):
        p.error(f"--batch-size {args.batch_size} is larger than the smallest training size")
    names = lambda idx: [dataset[i].info["name"] for i in idx]  # noqa: E731
    log(f"test set: the last {N_TEST} valid files by index: {names(test_idx)} "
        f"(loaded in {time.perf_counter() - t_load:.0f} s)")
    log(f"validation set: the {len(val_idx)} valid files before them: {names(val_idx)}; "
        f"{len(pool)} training structures left, seeds {seeds}")
    for t, split in splits.items():
        dropped = {k: names(v) for k, v in split["dropped"].items() if v}
        log(f"{t}: {len(split['pool'])} training / {len(split['validation'])} validation / {len(split['test'])} test, "
            f"sizes {split['sizes']}" + (f"; without a valid label, dropped from their sets: {dropped}" if dropped
                                         else ""))

    baselines, probes = reference_baselines(dataset, splits, {t: TARGETS[t][0]["level"] for t in targets}, log)
    results = []
    partial = f"{args.section}_partial"
    for route in routes:
        for target in targets:
            split = splits[target]
            sizes, n_max = split["sizes"], max(split["sizes"])
            for n in sizes:
                # Same number of optimiser steps at every size.
                epochs = max(
                    1, round(args.epochs * math.ceil(n_max / args.batch_size) / math.ceil(n / args.batch_size))
                )
                train_idx = split["pool"][:n]
                neighbours = mean_neighbours(dataset, train_idx, model_config["cutoff"])
                runs = {lr: [run_one(dataset, route, target, train_idx, split["validation"], epochs, args.batch_size,
                                     lr, seed, log, neighbours, args.model, args.patience) for seed in seeds]
                        for lr in args.lr}
                val_maes = {lr: [record["val_mae"] for _, record in runs[lr]] for lr in args.lr}
                lr = choose_learning_rate(val_maes)  # on the validation set; only the kept models see the test set
                per_seed = [{**record, **test_record(dataset, result, target, split["test"], args.batch_size)}
                            for result, record in runs[lr]]
                extra = {"learning_rate": lr, "epochs": epochs, "steps": epochs * math.ceil(n / args.batch_size)}
                if len(args.lr) > 1:
                    extra["learning_rate_candidates"] = [
                        {"learning_rate": c, "val_mae_mean": float(np.mean(v)), "val_mae_per_seed": v}
                        for c, v in val_maes.items()
                    ]
                row = summarize(route, target, n, per_seed, **extra)
                std = row["test_mae_std"]
                log(f"  {route:10s} {target:14s} n={n:3d}: test MAE {row['test_mae_mean']:.4f}"
                    + ("" if std is None else f" +- {std:.4f}") + f" {UNITS[target]} over seeds {seeds} (lr {lr:g}, "
                    f"val {row['val_mae_mean']:.4f}, train {row['train_mae_mean']:.4f})")
                results.append(row)
                # Written after every row so a run cut short still leaves its finished points.
                merge_json(Path(args.out_json), partial, {"device": info, "results": results})

    all_sizes = sorted({n for split in splits.values() for n in split["sizes"]})
    payload = {
        "protocol": protocol_record(args, dataset, report, (pool, val_idx, test_idx), splits, model_config),
        "device": info,
        **baselines,
        "reference_linear_probe": probes,
        "results": results,
    }
    # shell-quoted, so that it runs again as written (--model takes JSON)
    argv = sys.argv[1:] if argv is None else argv
    payload["command"] = shlex.join(["python", "benchmarks/bto_response.py", *argv])
    merge_json(Path(args.out_json), args.section, payload, drop=(partial,))
    lines = {t: {"mae": ref["test_mae"], "label": ref["label"]} for refs in baselines.values()
             for t, ref in refs.items()}
    plot({args.section: payload}, lines, targets, args.out_png)
    suffix = "" if args.section == "learning_curves" else f"_{args.section}"
    table_path = Path(args.out_json).with_name(Path(args.out_json).stem + suffix + "_table.md")
    table = markdown_table(results, lines, all_sizes, routes, targets, info, seeds)
    table_path.write_text(table)
    log("")
    log(table)
    log(f"wrote {args.out_json}, {args.out_png} and {table_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
