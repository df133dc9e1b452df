"""Scores of ``hubbard_uv.py evaluate``: model and baseline errors of held-out rows, per material and pooled."""
from __future__ import annotations

import numpy as np


def score_rows(rows, predictions) -> dict:
    from aiida_eqml.ml.hubbard.evaluation import errors

    out = {}
    for kind in ("U", "V"):
        sel = [r for r in rows if r["kind"] == kind]
        out[kind] = errors([r["truth"] for r in sel], [predictions[(r["sample"], r["kind"], r["key"])] for r in sel])
    return out


def score_baselines(train_rows, test_rows) -> dict:
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


def mean_std(values):
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
        summary[f"mare_{low}"], summary[f"mare_{low}_std"] = mean_std(per_seed)
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
    summary["material_mean_mare_u"] = mean_std([e["mare_u"] for e in entries])[0]
    summary["material_mean_mare_v"] = mean_std([e["mare_v"] for e in entries])[0]
    return summary
