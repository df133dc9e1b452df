"""Direct-route heads of every architecture: equivariance, permutation, translation, supercell, padding, jit reuse."""

import e3nn_jax as e3nn
import jax
import numpy as np
import pytest
from conftest import CUTOFF, SPECIES, TINY_CORE

from aiida_eqml.ml.graph import batch_graphs, graph_from_atoms, padding_bucket
from aiida_eqml.ml.models import build_model

# Tiny on purpose: the tests check symmetry, not accuracy, and XLA compile time dominates.
TINY = {
    **TINY_CORE,
    "mace_channels": 2,
    "correlation": 2,
    "mace_lmax": 1,
    "node_attrs": {"occ": "0e + 2e"},
    "heads": {
        "born": {"level": "node", "tensor": "ij"},
        "raman": {"level": "node", "tensor": "ijk=jik"},
        "hubbard_v": {"level": "edge", "irreps": "0e + 1o"},
        "eps": {"level": "graph", "tensor": "ij=ji", "reduce": "mean"},
        "energy": {"level": "graph", "irreps": "0e"},
    },
}


def _graph(atoms, occ=None):
    occ = np.random.default_rng(7).normal(size=(len(atoms), 6)) if occ is None else occ
    return graph_from_atoms(atoms, CUTOFF, SPECIES, node_attrs={"occ": e3nn.IrrepsArray("0e+2e", occ)})


def _batch(graphs):
    n = sum(len(g.positions) for g in graphs)
    e = sum(len(g.senders) for g in graphs)
    return batch_graphs(graphs, *padding_bucket(n, e, len(graphs)))


# Keys only one architecture knows (the registry refuses them for the others).
OWN_KEYS = {"allegro": {"allegro_channels": 2, "allegro_lmax": 2, "allegro_latent": [8]}}
ARCHITECTURES = ["nequip", "mace", "allegro"]


def tiny_config(architecture: str, **overrides) -> dict:
    return {**TINY, "architecture": architecture, **OWN_KEYS.get(architecture, {}), **overrides}


@pytest.fixture(scope="module", params=ARCHITECTURES)
def model_and_params(request):
    model = build_model(tiny_config(request.param))
    atoms = _make_atoms()
    params = model.init(jax.random.PRNGKey(0), _batch([_graph(atoms)]))
    return model, params, jax.jit(model.apply)


def _make_atoms(seed=0, n=4):
    import ase

    rng = np.random.default_rng(seed)
    cell = 3.6 * (np.eye(3) + 0.1 * rng.normal(size=(3, 3)))
    frac = np.array([[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0.0], [0.0, 0.5, 0.5]])[:n] + 0.05 * rng.normal(size=(n, 3))
    return ase.Atoms(["Ba", "Ti", "O", "O"][:n], scaled_positions=frac, cell=cell, pbc=True)


def _rotate_graph(graph, rot):
    d = lambda irreps: np.asarray(e3nn.Irreps(irreps).D_from_matrix(rot))  # noqa: E731
    return graph._replace(
        positions=graph.positions @ rot.T,
        cells=graph.cells @ rot.T,
        node_attrs={k: e3nn.IrrepsArray(v.irreps, v.array @ d(v.irreps).T) for k, v in graph.node_attrs.items()},
    )


@pytest.mark.parametrize("improper", [False, True])
def test_all_heads_equivariant(model_and_params, rotation, improper):
    model, params, apply = model_and_params
    graph = _batch([_graph(_make_atoms())])
    rot = rotation(11, improper)
    out = apply(params, graph)
    out_rot = apply(params, _rotate_graph(graph, rot))
    assert set(out) == set(model.heads)
    for name, value in out.items():
        d = np.asarray(value.irreps.D_from_matrix(rot))
        expected = np.asarray(value.array) @ d.T
        scale = max(1.0, float(np.abs(expected).max()))
        np.testing.assert_allclose(np.asarray(out_rot[name].array), expected, atol=1e-5 * scale, err_msg=name)
        assert float(np.abs(value.array).max()) > 1e-6, f"head {name} is identically zero"


def test_heads_have_declared_irreps_and_shapes(model_and_params):
    model, params, apply = model_and_params
    graph = _batch([_graph(_make_atoms())])
    out = apply(params, graph)
    sizes = {"node": graph.positions.shape[0], "edge": graph.senders.shape[0], "graph": graph.cells.shape[0]}
    for name, head in model.heads.items():
        assert out[name].irreps == head.irreps
        assert out[name].shape == (sizes[head.level], head.irreps.dim)
    # Padding is zero everywhere.
    assert np.all(np.asarray(out["born"].array)[~graph.node_mask] == 0)
    assert np.all(np.asarray(out["hubbard_v"].array)[~graph.edge_mask] == 0)
    assert np.all(np.asarray(out["eps"].array)[~graph.graph_mask] == 0)


