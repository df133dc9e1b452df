"""The plots of ``hubbard_uv.py evaluate``: parity of every held-out label and the learning curve."""
from __future__ import annotations

from pathlib import Path

import numpy as np


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
