"""The protocol of ``bto_response.py`` and its record: the split, the summary over seeds, the JSON section (command,
commit, device) and the figure and table drawn from sections.

Split (records ordered by file index, after the loader's exclusions):

* **test**: the last ``N_TEST`` = 8 valid files; used once, after every choice is made;
* **validation**: the ``N_VAL`` = 4 valid files just before them; the same set at every training size
  and seed, never trained on; every choice is made on it (the best epoch / early stopping inside
  :func:`aiida_eqml.ml.training.train`, the learning rate when several are given);
* **training**: the first ``n`` of the rest (nested: the 4 are inside the 8, ...). With the 40 valid
  bto400 records that leaves 40 - 8 - 4 = 28, so n = 32 does not fit; the largest size is ``all``
  (every training structure left, 28 today).

Taking the validation files from the end of the pool keeps the training sets of the older protocol
(no validation set, first n of the same pool) for every n <= 28, so old and new points are of the same
structures.

**One split for every target** (:func:`split_for_target`). The split above is made once, over the *structures*
the loader keeps (``load_bto400(on_fault="mask")``: a record whose labels fail a check stays, with those labels
NaN). A target whose label is invalid in some records then drops those records from whichever set they are in;
nothing moves between sets. For the dielectric tensor (six records not positive definite) this drops
structure_00048 and 00049 from the test set (6 test structures, not 8) and 00010, 00017, 00020, 00023 from the
training pool (24 left, so its ``all`` is 24); its validation set is the shared one. Re-applying the rule
"last 8 valid files" to the 34 dielectric records instead would have made 00038 and 00039 (validation files of the
other targets) test files and some training files validation files, so a structure could be a training structure for
one target and a test structure for another (a joint model would train on test structures); with one split a
structure is in the same set for every target.

Seeds change the model initialisation and the batch order (``train``'s ``seed``), not the split. A
result row holds the mean and the sample standard deviation (ddof = 1; ``None`` for one seed) over
seeds, and each seed's values. Sections written before this protocol (one seed, no validation set: rows with
a ``test_mae`` only) are still drawn, labelled as such (:func:`curve_points`, :func:`is_validated`).
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
from pathlib import Path

import numpy as np

N_TEST = 8
N_VAL = 4
UNITS = {"born_charges": "e", "raman_tensors": "1/Angstrom", "dielectric": "1"}
TITLES = {"born_charges": "Born charges Z*", "raman_tensors": "Raman tensors",
          "dielectric": "dielectric tensor eps_inf"}
ISSUE_REFERENCE = {"born_charges": 0.36, "raman_tensors": 1.6}  # species-mean MAE quoted in issue 3
ISSUE_GOAL = {"born_charges": 0.036, "raman_tensors": 0.16}  # <= with 32 training structures (none for eps_inf)


def split_last(dataset, n_test: int):
    """(pool, test): records ordered by file index, the last ``n_test`` held out."""
    order = sorted(range(len(dataset)), key=lambda i: dataset[i].info["file_index"])
    if len(order) <= n_test:
        raise ValueError(f"only {len(order)} valid records; need more than {n_test} (the test set)")
    return order[:-n_test], order[-n_test:]


def split_protocol(dataset, n_test: int = N_TEST, n_val: int = N_VAL):
    """(training pool, validation, test) dataset indices, each ordered by file index."""
    pool, test = split_last(dataset, n_test)
    if n_val < 1:
        raise ValueError(f"the validation set needs at least one structure, got {n_val}")
    if len(pool) <= n_val:
        raise ValueError(f"{len(pool)} records before the test set: none left to train on after {n_val} validation")
    return pool[:-n_val], pool[-n_val:], test


def has_label(sample, target: str) -> bool:
    """Whether ``sample`` has a valid (finite) label of ``target``; the loader's mask mode makes a faulty one NaN."""
    labels = sample.node_targets if target in sample.node_targets else sample.graph_targets
    return target in labels and bool(np.all(np.isfinite(labels[target])))


