"""The dielectric tensor in benchmarks/bto_response.py: the graph head it builds, the split it trains on and its
references (benchmarks/bto_references.py). Synthetic structures, plus the real bto400 split when the data is there.

* the benchmark's eps_inf head (a 0e + 2e graph head of the target registry) reads out a symmetric Cartesian tensor
  that rotates as R eps R^T under proper and improper rotations;
* the split is made once over the structures: records without a valid label leave their set and never move to
  another (no test structure is trained on), and on bto400 the dielectric sets are the shared ones less the six
  records with an unphysical tensor;
* the mean-tensor baseline predicts the training mean, and the linear probe's features rotate with the structure and
  recover a tensor that is linear in them.
"""

import sys
from pathlib import Path
from types import SimpleNamespace

import ase
import e3nn_jax as e3nn
import jax
import numpy as np
import pytest
from conftest import TINY_CORE, random_rotation

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
BTO400 = ROOT.parent / "shared" / "data" / "bto400"

import bto_references  # noqa: E402
from bto_protocol import split_for_target, split_protocol  # noqa: E402
from bto_response import TARGETS, model_config_for  # noqa: E402

from aiida_eqml.ml.dataset import Dataset, Sample  # noqa: E402
from aiida_eqml.ml.graph import batch_graphs, graph_from_atoms, padding_bucket  # noqa: E402
from aiida_eqml.ml.models import build_model  # noqa: E402
from aiida_eqml.ml.targets import target_spec  # noqa: E402
from aiida_eqml.ml.tensors import tensor_type  # noqa: E402


def perovskite_supercell(seed: int, amplitude: float = 0.08, repeat: int = 3) -> ase.Atoms:
    """Cubic BaTiO3 (a = 4 A) repeated ``repeat`` times with random displacements (Angstrom)."""
    cell = ase.Atoms("BaTiO3", scaled_positions=[[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5],
                                                 [0, 0.5, 0.5]], cell=4.0 * np.eye(3), pbc=True)
    atoms = cell.repeat(repeat)
    atoms.positions += amplitude * np.random.default_rng(seed).normal(size=atoms.positions.shape)
    return atoms


@pytest.mark.parametrize("improper", [False, True])
def test_dielectric_head_is_symmetric_and_rotates_as_r_eps_rt(improper):
    head, _ = TARGETS["dielectric"]
    assert head == {"level": "graph", "tensor": "ij=ji", "reduce": "mean"}  # the registry's head, intensive
    config = model_config_for("direct", "dielectric", overrides=TINY_CORE)
    # a realistic normalisation (eps ~ 5.1 I from the 0e shift, spread 0.04), as run_one sets it
    shift = [[5.1 * np.sqrt(3)] + [0.0] * 5] * 3
    config["normalization"] = {"dielectric": {"scale": 0.04, "species_shift": shift}}
    model = build_model(config)
    atoms = perovskite_supercell(0, amplitude=0.15, repeat=1)
    graph = graph_from_atoms(atoms, TINY_CORE["cutoff"], TINY_CORE["species"])
    batch = batch_graphs([graph], *padding_bucket(len(atoms), len(graph.senders), 1))
    params = model.init(jax.random.PRNGKey(0), batch)
    ttype = tensor_type(target_spec("dielectric")["tensor"])

    def eps(g):
        out = model.apply(params, g)["dielectric"]
        assert out.irreps == e3nn.Irreps("0e + 2e")
        return np.asarray(ttype.to_cartesian(np.asarray(out.array, np.float64)))[0]

    rot = random_rotation(3, improper)
    value = eps(batch)
    rotated = eps(batch._replace(positions=batch.positions @ rot.T, cells=batch.cells @ rot.T))
    np.testing.assert_allclose(value, value.T, atol=1e-12)
    assert abs(np.trace(value) / 3 - 5.1) < 0.5, "the 0e shift sets the isotropic part"
    anisotropy = value - np.trace(value) / 3 * np.eye(3)
    assert np.abs(anisotropy).max() > 1e-6, "a head without a 2e part would pass the rotation check trivially"
    np.testing.assert_allclose(rotated, rot @ value @ rot.T, atol=1e-5)


def _fake_records(file_indices, invalid):
    """Stand-ins with what the split reads: a file index and a dielectric label (NaN where ``invalid``)."""
    return [SimpleNamespace(info={"file_index": i, "name": f"structure_{i:05d}"}, node_targets={},
                            graph_targets={"dielectric": np.full((3, 3), np.nan if i in invalid else 5.0)})
            for i in file_indices]


