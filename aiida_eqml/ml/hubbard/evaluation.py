"""Pure functions of the Hubbard benchmark (``benchmarks/hubbard_uv.py``): materials, quality flags, label tables,
leave-one-material-out splits, baselines and errors. No aiida, no training: numpy only, so they are tested cheaply.

A *material* is a composition plus a structure type (and magnetic order), e.g. ``NiO-rocksalt-afm2``: the unit a
leave-one-material-out evaluation holds out, all its strains and self-consistent iterations together.

A *label table* is a list of rows, one per scored hp.x number::

    {"kind": "U" | "V", "sample": index in the record, "key": (atom,) | (i, j, S1, S2, S3), "material": str,
     "group": element ("Ni") for U, unordered element pair ("Ni-O") for V, "truth": eV (hp.x),
     "scf": eV (the U / V the perturbed scf used: the previous iteration's value), "trace": tr n (on-site
     occupation summed over spins; for V the sum over the two sites), "iteration": the self-consistent iteration of
     the label (``info['iteration']``; None when unknown)}

Only samples whose scf passes :func:`aiida_eqml.ml.hubbard.records.hubbard_label_issues` give rows: the others stay
in the record, flagged (:func:`label_flags`), and are neither trained on nor scored.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import ase.data
import numpy as np

from .quality import hubbard_label_issues

__all__ = [
    "material_of",
    "cell_of",
    "label_flags",
    "label_table",
    "material_splits",
    "validation_split",
    "element_mean_baseline",
    "previous_iteration_baseline",
    "occupation_linear_baseline",
    "BASELINES",
    "errors",
    "pooled_errors",
    "choose_per_target",
    "distinct_v_couples",
]


# ----------------------------------------------------------------------------- materials
def material_of(sample) -> str:
    """``info['material']`` (campaign labels), else derived from the older strain-path record's info
    (``element`` + ``order``: ``NiO-rocksalt-fm``; the 4-atom AFM cell is AFM-II: ``NiO-rocksalt-afm2``), else the
    sample name without its ``_a<strain>...`` / ``_iter<k>`` tail."""
    info = sample.info
    if info.get("material"):
        return str(info["material"])
    if info.get("element") and info.get("order"):
        order = {"afm": "afm2"}.get(str(info["order"]), str(info["order"]))
        return f"{info['element']}O-rocksalt-{order}"
    name = str(info.get("name", ""))
    stem = re.split(r"_(?:a\d+|s\d+|iter\d+|pk\d+)", name)[0]
    if stem:
        return stem
    return "".join(sorted({ase.data.chemical_symbols[z] for z in sample.numbers}))


def cell_of(sample) -> str:
    """The DFT cell (material x strain) a sample comes from: every iteration of one self-consistent loop."""
    info = sample.info
    if info.get("campaign_key"):
        return str(info["campaign_key"])
    if info.get("strain") is not None:
        return f"{material_of(sample)}@{float(info['strain']):.3f}"
    return re.sub(r"_iter\d+$", "", str(info.get("name", "")))


def label_flags(record, **criteria) -> dict[int, list[str]]:
    """``{sample index: issues}`` of the samples the quality filter rejects (empty issues are not listed).
    ``criteria`` go to :func:`hubbard_label_issues`; a sample without scf diagnostics is flagged, not an error."""
    flags = {}
    for index, sample in enumerate(record.samples):
        try:
            issues = hubbard_label_issues({**sample.info, "name": sample.info.get("name", str(index))}, **criteria)
        except ValueError as exc:
            issues = [str(exc)]
        if issues:
            flags[index] = issues
    return flags


# ----------------------------------------------------------------------------- label table
def _trace(occupations, atom: int) -> float:
    return float(np.trace(np.asarray(occupations[atom]), axis1=-2, axis2=-1).sum())


def label_table(record, indices: Iterable[int] | None = None, flags: Mapping[int, Any] | None = None) -> list[dict]:
    """Rows (module docstring) of every finite U / V label of the samples ``indices`` (default: all) not in
    ``flags``."""
    flags = flags or {}
    rows = []
    for index in range(len(record)) if indices is None else indices:
        if index in flags:
            continue
        s = record.samples[index]
        material = material_of(s)
        # the self-consistent iteration (1: the scf ran with the campaign's seeds, not with a previous label)
        iteration = s.info.get("iteration")
        iteration = int(iteration) if iteration is not None else None
        symbols = [ase.data.chemical_symbols[z] for z in s.numbers]
        occ = s.node_attrs["occupations"]
        u_scf = np.asarray(s.node_attrs["hubbard_u_scf"], float).reshape(-1)
        if "hubbard_u" in s.node_targets:
            u = np.asarray(s.node_targets["hubbard_u"], float).reshape(len(s.numbers), -1)[:, 0]
            for atom in np.flatnonzero(np.isfinite(u)):
                rows.append({"kind": "U", "sample": int(index), "key": (int(atom),), "material": material,
                             "group": symbols[atom], "truth": float(u[atom]), "scf": float(u_scf[atom]),
                             "trace": _trace(occ, atom), "iteration": iteration})
        if "hubbard_v" in s.edge_targets:
            target = s.edge_targets["hubbard_v"]
            scf = {}
            if "hubbard_v_scf" in s.edge_attrs:
                attr = s.edge_attrs["hubbard_v_scf"]
                scf = {
                    tuple(int(x) for x in k): float(np.asarray(v).reshape(-1)[0])
                    for k, v in zip(attr.keys, attr.values)
                }
            for key, value in zip(target.keys, np.asarray(target.values, float).reshape(len(target.keys), -1)[:, 0]):
                if not np.isfinite(value):
                    continue
                key = tuple(int(x) for x in key)
                i, j = key[0], key[1]
                rows.append({"kind": "V", "sample": int(index), "key": key, "material": material,
                             "group": "-".join(sorted((symbols[i], symbols[j]))), "truth": float(value),
                             # a couple the scf did not carry had V = 0 in it
                             "scf": scf.get(key, 0.0), "trace": _trace(occ, i) + _trace(occ, j),
                             "iteration": iteration})
    return rows


# ----------------------------------------------------------------------------- splits
def material_splits(
    record, flags: Mapping[int, Any] | None = None, materials: Sequence[str] | None = None
) -> list[dict]:
    """One split per held-out material (all materials, or ``materials``): ``{"material", "train": [indices of every
    other material's samples], "test": [its samples]}``; flagged samples are in neither."""
    flags = flags or {}
    by_material: dict[str, list[int]] = {}
    for index, s in enumerate(record.samples):
        if index not in flags:
            by_material.setdefault(material_of(s), []).append(index)
    names = sorted(by_material)
    if materials:
        unknown = sorted(set(materials) - set(names))
        if unknown:
            raise ValueError(f"materials {unknown} have no usable label; the record has {names}")
        names = [m for m in names if m in set(materials)]
    return [{"material": m, "train": [i for other in sorted(by_material) if other != m for i in by_material[other]],
             "test": list(by_material[m])} for m in names]


def unseen_species(record, train: Iterable[int], test: Iterable[int]) -> list[str]:
    """Elements of the ``test`` samples' structures that no ``train`` sample holds, labelled or not (e.g. Sr of a
    held-out SrTiO3 when no other material has Sr): the ML loop refuses a structure with an element its models never
    saw, so a held-out material with one is outside the models' domain even when its U and V elements are known."""
    seen = {int(z) for i in train for z in record.samples[i].numbers}
    wanted = {int(z) for i in test for z in record.samples[i].numbers}
    return sorted(ase.data.chemical_symbols[z] for z in wanted - seen)


def _has_v_labels(sample) -> bool:
    target = sample.edge_targets.get("hubbard_v")
    return target is not None and bool(np.isfinite(np.asarray(target.values, float)).any())


def validation_split(
    record, train: Sequence[int], fraction: float = 0.25, seed: int = 0
) -> tuple[list[int], list[int], str]:
    """``(fit, validation, unit)``: the training samples split by *material* (a seeded ``fraction`` of the training
    materials, at least one) so that model selection sees materials it did not fit; with one training material, by
    DFT cell (strain) instead; with one cell, no validation (``unit`` ``"none"``).

    When two or more of the groups carry V labels, the validation groups include one of them (and the fit keeps at
    least one): a draw of U-only materials would judge every V option on U alone (the seventh session's summed-V
    evaluation did exactly that). A draw that already holds a V group is kept as it is."""
    rng = np.random.default_rng(seed)
    for unit, key in (("material", material_of), ("cell", cell_of)):
        groups = sorted({key(record.samples[i]) for i in train})
        if len(groups) >= 2:
            n_val = min(len(groups) - 1, max(1, int(round(fraction * len(groups)))))
            order = [groups[k] for k in rng.permutation(len(groups))]
            val_groups = order[:n_val]
            with_v = {key(record.samples[i]) for i in train if _has_v_labels(record.samples[i])}
            if len(with_v) >= 2 and not with_v & set(val_groups):
                # the first V group of the same permutation replaces the last drawn group: still seeded
                val_groups[-1] = next(g for g in order[n_val:] if g in with_v)
            elif len(with_v) >= 2 and with_v <= set(val_groups):
                # and the fit keeps one: the last V group drawn goes back for the first U-only group left
                last_v = max(k for k, g in enumerate(val_groups) if g in with_v)
                spare = [g for g in order[n_val:] if g not in with_v]
                if spare:
                    val_groups[last_v] = spare[0]
            val_groups = set(val_groups)
            fit = [i for i in train if key(record.samples[i]) not in val_groups]
            val = [i for i in train if key(record.samples[i]) in val_groups]
            return fit, val, unit
    return list(train), [], "none"


# ----------------------------------------------------------------------------- baselines
def _by(rows, kind):
    return [r for r in rows if r["kind"] == kind]


def element_mean_baseline(train_rows: Sequence[dict]) -> Callable[[dict], float]:
    """Per element (U) / element pair (V) mean of the training labels; a group absent from training gets the mean of
    all training labels of that kind (NaN if there is none)."""
    means, overall = {}, {}
    for kind in ("U", "V"):
        rows = _by(train_rows, kind)
        overall[kind] = float(np.mean([r["truth"] for r in rows])) if rows else float("nan")
        for group in {r["group"] for r in rows}:
            means[(kind, group)] = float(np.mean([r["truth"] for r in rows if r["group"] == group]))
    return lambda row: means.get((row["kind"], row["group"]), overall[row["kind"]])


def previous_iteration_baseline(train_rows: Sequence[dict] = ()) -> Callable[[dict], float]:
    """The U / V the perturbed scf used (U_in, the previous iteration's hp.x value; the starting U in iteration 1):
    the paper's baseline, fitted on nothing."""
    return lambda row: row["scf"]


def occupation_linear_baseline(train_rows: Sequence[dict]) -> Callable[[dict], float]:
    """Per element (U) / element pair (V) a least-squares line ``truth = a + b tr n`` (``row["trace"]``) through the
    training labels; a group with one distinct trace gets its mean, a group absent from training the mean of all
    training labels of that kind (as :func:`element_mean_baseline`: a line through other elements' traces would
    extrapolate across d counts)."""
    def fit(rows):
        x = np.array([r["trace"] for r in rows])
        y = np.array([r["truth"] for r in rows])
        if len(rows) == 0:
            return np.array([0.0, np.nan])
        if np.ptp(x) < 1e-9:
            return np.array([0.0, float(np.mean(y))])
        return np.polyfit(x, y, 1)

    lines, overall = {}, {}
    for kind in ("U", "V"):
        rows = _by(train_rows, kind)
        overall[kind] = np.array([0.0, float(np.mean([r["truth"] for r in rows])) if rows else np.nan])
        for group in {r["group"] for r in rows}:
            lines[(kind, group)] = fit([r for r in rows if r["group"] == group])
    return lambda row: float(np.polyval(lines.get((row["kind"], row["group"]), overall[row["kind"]]), row["trace"]))


BASELINES: dict[str, Callable[[Sequence[dict]], Callable[[dict], float]]] = {
    "element_mean": element_mean_baseline,
    "previous_iteration": previous_iteration_baseline,
    "occupation_linear": occupation_linear_baseline,
}


# ----------------------------------------------------------------------------- errors
def errors(truth, pred) -> dict:
    """``{"n", "mae", "mare", "rmse", "max_abs"}`` (eV; MARE a fraction, mean |pred - truth| / |truth|); ``None``
    values when there is nothing to score."""
    truth, pred = np.asarray(truth, float), np.asarray(pred, float)
    if truth.size == 0:
        return {"n": 0, "mae": None, "mare": None, "rmse": None, "max_abs": None}
    diff = np.abs(pred - truth)
    return {"n": int(truth.size), "mae": float(np.mean(diff)), "mare": float(np.mean(diff / np.abs(truth))),
            "rmse": float(np.sqrt(np.mean(diff ** 2))), "max_abs": float(np.max(diff))}


def choose_per_target(candidates: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """``{"U": k, "V": k}``: the index of the candidate with the lowest validation MARE (``val_mare_u`` /
    ``val_mare_v``) for each target, the first candidate where no score is finite.

    Each target is chosen on its own score, not on the mean of both: V validation MAREs (25-85 % on the campaign,
    where V at q = Gamma is near zero) are larger than U's and, averaged in, let a candidate win on V that is worse
    on U (docs/hubbard.md: both candidates of the twelfth session were chosen that way)."""
    chosen = {}
    for kind, field in (("U", "val_mare_u"), ("V", "val_mare_v")):
        scores = [c.get(field) for c in candidates]
        finite = [k for k, value in enumerate(scores) if value is not None and np.isfinite(value)]
        chosen[kind] = min(finite, key=lambda k: scores[k]) if finite else 0
    return chosen


def pooled_errors(rows: Sequence[dict], field: str) -> dict[str, dict]:
    """``{"U": errors, "V": errors}`` of ``row[field]`` against ``row["truth"]``."""
    return {
        kind: errors([r["truth"] for r in _by(rows, kind)], [r[field] for r in _by(rows, kind)]) for kind in ("U", "V")
    }


def distinct_v_couples(sample, symprec: float = 1e-3) -> int:
    """How many symmetry-distinct V couples the ``hubbard_v`` target of one sample holds.

    hp.x writes V for every couple of a shell, most of them equal by symmetry; two couples are counted once when
    their unordered pair of sites is in the same pair of spglib orbits (atoms typed by element and by the sign of
    their on-site moment, so the two AFM sublattices are distinct) at the same bond length (``symprec``, A). Bond
    length plus orbits is an invariant of the couple, not a full orbit test: two inequivalent couples of equal
    length between the same orbits would count once (an undercount, never an overcount).
    """
    import spglib

    target = sample.edge_targets.get("hubbard_v")
    if target is None or not len(target.keys):
        return 0
    keys = target.keys[np.isfinite(target.values.reshape(len(target.keys), -1)[:, 0])]
    moments = np.zeros(len(sample.numbers))
    if "occupations" in sample.node_attrs:
        occupations = np.asarray(sample.node_attrs["occupations"])
        if occupations.shape[1] == 2:
            moments = np.trace(occupations[:, 0], axis1=-2, axis2=-1) - np.trace(occupations[:, 1], axis1=-2, axis2=-1)
    types = np.asarray(sample.numbers) * 3 + np.where(moments > 0.1, 1, np.where(moments < -0.1, 2, 0))
    cell = np.asarray(sample.cell, float)
    fractional = np.asarray(sample.positions, float) @ np.linalg.inv(cell)
    orbits = spglib.get_symmetry_dataset((cell, fractional, types), symprec=symprec).equivalent_atoms
    positions = np.asarray(sample.positions, float)
    distinct = set()
    for i, j, *shift in keys.tolist():
        length = np.linalg.norm(positions[j] + np.asarray(shift) @ cell - positions[i])
        distinct.add((tuple(sorted((int(orbits[i]), int(orbits[j])))), round(float(length) / (10 * symprec))))
    return len(distinct)
