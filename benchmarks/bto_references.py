"""References of the bto400 benchmark on each target's split (:func:`reference_baselines`, used by
``bto_response.py``): each species' mean tensor for the node targets (Z*, Raman) and, for the dielectric tensor
eps_inf (a graph-level target of one composition):

* :func:`mean_tensor_baseline`: predict the training set's mean tensor for every structure. All structures have the
  same composition, so this is what the per-species mean is for the node targets: the best constant.
* :func:`linear_probe`: ridge regression on structure-only features (no label of any kind enters them). eps_inf of
  the centrosymmetric cubic parent changes to lowest order *quadratically* in the displacements u from the ideal
  sites (the Raman tensors vanish there: eps_ab(u) - eps_ab(0) = 4 pi 1/2 sum_I chi_I,abc(u) u_Ic with chi_I linear
  in u, see ``bto_linear_reference.dielectric_consistency``), so the features are symmetric second-moment tensors of
  the displacements (:func:`displacement_tensors`), and the map from each of them to eps is the most general linear
  one the cubic lattice allows: one coefficient each for its trace (A1g), its traceless diagonal (Eg) and its
  off-diagonal (T2g) part. Like the probe of ``bto_linear_reference.py`` it needs the bto400 lattice (ideal sites on
  the 1/6 grid, cube axes along x, y, z); it is a reference of what the labels hold, not a transferable model.

MAE as everywhere in this benchmark (:mod:`aiida_eqml.ml.metrics`): over the 9 Cartesian components of each test
tensor (dimensionless).
"""

from __future__ import annotations

import numpy as np
from bto_linear_reference import fit_ridge as ridge_normal_equations
from bto_linear_reference import ideal_sites
from bto_protocol import ISSUE_GOAL, ISSUE_REFERENCE, TITLES, UNITS

TARGET = "dielectric"
NOMINAL_CHARGE = {56: 2.0, 22: 4.0, 8: -2.0}  # Ba2+ Ti4+ O2-: a structure-only estimate of the polar mode
# Ti-O neighbours on the ideal lattice, in fractional units of the 3x3x3 supercell: the bond is 1/6 of its edge, the
# next Ti-O distance 0.37, so 0.25 separates them
TI_O_BOND = 0.25
LAMBDAS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # ridge strength, on features standardised over training
FEATURES = ("Ba <u u>", "Ti <u u>", "O <u u>", "Ti off-centring in O6 <d d>", "Ti-O bond stretch <s^2 e e>",
            "polar mode P P (nominal charges)")


def labels(dataset, indices) -> np.ndarray:
    """[n, 3, 3] dielectric tensors of the records ``indices``."""
    return np.array([dataset[i].graph_targets[TARGET] for i in indices], dtype=float)


def tensor_mae(prediction, truth) -> float:
    """Mean absolute error per Cartesian component (9 per tensor), as :func:`aiida_eqml.ml.metrics.errors`."""
    return float(np.abs(np.asarray(prediction) - np.asarray(truth)).mean())


def mean_tensor_baseline(dataset, train_idx, test_idx) -> dict:
    """Predict the mean training tensor for every test structure."""
    mean = labels(dataset, train_idx).mean(axis=0)
    truth = labels(dataset, test_idx)
    return {"test_mae": tensor_mae(np.broadcast_to(mean, truth.shape), truth), "n_train": len(train_idx),
            "n_test": len(test_idx), "mean_tensor": mean.tolist()}


def ti_o_bonds(sample):
    """(Ti index, O index, ideal unit vector Ti -> O) of the six O around each Ti, from the ideal sites."""
    ideal, _ = ideal_sites(sample)
    cell = np.asarray(sample.cell, float)
    numbers = np.asarray(sample.numbers)
    ti, ox = np.where(numbers == 22)[0], np.where(numbers == 8)[0]
    rel = ideal[ox][None, :, :] - ideal[ti][:, None, :]
    rel -= np.round(rel)  # minimum image on the ideal lattice
    near = np.linalg.norm(rel, axis=-1) < TI_O_BOND
    pairs = np.argwhere(near)
    if len(pairs) != 6 * len(ti):
        raise ValueError(f"{sample.info.get('name')}: {len(pairs)} Ti-O bonds, expected 6 per Ti")
    vectors = rel[pairs[:, 0], pairs[:, 1]] @ cell
    return ti[pairs[:, 0]], ox[pairs[:, 1]], vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def displacement_tensors(sample) -> np.ndarray:
    """[len(FEATURES), 3, 3] symmetric tensors of the displacements from the ideal sites (Angstrom^2).

    Each rotates as R X R^T with the structure (it is built from outer products of displacements and ideal bond
    vectors), so a rotated structure gives the rotated features; which of these the labels follow is the fit's job.
    """
    _, u = ideal_sites(sample)
    numbers = np.asarray(sample.numbers)
    features = [np.einsum("ia,ib->ab", u[numbers == z], u[numbers == z]) / np.sum(numbers == z) for z in (56, 22, 8)]
    ti, ox, bond = ti_o_bonds(sample)
    # Ti off-centring: the Ti displacement relative to the centre of its O6 cage (the local soft-mode coordinate)
    cage = np.zeros((len(numbers), 3))
    np.add.at(cage, ti, u[ox] / 6.0)
    titanium = np.unique(ti)
    d = u[titanium] - cage[titanium]
    features.append(np.einsum("ia,ib->ab", d, d) / len(titanium))
    # Ti-O bond stretch s = (u_O - u_Ti) . e along each bond, weighted by the bond direction
    stretch = np.einsum("ia,ia->i", u[ox] - u[ti], bond)
    features.append(np.einsum("i,ia,ib->ab", stretch**2, bond, bond) / len(bond))
    # the structure's net polar displacement with nominal charges (zero-wavevector polar mode)
    polar = np.einsum("i,ia->a", np.array([NOMINAL_CHARGE[int(z)] for z in numbers]), u) / len(titanium)
    features.append(np.outer(polar, polar))
    return np.array(features)