def split_for_target(dataset, target: str, n_test: int = N_TEST, n_val: int = N_VAL) -> dict:
    """The shared split (:func:`split_protocol` over every record of ``dataset``, whatever its labels) restricted to
    the records with a valid ``target`` label: ``{"pool", "validation", "test", "dropped"}`` (dataset indices;
    ``dropped``: the records left out of each set). A record is never moved to another set, so no test structure of
    any target is trained on; a set may only shrink, and an empty validation or test set is an error."""
    shared = dict(zip(("pool", "validation", "test"), split_protocol(dataset, n_test, n_val)))
    split = {key: [i for i in idx if has_label(dataset[i], target)] for key, idx in shared.items()}
    split["dropped"] = {key: [i for i in idx if i not in split[key]] for key, idx in shared.items()}
    for key in ("pool", "validation", "test"):
        if not split[key]:
            raise ValueError(f"{target}: no record of the {key} set has a valid label")
    return split


def resolve_sizes(text: str, n_pool: int) -> list[int]:
    """``"4,8,16,all"`` -> sorted sizes; ``all`` is the whole training pool. A size that does not fit is an error."""
    sizes = set()
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        n = n_pool if item == "all" else int(item)
        if n < 1 or n > n_pool:
            raise ValueError(
                f"training size {n}: only {n_pool} training structures (valid records minus the {N_TEST} test and "
                f"the validation structures); use 'all' for the largest"
            )
        sizes.add(n)
    if not sizes:
        raise ValueError("no training size given")
    return sorted(sizes)


def mean_std(values) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof = 1; None for a single value)."""
    values = np.asarray([float(v) for v in values])
    return float(values.mean()), (float(values.std(ddof=1)) if len(values) > 1 else None)


def choose_learning_rate(val_maes: dict) -> float:
    """The learning rate with the lowest mean validation MAE over seeds (``{lr: [val MAE per seed]}``)."""
    return min(val_maes, key=lambda lr: (float(np.mean(val_maes[lr])), lr))


def summarize(route: str, target: str, n_train: int, per_seed: list[dict], **extra) -> dict:
    """One result row: mean / std over seeds of the test, validation and training MAE, and every seed's record."""
    row = {"route": route, "target": target, "n_train": n_train, **extra, "seeds": [r["seed"] for r in per_seed]}
    for key in ("test_mae", "val_mae", "train_mae", "test_rmse", "val_rmse"):
        row[f"{key}_mean"], row[f"{key}_std"] = mean_std([r[key] for r in per_seed])
    species = sorted(per_seed[0]["test_mae_per_species"])
    row["test_mae_per_species_mean"] = {
        s: float(np.mean([r["test_mae_per_species"][s] for r in per_seed])) for s in species
    }
    row["wall_s"] = float(sum(r["wall_s"] for r in per_seed))
    row["per_seed"] = per_seed
    return row


def curve_points(row: dict) -> tuple[float, float | None] | None:
    """(test MAE, spread) of a result row: the mean and std over seeds (this protocol) or the single value
    of an older section (no validation set, one seed, ``test_mae``); None if the row has neither."""
    if "test_mae_mean" in row:
        return row["test_mae_mean"], row.get("test_mae_std")
    if "test_mae" in row:
        return row["test_mae"], None
    return None


def is_validated(payload: dict) -> bool:
    """Whether a section was written with this protocol (validation set and seeds recorded)."""
    protocol = payload.get("protocol", {})
    return "validation" in protocol and "seeds" in protocol


def protocol_record(args, dataset, report, shared, splits, model_config) -> dict:
    """The ``protocol`` of a JSON section: the shared split and each target's sets (records without a valid label
    dropped), the seeds and the training settings."""
    pool, val_idx, test_idx = shared
    names = lambda idx: [dataset[i].info["name"] for i in idx]  # noqa: E731
    return {
        "data": os.path.abspath(args.data),
        "targets_loaded": args.targets,
        "valid_records": len(dataset),
        "excluded": report.excluded,
        "labels_invalid": report.masked,
        "test_set": names(test_idx),
        "test_set_rule": f"the last {N_TEST} valid files by index (loader exclusions applied first); used once, "
                         "on the models kept after every choice",
        "validation": names(val_idx),
        "validation_rule": f"the {len(val_idx)} valid files just before the test set, the same at every size "
                           "and seed, never trained on; best epoch (lowest validation loss), early stopping "
                           "and the learning rate are chosen on it",
        "train_pool": len(pool),
        "per_target_rule": "the shared split above, less the records without a valid label of the target (dropped "
                           "from their set, never moved to another)",
        "per_target": {t: {"test_set": names(s["test"]), "validation": names(s["validation"]),
                           "train_pool": len(s["pool"]),
                           "train_sets": {str(n): names(s["pool"][:n]) for n in s["sizes"]},
                           "dropped": {k: names(v) for k, v in s["dropped"].items()}} for t, s in splits.items()},
        "sizes_requested": args.sizes,
        "seeds": args.seeds,
        "seeds_vary": "model initialisation and batch order (the split is fixed)",
        "std": "sample standard deviation over seeds (ddof = 1; null for one seed)",
        "model": model_config,
        "epochs_at_largest_size": args.epochs,
        "batch_size": args.batch_size,
        "learning_rates": args.lr,
        "early_stopping_patience": args.patience,
    }


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


