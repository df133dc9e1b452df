"""Dataset record: validation, npz round trip without pickle, extxyz, padded batches."""

import json

import numpy as np
import pytest

from aiida_eqml.ml.dataset import Dataset, EdgeTarget, Sample, make_batches, target_shape
from aiida_eqml.ml.tensors import tensor_type

SPECS = {
    "born_charges": {"level": "node", "tensor": "ij", "unit": "e"},
    "dielectric": {"level": "graph", "tensor": "ij=ji", "unit": "1"},
    "hopping": {"level": "edge", "irreps": "0e", "unit": "eV"},
}


def _sample(rng, n=3, name="s", with_edges=True):
    cell = np.eye(3) * 4.0
    positions = rng.uniform(0, 1.5, (n, 3))  # all pairs (no shift) within 2.6 A
    numbers = rng.choice([8, 22], n)
    eps = np.eye(3) * 5 + 0.1 * (lambda a: a + a.T)(rng.normal(size=(3, 3)))
    edges = {}
    if with_edges:
        edges["hopping"] = EdgeTarget(
            keys=[[0, 1, 0, 0, 0], [1, 0, 0, 0, 0], [0, 0, 1, 0, 0]], values=rng.normal(size=(3, 1))
        )
    return Sample(
        numbers=numbers,
        positions=positions,
        cell=cell,
        pbc=True,
        node_targets={"born_charges": rng.normal(size=(n, 3, 3))},
        graph_targets={"dielectric": eps},
        edge_targets=edges,
        info={"name": name},
    )


@pytest.fixture
def dataset():
    rng = np.random.default_rng(0)
    samples = [_sample(rng, n, f"s{i}", with_edges=i != 1) for i, n in enumerate((3, 4, 2))]
    samples[2].node_targets["born_charges"][1] = np.nan  # a missing label
    return Dataset(samples, SPECS)


def test_target_shape():
    assert target_shape({"tensor": "ijk=jik"}) == (3, 3, 3)
    assert target_shape({"tensor": "ij"}) == (3, 3)
    assert target_shape({"irreps": "1o+2e"}) == (8,)


def test_npz_round_trip_is_exact_and_pickle_free(dataset, tmp_path):
    path = tmp_path / "d.npz"
    dataset.save(path)
    with np.load(path, allow_pickle=False) as data:  # would raise if any object array were stored
        meta = json.loads(str(data["metadata"]))
        assert all(data[k].dtype != object for k in data.files)
    assert meta["schema_version"] == 1 and meta["target_specs"] == SPECS
    loaded = Dataset.load(path)
    assert len(loaded) == 3 and loaded.target_specs == SPECS
    for a, b in zip(dataset, loaded):
        np.testing.assert_array_equal(a.positions, b.positions)
        np.testing.assert_array_equal(a.numbers, b.numbers)
        np.testing.assert_array_equal(a.node_targets["born_charges"], b.node_targets["born_charges"])  # NaN == NaN here
        np.testing.assert_array_equal(a.graph_targets["dielectric"], b.graph_targets["dielectric"])
        assert set(a.edge_targets) == set(b.edge_targets)
        for k in a.edge_targets:
            np.testing.assert_array_equal(a.edge_targets[k].keys, b.edge_targets[k].keys)
            np.testing.assert_array_equal(a.edge_targets[k].values, b.edge_targets[k].values)
        assert a.info == b.info


