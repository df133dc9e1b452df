"""BaTiO3 response benchmark (issue 3): learning curves of Z* and Raman tensors.

    python benchmarks/bto_response.py --data ../shared/data/bto400              # full run (GPU)
    python benchmarks/bto_response.py --data .bto400 --sizes 4 --epochs 2 \
        --out-json /tmp/bto.json --out-png /tmp/bto.png                         # CPU smoke check

Protocol
--------
* The bto400 records are read and validated by :func:`aiida_eqml.ml.datasets.bto.load_bto400`
  with only the targets benchmarked here (Born charges, Raman tensors): six records have an
  unphysical *dielectric* tensor, which is not used here, so they stay (their Z* and Raman
  labels pass every check). A record whose Z* or Raman labels fail a check is excluded; the
  test set is then "the last 8 valid files by index" (the JSON lists the file names).
* Training sets are the first ``n`` of the remaining records by file index (nested: the 4 are
  inside the 8, ...), ``n`` in ``--sizes``.
* Reference: each species' mean tensor over the first 32 training records
  (:func:`species_mean_baseline`), the issue's 0.36 e / 1.6 1/Angstrom; target is 10x lower.
* Routes: ``direct`` (an irreps readout of the tensor, per-species shift of its ``0e`` part from
  the training set) and ``derivative`` (the tensor as a derivative of a field-dependent energy
  E(R, F): Z* = -d2E/dF dtau, chi = -(1/(4 pi eps0 Omega)) d3E/dF2 dtau, see ``response.py``).
  One model per (route, target, size), trained with :func:`aiida_eqml.ml.training.train`; the
  same number of optimiser steps at every size (``--epochs`` is the epoch count of the largest
  size, smaller sets run proportionally more epochs) so that small sets are not under-trained.
* No validation set (every structure is precious at n = 4): the best epoch is picked on the
  training loss, and the test set is only used once, after training.

Nothing here assumes a CPU: jax picks the default backend (the printed ``device`` field says which).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

TARGETS = {
    # dataset target -> (direct head spec, derivative quantity)
    "born_charges": ({"level": "node", "tensor": "ij"}, "born_charges"),
    "raman_tensors": ({"level": "node", "tensor": "ijk=jik"}, "raman"),
}
UNITS = {"born_charges": "e", "raman_tensors": "1/Angstrom"}
ISSUE_REFERENCE = {"born_charges": 0.36, "raman_tensors": 1.6}  # species-mean MAE quoted in issue 3
ISSUE_GOAL = {"born_charges": 0.036, "raman_tensors": 0.16}  # <= with 32 training structures
N_TEST = 8

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


def split_last(dataset, n_test: int):
    """(pool, test): records ordered by file index, the last ``n_test`` held out."""
    order = sorted(range(len(dataset)), key=lambda i: dataset[i].info["file_index"])
    if len(order) <= n_test:
        raise ValueError(f"only {len(order)} valid records; need more than {n_test} (the test set)")
    return order[:-n_test], order[-n_test:]


def mean_neighbours(dataset, indices, cutoff: float) -> float:
    """Mean edges per atom of the training structures (geometry only, no labels)."""
    from aiida_eqml.ml.graph import graph_from_atoms

    counts = []
    for i in indices:
        atoms = dataset[i].to_ase()
        graph = graph_from_atoms(atoms, cutoff, sorted(set(atoms.get_chemical_symbols())))
        counts.append(graph.n_edge[0] / len(atoms))
    return float(np.mean(counts))


def run_one(dataset, route, target, train_idx, test_idx, epochs, batch_size, lr, seed, log, avg_num_neighbors,
            model_overrides=None):
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
        shift = [[round_sig(v, 3) for v in row] for row in norm["species_shift"]]
        model_config["normalization"] = {target: {"scale": scale, "species_shift": shift}}
    # Neighbours per atom, fixed here (training.py would average over the training graphs,
    # which differ in the last digits between sizes); rounded for the same reason as above.
    model_config["avg_num_neighbors"] = round_sig(avg_num_neighbors, 2)
    config = {
        "model": model_config,
        "targets": {target: {"weight": 1.0}},
        "seed": seed,
        "epochs": epochs,
        "batch_size": batch_size,
        "split": {"train": list(train_idx), "val": [], "test": list(test_idx)},
        "optimizer": {"name": "adam", "learning_rate": lr, "schedule": "cosine", "decay_rate": 0.01,
                      "warmup_epochs": 0, "clip_norm": 10.0},
        "early_stopping": {"patience": 0},
        "progress": False,
    }
    t0 = time.perf_counter()
    result = train(dataset, config)
    seconds = time.perf_counter() - t0
    test = result.metrics["test"][target]
    train_metrics = result.metrics["train"][target]
    log(f"  {route:10s} {target:14s} n={len(train_idx):3d}: test MAE {test['mae']:.4f} {UNITS[target]} "
        f"(train {train_metrics['mae']:.4f}), {len(result.history)} epochs, {seconds:.1f} s")
    return {
        "route": route,
        "target": target,
        "n_train": len(train_idx),
        "epochs": len(result.history),
        "steps": len(result.history) * math.ceil(len(train_idx) / batch_size),
        "test_mae": test["mae"],
        "test_rmse": test["rmse"],
        "test_relative_rmse": test["relative_rmse"],
        "test_mae_per_species": {k: v["mae"] for k, v in test.get("per_species", {}).items()},
        "train_mae": train_metrics["mae"],
        "final_train_loss": result.history[-1]["train_loss"],
        "normalization_scale": scale,
        "wall_s": seconds,
    }


def series_label(payload: dict, route: str) -> str:
    """Legend text of one run: route, optimiser steps x batch size, device."""
    rows = [r for r in payload["results"] if r["route"] == route]
    steps = sorted({r["steps"] for r in rows})
    device = payload.get("device", {})
    where = "GPU" if device.get("backend") in ("gpu", "cuda") else device.get("backend", "?").upper()
    return f"{route} head, {'/'.join(map(str, steps))} steps x {payload['protocol']['batch_size']} ({where})"


def plot(sections: dict, baselines, targets, path, linear=None):
    """Learning curves of every run in ``sections`` ({name: payload}), the species-mean reference,
    the goal and, if given, the linear-in-displacement probe (bto_linear_reference.py)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(targets), figsize=(6.0 * len(targets), 4.6), squeeze=False)
    markers = iter("os^vD<>p")
    styles = {}
    for ax, target in zip(axes[0], targets):
        sizes = set()
        for payload in sections.values():
            for route in ("direct", "derivative"):
                rows = sorted((r for r in payload["results"] if r["target"] == target and r["route"] == route),
                              key=lambda r: r["n_train"])
                if not rows:
                    continue
                label = series_label(payload, route)
                if label not in styles:  # one marker and colour per run in both panels
                    styles[label] = {"marker": next(markers), "color": f"C{len(styles)}"}
                sizes |= {r["n_train"] for r in rows}
                ax.plot([r["n_train"] for r in rows], [r["test_mae"] for r in rows], label=label, **styles[label])
        for radius, color in (("4.5", "tab:brown"), ("all", "tab:purple")):
            rows = sorted((r for r in (linear or {}).get("results", [])
                           if r["target"] == target and str(r["radius"]) == radius), key=lambda r: r["n_train"])
            if rows:
                what = "whole supercell" if radius == "all" else f"within {radius} A"
                ax.plot([r["n_train"] for r in rows], [r["test_mae"] for r in rows], color=color, ls="-.", lw=1,
                        label=f"linear in displacements {what} (probe)")
        if target in baselines:
            ax.axhline(baselines[target]["mae"], color="grey", ls="--", label="species mean")
        ax.axhline(ISSUE_GOAL[target], color="green", ls=":", label="goal (issue 3)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(sizes), [str(n) for n in sorted(sizes)])
        ax.set_yscale("log")
        ax.set_xlabel("training structures (135 atoms each)")
        ax.set_ylabel(f"test MAE ({UNITS[target]})")
        ax.set_title({"born_charges": "Born charges Z*", "raman_tensors": "Raman tensors"}[target])
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_from_json(json_path: Path, png_path) -> None:
    """Redraw the PNG from every learning-curve section of the JSON (``--plot-only``)."""
    data = json.loads(Path(json_path).read_text())
    sections = {k: v for k, v in data.items() if isinstance(v, dict) and "protocol" in v and "results" in v}
    if not sections:
        raise SystemExit(f"{json_path}: no learning-curve section to plot")
    main = data.get("learning_curves") or next(iter(sections.values()))
    baselines = {t: {"mae": v["test_mae"]} for t, v in main["reference_species_mean"].items()}
    targets = [t for t in TARGETS if any(r["target"] == t for v in sections.values() for r in v["results"])]
    plot(sections, baselines, targets, png_path, data.get("linear_reference"))


def markdown_table(results, baselines, sizes, routes, targets, info) -> str:
    """The learning-curve table as Markdown (docs/benchmarks.md links it)."""
    lines = [
        f"Test MAE on the last {N_TEST} valid structures (device: {info['backend']} {info['device']}).",
        "",
        "| target | route | " + " | ".join(f"n = {n}" for n in sizes) + " | species mean (32) | goal |",
        "|---|---|" + "---|" * len(sizes) + "---|---|",
    ]
    for target in targets:
        for route in routes:
            row = {r["n_train"]: r["test_mae"] for r in results if r["target"] == target and r["route"] == route}
            cells = [f"{row[n]:.4f}" if n in row else "" for n in sizes]
            lines.append(f"| {target} ({UNITS[target]}) | {route} | " + " | ".join(cells)
                         + f" | {baselines[target]['mae']:.4f} | {ISSUE_GOAL[target]} |")
    return "\n".join(lines) + "\n"


def device_info() -> dict:
    import jax

    dev = jax.devices()[0]
    return {
        "backend": jax.default_backend(),
        "device": getattr(dev, "device_kind", str(dev)),
        "num_devices": jax.device_count(),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
    }


def merge_json(path: Path, section: str, payload: dict) -> None:
    """Write ``payload`` under ``section`` of the JSON file, keeping the other sections
    (bto_throughput.py writes its own)."""
    import subprocess

    here = Path(__file__).resolve().parent
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=here).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "benchmarks", "aiida_eqml"], capture_output=True,
                           text=True, cwd=here).stdout.strip()
    data = json.loads(path.read_text()) if path.exists() else {}
    command = " ".join([os.path.relpath(sys.argv[0], here.parent), *sys.argv[1:]])
    # the command and code that wrote the section (a payload's own, more specific command is kept)
    data[section] = {"command": command, **payload, "commit": commit + ("+dirty" if dirty else "")}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")


