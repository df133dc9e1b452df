"""Loader and validator for the bto400 layout (BaTiO3 3x3x3 supercells, electric response).

Layout (one file per structure, matched by the 5-digit index ``NNNNN``)::

    structures/cif/structure_NNNNN.cif   cell + positions (read with ase)
    structures/qe/structure_NNNNN.scf    the same as QE cards (optional; cross-checked if present)
    born_charges/NNNNN.npy               (n, 3, 3)     Z*[atom, field, displacement], e
    raman_tensors/NNNNN.npy              (n, 3, 3, 3)  see below, 1/Angstrom
    dielectric/NNNNN.npy                 (3, 3)        eps_inf

Raman index order.  The data's README says ``chi[atom, field, field, displacement]``, but the
arrays are exactly symmetric in their *last two* axes and not in axes (1, 2): they follow the
aiida-vibroscopy convention ``[atom, displacement, field, field]`` (its docs, "Conventions").
The loader converts to the architecture contract ``chi[I, a, b, c]`` (a, b field; c displacement)
and checks the field symmetry after conversion, so a file in the other layout is caught and
reported instead of silently mislabelled.

Every record is checked (finite values, shapes, atom count and species order against the
majority of the readable records - not the first one, which may itself be the faulty record, cif vs QE
positions, Z* acoustic sum rule, Raman field symmetry and translational sum rule, dielectric symmetric positive
definite with eigenvalues > 1, plausible magnitudes).
Faulty records are excluded (or, with ``on_fault="mask"``, only the faulty label is set to NaN)
and listed, by file name, in the returned :class:`LoadReport`.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from aiida_eqml.ml.dataset import Dataset, Sample
from aiida_eqml.ml.targets import target_specs

__all__ = [
    "BTO_TARGET_SPECS",
    "BTOTolerances",
    "LoadReport",
    "load_bto400",
    "check_record",
    "read_qe_cards",
    "read_p1_cif",
    "species_mean_baseline",
    "split_first_n",
]

BTO_TARGET_SPECS = target_specs("born_charges", "raman_tensors", "dielectric")  # aiida_eqml.ml.targets
_FOLDER = {"born_charges": "born_charges", "raman_tensors": "raman_tensors", "dielectric": "dielectric"}
_CIF_RE = re.compile(r"^structure_(\d{5})\.cif$")


@dataclasses.dataclass(frozen=True)
class BTOTolerances:
    """Acceptance thresholds. Defaults are loose compared with converged DFT (the data meets
    the sum rules to ~1e-13) yet far below what a corrupted record shows."""

    born_asr: float = 0.1  # e, max |sum_I Z*_I,ab|
    raman_asr: float = 0.5  # 1/A, max |sum_I chi_I,abc|
    raman_field_symmetry: float = 1e-3  # relative to max |chi|
    dielectric_symmetry: float = 1e-3  # relative to max |eps|
    dielectric_min_eigenvalue: float = 1.0  # eps_inf > 1 for any real insulator
    dielectric_max_eigenvalue: float = 1000.0
    max_abs_born: float = 20.0  # e
    max_abs_raman: float = 500.0  # 1/A
    structure_mismatch: float = 1e-3  # Angstrom, cif vs QE cards (cif keeps 5 decimals)


@dataclasses.dataclass
class LoadReport:
    """What the loader read, excluded and masked, by file name."""

    root: str
    loaded: list[str] = dataclasses.field(default_factory=list)
    excluded: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    masked: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        lines = [
            f"bto400 at {self.root}: {len(self.loaded)} records loaded, {len(self.excluded)} excluded, "
            f"{len(self.masked)} with masked labels"
        ]
        for title, table in (("excluded", self.excluded), ("masked labels", self.masked)):
            for name, reasons in sorted(table.items()):
                lines.append(f"  {title}: {name}: " + "; ".join(reasons))
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def read_qe_cards(path: str | os.PathLike) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Parse ``CELL_PARAMETERS angstrom`` and ``ATOMIC_POSITIONS angstrom`` cards.

    ase's espresso-in reader needs a full pw.x input (namelists), which these card-only files lack.
    """
    lines = [line.strip() for line in Path(path).read_text().splitlines()]
    headers = {
        line.split()[0]: i
        for i, line in enumerate(lines)
        if line and line.split()[0] in ("CELL_PARAMETERS", "ATOMIC_POSITIONS")
    }
    for card in ("CELL_PARAMETERS", "ATOMIC_POSITIONS"):
        if card not in headers:
            raise ValueError(f"{path}: no {card} card")
        if "angstrom" not in lines[headers[card]].lower():
            raise ValueError(f"{path}: {card} must be in angstrom, got {lines[headers[card]]!r}")
    i = headers["CELL_PARAMETERS"]
    cell = np.array([lines[i + k].split()[:3] for k in (1, 2, 3)], dtype=float)
    symbols, positions = [], []
    for line in lines[headers["ATOMIC_POSITIONS"] + 1 :]:
        parts = line.split()
        if len(parts) < 4 or not parts[0][0].isalpha() or parts[0].isupper() and len(parts[0]) > 2:
            break
        symbols.append(parts[0])
        positions.append([float(x) for x in parts[1:4]])
    return cell, symbols, np.array(positions, dtype=float).reshape(-1, 3)