def test_split_for_target_drops_invalid_records_and_never_moves_them():
    files = [0, 1, 2, 3, 5, 6, 8, 9, 10, 11, 12, 13, 14, 15, 17, 18, 19, 20]  # 18 records, gaps in the numbering
    records = _fake_records(files, invalid={1, 13, 19, 20})
    idx = lambda ids: [records[i].info["file_index"] for i in ids]  # noqa: E731
    pool, val, test = split_protocol(records, n_test=4, n_val=3)
    assert (idx(pool), idx(val), idx(test)) == ([0, 1, 2, 3, 5, 6, 8, 9, 10, 11, 12], [13, 14, 15], [17, 18, 19, 20])
    split = split_for_target(records, "dielectric", n_test=4, n_val=3)
    assert idx(split["test"]) == [17, 18]  # 19, 20 dropped; validation file 15 is NOT pulled into the test set
    assert idx(split["validation"]) == [14, 15]  # 13 dropped; pool file 12 is NOT pulled into the validation set
    assert idx(split["pool"]) == [0, 2, 3, 5, 6, 8, 9, 10, 11, 12]
    assert {k: idx(v) for k, v in split["dropped"].items()} == {"pool": [1], "validation": [13], "test": [19, 20]}
    assert set(split["test"]) <= set(test) and set(split["validation"]) <= set(val) and set(split["pool"]) <= set(pool)
    assert not set(split["pool"]) & (set(test) | set(val)), "a test or validation structure of any target trained on"
    with pytest.raises(ValueError, match="no record of the test set"):
        split_for_target(_fake_records(files, invalid={17, 18, 19, 20}), "dielectric", n_test=4, n_val=3)


@pytest.mark.skipif(not BTO400.is_dir(), reason=f"bto400 data not at {BTO400}")
def test_bto400_dielectric_split_is_the_shared_one_less_six_records():
    from aiida_eqml.ml.datasets.bto import load_bto400

    dataset, report = load_bto400(BTO400, targets=("dielectric",), on_fault="mask")
    names = lambda ids: [dataset[i].info["name"][-5:] for i in ids]  # noqa: E731
    split = split_for_target(dataset, "dielectric")
    invalid = {"00010", "00017", "00020", "00023", "00048", "00049"}
    assert {n[-5:] for n in report.masked} == invalid and not report.excluded
    assert names(split["test"]) == ["00041", "00043", "00044", "00045", "00046", "00047"]
    assert names(split["validation"]) == ["00036", "00037", "00038", "00039"]  # the validation set of Z* and Raman
    assert len(split["pool"]) == 24 and not invalid & set(names(split["pool"]))
    assert max(names(split["pool"])) < min(names(split["validation"]))


def _probe_dataset(n, weights, seed=0):
    """Synthetic 135-atom supercells whose eps is exactly linear in the probe's cubic design."""
    samples = []
    for k in range(n):
        atoms = perovskite_supercell(seed + k, amplitude=0.04 + 0.01 * (k % 5))
        sample = Sample.from_ase(atoms, info={"name": f"s{k}", "file_index": k})
        x = bto_references.cubic_design(bto_references.displacement_tensors(sample)[None])
        sample.graph_targets["dielectric"] = (x @ weights).reshape(3, 3)
        samples.append(sample)
    return Dataset(samples, {"dielectric": target_spec("dielectric")})


def test_probe_features_rotate_with_the_structure():
    sample = Sample.from_ase(perovskite_supercell(1))
    features = bto_references.displacement_tensors(sample)
    assert features.shape == (len(bto_references.FEATURES), 3, 3)
    np.testing.assert_allclose(features, features.transpose(0, 2, 1))
    for improper in (False, True):
        rot = random_rotation(5, improper)
        moved = Sample.from_ase(ase.Atoms(sample.numbers, positions=sample.positions @ rot.T, cell=sample.cell @ rot.T,
                                          pbc=True))
        np.testing.assert_allclose(bto_references.displacement_tensors(moved), rot @ features @ rot.T, atol=1e-10)


def test_mean_tensor_baseline_and_probe_on_a_linear_tensor():
    n_features = len(bto_references.FEATURES)
    weights = np.concatenate([np.random.default_rng(2).normal(size=3 * n_features) * 2.0, [5.1]])
    dataset = _probe_dataset(14, weights)
    train, val, test = list(range(8)), [8, 9, 10], [11, 12, 13]
    eps = bto_references.labels(dataset, range(14))
    ref = bto_references.mean_tensor_baseline(dataset, train, test)
    np.testing.assert_allclose(ref["mean_tensor"], eps[train].mean(axis=0))
    assert ref["test_mae"] == pytest.approx(np.abs(eps[test] - eps[train].mean(axis=0)).mean())
    probe = bto_references.linear_probe(dataset, train, val, test, [8])
    (row,) = probe["results"]
    assert row["ridge_lambda"] == min(bto_references.LAMBDAS), "an exact linear tensor needs the weakest ridge"
    assert row["test_mae"] < 0.02 * ref["test_mae"], (row, ref)
