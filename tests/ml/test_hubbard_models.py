"""Hubbard U/V models: symmetry of the predictions on real pw.x occupations, the record, ensembles.

Inputs are real QE 7.2 runs of AFM NiO (tests/fixtures/qe72, see generate.py there): DFT+U
(U on Ni 3d and O 2p) and DFT+U+V (V on the Ni 3d - O 2p couples), each also for the rigidly
rotated crystal. Models are untrained (random weights): the symmetries must hold for any weights.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import ase
import jax
import numpy as np
import pytest

from aiida_eqml.ml.dataset import Dataset
from aiida_eqml.ml.hubbard.ensemble import Ensemble, train_ensemble
from aiida_eqml.ml.hubbard.models import hubbard_model_config, pair_edge_indices, predict_hubbard
from aiida_eqml.ml.hubbard.occupations import qe_wigner_matrix
from aiida_eqml.ml.hubbard.records import (
    HUBBARD_TARGET_SPECS,
    PAIR_ATTR,
    SITE_ATTR,
    hubbard_record_sample,
    hubbard_training_dataset,
    pair_attr_irreps,
    site_attr_irreps,
)
from aiida_eqml.ml.models import build_model
from aiida_eqml.parsers.occupations import (
    intersite_blocks,
    nsg_shape,
    parse_hubbard_neighbours,
    parse_occup_txt,
    parse_onsite_occupations_xml,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "qe72"
_spec = importlib.util.spec_from_file_location("qe72_generate", FIXTURES / "generate.py")
generate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(generate)
ROTATION = generate.ROTATION
SPECIES = ["Ni", "O"]
TIGHT = 2e-5  # float32 network: "exact" symmetry up to rounding
REAL_LABELS = Path(__file__).resolve().parents[2] / "docs" / "benchmarks" / "hubbard_labels.npz"


def load_run(case: str):
    """(onsite {atom: [2, D, D]}, {(i, j, S1, S2, S3): (block [2, Di, Dj], V eV)}) of a fixture run."""
    directory = FIXTURES / case
    onsite = parse_onsite_occupations_xml((directory / "data-file-schema.xml").read_text())
    intersite = {}
    if (directory / "occup.txt").exists():
        text = (directory / "occup.txt").read_text()
        neighbours = parse_hubbard_neighbours((directory / "aiida.out").read_text())
        nsg = parse_occup_txt(text, nsg_shape(text, onsite.manifolds, 4, onsite.nspin))
        for b in intersite_blocks(nsg, neighbours, onsite.manifolds, 4):
            intersite[(b.i, b.j, *b.translation)] = (b.matrix, b.hubbard_v_ev)
    return onsite.matrices, intersite


def nio_atoms(cell) -> ase.Atoms:
    return ase.Atoms("Ni2O2", scaled_positions=generate.FRAC, cell=cell, pbc=True)


def nio_sample(onsite, intersite, cell, target_u=None):
    u_scf = {0: 5.0, 1: 5.0} if intersite else {0: 5.0, 1: 5.0, 2: 1.0, 3: 1.0}
    return hubbard_record_sample(
        nio_atoms(cell),
        onsite,
        u_scf,
        target_u=target_u or {0: 6.0, 1: 6.0},
        intersite={k: b for k, (b, _) in intersite.items()} or None,
        hubbard_v_scf={k: v for k, (_, v) in intersite.items()},
        info={"name": "NiO"},
    )


def rotate_blocks(onsite, intersite, rotation):
    """Occupations of the rotated crystal from Wigner matrices in QE's basis: W n W^T."""
    l_of = {atom: (block.shape[-1] - 1) // 2 for atom, block in onsite.items()}
    new_onsite = {
        a: qe_wigner_matrix(l_of[a], rotation) @ b @ qe_wigner_matrix(l_of[a], rotation).T for a, b in onsite.items()
    }
    new_intersite = {}
    for key, (block, v) in intersite.items():
        wi, wj = qe_wigner_matrix(l_of[key[0]], rotation), qe_wigner_matrix(l_of[key[1]], rotation)
        new_intersite[key] = (wi @ block @ wj.T, v)
    return new_onsite, new_intersite


def model_and_params(dataset, attrs, seed=0, **overrides):
    # Small network: the symmetries hold for any size, and compilation dominates the test time.
    overrides = {"num_layers": 1, "hidden_irreps": "8x0e + 4x1o + 4x1e + 4x2e + 2x2o", **overrides}
    config = hubbard_model_config(SPECIES, attrs, cutoff=4.0, avg_num_neighbors=10.0, **overrides)
    model = build_model(config)
    from aiida_eqml.ml.dataset import make_batches

    batch = make_batches(dataset, config, 1)[0]
    return model, model.init(jax.random.PRNGKey(seed), batch.graph)


@pytest.fixture(scope="module")
def uv_runs():
    return load_run("nio_uv"), load_run("nio_uv_rotated")


@pytest.fixture(scope="module")
def u_runs():
    return load_run("nio_u"), load_run("nio_u_rotated")


def predictions(model, params, samples, **kwargs):
    dataset, _ = hubbard_training_dataset(Dataset(samples, HUBBARD_TARGET_SPECS), **kwargs)
    return predict_hubbard(model, params, dataset)


# ------------------------------------------------------------------ symmetry of the predictions


def test_rotating_the_crystal_and_its_occupations_leaves_u_and_v_unchanged(uv_runs):
    (onsite, intersite), (onsite_rot, intersite_rot) = uv_runs
    sample = nio_sample(onsite, intersite, generate.CELL)
    dataset, attrs = hubbard_training_dataset(Dataset([sample], HUBBARD_TARGET_SPECS))
    assert attrs == {
        "node_attrs": {SITE_ATTR: str(site_attr_irreps((1, 2)))},  # U+V: O 2p is a Hubbard manifold too
        "edge_attrs": {PAIR_ATTR: str(pair_attr_irreps(((1, 2), (2, 1))))},
    }
    model, params = model_and_params(dataset, attrs)
    assert set(model.heads) == {"hubbard_u", "hubbard_v"}
    ref = predict_hubbard(model, params, dataset)[0]
    u, (keys, v) = ref["hubbard_u"], ref["hubbard_v"]
    assert np.all(np.isfinite(u)) and abs(u[0] - u[2]) > 1e-6
    assert len(keys) == 24 and np.std(v) > 1e-6  # Ni->O and O->Ni couples, not all alike

    # (a) exact: the Wigner matrices in QE's basis, for a generic proper rotation and an improper one
    exact_error = 0.0
    for rotation in (ROTATION, -generate.rotation_matrix([0.3, -1.0, 0.5], 2.1)):
        moved = nio_sample(*rotate_blocks(onsite, intersite, rotation), generate.CELL @ rotation.T)
        out = predictions(model, params, [moved])[0]
        np.testing.assert_allclose(out["hubbard_u"], u, atol=TIGHT)
        np.testing.assert_array_equal(out["hubbard_v"][0], keys)
        np.testing.assert_allclose(out["hubbard_v"][1], v, atol=TIGHT)
        exact_error = max(exact_error, np.abs(out["hubbard_u"] - u).max(), np.abs(out["hubbard_v"][1] - v).max())

    # (b) real pw.x run of the rotated crystal (its own SCF noise, ~1e-4 in n)
    out = predictions(model, params, [nio_sample(onsite_rot, intersite_rot, generate.CELL @ ROTATION.T)])[0]
    np.testing.assert_allclose(out["hubbard_u"], u, atol=2e-3)
    np.testing.assert_allclose(out["hubbard_v"][1], v, atol=2e-3)

    # the check has teeth: rotating the crystal but not its occupations changes the predictions far
    # more than the float32 rounding of the exact check (measured ~1e-7 vs ~6e-5 with random weights)
    wrong = predictions(model, params, [nio_sample(onsite, intersite, generate.CELL @ ROTATION.T)])[0]
    wrong_error = max(np.abs(wrong["hubbard_u"] - u).max(), np.abs(wrong["hubbard_v"][1] - v).max())
    assert wrong_error > 20 * max(exact_error, 1e-7), (wrong_error, exact_error)


def test_rotation_with_u_on_two_manifolds(u_runs):
    """DFT+U with U on Ni 3d and O 2p: the d and p slots of the site descriptor both rotate correctly."""
    (onsite, _), (onsite_rot, _) = u_runs
    dataset, attrs = hubbard_training_dataset(Dataset([nio_sample(onsite, {}, generate.CELL)], HUBBARD_TARGET_SPECS))
    assert attrs["node_attrs"][SITE_ATTR] == str(site_attr_irreps((1, 2)))
    model, params = model_and_params(dataset, attrs)
    u = predict_hubbard(model, params, dataset)[0]["hubbard_u"]
    assert np.all(np.isfinite(u))
    rotated = predictions(model, params, [nio_sample(onsite_rot, {}, generate.CELL @ ROTATION.T)])[0]["hubbard_u"]
    np.testing.assert_allclose(rotated, u, atol=2e-3)
    exact = predictions(
        model, params, [nio_sample(rotate_blocks(onsite, {}, ROTATION)[0], {}, generate.CELL @ ROTATION.T)]
    )
    np.testing.assert_allclose(exact[0]["hubbard_u"], u, atol=TIGHT)


def test_swapping_spin_channels_leaves_u_and_v_unchanged(uv_runs):
    (onsite, intersite), _ = uv_runs
    dataset, attrs = hubbard_training_dataset(
        Dataset([nio_sample(onsite, intersite, generate.CELL)], HUBBARD_TARGET_SPECS)
    )
    model, params = model_and_params(dataset, attrs, seed=3)
    ref = predict_hubbard(model, params, dataset)[0]
    swapped = nio_sample(
        {a: b[::-1] for a, b in onsite.items()}, {k: (b[::-1], v) for k, (b, v) in intersite.items()}, generate.CELL
    )
    out = predictions(model, params, [swapped])[0]
    np.testing.assert_allclose(out["hubbard_u"][:2], ref["hubbard_u"][:2], atol=TIGHT)
    np.testing.assert_allclose(out["hubbard_v"][1], ref["hubbard_v"][1], atol=TIGHT)
    # ... but the magnetism is seen: the spin-averaged (non-magnetic) occupations give other U
    mean = {a: np.repeat(b.mean(axis=0, keepdims=True), 2, axis=0) for a, b in onsite.items()}
    non_magnetic = predictions(model, params, [nio_sample(mean, intersite, generate.CELL)])[0]
    assert np.abs(non_magnetic["hubbard_u"][:2] - ref["hubbard_u"][:2]).max() > 1e-4


def test_afm_equivalent_sites_get_the_same_u_and_v(uv_runs, u_runs):
    """Ni1 and Ni2 of AFM NiO are related by a translation plus a spin flip: same U; the six Ni-O
    couples of a Ni (D3d site symmetry) and their O-Ni reverses get the same V."""
    for (onsite, intersite), _ in (uv_runs, u_runs):
        dataset, attrs = hubbard_training_dataset(
            Dataset([nio_sample(onsite, intersite, generate.CELL)], HUBBARD_TARGET_SPECS)
        )
        model, params = model_and_params(dataset, attrs, seed=1)
        out = predict_hubbard(model, params, dataset)[0]
        np.testing.assert_allclose(out["hubbard_u"][0], out["hubbard_u"][1], atol=2e-4)
        if intersite:
            keys, v = out["hubbard_v"]
            ni_o = v[keys[:, 0] < 2]
            o_ni = v[keys[:, 0] >= 2]
            assert len(ni_o) == 12 and len(o_ni) == 12
            np.testing.assert_allclose(ni_o, ni_o[0], atol=2e-4)
            np.testing.assert_allclose(o_ni, o_ni[0], atol=2e-4)


@pytest.mark.skipif(not REAL_LABELS.exists(), reason="real hp.x labels not harvested yet")
def test_real_afm_labels_equivalent_sites():
    """On the harvested hp.x labels (benchmarks/hubbard_uv.py): the two TM sites of each AFM cell
    got the same U from hp.x, and an untrained model predicts equal U for them."""
    record = Dataset.load(REAL_LABELS)
    afm = [s for s in record.samples if s.n_atoms == 4]
    if not afm:
        pytest.skip("no AFM cell among the harvested labels")
    for s in afm:
        u = s.node_targets["hubbard_u"][:2, 0]
        assert abs(u[0] - u[1]) < 0.02 * abs(u[0]), (s.info.get("name"), u)
    dataset, attrs = hubbard_training_dataset(Dataset(afm, record.target_specs), manifold_ls=(2,))
    species = sorted({ase.data.chemical_symbols[z] for s in afm for z in s.numbers})
    config = hubbard_model_config(species, attrs, cutoff=4.0, avg_num_neighbors=10.0)
    model = build_model(config)
    from aiida_eqml.ml.dataset import make_batches

    params = model.init(jax.random.PRNGKey(0), make_batches(dataset, config, 1)[0].graph)
    for out in predict_hubbard(model, params, dataset):
        np.testing.assert_allclose(out["hubbard_u"][0], out["hubbard_u"][1], atol=1e-3)


# ------------------------------------------------------------------ record and inputs


def test_record_roundtrip_and_training_dataset(tmp_path, uv_runs):
    (onsite, intersite), _ = uv_runs
    sample = nio_sample(onsite, intersite, generate.CELL, target_u={0: 6.1, 1: 6.2})
    record = Dataset([sample], HUBBARD_TARGET_SPECS)
    record.save(tmp_path / "record.npz")
    loaded = Dataset.load(tmp_path / "record.npz")
    np.testing.assert_array_equal(loaded.samples[0].node_attrs["occupations"], sample.node_attrs["occupations"])
    np.testing.assert_array_equal(loaded.samples[0].node_targets["hubbard_u"][2:], np.nan)
    dataset, attrs = hubbard_training_dataset(loaded)
    site = dataset.samples[0].node_attrs[SITE_ATTR]
    p_dim = site_attr_irreps((1,)).dim - 1
    assert site.shape == (4, site_attr_irreps((1, 2)).dim)
    assert np.all(site[:2, :p_dim] == 0) and np.all(site[2:, p_dim:-1] == 0)  # Ni: empty p slot, O: empty d slot
    assert np.abs(site[:2, p_dim:-1]).max() > 0.1 and np.abs(site[2:, :p_dim]).max() > 0.1
    np.testing.assert_allclose(site[:, -1], [0.5, 0.5, 0.0, 0.0])  # U_scf in units of 10 eV
    pair = dataset.samples[0].edge_attrs[PAIR_ATTR]
    assert pair.values.shape == (24, pair_attr_irreps(((1, 2), (2, 1))).dim)
    dataset.save(tmp_path / "descriptors.npz")  # descriptor attributes are plain arrays too


def test_bad_input_is_rejected_with_a_clear_message(uv_runs):
    (onsite, intersite), _ = uv_runs
    sample = nio_sample(onsite, intersite, generate.CELL)
    with pytest.raises(ValueError, match="not a Hubbard record"):
        hubbard_training_dataset(Dataset([sample], {"hubbard_x": {"level": "node", "irreps": "0e"}}, validate=False))
    broken = nio_sample(onsite, intersite, generate.CELL)
    del broken.node_attrs["hubbard_l"]
    with pytest.raises(ValueError, match=r"lacks node attribute\(s\) \['hubbard_l'\]"):
        hubbard_training_dataset(Dataset([broken], HUBBARD_TARGET_SPECS))
    with pytest.raises(ValueError, match=r"manifold l=\[2\] but the descriptor has slots for l=\[1\]"):
        hubbard_training_dataset(Dataset([sample], HUBBARD_TARGET_SPECS), manifold_ls=(1,))
    with pytest.raises(ValueError, match=r"couples with \(l_I, l_J\)=\[\(1, 2\)\]"):
        hubbard_training_dataset(Dataset([sample], HUBBARD_TARGET_SPECS), pair_ls=((2, 1),))
    # V couples longer than the cutoff cannot be edges
    dataset, attrs = hubbard_training_dataset(Dataset([sample], HUBBARD_TARGET_SPECS))
    config = hubbard_model_config(SPECIES, attrs, cutoff=1.9)
    with pytest.raises(ValueError, match="not edges within cutoff 1.9"):
        predict_hubbard(build_model(config), None, dataset)
    from aiida_eqml.ml.graph import graph_from_atoms

    graph = graph_from_atoms(nio_atoms(generate.CELL), 1.9, SPECIES)
    with pytest.raises(ValueError, match=r"V couples \[\[0, 2, .*beyond the cutoff 1.9"):
        pair_edge_indices(graph, dataset.samples[0].edge_attrs[PAIR_ATTR].keys, 1.9)
    with pytest.raises(ValueError, match="site descriptor 'hubbard_site'"):
        hubbard_model_config(SPECIES, {"node_attrs": {}})


# ------------------------------------------------------------------ ensembles


def strained_nio_dataset():
    """Small synthetic-label set on real occupations: U = 4 + 10 (trace n_d - 8.2) + 3 (a - a0)."""
    (onsite, _), (onsite_rot, _) = load_run("nio_u"), load_run("nio_u_rotated")
    samples = []
    for k, strain in enumerate((0.96, 0.98, 1.0, 1.02, 1.04, 1.01)):
        base = onsite if k % 2 == 0 else onsite_rot
        cell = (generate.CELL if k % 2 == 0 else generate.CELL @ ROTATION.T) * strain
        scaled = {a: b * (1.0 + 0.02 * (strain - 1.0) * (a + 1)) for a, b in base.items()}
        trace = {a: float(np.trace(b[0]) + np.trace(b[1])) for a, b in scaled.items() if a < 2}
        target = {a: 4.0 + 10.0 * (t - 8.2) + 30.0 * (strain - 1.0) for a, t in trace.items()}
        samples.append(
            hubbard_record_sample(nio_atoms(cell), scaled, {0: 5.0, 1: 5.0, 2: 1.0, 3: 1.0}, target_u=target)
        )
    dataset, attrs = hubbard_training_dataset(Dataset(samples, {"hubbard_u": HUBBARD_TARGET_SPECS["hubbard_u"]}))
    return dataset, attrs


def test_ensemble_trains_saves_and_gives_a_spread(tmp_path):
    dataset, attrs = strained_nio_dataset()
    config = {
        "model": hubbard_model_config(SPECIES, attrs, cutoff=3.0, num_layers=1, hidden_irreps="8x0e + 2x1o + 2x2e"),
        "epochs": 30,
        "batch_size": 2,
        "split": {"train": [0, 1, 2, 3, 4], "val": [], "test": [5]},
        "optimizer": {"learning_rate": 1e-2},
        "early_stopping": {"patience": 0},
        "progress": False,
    }
    ensemble, runs = train_ensemble(dataset, config, num_members=2, out_dir=tmp_path / "runs")
    assert len(ensemble) == 2
    for run in runs:
        assert run.history[-1]["train_loss"] < 0.5 * run.history[0]["train_loss"]
    out = ensemble.predict(dataset)
    mean, std = out[0]["hubbard_u"]
    assert mean.shape == (4,) and np.all(np.isfinite(mean))  # O 2p is a manifold in this run (U = 1 eV)
    assert np.all(std[:2] > 0)  # two seeds, two different models
    members = ensemble.member_predictions(dataset)
    np.testing.assert_allclose(mean[:2], (members[0][0]["hubbard_u"][:2] + members[1][0]["hubbard_u"][:2]) / 2)

    ensemble.save(tmp_path / "ens", metadata={"dataset": "synthetic"})
    loaded = Ensemble.load(tmp_path / "ens")
    again = loaded.predict(dataset)
    np.testing.assert_allclose(again[0]["hubbard_u"][0][:2], mean[:2], atol=1e-6)
    assert [m["seed"] for m in loaded.metadata] == [0, 1]
    # a tampered member is caught
    with open(tmp_path / "ens" / "member_01.eqml", "ab") as handle:
        handle.write(b"x")
    with pytest.raises(ValueError, match="sha256 differs"):
        Ensemble.load(tmp_path / "ens")


# ------------------------------------------------------------------ U summed over a site's own images


def _without(params, key):
    """The parameter tree without the sub-module ``key`` (the images readout of a u_sum_images model)."""
    if hasattr(params, "items"):
        return {k: _without(v, key) for k, v in params.items() if k != key}
    return params


def test_u_summed_over_images_is_the_node_head_plus_the_coupling_to_the_sites_own_images(u_runs):
    """``u_sum_images``: U(I) = node head(I) + sum over I's edges to I + S (S != 0) of an edge head. Invariant under
    proper and improper rotations; the model without the images readout, on the same weights, gives the node head
    alone; in a 2x1x1 supercell (some of a site's images become another atom) U changes, where the plain model,
    local by construction, gives the primitive cell's U on every copy."""
    (onsite, _), _ = u_runs
    sample = nio_sample(onsite, {}, generate.CELL)
    dataset, attrs = hubbard_training_dataset(Dataset([sample], HUBBARD_TARGET_SPECS))
    model, params = model_and_params(dataset, attrs, seed=1, u_sum_images=True)
    assert model.heads["hubbard_u"].reduce == "images"
    u = predict_hubbard(model, params, dataset)[0]["hubbard_u"]
    assert np.all(np.isfinite(u))
    for rotation in (ROTATION, -generate.rotation_matrix([0.3, -1.0, 0.5], 2.1)):
        moved = nio_sample(rotate_blocks(onsite, {}, rotation)[0], {}, generate.CELL @ rotation.T)
        np.testing.assert_allclose(predictions(model, params, [moved])[0]["hubbard_u"], u, atol=TIGHT)

    plain_model, plain_params = model_and_params(dataset, attrs, seed=1)
    node_only = _without(params, "head_hubbard_u_images")
    assert jax.tree_util.tree_structure(node_only) == jax.tree_util.tree_structure(plain_params)
    u_node = predict_hubbard(plain_model, node_only, dataset)[0]["hubbard_u"]
    assert np.abs(u - u_node).max() > 1e-4  # NiO's 2.95 A lattice vectors: every site has images in the cutoff

    atoms = nio_atoms(generate.CELL).repeat((2, 1, 1))
    big = hubbard_record_sample(atoms, {a + 4 * k: b for k in range(2) for a, b in onsite.items()},
                                {a + 4 * k: u for k in range(2) for a, u in {0: 5.0, 1: 5.0, 2: 1.0, 3: 1.0}.items()},
                                target_u={0: 6.0, 1: 6.0, 4: 6.0, 5: 6.0})
    big_set, _ = hubbard_training_dataset(Dataset([big], HUBBARD_TARGET_SPECS), (1, 2))
    np.testing.assert_allclose(predict_hubbard(plain_model, node_only, big_set)[0]["hubbard_u"],
                               np.tile(u_node, 2), atol=TIGHT)
    u_big = predict_hubbard(model, params, big_set)[0]["hubbard_u"]
    assert np.abs(u_big - np.tile(u, 2)).max() > 1e-4