def test_wrong_schema_version_and_garbage_rejected(dataset, tmp_path):
    path = tmp_path / "d.npz"
    dataset.save(path)
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    meta = json.loads(str(arrays["metadata"]))
    meta["schema_version"] = 99
    arrays["metadata"] = np.array(json.dumps(meta))
    np.savez(tmp_path / "v99.npz", **arrays)
    with pytest.raises(ValueError, match="schema version 99"):
        Dataset.load(tmp_path / "v99.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="not a readable"):
        Dataset.load(tmp_path / "junk.npz")


def test_wrong_tensor_shape_names_sample_target_and_shapes():
    rng = np.random.default_rng(1)
    s = _sample(rng, 3, "bad_one")
    s.node_targets["born_charges"] = np.zeros((3, 3))
    with pytest.raises(ValueError, match=r"'bad_one'.*born_charges.*expected shape \(3, 3, 3\), got \(3, 3\)"):
        Dataset([s], SPECS)


def test_nan_positions_unknown_level_inf_label_rejected():
    rng = np.random.default_rng(2)
    s = _sample(rng, 3, "nanpos")
    s.positions[1, 0] = np.nan
    with pytest.raises(ValueError, match=r"'nanpos'.*positions contain NaN.*\[1\]"):
        Dataset([s], SPECS)
    with pytest.raises(ValueError, match="unknown level 'atom'"):
        Dataset([], {"x": {"level": "atom", "tensor": "ij"}})
    s = _sample(rng, 3, "inf")
    s.graph_targets["dielectric"][0, 0] = np.inf
    with pytest.raises(ValueError, match="dielectric.*inf.*only NaN"):
        Dataset([s], SPECS)
    s = _sample(rng, 3, "undeclared")
    s.node_targets["charges"] = np.zeros(3)
    with pytest.raises(ValueError, match="'charges' is not declared"):
        Dataset([s], SPECS)


def test_extxyz_export(dataset, tmp_path):
    import ase.io

    path = tmp_path / "d.extxyz"
    dataset.to_extxyz(path)
    frames = ase.io.read(path, index=":")
    assert len(frames) == 3
    np.testing.assert_allclose(frames[0].positions, dataset[0].positions, atol=1e-6)
    np.testing.assert_allclose(
        frames[0].arrays["born_charges"].reshape(-1, 3, 3), dataset[0].node_targets["born_charges"], atol=1e-6
    )


def test_make_batches_irreps_targets_and_masks(dataset):
    config = {
        "species": ["O", "Ti"],
        "cutoff": 4.5,
        "heads": {k: {kk: vv for kk, vv in v.items() if kk != "unit"} for k, v in SPECS.items()},
    }
    batches = make_batches(dataset, config, batch_size=2)
    assert len(batches) == 2
    b0, b1 = batches
    # Same padded shapes for every batch (single compilation).
    assert b0.graph.positions.shape == b1.graph.positions.shape
    born = tensor_type("ij")
    # Node targets: irreps of the Cartesian label, padding masked.
    n0 = dataset[0].n_atoms
    np.testing.assert_allclose(
        born.to_cartesian(np.asarray(b0.targets["born_charges"].array[:n0], np.float64)),
        dataset[0].node_targets["born_charges"],
        atol=1e-5,
    )
    assert b0.masks["born_charges"].sum() == dataset[0].n_atoms + dataset[1].n_atoms
    # The NaN label of sample 2, atom 1 is masked and stored as zeros (no NaN reaches the loss).
    mask = b1.masks["born_charges"]
    assert mask[: dataset[2].n_atoms].tolist() == [True, False]
    assert np.all(np.isfinite(b1.targets["born_charges"].array))
    # Graph targets: one row per real graph.
    assert b0.masks["dielectric"].tolist()[:3] == [True, True, False]
    # Edge targets: placed on the matching (i, j, S) edge; sample 1 has none -> masked.
    g = b0.graph
    labelled = np.nonzero(b0.masks["hopping"])[0]
    assert len(labelled) == 3
    keys = {(int(g.senders[e]), int(g.receivers[e]), *np.rint(g.shifts[e]).astype(int).tolist()) for e in labelled}
    assert keys == {(0, 1, 0, 0, 0), (1, 0, 0, 0, 0), (0, 0, 1, 0, 0)}


def test_make_batches_rejects_unknown_species(dataset):
    config = {"species": ["O"], "cutoff": 3.0, "heads": {"born_charges": {"level": "node", "tensor": "ij"}}}
    with pytest.raises(ValueError, match=r"sample 0 \('s0'\).*\['Ti'\] not in the model's species"):
        make_batches(dataset, config, batch_size=2)


def test_edge_target_beyond_cutoff_rejected():
    rng = np.random.default_rng(3)
    s = _sample(rng, 3, "far")
    s.edge_targets["hopping"] = EdgeTarget(keys=[[0, 1, 5, 0, 0]], values=[[1.0]])
    ds = Dataset([s], SPECS)
    config = {"species": ["O", "Ti"], "cutoff": 3.0, "heads": {"hopping": {"level": "edge", "irreps": "0e"}}}
    with pytest.raises(ValueError, match=r"'far'.*hopping.*not edges"):
        make_batches(ds, config, batch_size=1)
