"""bto400 loader: validation of every record, fault report by file name, species-mean baseline.

Synthetic records (5-atom cells written here) test each check; the real data in
``<repo>/../shared/data/bto400`` is used when present (skipped otherwise).
"""

from pathlib import Path

import ase
import ase.io
import numpy as np
import pytest

from aiida_eqml.ml.dataset import Dataset
from aiida_eqml.ml.datasets.bto import check_record, load_bto400, species_mean_baseline, split_first_n

BTO400 = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "bto400"


def _write_record(root: Path, index: str, rng, *, born=None, raman=None, eps=None, symbols=None, qe_offset=0.0):
    symbols = symbols or ["Ba", "Ti", "O", "O", "O"]
    frac = np.array([[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]]) + rng.normal(
        0, 0.01, (5, 3)
    )
    atoms = ase.Atoms(symbols, scaled_positions=frac, cell=np.eye(3) * 4.0, pbc=True)
    for sub in ("structures/cif", "structures/qe", "born_charges", "raman_tensors", "dielectric"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    ase.io.write(root / f"structures/cif/structure_{index}.cif", atoms)
    lines = (
        ["CELL_PARAMETERS angstrom"]
        + [" ".join(f"{x:.16f}" for x in row) for row in atoms.cell[:]]
        + ["", "ATOMIC_POSITIONS angstrom"]
    )
    lines += [
        f"{s} " + " ".join(f"{x + qe_offset:.16f}" for x in p)
        for s, p in zip(atoms.get_chemical_symbols(), atoms.positions)
    ]
    (root / f"structures/qe/structure_{index}.scf").write_text("\n".join(lines) + "\n")
    if born is None:
        born = np.array([np.eye(3) * q for q in (2.7, 7.2, -2.1, -2.1, -5.7)]) + rng.normal(0, 0.1, (5, 3, 3))
        born -= born.mean(axis=0)  # acoustic sum rule
    if raman is None:
        r = rng.normal(0, 1.0, (5, 3, 3, 3))
        r = r + r.transpose(0, 1, 3, 2)  # vibroscopy layout [atom, displacement, field, field]
        raman = r - r.mean(axis=0)
    if eps is None:
        eps = np.eye(3) * 5.1 + 0.01 * np.ones((3, 3))
    np.save(root / f"born_charges/{index}.npy", born)
    np.save(root / f"raman_tensors/{index}.npy", raman)
    np.save(root / f"dielectric/{index}.npy", eps)
    return atoms, born, raman, eps


def test_synthetic_faults_are_found_and_named(tmp_path):
    rng = np.random.default_rng(0)
    _, born0, raman0, eps0 = _write_record(tmp_path, "00000", rng)
    _write_record(tmp_path, "00001", rng)
    bad_born = born0.copy()
    bad_born[0, 0, 0] += 1.0
    _write_record(tmp_path, "00002", rng, born=bad_born)  # acoustic sum rule broken
    bad_raman = raman0.copy()
    bad_raman[1, 0, 0, 1] += 2.0
    _write_record(tmp_path, "00003", rng, raman=bad_raman)  # field indices not symmetric
    _write_record(tmp_path, "00004", rng, eps=np.diag([5.0, -64.0, 5.0]))  # not positive definite
    _write_record(tmp_path, "00005", rng, eps=np.diag([0.5, 0.6, 0.7]))  # eps_inf < 1
    _write_record(tmp_path, "00006", rng, symbols=["Ti", "Ba", "O", "O", "O"])  # atom order differs
    nan_born = born0.copy()
    nan_born[2, 1, 1] = np.nan
    _write_record(tmp_path, "00007", rng, born=nan_born)
    _write_record(tmp_path, "00008", rng, born=born0[:4] - born0[:4].mean(0))  # wrong atom count
    _write_record(tmp_path, "00009", rng, qe_offset=0.05)  # cif and QE cards disagree
    _write_record(tmp_path, "00010", rng)
    (tmp_path / "dielectric/00010.npy").unlink()  # missing file

    dataset, report = load_bto400(tmp_path)
    assert report.loaded == ["structure_00000", "structure_00001"]
    assert len(dataset) == 2
    reasons = {k: " ".join(v) for k, v in report.excluded.items()}
    assert "acoustic sum rule" in reasons["structure_00002"] and "born_charges/00002.npy" in reasons["structure_00002"]
    assert "not symmetric in the two field indices" in reasons["structure_00003"]
    assert "not positive definite" in reasons["structure_00004"] and "-64" in reasons["structure_00004"]
    assert "eps_inf must exceed 1" in reasons["structure_00005"]
    assert "atom count/order differs" in reasons["structure_00006"]
    assert "NaN" in reasons["structure_00007"]
    assert "shape (4, 3, 3)" in reasons["structure_00008"]
    assert "disagree" in reasons["structure_00009"]
    assert "missing dielectric/00010.npy" in reasons["structure_00010"]
    assert "structure_00004" in str(report)

    # Raman converted from the vibroscopy layout [I, c, a, b] to the contract [I, a, b, c].
    np.testing.assert_allclose(dataset[0].node_targets["raman_tensors"], raman0.transpose(0, 2, 3, 1))
    np.testing.assert_allclose(dataset[0].node_targets["born_charges"], born0)

    # mask policy: a bad dielectric only masks that label, the record stays.
    masked, report = load_bto400(tmp_path, on_fault="mask")
    assert "structure_00004" in report.masked and "structure_00004" in report.loaded
    record = masked[report.loaded.index("structure_00004")]
    assert np.all(np.isnan(record.graph_targets["dielectric"])) and np.all(
        np.isfinite(record.node_targets["born_charges"])
    )
    assert "structure_00006" in report.excluded  # structural faults still exclude


def test_check_record_accepts_good_physics():
    rng = np.random.default_rng(1)
    born = rng.normal(size=(4, 3, 3))
    born -= born.mean(0)
    raman = rng.normal(size=(4, 3, 3, 3))
    raman = raman + raman.transpose(0, 2, 1, 3)
    raman -= raman.mean(0)
    assert check_record(born, raman, np.eye(3) * 4, 4) == {}


@pytest.mark.skipif(not BTO400.is_dir(), reason=f"bto400 data not found at {BTO400}")
def test_real_bto400_faulty_records_and_baseline(tmp_path):
    dataset, report = load_bto400(BTO400)
    # The six records whose eps_inf has a -64 eigenvalue (their NLO tensors are ~4e5 pm/V too).
    bad = {f"structure_{i:05d}" for i in (10, 17, 20, 23, 48, 49)}
    assert set(report.excluded) == bad, str(report)
    assert all("not positive definite" in " ".join(report.excluded[k]) for k in bad)
    assert len(dataset) == 34 and not report.masked
    sample = dataset[0]
    assert sample.n_atoms == 135 and sample.node_targets["raman_tensors"].shape == (135, 3, 3, 3)
    # Contract layout: symmetric in the two field indices (a, b).
    r = sample.node_targets["raman_tensors"]
    np.testing.assert_allclose(r, r.transpose(0, 2, 1, 3), atol=1e-10)

    # Species-mean baseline, first 32 files train / rest test, faulty records excluded.
    train = dataset.subset([i for i, s in enumerate(dataset) if s.info["file_index"] <= 39])
    test = dataset.subset([i for i, s in enumerate(dataset) if s.info["file_index"] > 39])
    assert (len(train), len(test)) == (28, 6)
    born = species_mean_baseline(train, test, "born_charges")
    raman = species_mean_baseline(train, test, "raman_tensors")
    assert born["mae"] == pytest.approx(0.36, abs=0.01)
    assert raman["mae"] == pytest.approx(1.6, abs=0.05)

    # The loaded dataset survives the npz round trip.
    dataset.subset(range(2)).save(tmp_path / "bto.npz")
    again = Dataset.load(tmp_path / "bto.npz")
    np.testing.assert_array_equal(again[1].node_targets["raman_tensors"], dataset[1].node_targets["raman_tensors"])
    assert split_first_n(dataset, 3)[0][2].info["name"] == "structure_00002"
