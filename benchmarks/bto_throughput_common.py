"""Shared pieces of ``benchmarks/bto_throughput.py``: the model configurations, timing windows and their summary,
the equivariance check, the ``Bench`` record every implementation returns, and the run's provenance (commit, load)."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

SPECIES = ["O", "Ti", "Ba"]
Z_IRREPS = "0e + 1e + 2e"  # Born charges: 1o x 1o
BASE = {
    "architecture": "nequip",
    "cutoff": 5.0,
    "num_layers": 2,
    "sh_lmax": 2,
    "num_radial_basis": 8,
    "radial_hidden": [32, 32],
    "envelope_p": 6,
    "readout_product_mul": 4,
}
CONFIGS = {
    "equal": {**BASE, "hidden_irreps": "32x0e + 16x1o + 8x2e"},
    "bto": {**BASE, "hidden_irreps": "32x0e + 8x0o + 16x1o + 8x1e + 8x2e + 4x2o"},  # bto_response.MODEL_CONFIG
}


# ============================================================== helpers
def git_commit() -> str:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "benchmarks/bto_throughput*.py", "aiida_eqml/ml"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def load_average():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def load_structure(data: Path, index: str):
    """One structure and its Born charges (the loader's cif reader)."""
    from aiida_eqml.ml.datasets.bto import read_p1_cif

    atoms = read_p1_cif(data / "structures" / "cif" / f"structure_{index}.cif")
    born = np.load(data / "born_charges" / f"{index}.npy", allow_pickle=False)
    return atoms, born


def random_rotation(seed=0) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def window(fn, min_time: float) -> float:
    """Calls/s of ``fn`` (which blocks until done) over one window of at least ``min_time`` s."""
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        dt = time.perf_counter() - t0
        if dt >= min_time:
            return n / dt


def summary(rates: list[float]) -> dict:
    return {
        "median": statistics.median(rates),
        "min": min(rates),
        "max": max(rates),
        "runs": [round(r, 4) for r in rates],
    }


def import_torch(torch_path: str | None):
    try:
        import torch  # noqa: F401
    except ImportError:
        if torch_path and Path(torch_path).is_dir():
            sys.path.append(str(Path(torch_path).resolve()))  # after the venv: its packages win
    import e3nn
    import torch

    return torch, e3nn


class Bench:
    """A network ready to time: ``infer()`` and ``step()`` block until done."""

    def __init__(self, name, params, infer, step, equivariance, warmup_s, extra=None):
        self.name, self.params, self.infer, self.step = name, int(params), infer, step
        self.equivariance, self.warmup_s, self.extra = float(equivariance), float(warmup_s), dict(extra or {})


def _equivariance(predict, positions, cells, rest, rot, d):
    out = np.asarray(predict(positions, cells, *rest))
    out_rot = np.asarray(predict(positions @ rot.T, cells @ rot.T, *rest))
    return float(np.abs(out_rot - out @ d.T).max() / np.abs(out).max())