def merge_json(path: Path, section: str, payload: dict, drop: tuple[str, ...] = ()) -> None:
    """Write ``payload`` under ``section`` of the JSON file, keeping the other sections
    (bto_throughput.py writes its own) except those named in ``drop``."""
    import subprocess

    here = Path(__file__).resolve().parent
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=here).stdout.strip()
    # run from the repository root: the pathspecs are relative to it (from benchmarks/ they matched nothing)
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "benchmarks", "aiida_eqml"], capture_output=True,
                           text=True, cwd=here.parent).stdout.strip()
    data = json.loads(path.read_text()) if path.exists() else {}
    for name in drop:
        data.pop(name, None)
    command = shlex.join([os.path.relpath(sys.argv[0], here.parent), *sys.argv[1:]])
    # the command and code that wrote the section (a payload's own, more specific command is kept)
    data[section] = {"command": command, **payload, "commit": commit + ("+dirty" if dirty else "")}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")


def series_label(payload: dict, route: str) -> str:
    """Legend text of one run: route, optimiser steps x batch size, device, protocol."""
    rows = [r for r in payload["results"] if r["route"] == route]
    steps = sorted({r["steps"] for r in rows if "steps" in r})
    device = payload.get("device", {})
    where = "GPU" if device.get("backend") in ("gpu", "cuda") else device.get("backend", "?").upper()
    if is_validated(payload):
        how = f"{len(payload['protocol']['seeds'])} seeds, mean +- std"
    else:
        how = "older protocol: no validation set, 1 seed"
    batch = payload["protocol"].get("batch_size", "?")
    return f"{route} head, {'/'.join(map(str, steps))} steps x {batch} ({where}; {how})"