def read_p1_cif(path: str | os.PathLike):
    """Read a single-block cif with ase; P1 files skip ase's symmetry expansion.

    ase's ``read`` expands every site with the space group (``crystal``), an O(n^2) pass that
    takes ~0.5 s for 135 atoms; for P1 it is the identity, so we take the sites as written.
    """
    import ase.io
    from ase.io.cif import parse_cif

    with open(path) as handle:
        blocks = [b for b in parse_cif(handle) if b.has_structure()]
    if len(blocks) != 1:
        raise ValueError(f"expected one structure block, found {len(blocks)}")
    block = blocks[0]
    number = block._get_spacegroup_number()
    name = str(block._get_spacegroup_name() or "").replace(" ", "")
    if number == 1 or (number is None and name in ("P1", "")):
        atoms = block.get_unsymmetrized_structure()
        atoms.pbc = True
        return atoms
    return ase.io.read(path, format="cif")


def check_record(
    born: np.ndarray | None,
    raman: np.ndarray | None,
    dielectric: np.ndarray | None,
    n_atoms: int,
    tol: BTOTolerances = BTOTolerances(),
) -> dict[str, list[str]]:
    """Physics checks of one record's labels; returns ``{target: [reasons]}`` (empty when good).

    ``raman`` must already be in the contract layout ``[atom, field, field, displacement]``.
    """
    faults: dict[str, list[str]] = {}

    def fault(target, message):
        faults.setdefault(target, []).append(message)

    if born is not None:
        if born.shape != (n_atoms, 3, 3):
            fault("born_charges", f"shape {born.shape}, expected {(n_atoms, 3, 3)}")
        elif not np.all(np.isfinite(born)):
            fault("born_charges", "contains NaN/inf")
        else:
            asr = np.abs(born.sum(axis=0)).max()
            if asr > tol.born_asr:
                fault("born_charges", f"acoustic sum rule violated: max |sum_I Z*| = {asr:.3g} e > {tol.born_asr}")
            if np.abs(born).max() > tol.max_abs_born:
                fault(
                    "born_charges", f"implausible magnitude max |Z*| = {np.abs(born).max():.3g} e > {tol.max_abs_born}"
                )
    if raman is not None:
        if raman.shape != (n_atoms, 3, 3, 3):
            fault("raman_tensors", f"shape {raman.shape}, expected {(n_atoms, 3, 3, 3)}")
        elif not np.all(np.isfinite(raman)):
            fault("raman_tensors", "contains NaN/inf")
        else:
            scale = max(np.abs(raman).max(), 1e-12)
            asym = np.abs(raman - raman.transpose(0, 2, 1, 3)).max() / scale
            if asym > tol.raman_field_symmetry:
                fault(
                    "raman_tensors",
                    f"not symmetric in the two field indices (relative asymmetry {asym:.3g} > "
                    f"{tol.raman_field_symmetry}); wrong index layout?",
                )
            asr = np.abs(raman.sum(axis=0)).max()
            if asr > tol.raman_asr:
                fault(
                    "raman_tensors",
                    f"translational sum rule violated: max |sum_I chi_I| = {asr:.3g} 1/A > {tol.raman_asr}",
                )
            if scale > tol.max_abs_raman:
                fault("raman_tensors", f"implausible magnitude max |chi| = {scale:.3g} 1/A > {tol.max_abs_raman}")
    if dielectric is not None:
        if dielectric.shape != (3, 3):
            fault("dielectric", f"shape {dielectric.shape}, expected (3, 3)")
        elif not np.all(np.isfinite(dielectric)):
            fault("dielectric", "contains NaN/inf")
        else:
            scale = max(np.abs(dielectric).max(), 1e-12)
            asym = np.abs(dielectric - dielectric.T).max() / scale
            if asym > tol.dielectric_symmetry:
                fault("dielectric", f"not symmetric (relative asymmetry {asym:.3g} > {tol.dielectric_symmetry})")
            eigenvalues = np.linalg.eigvalsh(0.5 * (dielectric + dielectric.T))
            if eigenvalues.min() <= 0:
                fault(
                    "dielectric",
                    f"not positive definite: eigenvalues {np.round(eigenvalues, 3).tolist()} "
                    f"(diagonal {np.round(np.diag(dielectric), 3).tolist()})",
                )
            elif eigenvalues.min() <= tol.dielectric_min_eigenvalue:
                fault(
                    "dielectric",
                    f"eigenvalue {eigenvalues.min():.3g} <= {tol.dielectric_min_eigenvalue} (eps_inf must exceed 1)",
                )
            if eigenvalues.max() > tol.dielectric_max_eigenvalue:
                fault("dielectric", f"implausible eigenvalue {eigenvalues.max():.3g} > {tol.dielectric_max_eigenvalue}")
    return faults