def cubic_design(tensors) -> np.ndarray:
    """[n * 9, 3 K + 1] design matrix of the cubic-symmetric linear map: for each feature tensor X its isotropic
    part tr(X)/3 I (A1g), its traceless diagonal (Eg) and its off-diagonal part (T2g); last column the isotropic
    intercept I. Rows are the 9 Cartesian components of each structure, as the MAE counts them."""
    tensors = np.asarray(tensors)
    eye = np.eye(3)
    iso = np.einsum("nkaa->nk", tensors)[..., None, None] / 3.0 * eye
    diag = tensors * eye - iso
    off = tensors * (1.0 - eye)
    columns = np.concatenate([iso, diag, off], axis=1)  # [n, 3K, 3, 3]
    n = len(tensors)
    design = columns.reshape(n, columns.shape[1], 9).transpose(0, 2, 1).reshape(n * 9, -1)
    intercept = np.tile(eye.reshape(9), n)[:, None]
    return np.hstack([design, intercept])


def fit_standardised_ridge(design, target, lam):
    """Ridge on standardised columns (the linear reference's solver; the intercept column, last, is not shrunk).
    Returns (weights, column scale)."""
    scale = design.std(axis=0)
    scale[-1] = 1.0
    scale[scale == 0] = 1.0
    x = design / scale
    return ridge_normal_equations(x.T @ x, x.T @ target, len(x), lam), scale


def linear_probe(dataset, pool, val_idx, test_idx, sizes) -> dict:
    """The probe at each training size (the first n of ``pool``): ridge strength chosen on the validation set, test
    MAE of that fit once. Features are computed from the structures only."""
    features = {i: displacement_tensors(dataset[i]) for i in list(pool) + list(val_idx) + list(test_idx)}

    def xy(indices):
        return cubic_design([features[i] for i in indices]), labels(dataset, indices).reshape(-1)

    x_val, y_val = xy(val_idx)
    x_test, y_test = xy(test_idx)
    results = []
    for n in sizes:
        x_train, y_train = xy(pool[:n])
        fits = {lam: fit_standardised_ridge(x_train, y_train, lam) for lam in LAMBDAS}
        val = {lam: tensor_mae(x_val / s @ w, y_val) for lam, (w, s) in fits.items()}
        lam = min(val, key=lambda k: (val[k], -k))  # ties: the stronger ridge
        w, s = fits[lam]
        results.append({"n_train": n, "ridge_lambda": lam, "train_mae": tensor_mae(x_train / s @ w, y_train),
                        "val_mae": val[lam], "test_mae": tensor_mae(x_test / s @ w, y_test)})
    return {"what": "ridge on symmetric displacement tensors (structure only) through the cubic-symmetric linear map "
                    "(A1g, Eg, T2g coefficient per feature); ridge strength chosen on the validation set",
            "features": list(FEATURES), "lambdas": list(LAMBDAS), "results": results}


def reference_baselines(dataset, splits, levels, log) -> tuple[dict, dict]:
    """The references on each target's split, from its training pool only: ``({"reference_species_mean": {node
    targets}, "reference_mean_tensor": {graph targets}}, {graph target: linear probe at every size})``; ``levels``:
    ``{target: "node" | "graph"}``."""
    from aiida_eqml.ml.datasets.bto import species_mean_baseline

    baselines, probes = {}, {}
    for t, split in splits.items():
        pool, test = split["pool"], split["test"]
        common = {"n_train": len(pool), "unit": UNITS[t]}
        if levels[t] == "graph":
            ref = mean_tensor_baseline(dataset, pool, test)
            baselines.setdefault("reference_mean_tensor", {})[t] = {**ref, **common, "label": "training mean tensor"}
            probes[t] = linear_probe(dataset, pool, split["validation"], test, split["sizes"])
            log(f"{TITLES[t]}: training mean tensor test MAE {ref['test_mae']:.4f}; linear probe test MAE "
                + ", ".join(f"n={r['n_train']}: {r['test_mae']:.4f}" for r in probes[t]["results"]))
            continue
        ref = species_mean_baseline(dataset.subset(pool), dataset.subset(test), t)
        baselines.setdefault("reference_species_mean", {})[t] = {
            "test_mae": ref["mae"], "per_species": ref["per_species"], "issue_value": ISSUE_REFERENCE[t],
            "goal": ISSUE_GOAL[t], **common, "label": "species mean"}
        log(f"species-mean reference ({len(pool)} training): {t} test MAE {ref['mae']:.4f} {UNITS[t]}")
    return baselines, probes