def test_permutation_translation_and_supercell(model_and_params):
    model, params, apply = model_and_params
    atoms = _make_atoms()
    occ = np.random.default_rng(7).normal(size=(len(atoms), 6))
    graph = _graph(atoms, occ)
    ref = apply(params, _batch([graph]))
    n = len(atoms)

    perm = np.array([2, 0, 3, 1])
    out = apply(params, _batch([_graph(atoms[perm], occ[perm])]))
    np.testing.assert_allclose(np.asarray(out["born"].array)[:n], np.asarray(ref["born"].array)[perm], atol=1e-5)
    np.testing.assert_allclose(np.asarray(out["energy"].array)[0], np.asarray(ref["energy"].array)[0], rtol=1e-5)

    moved = atoms.copy()
    moved.positions += np.array([0.7, -1.3, 2.1])
    out = apply(params, _batch([_graph(moved, occ)]))
    for name in ("born", "raman", "eps"):
        np.testing.assert_allclose(np.asarray(out[name].array), np.asarray(ref[name].array), atol=1e-5)

    # 2x2x2 supercell: same per-atom outputs, extensive energy x8, intensive mean unchanged.
    big = atoms.repeat((2, 2, 2))
    out = apply(params, _batch([_graph(big, np.tile(occ, (8, 1)))]))
    born_big = np.asarray(out["born"].array)[: 8 * n].reshape(8, n, -1)
    np.testing.assert_allclose(born_big, np.broadcast_to(np.asarray(ref["born"].array)[:n], born_big.shape), atol=1e-5)
    np.testing.assert_allclose(np.asarray(out["energy"].array)[0], 8 * np.asarray(ref["energy"].array)[0], rtol=1e-4)
    np.testing.assert_allclose(np.asarray(out["eps"].array)[0], np.asarray(ref["eps"].array)[0], atol=1e-5)


def test_edge_outputs_distinguish_periodic_images(model_and_params):
    model, params, apply = model_and_params
    import ase

    # One Ti in a small cell: all its edges are to its own images (same sender/receiver).
    atoms = ase.Atoms("TiO", scaled_positions=[[0, 0, 0], [0.5, 0.5, 0.5]], cell=np.diag([3.0, 3.2, 3.4]), pbc=True)
    graph = _graph(atoms)
    out = np.asarray(apply(params, _batch([graph]))["hubbard_v"].array)[: len(graph.senders)]
    self_edges = np.where(graph.senders == graph.receivers)[0]
    assert len(self_edges) >= 2
    assert np.abs(out[self_edges[0]] - out[self_edges[1]]).max() > 1e-6


def test_batch_of_two_equals_separate_and_no_recompile_in_bucket(model_and_params):
    model, params, _ = model_and_params
    apply = jax.jit(model.apply)
    g1, g2, g3 = (_graph(_make_atoms(seed=s)) for s in (1, 2, 3))
    shape = padding_bucket(8, len(g1.senders) + len(g2.senders) + 40, 2)
    both = apply(params, batch_graphs([g1, g2], *shape))
    alone = apply(params, batch_graphs([g2], *shape))
    np.testing.assert_allclose(np.asarray(both["born"].array)[4:8], np.asarray(alone["born"].array)[:4], atol=1e-5)
    np.testing.assert_allclose(np.asarray(both["energy"].array)[1], np.asarray(alone["energy"].array)[0], rtol=1e-5)
    size = apply._cache_size()
    apply(params, batch_graphs([g3, g1], *shape))
    assert apply._cache_size() == size == 1


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="needs 'species'"):
        build_model({"heads": {"e": {"level": "graph", "irreps": "0e"}}})
    with pytest.raises(ValueError, match="unknown model config keys \\['hiden_irreps'\\]"):
        build_model({"species": SPECIES, "hiden_irreps": "8x0e", "heads": {"e": {"level": "graph", "irreps": "0e"}}})
    with pytest.raises(ValueError, match="level must be one of"):
        build_model({"species": SPECIES, "heads": {"e": {"level": "atom", "irreps": "0e"}}})
    with pytest.raises(ValueError, match="derivative quantity 'bogus' unknown"):
        build_model({"species": SPECIES, "heads": {"bogus": {"route": "derivative"}}})
    with pytest.raises(ValueError, match="normalization given for unknown head 'x'"):
        build_model(
            {"species": SPECIES, "heads": {"e": {"level": "graph", "irreps": "0e"}}, "normalization": {"x": {}}}
        )