def _majority_symbols(structures: dict) -> tuple[list[str] | None, str]:
    """The species sequence most records share (ties: the earliest file), and how to name it in a report."""
    from collections import Counter

    counts = Counter(
        tuple(atoms.get_chemical_symbols()) for atoms in structures.values() if np.all(np.isfinite(atoms.positions))
    )
    if not counts:
        return None, "no readable record"
    symbols, count = counts.most_common(1)[0]
    return list(symbols), f"the majority of records ({count} of {sum(counts.values())}: {len(symbols)} atoms)"


def load_bto400(
    root: str | os.PathLike,
    *,
    targets: Sequence[str] = ("born_charges", "raman_tensors", "dielectric"),
    on_fault: str = "exclude",
    tolerances: BTOTolerances = BTOTolerances(),
) -> tuple[Dataset, LoadReport]:
    """Read and validate a bto400 directory; returns the good records and a report.

    ``on_fault="exclude"`` drops a record with any faulty label (the README's advice: never train
    on it silently); ``"mask"`` keeps the record and sets only the faulty labels to NaN (missing).
    Structural faults (unreadable, wrong atom count or order, missing file) always exclude.
    """
    if on_fault not in ("exclude", "mask"):
        raise ValueError(f"on_fault must be 'exclude' or 'mask', got {on_fault!r}")
    unknown = set(targets) - set(BTO_TARGET_SPECS)
    if unknown:
        raise ValueError(f"unknown bto400 targets {sorted(unknown)}; available: {list(BTO_TARGET_SPECS)}")
    root = Path(root)
    cif_dir = root / "structures" / "cif"
    if not cif_dir.is_dir():
        raise FileNotFoundError(f"{root}: no structures/cif folder; is this a bto400 directory?")
    report = LoadReport(root=str(root))
    indices = sorted(m.group(1) for f in os.listdir(cif_dir) if (m := _CIF_RE.match(f)))
    if not indices:
        raise FileNotFoundError(f"{cif_dir}: no structure_NNNNN.cif files")
    for target in targets:
        stray = sorted(set(f[:-4] for f in os.listdir(root / _FOLDER[target]) if f.endswith(".npy")) - set(indices))
        if stray:
            report.notes.append(f"{target}: files without a structure ignored: {[s + '.npy' for s in stray]}")

    samples: list[Sample] = []
    structures = {}
    for index in indices:
        try:
            structures[index] = read_p1_cif(cif_dir / f"structure_{index}.cif")
        except Exception as exc:  # ase raises many types for a broken cif
            report.excluded[f"structure_{index}.cif"] = [f"unreadable cif: {exc}"]
    reference_symbols, reference_note = _majority_symbols(structures)
    for index, atoms in structures.items():
        name = f"structure_{index}"
        reasons: list[str] = []
        n = len(atoms)
        symbols = atoms.get_chemical_symbols()
        if not np.all(np.isfinite(atoms.positions)):
            reasons.append(f"{name}.cif: non-finite positions")
        elif symbols != reference_symbols:
            reasons.append(
                f"{name}.cif: atom count/order differs from {reference_note} "
                f"({n} atoms, {atoms.get_chemical_formula()})"
            )
        qe_path = root / "structures" / "qe" / f"{name}.scf"
        if qe_path.exists() and not reasons:
            try:
                qe_cell, qe_symbols, qe_positions = read_qe_cards(qe_path)
                if qe_symbols != symbols:
                    reasons.append(f"{qe_path.name}: species order differs from the cif")
                else:
                    frac = np.linalg.solve(atoms.cell[:].T, (qe_positions - atoms.positions).T).T
                    delta = np.abs((frac - np.round(frac)) @ atoms.cell[:]).max()
                    dcell = np.abs(qe_cell - atoms.cell[:]).max()
                    if max(delta, dcell) > tolerances.structure_mismatch:
                        reasons.append(f"{qe_path.name} and cif disagree by {max(delta, dcell):.3g} A")
            except ValueError as exc:
                report.notes.append(f"{qe_path.name}: not cross-checked ({exc})")

        raw: dict[str, np.ndarray | None] = {}
        for target in targets:
            path = root / _FOLDER[target] / f"{index}.npy"
            if not path.exists():
                reasons.append(f"missing {_FOLDER[target]}/{index}.npy")
                continue
            try:
                raw[target] = np.load(path, allow_pickle=False).astype(np.float64)
            except (ValueError, OSError) as exc:
                reasons.append(f"{_FOLDER[target]}/{index}.npy unreadable: {exc}")
        if reasons:
            report.excluded[name] = reasons
            continue
        if "raman_tensors" in raw and raw["raman_tensors"].ndim == 4:
            # aiida-vibroscopy [I, displacement, a, b] -> contract [I, a, b, displacement]
            raw["raman_tensors"] = raw["raman_tensors"].transpose(0, 2, 3, 1)
        faults = check_record(raw.get("born_charges"), raw.get("raman_tensors"), raw.get("dielectric"), n, tolerances)
        labelled = {f"{_FOLDER[t]}/{index}.npy: {m}" for t, ms in faults.items() for m in ms}
        shape_faults = any("shape" in m for ms in faults.values() for m in ms)
        if faults and (on_fault == "exclude" or shape_faults):
            report.excluded[name] = sorted(labelled)
            continue
        if faults:
            report.masked[name] = sorted(labelled)
            for target in faults:
                raw[target] = np.full_like(raw[target], np.nan)
        node_targets = {t: raw[t] for t in targets if BTO_TARGET_SPECS[t]["level"] == "node"}
        graph_targets = {t: raw[t] for t in targets if BTO_TARGET_SPECS[t]["level"] == "graph"}
        samples.append(
            Sample.from_ase(
                atoms,
                node_targets=node_targets,
                graph_targets=graph_targets,
                info={"name": name, "file_index": int(index), "source": "bto400"},
            )
        )
        report.loaded.append(name)
    dataset = Dataset(samples, {t: BTO_TARGET_SPECS[t] for t in targets})
    return dataset, report


