"""Error metrics per target and per species, in Cartesian (physical) units.

Predictions and labels are compared as Cartesian tensors (what DFT gives and what users read),
so an MAE of Born charges is in e per tensor component. Only labelled entries count (the
``mask`` of a batch: padding and NaN labels excluded).

:class:`MetricAccumulator` sums errors over batches so that a whole dataset is evaluated without
holding all predictions; :func:`summarise` turns sums into MAE / RMSE / relative errors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["tensor_error_sums", "summarise", "MetricAccumulator", "errors"]


def tensor_error_sums(prediction: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """Sums for MAE/RMSE/relative error over labelled entries.

    ``prediction``/``truth``: ``[M, ...]`` Cartesian; ``mask``: ``[M]`` bool. Per-component sums
    give MAE and RMSE; Frobenius norms per entry give the relative error
    ``sum ||P - T|| / sum ||T||`` (robust when single components are ~0).
    """
    prediction = np.asarray(prediction, np.float64)
    truth = np.asarray(truth, np.float64)
    mask = np.asarray(mask, bool)
    # the entry width from the array, not -1: a batch may hold no label of this target (U-only samples of a
    # U+V record have no V), and an empty array cannot infer -1
    width = int(np.prod(prediction.shape[1:], dtype=np.int64))
    p = prediction[mask].reshape(int(mask.sum()), width)
    t = truth[mask].reshape(int(mask.sum()), width)
    diff = p - t
    return {
        "count": float(len(p)),
        "components": float(diff.size),
        "abs": float(np.abs(diff).sum()),
        "sq": float((diff**2).sum()),
        "norm_diff": float(np.linalg.norm(diff, axis=1).sum()),
        "norm_true": float(np.linalg.norm(t, axis=1).sum()),
        "sq_true": float((t**2).sum()),
    }


def _add(a: dict, b: dict) -> dict:
    return {k: a.get(k, 0.0) + b[k] for k in b}


def summarise(sums: Mapping[str, float]) -> dict[str, float]:
    """MAE, RMSE (per component), relative error and relative RMSE from :func:`tensor_error_sums`."""
    n = sums.get("components", 0.0)
    if n == 0:
        return {
            "mae": float("nan"),
            "rmse": float("nan"),
            "relative": float("nan"),
            "relative_rmse": float("nan"),
            "count": 0,
        }
    return {
        "mae": sums["abs"] / n,
        "rmse": float(np.sqrt(sums["sq"] / n)),
        "relative": sums["norm_diff"] / sums["norm_true"] if sums["norm_true"] > 0 else float("nan"),
        "relative_rmse": float(np.sqrt(sums["sq"] / sums["sq_true"])) if sums["sq_true"] > 0 else float("nan"),
        "count": int(sums["count"]),
    }


class MetricAccumulator:
    """Accumulates error sums per target, and per species for node targets."""

    def __init__(self, species_names: Sequence[str] | None = None):
        self.species_names = list(species_names) if species_names is not None else None
        self.total: dict[str, dict] = {}
        self.per_species: dict[str, dict[str, dict]] = {}

    def update(self, name: str, prediction, truth, mask, species: np.ndarray | None = None) -> None:
        """Add one batch of target ``name``; ``species`` ([M] indices) enables the per-species split."""
        self.total[name] = _add(self.total.get(name, {}), tensor_error_sums(prediction, truth, mask))
        if species is None or self.species_names is None:
            return
        species = np.asarray(species)
        table = self.per_species.setdefault(name, {})
        for index in np.unique(species[np.asarray(mask, bool)]):
            key = self.species_names[int(index)]
            sub = np.asarray(mask, bool) & (species == index)
            table[key] = _add(table.get(key, {}), tensor_error_sums(prediction, truth, sub))

    def result(self) -> dict[str, dict]:
        """``{target: {"mae", "rmse", "relative", "relative_rmse", "count", "per_species": {...}}}``."""
        out = {}
        for name, sums in self.total.items():
            out[name] = summarise(sums)
            if name in self.per_species:
                out[name]["per_species"] = {k: summarise(v) for k, v in sorted(self.per_species[name].items())}
        return out


def errors(prediction, truth, mask=None) -> dict[str, float]:
    """One-shot metrics for arrays (all entries labelled when ``mask`` is None)."""
    truth = np.asarray(truth)
    if mask is None:
        mask = np.all(np.isfinite(truth.reshape(len(truth), -1)), axis=1)
    return summarise(tensor_error_sums(prediction, np.nan_to_num(truth), mask))