def test_normalization_scale_and_species_shift():
    import jax.numpy as jnp

    base = {
        "species": SPECIES,
        "cutoff": CUTOFF,
        "num_layers": 1,
        "hidden_irreps": "4x0e + 2x1o",
        "radial_hidden": [8],
        "num_radial_basis": 4,
        "heads": {"q": {"level": "node", "irreps": "0e + 1o"}},
    }
    shift = [[1.0, 5.0, 5.0, 5.0], [2.0, 0, 0, 0], [3.0, 0, 0, 0]]  # 1o entries are ignored
    plain = build_model(base)
    scaled = build_model(dict(base, normalization={"q": {"scale": 2.0, "species_shift": shift}}))
    graph = _batch([graph_from_atoms(_make_atoms(), CUTOFF, SPECIES)])
    params = plain.init(jax.random.PRNGKey(1), graph)
    a = np.asarray(plain.apply(params, graph)["q"].array)[:4]
    b = np.asarray(scaled.apply(params, graph)["q"].array)[:4]
    species = np.asarray(graph.species)[:4]
    expected = 2.0 * a
    expected[:, 0] += np.array([1.0, 2.0, 3.0])[species]
    np.testing.assert_allclose(b, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="species_shift'\\] must have shape \\(3, 4\\)"):
        build_model(dict(base, normalization={"q": {"species_shift": [[0.0]]}})).apply(params, graph)
    del jnp


def test_unknown_species_rejected(random_atoms):
    import ase

    atoms = ase.Atoms("BaCu", positions=[[0, 0, 0], [1.5, 1.5, 1.5]], cell=np.eye(3) * 4, pbc=True)
    with pytest.raises(ValueError, match=r"Cu not in the model's species \['Ba', 'Ti', 'O'\]"):
        graph_from_atoms(atoms, CUTOFF, SPECIES)


def test_architecture_registry_refuses_unknown_names_and_foreign_keys():
    from aiida_eqml.ml.architectures import ARCHITECTURES as REGISTRY

    assert {"nequip", "mace", "allegro"} <= set(REGISTRY)
    with pytest.raises(ValueError, match="architecture must be one of"):
        build_model(dict(TINY, architecture="transformer"))
    with pytest.raises(ValueError, match="unknown model config keys \\['allegro_channels'\\]"):
        build_model(dict(TINY, architecture="nequip", allegro_channels=4))
    assert build_model(tiny_config("allegro")).config["allegro_channels"] == 2
    assert "allegro_channels" not in build_model(tiny_config("nequip")).config  # other configs unchanged


@pytest.mark.parametrize("architecture", ["allegro", "nequip"])
def test_receptive_field(architecture):
    """Allegro is strictly local: moving an atom outside the cutoff of atom 0 leaves atom 0's outputs unchanged
    (two message-passing layers of NequIP see it through a common neighbour)."""
    import ase

    config = tiny_config(architecture, num_layers=2, node_attrs={}, heads={"q": {"level": "node", "irreps": "0e + 1o"}})
    model = build_model(config)
    # A chain Ba(0) - O(2.5 A) - Ti(5 A) in a large box: Ti is a neighbour of O, not of Ba (cutoff 3.5 A).
    atoms = ase.Atoms("BaOTi", positions=[[0, 0, 0], [2.5, 0, 0], [5.0, 0, 0]], cell=np.eye(3) * 20, pbc=True)
    moved = atoms.copy()
    moved.positions[2] += [0.3, 0.4, 0.0]  # still within the cutoff of O, never of Ba
    graphs = [graph_from_atoms(a, CUTOFF, SPECIES) for a in (atoms, moved)]
    params = model.init(jax.random.PRNGKey(3), _batch([graphs[0]]))
    out = [np.asarray(model.apply(params, _batch([g]))["q"].array) for g in graphs]
    change_of_ba = np.abs(out[0][0] - out[1][0]).max()
    change_of_o = np.abs(out[0][1] - out[1][1]).max()
    assert change_of_o > 1e-6
    if architecture == "allegro":
        assert change_of_ba == 0.0
    else:
        assert change_of_ba > 1e-7


def test_allegro_model_file_round_trip(tmp_path):
    """An Allegro model file passes the load-time checks (config schema, weights vs modules) and predicts the same."""
    from aiida_eqml.ml.modelfile import load_model, save_model

    model = build_model(tiny_config("allegro", heads={"born": TINY["heads"]["born"]}))
    graph = _batch([_graph(_make_atoms())])
    params = model.init(jax.random.PRNGKey(5), graph)
    save_model(tmp_path / "allegro.eqml", model.config, params)
    loaded, loaded_params, meta = load_model(tmp_path / "allegro.eqml")
    assert loaded.config == model.config and meta["config"]["architecture"] == "allegro"
    np.testing.assert_array_equal(
        np.asarray(jax.jit(loaded.apply)(loaded_params, graph)["born"].array),
        np.asarray(jax.jit(model.apply)(params, graph)["born"].array),
    )