def plot(sections: dict, baselines, targets, path, linear=None):
    """Learning curves of every run in ``sections`` ({name: payload}; mean +- std over seeds where recorded), the
    species-mean reference, the goal and, if given, the linear-in-displacement probe (bto_linear_reference.py)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(targets), figsize=(6.0 * len(targets), 4.6), squeeze=False)
    markers = iter("os^vD<>p" * 4)
    styles = {}
    for ax, target in zip(axes[0], targets):
        sizes = set()
        for payload in sections.values():
            for route in ("direct", "derivative"):
                rows = sorted((r for r in payload["results"] if r["target"] == target and r["route"] == route
                               and curve_points(r) is not None), key=lambda r: r["n_train"])
                if not rows:
                    continue
                label = series_label(payload, route)
                if label not in styles:  # one marker and colour per run in both panels
                    styles[label] = {"marker": next(markers), "color": f"C{len(styles) % 10}"}
                sizes |= {r["n_train"] for r in rows}
                points = [curve_points(r) for r in rows]
                spread = [std or 0.0 for _, std in points]
                ax.errorbar([r["n_train"] for r in rows], [m for m, _ in points],
                            yerr=spread if any(spread) else None, capsize=3, label=label, **styles[label])
        for radius, color in (("4.5", "tab:brown"), ("all", "tab:purple")):
            rows = sorted((r for r in (linear or {}).get("results", [])
                           if r["target"] == target and str(r["radius"]) == radius), key=lambda r: r["n_train"])
            if rows:
                what = "whole supercell" if radius == "all" else f"within {radius} A"
                ax.plot([r["n_train"] for r in rows], [r["test_mae"] for r in rows], color=color, ls="-.", lw=1,
                        label=f"linear in displacements {what} (probe)")
        for probe in (payload.get("reference_linear_probe", {}).get(target) for payload in sections.values()):
            if probe:  # the structure-only linear probe of a graph target (bto_dielectric.py)
                rows = sorted(probe["results"], key=lambda r: r["n_train"])
                ax.plot([r["n_train"] for r in rows], [r["test_mae"] for r in rows], color="tab:purple", ls="-.",
                        lw=1, label="linear probe on displacement features")
                break
        if target in baselines:
            ax.axhline(baselines[target]["mae"], color="grey", ls="--", label=baselines[target].get("label",
                                                                                                    "species mean"))
        if target in ISSUE_GOAL:
            ax.axhline(ISSUE_GOAL[target], color="green", ls=":", label="goal (issue 3)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(sizes), [str(n) for n in sorted(sizes)])
        ax.set_yscale("log")
        ax.set_xlabel("training structures (135 atoms each)")
        ax.set_ylabel(f"test MAE ({UNITS[target]})")
        ax.set_title(TITLES[target])
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_from_json(json_path: Path, png_path, log=print) -> None:
    """Redraw the PNG from every learning-curve section of the JSON (``--plot-only``); a section whose rows have
    no test MAE (neither this protocol's ``test_mae_mean`` nor the older ``test_mae``) is skipped with a message."""
    data = json.loads(Path(json_path).read_text())
    sections = {}
    for name, payload in data.items():
        if not (isinstance(payload, dict) and "protocol" in payload and "results" in payload):
            continue
        if not any(curve_points(r) is not None for r in payload["results"]):
            log(f"{json_path}: section {name!r} has no test MAE in its results; skipped")
            continue
        sections[name] = payload
        if not is_validated(payload):
            log(f"{json_path}: section {name!r} is of the older protocol (no validation set, one seed)")
    if not sections:
        raise SystemExit(f"{json_path}: no learning-curve section to plot")
    # The reference line of each target: from a section of this protocol (species means over its training pool),
    # else the main section, else the first section that has one for that target.
    ranked = sorted(sections.items(), key=lambda kv: (not is_validated(kv[1]), kv[0] != "learning_curves"))
    baselines = {}
    for _, payload in ranked:
        for target, ref in payload.get("reference_species_mean", {}).items():
            baselines.setdefault(target, {"mae": ref["test_mae"]})
        for target, ref in payload.get("reference_mean_tensor", {}).items():
            baselines.setdefault(target, {"mae": ref["test_mae"], "label": "training mean tensor"})
    targets = [t for t in UNITS if any(r["target"] == t for v in sections.values() for r in v["results"])]
    plot(sections, baselines, targets, png_path, data.get("linear_reference"))


def _cell(row, key) -> str:
    mean, std = row[f"{key}_mean"], row[f"{key}_std"]
    return f"{mean:.4f}" if std is None else f"{mean:.4f} +- {std:.4f}"


def markdown_table(results, baselines, sizes, routes, targets, info, seeds) -> str:
    """The learning-curve table as Markdown: test and validation MAE, mean +- std over seeds."""
    lines = [
        f"MAE on the last {N_TEST} valid structures (test; fewer for a target whose label is invalid in some of them, "
        f"see the section's protocol.per_target) and on the validation structures (val), mean +- sample std over "
        f"seeds {seeds} (device: {info['backend']} {info['device']}).",
        "",
        "| target | route | set | " + " | ".join(f"n = {n}" for n in sizes) + " | mean (species / tensor) | goal |",
        "|---|---|---|" + "---|" * len(sizes) + "---|---|",
    ]
    for target in targets:
        for route in routes:
            row = {r["n_train"]: r for r in results if r["target"] == target and r["route"] == route}
            for key, what in (("test_mae", "test"), ("val_mae", "val")):
                cells = [_cell(row[n], key) if n in row else "" for n in sizes]
                lines.append(f"| {target} ({UNITS[target]}) | {route} | {what} | " + " | ".join(cells)
                             + f" | {baselines[target]['mae']:.4f} | {ISSUE_GOAL.get(target, '')} |")
    return "\n".join(lines) + "\n"
