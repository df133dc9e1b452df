"""A second, physics-based reference for the BaTiO3 benchmark: tensors linear in displacements.

    python benchmarks/bto_linear_reference.py --data ../shared/data/bto400

Every bto400 structure is the same 3x3x3 supercell of cubic BaTiO3 with thermal displacements u
from the ideal sites. Each atom's Z* or Raman tensor is fitted as an affine function of the
displacements of the atoms around it (ridge regression), one fit per *site type* (Ba, Ti, and O
by the axis of its Ti-O-Ti chain, so that the fitted couplings are those of one crystal site):

    T_I = T_site + sum_{J within R of I} K_site(J - I) . u_J

``--radius all`` uses every atom of the supercell (405 displacement components per site): then
the receptive field is the whole periodic cell. The ridge strength is picked by leave-one-out
cross-validation over *training* structures; the test set is the one of bto_response.py (the last
8 valid files). This model is not transferable (it needs a fixed reference lattice and
orientation, so it is neither a general nor an equivariant model); it tells what the labels hold:
how much of each tensor is linear in the local displacements, and whether a larger receptive
field changes that. Numbers go to the ``linear_reference`` section of bto_response.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bto_protocol import N_TEST, UNITS, merge_json, split_last  # noqa: E402

GRID = 6  # ideal sites of the 5-atom perovskite in a 3x3x3 supercell sit on a 1/6 fractional grid
LAMBDAS = (1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2)  # ridge strength per sample, on u in Angstrom


def ideal_sites(sample, max_displacement: float = 0.5):
    """(ideal fractional positions, Cartesian displacements) on the perovskite grid."""
    cell = np.asarray(sample.cell, dtype=float)
    frac = np.linalg.solve(cell.T, np.asarray(sample.positions, dtype=float).T).T
    ideal = np.round(frac * GRID) / GRID
    u = (frac - ideal) @ cell
    if np.abs(u).max() > max_displacement:
        raise ValueError(f"{sample.info.get('name')}: an atom is {np.abs(u).max():.2f} A from its perovskite site; "
                         "this reference needs the bto400 supercell")
    return ideal % 1.0, u


def neighbour_orders(ideal, cell, radius: float | None):
    """For each atom, the atoms within ``radius`` (None: all) ordered by relative ideal position,
    and a site-type key (the sorted relative positions: equal keys = equivalent sites).

    Not a neighbour list (vesin gives edges, not this): the fit needs the same *lattice site* in
    the same feature slot for every atom of a site type, so the atoms are matched by their
    relative position on the ideal grid. The minimum image decides the distance, so ``radius``
    must stay below half the shortest cell height.
    """
    heights = abs(np.linalg.det(cell)) / np.linalg.norm(np.cross(cell[[1, 2, 0]], cell[[2, 0, 1]]), axis=1)
    if radius is not None and radius >= heights.min() / 2:
        raise ValueError(f"--radii {radius} A: must be below half the cell height ({heights.min() / 2:.2f} A); "
                         "use 'all' for the whole supercell")
    orders, keys = [], []
    for i in range(len(ideal)):
        rel = (ideal - ideal[i]) % 1.0
        cart = (rel - np.round(rel)) @ cell  # minimum image, used only for the distance
        rel_key = np.round(rel * GRID).astype(int) % GRID
        sel = np.arange(len(ideal)) if radius is None else np.where(np.linalg.norm(cart, axis=1) < radius)[0]
        order = sel[np.lexsort(rel_key[sel].T[::-1])]
        orders.append(order)
        keys.append(rel_key[order].tobytes())
    return orders, keys


def _design(x):
    return np.hstack([x, np.ones((len(x), 1))])


def fit_ridge(gram, moment, n_samples, lam):
    """Ridge weights from the normal equations (``gram = A^T A``, ``moment = A^T Y``)."""
    reg = lam * n_samples * np.eye(len(gram))
    reg[-1, -1] = 0.0  # the intercept (the site's mean tensor) is not shrunk
    return np.linalg.solve(gram + reg, moment)


def run(dataset, target, train_idx, test_idx, radius):
    first = dataset[train_idx[0]]
    ideal0, _ = ideal_sites(first)
    orders, keys = neighbour_orders(ideal0, np.asarray(first.cell, float), radius)
    groups: dict[tuple, list[int]] = {}
    for i, z in enumerate(first.numbers):
        groups.setdefault((int(z), keys[i]), []).append(i)
    disp = {k: ideal_sites(dataset[k])[1] for k in list(train_idx) + list(test_idx)}

    def xy(structure, atoms):
        x = np.array([disp[structure][orders[i]].ravel() for i in atoms])
        y = np.array([dataset[structure].node_targets[target][i].ravel() for i in atoms])
        return _design(x), y

    errors, numbers, lambdas = [], [], []
    for (z, _), atoms in groups.items():
        # Normal equations per training structure, so leave-one-structure-out CV (which picks the
        # ridge strength on the training structures only) is a subtraction.
        parts = {s: xy(s, atoms) for s in train_idx}
        grams = {s: a.T @ a for s, (a, _) in parts.items()}
        moments = {s: a.T @ y for s, (a, y) in parts.items()}
        gram, moment = sum(grams.values()), sum(moments.values())
        n_samples = len(train_idx) * len(atoms)
        cv = []
        for lam in LAMBDAS:
            err = [np.abs(parts[h][0] @ fit_ridge(gram - grams[h], moment - moments[h], n_samples - len(atoms), lam)
                          - parts[h][1]).mean() for h in train_idx] if len(train_idx) > 1 else [0.0]
            cv.append(np.mean(err))
        lam = LAMBDAS[int(np.argmin(cv))]
        w = fit_ridge(gram, moment, n_samples, lam)
        for s in test_idx:
            at, yt = xy(s, atoms)
            errors.append(np.abs(at @ w - yt))
            numbers.append(np.full(len(at), z))
        lambdas.append(lam)
    err = np.concatenate(errors)
    num = np.concatenate(numbers)
    import ase.data

    return {
        "test_mae": float(err.mean()),
        "test_mae_per_species": {ase.data.chemical_symbols[z]: float(err[num == z].mean()) for z in np.unique(num)},
        "site_types": len(groups),
        "features_per_site": int(3 * max(len(orders[a[0]]) for a in groups.values())),
        "ridge_lambdas": lambdas,
    }


def dielectric_consistency(data_dir) -> dict:
    """Do the Raman tensors agree with the dielectric tensors of the same records?

    chi_I,abc = d chi_ab / d u_Ic with chi = (eps_inf - 1) / (4 pi), and chi_I vanishes on the
    centrosymmetric ideal sites, so to lowest order eps_ab(u) - eps_ab(0) = 4 pi * 1/2 sum_I
    chi_I,abc(u) u_Ic. Returns, per component ab, the correlation over the records with a valid
    dielectric tensor between eps_ab and 1/2 sum_I chi_I,abc u_Ic (the unknown eps(0) and the
    volume factor drop out of a correlation).
    """
    from aiida_eqml.ml.datasets.bto import load_bto400

    dataset, report = load_bto400(data_dir, targets=("raman_tensors", "dielectric"))
    x, y = [], []
    for sample in dataset:
        _, u = ideal_sites(sample)
        x.append(0.5 * np.einsum("iabc,ic->ab", sample.node_targets["raman_tensors"], u))
        y.append(sample.graph_targets["dielectric"])
    x, y = np.array(x), np.array(y)
    corr = {
        f"{'xyz'[a]}{'xyz'[b]}": float(np.corrcoef(x[:, a, b], y[:, a, b])[0, 1]) for a in range(3) for b in range(a, 3)
    }
    return {"records": len(dataset), "excluded": report.excluded, "correlation_per_component": corr}


def label_noise_floor(data_dir) -> dict:
    """What the labels' own constraints say about their noise, and a bound on the Raman noise from the dielectric.

    * The acoustic sum rules (sum_I Z*_I = 0, sum_I chi_I = 0) and the symmetry of chi in its two field indices,
      read from the raw files: if they hold to round-off they were imposed when the labels were made and say
      nothing about the noise.
    * The dielectric bound: per component ab, eps_ab = a + b x_ab with x_ab = 1/2 sum_I chi_I,abc u_Ic (see
      :func:`dielectric_consistency`). If the whole residual of that line came from independent noise of
      standard deviation sigma on every Raman component, var(residual) = b^2 sigma^2 1/4 sum_Ic u_Ic^2, so
      sigma <= std(residual) / (|b| 1/2 |u|). Non-linearity in u also lands in the residual, so this is an upper
      bound on sigma; the best test MAE such noise allows is sqrt(2/pi) sigma (a Gaussian's mean absolute value).
    """
    from aiida_eqml.ml.datasets.bto import load_bto400

    root = Path(data_dir)
    raman = np.array([np.load(f) for f in sorted((root / "raman_tensors").glob("*.npy"))])  # file layout
    born = np.array([np.load(f) for f in sorted((root / "born_charges").glob("*.npy"))])
    scale = np.abs(raman).max()
    constraints = {
        "born_asr_max_e": float(np.abs(born.sum(axis=1)).max()),
        "raman_asr_max_per_angstrom": float(np.abs(raman.sum(axis=1)).max()),
        # the file layout is [atom, displacement, field, field]: the field pair is the last two axes
        "raman_field_asymmetry_max_relative": float(np.abs(raman - raman.swapaxes(-1, -2)).max() / scale),
        "raman_rms_per_angstrom": float(np.sqrt((raman**2).mean())),
        "born_rms_e": float(np.sqrt((born**2).mean())),
    }
    dataset, report = load_bto400(data_dir, targets=("raman_tensors", "dielectric"))
    x, y, norms = [], [], []
    for sample in dataset:
        _, u = ideal_sites(sample)
        x.append(0.5 * np.einsum("iabc,ic->ab", sample.node_targets["raman_tensors"], u))
        y.append(sample.graph_targets["dielectric"])
        norms.append(0.5 * np.sqrt((u**2).sum()))
    x, y, norms = np.array(x), np.array(y), np.array(norms)
    per_component = {}
    for a in range(3):
        for b in range(a, 3):
            slope, intercept = np.polyfit(x[:, a, b], y[:, a, b], 1)
            residual = y[:, a, b] - (intercept + slope * x[:, a, b])
            sigma = float(np.std(residual, ddof=2) / (abs(slope) * norms.mean()))
            per_component[f"{'xyz'[a]}{'xyz'[b]}"] = {"slope": float(slope), "residual_std": float(np.std(residual)),
                                                     "sigma_upper_per_angstrom": sigma}
    sigmas = [c["sigma_upper_per_angstrom"] for c in per_component.values()]
    sigma = float(np.median(sigmas))
    return {
        "records": len(dataset), "excluded": report.excluded, "constraints_in_files": constraints,
        "dielectric_bound": per_component, "sigma_upper_median_per_angstrom": sigma,
        "sigma_upper_min_per_angstrom": float(min(sigmas)),
        "best_mae_upper_per_angstrom": float(np.sqrt(2 / np.pi) * sigma),
    }


def main(argv=None) -> int:
    repo = Path(__file__).resolve().parents[1]
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(repo.parent / "shared" / "data" / "bto400"))
    p.add_argument("--sizes", default="4,8,16,32")
    p.add_argument("--radii", default="3.0,4.5,all", help="neighbour radii in Angstrom, 'all' for the whole supercell")
    p.add_argument("--targets", default="born_charges,raman_tensors")
    p.add_argument("--out-json", default=str(repo / "docs" / "benchmarks" / "bto_response.json"))
    p.add_argument(
        "--dielectric-check",
        action="store_true",
        help="only compare the Raman tensors with the dielectric tensors (section raman_dielectric_consistency)",
    )
    p.add_argument("--noise-floor", action="store_true",
                   help="only the labels' constraints and the noise bound from the dielectric (section label_noise)")
    args = p.parse_args(argv)
    if args.noise_floor:
        floor = label_noise_floor(args.data)
        floor["command"] = " ".join(["python", "benchmarks/bto_linear_reference.py", *(argv or sys.argv[1:])])
        print(json.dumps({k: v for k, v in floor.items() if k != "excluded"}, indent=1))
        merge_json(Path(args.out_json), "label_noise", floor)
        return 0
    if args.dielectric_check:
        check = dielectric_consistency(args.data)
        print(json.dumps(check["correlation_per_component"], indent=1))
        merge_json(Path(args.out_json), "raman_dielectric_consistency", check)
        return 0

    from aiida_eqml.ml.datasets.bto import load_bto400

    targets = [t for t in args.targets.split(",") if t]
    sizes = [int(n) for n in args.sizes.split(",") if n]
    radii = [None if r == "all" else float(r) for r in args.radii.split(",") if r]
    dataset, report = load_bto400(args.data, targets=tuple(targets))
    print(report, flush=True)
    pool, test_idx = split_last(dataset, N_TEST)
    results = []
    print(f"{'target':14s} {'radius':>7s} " + " ".join(f"n={n:<7d}" for n in sizes))
    for target in targets:
        for radius in radii:
            row = []
            for n in sizes:
                t0 = time.perf_counter()
                r = run(dataset, target, pool[:n], test_idx, radius)
                r.update(target=target, radius=radius if radius is not None else "all", n_train=n,
                         wall_s=time.perf_counter() - t0)
                results.append(r)
                row.append(r["test_mae"])
            print(f"{target:14s} {str(radius or 'all'):>7s} " + " ".join(f"{v:<9.4f}" for v in row), flush=True)
    payload = {
        "what": "per-site-type ridge regression of each tensor on the displacements within a radius "
        "(not a transferable model; a probe of the labels)",
        "command": " ".join(
            ["python", "benchmarks/bto_linear_reference.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "data": os.path.abspath(args.data),
        "test_set": [dataset[i].info["name"] for i in test_idx],
        "units": {t: UNITS[t] for t in targets},
        "results": results,
    }
    merge_json(Path(args.out_json), "linear_reference", payload)
    print(f"wrote section 'linear_reference' of {args.out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