def split_first_n(dataset: Dataset, n_train: int, *, by: str = "file_index") -> tuple[Dataset, Dataset]:
    """Order by ``info[by]`` and split into the first ``n_train`` and the rest."""
    order = sorted(range(len(dataset)), key=lambda i: dataset[i].info[by])
    return dataset.subset(order[:n_train]), dataset.subset(order[n_train:])


def species_mean_baseline(train: Dataset, test: Dataset, target: str) -> dict:
    """Predict each species' mean training tensor; MAE on ``test`` (overall and per element).

    NaN (missing) labels are ignored in both the means and the errors.
    """
    import ase.data

    numbers = np.concatenate([s.numbers for s in train])
    values = np.concatenate([s.node_targets[target] for s in train])
    means = {}
    for z in np.unique(numbers):
        v = values[numbers == z]
        v = v[np.all(np.isfinite(v.reshape(len(v), -1)), axis=1)]
        means[int(z)] = v.mean(axis=0)
    errors, per_species = [], {}
    for s in test:
        truth = s.node_targets[target]
        unknown = set(np.unique(s.numbers).tolist()) - set(means)
        if unknown:
            raise ValueError(f"{s.info.get('name')}: species {sorted(unknown)} not in the training set")
        prediction = np.stack([means[int(z)] for z in s.numbers])
        err = np.abs(prediction - truth).reshape(s.n_atoms, -1)
        ok = np.all(np.isfinite(err), axis=1)
        errors.append((s.numbers[ok], err[ok]))
    all_numbers = np.concatenate([e[0] for e in errors])
    all_err = np.concatenate([e[1] for e in errors])
    for z in np.unique(all_numbers):
        per_species[ase.data.chemical_symbols[int(z)]] = float(all_err[all_numbers == z].mean())
    return {"mae": float(all_err.mean()), "per_species": per_species, "n_train": len(train), "n_test": len(test)}