def main(argv=None) -> int:
    repo = Path(__file__).resolve().parents[1]
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(repo.parent / "shared" / "data" / "bto400"), help="bto400 directory")
    p.add_argument("--sizes", default="4,8,16,32", help="training set sizes (comma separated)")
    p.add_argument("--epochs", type=int, default=100, help="epochs at the largest size (same step count at every size)")
    p.add_argument("--routes", default="direct,derivative")
    p.add_argument("--targets", default="born_charges,raman_tensors")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="{}", type=json.loads,
                   help="JSON overrides of the model config, e.g. '{\"num_layers\": 3, \"sh_lmax\": 3}'")
    p.add_argument("--section", default="learning_curves",
                   help="section of --out-json this run writes (other sections are kept)")
    p.add_argument("--out-json", default=str(repo / "docs" / "benchmarks" / "bto_response.json"))
    p.add_argument("--out-png", default=str(repo / "docs" / "benchmarks" / "bto_response_learning_curves.png"))
    p.add_argument("--jit-cache", default=os.path.join(os.path.expanduser("~"), ".cache", "aiida_eqml_bench_jit"),
                   help="persistent jax compilation cache ('' to disable)")
    p.add_argument("--device-info", action="store_true", help="print the jax backend/devices and exit")
    p.add_argument("--plot-only", action="store_true",
                   help="redraw --out-png from every learning-curve section of --out-json (no training)")
    args = p.parse_args(argv)

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
    sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    routes = [r.strip() for r in args.routes.split(",") if r.strip()]
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    bad = [r for r in routes if r not in ("direct", "derivative")] + [t for t in targets if t not in TARGETS]
    if not isinstance(args.model, dict) or set(args.model) & {"heads", "species", "normalization"}:
        p.error("--model must be a JSON object of model sizes (not heads/species/normalization)")
    model_config = {**MODEL_CONFIG, **args.model}
    if bad or not sizes or min(sizes) < 1:
        p.error(f"bad --routes/--targets/--sizes: {bad or sizes}; routes direct,derivative; targets {list(TARGETS)}")

    from aiida_eqml.ml.datasets.bto import load_bto400, species_mean_baseline

    log = lambda msg: print(msg, flush=True)  # noqa: E731
    log(f"device: {info['backend']} {info['device']} x{info['num_devices']} (jax {info['jax']})")
    t_load = time.perf_counter()
    dataset, report = load_bto400(args.data, targets=tuple(targets))
    log(str(report))
    pool, test_idx = split_last(dataset, N_TEST)
    if max(sizes) > len(pool):
        p.error(f"--sizes up to {max(sizes)} but only {len(pool)} valid records before the {N_TEST} held out")
    names = lambda idx: [dataset[i].info["name"] for i in idx]  # noqa: E731
    log(
        f"test set: the last {N_TEST} valid files by index: {names(test_idx)} "
        f"(loaded in {time.perf_counter() - t_load:.0f} s)"
    )

    baseline_n = min(32, len(pool))
    baselines = {
        t: species_mean_baseline(dataset.subset(pool[:baseline_n]), dataset.subset(test_idx), t) for t in targets
    }
    for t in targets:
        log(f"species-mean reference ({baseline_n} training): {t} test MAE {baselines[t]['mae']:.4f} {UNITS[t]}")

    results = []
    n_max = max(sizes)
    for route in routes:
        for target in targets:
            for n in sizes:
                # Same number of optimiser steps at every size.
                epochs = max(
                    1, round(args.epochs * math.ceil(n_max / args.batch_size) / math.ceil(n / args.batch_size))
                )
                results.append(run_one(dataset, route, target, pool[:n], test_idx, epochs, args.batch_size, args.lr,
                                       args.seed, log, mean_neighbours(dataset, pool[:n], model_config["cutoff"]),
                                       args.model))
                # Written after every training so a run cut short still leaves its finished points.
                merge_json(Path(args.out_json), f"{args.section}_partial", {"device": info, "results": results})

    # Table
    log("")
    log(f"{'target':14s} {'route':10s} " + " ".join(f"n={n:<7d}" for n in sizes) + "  reference  goal")
    for target in targets:
        for route in routes:
            row = {r["n_train"]: r["test_mae"] for r in results if r["target"] == target and r["route"] == route}
            log(f"{target:14s} {route:10s} " + " ".join(f"{row[n]:<9.4f}" for n in sizes)
                + f"  {baselines[target]['mae']:<9.4f}  {ISSUE_GOAL[target]}")
    payload = {
        "protocol": {
            "data": os.path.abspath(args.data),
            "targets_loaded": targets,
            "valid_records": len(dataset),
            "excluded": report.excluded,
            "test_set": names(test_idx),
            "test_set_rule": f"the last {N_TEST} valid files by index (loader exclusions applied first)",
            "train_sets": {str(n): names(pool[:n]) for n in sizes},
            "model": model_config,
            "epochs_at_largest_size": args.epochs,
            "batch_size": args.batch_size,
            "learning_rate": args.lr,
            "seed": args.seed,
        },
        "device": info,
        "reference_species_mean": {
            t: {
                "n_train": baseline_n,
                "test_mae": baselines[t]["mae"],
                "per_species": baselines[t]["per_species"],
                "issue_value": ISSUE_REFERENCE[t],
                "goal": ISSUE_GOAL[t],
                "unit": UNITS[t],
            }
            for t in targets
        },
        "results": results,
    }
    payload["command"] = " ".join(
        ["python", "benchmarks/bto_response.py", *(argv if argv is not None else sys.argv[1:])]
    )
    merge_json(Path(args.out_json), args.section, payload)
    plot({args.section: payload}, {t: {"mae": b["mae"]} for t, b in baselines.items()}, targets, args.out_png)
    suffix = "" if args.section == "learning_curves" else f"_{args.section}"
    table_path = Path(args.out_json).with_name(Path(args.out_json).stem + suffix + "_table.md")
    table = markdown_table(results, baselines, sizes, routes, targets, info)
    table_path.write_text(table)
    log("")
    log(table)
    log(f"wrote {args.out_json}, {args.out_png} and {table_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
