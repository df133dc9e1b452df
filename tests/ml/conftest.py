"""Small shared fixtures for the ML tests: tiny random periodic structures and the tiny model core they run."""

import ase
import numpy as np
import pytest

SPECIES = ["Ba", "Ti", "O"]
CUTOFF = 3.5
#: Tiny on purpose: the tests check symmetry and derivatives, not accuracy, and XLA compile time dominates.
TINY_CORE = {
    "species": SPECIES,
    "cutoff": CUTOFF,
    "num_layers": 1,
    "hidden_irreps": "4x0e + 2x1o + 2x1e + 2x2e",
    "radial_hidden": [8],
    "num_radial_basis": 4,
    "avg_num_neighbors": 10.0,
    "readout_product_mul": 2,
}


def random_periodic_atoms(seed: int = 0, n_atoms: int = 4, symbols=("Ba", "Ti", "O"), cell_length: float = 4.0):
    """A small triclinic cell with random positions (no two atoms closer than 1 A)."""
    rng = np.random.default_rng(seed)
    cell = cell_length * (np.eye(3) + 0.15 * rng.normal(size=(3, 3)))
    while True:
        frac = rng.uniform(size=(n_atoms, 3))
        atoms = ase.Atoms(
            symbols=[symbols[i % len(symbols)] for i in range(n_atoms)],
            scaled_positions=frac,
            cell=cell,
            pbc=True,
        )
        d = atoms.get_all_distances(mic=True)
        if n_atoms == 1 or np.min(d[np.triu_indices(n_atoms, 1)]) > 1.0:
            return atoms


@pytest.fixture
def random_atoms():
    return random_periodic_atoms


def random_rotation(seed: int, improper: bool) -> np.ndarray:
    """A random proper (det +1) or improper (det -1) orthogonal matrix."""
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q = -q
    return -q if improper else q


@pytest.fixture
def rotation():
    return random_rotation


def train_hubbard_model(record, tmp_path, hubbard: dict, split: dict, batch_size: int):
    """What an ``eqml.train`` CalcJob runs (``train_cli``) on a Hubbard record with a tiny model and the given
    ``hubbard`` training options; returns the path of the model file it writes."""
    import json

    from aiida_eqml.ml.train_cli import MODEL_FILENAME, train_command

    config = {
        "model": {"num_layers": 1, "hidden_irreps": "8x0e + 2x1o + 2x2e", "radial_hidden": [8], "cutoff": 4.0},
        "hubbard": hubbard,
        "epochs": 3, "batch_size": batch_size, "split": split,
        "early_stopping": {"patience": 0}, "progress": False,
    }
    record.save(tmp_path / "record.npz")
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert train_command(tmp_path / "record.npz", tmp_path / "config.json", tmp_path / "run", progress=False) == 0
    return tmp_path / "run" / MODEL_FILENAME
