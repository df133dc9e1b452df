"""NMR shielding sigma_{I,ab} = d2E/dB_a dmu_{I,b} from E(R, B, mu) (aiida_eqml.ml.magnetic), float64.

Equivariance (proper and improper rotations: B and mu are pseudovectors, so sigma is even under inversion),
finite differences, permutation and supercell consistency, a model without the flag unchanged, clear errors.
One padded batch shape for the symmetry tests, so the derivative program compiles once.
"""

import e3nn_jax as e3nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import CUTOFF, SPECIES, TINY_CORE, random_periodic_atoms

from aiida_eqml.ml.config_schema import ConfigError, validate_model_config
from aiida_eqml.ml.graph import batch_graphs, graph_from_atoms
from aiida_eqml.ml.magnetic import magnetic_energy_fn, shielding_cartesian
from aiida_eqml.ml.modelfile_checks import _expected_modules
from aiida_eqml.ml.models import build_model, normalize_config
from aiida_eqml.ml.response import model_energy_fn, response_cartesian

BASE = {
    **TINY_CORE,
    "dtype": "float64",
    "heads": {"energy": {"level": "graph", "irreps": "0e"}, "forces": {"route": "derivative"}},
}
ENERGY = {"energy": {"level": "graph", "irreps": "0e"}}
MAGNETIC = {**BASE, "magnetic": True, "heads": {**ENERGY, "nmr_shielding": {"route": "derivative"}}}
N_PRIM = 4


@pytest.fixture(scope="module", autouse=True)
def x64():
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


def _batch(atoms_list):
    graphs = [graph_from_atoms(a, CUTOFF, SPECIES) for a in atoms_list]
    n_edge = sum(len(g.senders) for g in graphs)
    return batch_graphs(graphs, sum(len(a) for a in atoms_list) + 2, n_edge + 8, len(graphs) + 1, dtype=np.float64)


def _with_magnetic(graph, bfield, moments):
    return graph._replace(
        globals={"magnetic_field": e3nn.IrrepsArray("1e", jnp.asarray(bfield))},
        node_attrs={"nuclear_moments": e3nn.IrrepsArray("1e", jnp.asarray(moments))},
    )


@pytest.fixture(scope="module")
def setup(x64):
    prim = random_periodic_atoms(seed=2, n_atoms=N_PRIM)
    perm = np.array([2, 0, 3, 1])
    # primitive cell, its 2x1x1 supercell and a permutation of it in one batch (16 atoms, 3 graphs + padding)
    graph = _batch([prim, prim.repeat((2, 1, 1)), prim[perm]])
    model = build_model(MAGNETIC)
    params = model.init(jax.random.PRNGKey(0), graph)
    apply = jax.jit(model.apply)
    return model, params, graph, apply, perm


def _at_zero(graph):
    """B = mu = 0 given explicitly: the same pytree as the other calls, so the same compiled program."""
    return _with_magnetic(graph, np.zeros((4, 3)), np.zeros((len(graph.positions), 3)))


def _sigma(model, out):
    return np.asarray(model.heads["nmr_shielding"].tensor.to_cartesian(out["nmr_shielding"]))


@pytest.mark.parametrize("kind", ["proper", "improper", "inversion"])
def test_shielding_equivariant_and_even_under_inversion(setup, rotation, kind):
    model, params, graph, apply, _ = setup
    rot = -np.eye(3) if kind == "inversion" else rotation(11, kind == "improper")
    det = np.linalg.det(rot)
    rng = np.random.default_rng(5)
    # Away from B = mu = 0 too: the pseudovector inputs themselves pick up det(R) under the rotation.
    bfield, moments = 0.3 * rng.normal(size=(4, 3)), 0.3 * rng.normal(size=(len(graph.positions), 3))
    out = apply(params, _with_magnetic(graph, bfield, moments))
    rotated = graph._replace(positions=graph.positions @ rot.T, cells=graph.cells @ rot.T)
    out_rot = apply(params, _with_magnetic(rotated, det * bfield @ rot.T, det * moments @ rot.T))
    sigma, sigma_rot = _sigma(model, out), _sigma(model, out_rot)
    n = 3 * N_PRIM + N_PRIM
    scale = np.abs(sigma[:n]).max()
    assert scale > 1e-3
    expected = np.einsum("ia,nab,jb->nij", rot, sigma, rot)  # R sigma R^T (det^2 = 1 for axial x axial)
    error = np.abs(sigma_rot - expected).max() / scale
    print(f"{kind}: max |sigma(R x) - R sigma R^T| / max|sigma| = {error:.2e}")
    assert error < 1e-10
    if kind == "inversion":
        np.testing.assert_allclose(sigma_rot, sigma, atol=1e-10 * scale)
    # The irreps head (0e + 1e + 2e) rotates with D(R); the energy is invariant.
    value = np.asarray(out["nmr_shielding"].array)
    d = np.asarray(out["nmr_shielding"].irreps.D_from_matrix(rot))
    np.testing.assert_allclose(np.asarray(out_rot["nmr_shielding"].array), value @ d.T, atol=1e-10 * scale)
    np.testing.assert_allclose(np.asarray(out_rot["energy"].array), np.asarray(out["energy"].array), rtol=1e-10)


def test_shielding_is_a_general_rank2_tensor(setup):
    model, params, graph, apply, _ = setup
    sigma = _sigma(model, apply(params, _at_zero(graph)))[:N_PRIM]
    iso = np.trace(sigma, axis1=1, axis2=2) / 3
    anti = 0.5 * (sigma - np.swapaxes(sigma, 1, 2))
    aniso = 0.5 * (sigma + np.swapaxes(sigma, 1, 2)) - iso[:, None, None] * np.eye(3)
    for part in (iso, anti, aniso):  # 0e, 1e, 2e all learnable
        assert np.abs(part).max() > 1e-6 * np.abs(sigma).max()
        assert np.abs(part).max() > 1e-8


def test_finite_differences(setup):
    model, params, graph, apply, _ = setup
    sigma = _sigma(model, apply(params, _at_zero(graph)))
    energy = magnetic_energy_fn(model, params, graph)
    zeros_b, zeros_mu = jnp.zeros((4, 3)), jnp.zeros((len(graph.positions), 3))
    grad_mu = jax.jit(jax.grad(lambda b, m: jnp.sum(energy(b, m) * graph.graph_mask), argnums=1))
    h = 1e-5
    fd = np.zeros_like(sigma)
    for a in range(3):
        step = np.zeros((4, 3))
        step[:, a] = h  # B_a of every graph: each atom's dE/dmu sees only its own graph's B
        fd[:, a, :] = (grad_mu(zeros_b + step, zeros_mu) - grad_mu(zeros_b - step, zeros_mu)) / (2 * h)
    scale = np.abs(sigma).max()
    error = np.abs(fd - sigma).max() / scale
    print(f"FD of dE/dmu over B (h={h}): max error / max|sigma| = {error:.2e}")
    assert error < 1e-8
    # And from energies alone, d2E/dB_a dmu_Ib by a 4-point central difference (no autodiff in the reference).
    e_jit = jax.jit(lambda b, m: energy(b, m)[0])
    h2 = 1e-3
    errors = []
    for atom, a, b in [(0, 0, 0), (1, 2, 1), (3, 1, 2), (2, 0, 2)]:
        db = np.zeros((4, 3))
        db[0, a] = h2
        dm = np.zeros((len(graph.positions), 3))
        dm[atom, b] = h2
        mixed = (e_jit(db, dm) - e_jit(db, -dm) - e_jit(-db, dm) + e_jit(-db, -dm)) / (4 * h2 * h2)
        errors.append(abs(float(mixed) - sigma[atom, a, b]) / scale)
    print(f"4-point FD of E over B and mu (h={h2}): max error / max|sigma| = {max(errors):.2e}")
    assert max(errors) < 1e-5


def test_permutation_and_supercell(setup):
    model, params, graph, apply, perm = setup
    sigma = _sigma(model, apply(params, _at_zero(graph)))
    prim, big, permuted = sigma[:N_PRIM], sigma[N_PRIM : 3 * N_PRIM], sigma[3 * N_PRIM : 4 * N_PRIM]
    scale = np.abs(prim).max()
    # ase's repeat: atoms 0..n-1 are the original cell, n..2n-1 their images one lattice vector away
    np.testing.assert_allclose(big[:N_PRIM], prim, atol=1e-10 * scale)
    np.testing.assert_allclose(big[N_PRIM:], prim, atol=1e-10 * scale)
    np.testing.assert_allclose(permuted, prim[perm], atol=1e-10 * scale)
    assert np.all(sigma[4 * N_PRIM :] == 0)  # padding


def test_model_without_flag_unchanged(setup):
    model, params, graph, _, _ = setup
    assert "magnetic" not in normalize_config(BASE)
    assert normalize_config({**BASE, "magnetic": False}) == normalize_config(BASE)  # same file, same hash
    plain, off = build_model(BASE), build_model({**BASE, "magnetic": False})
    p_plain, p_off = plain.init(jax.random.PRNGKey(0), graph), off.init(jax.random.PRNGKey(0), graph)
    assert jax.tree_util.tree_structure(p_plain) == jax.tree_util.tree_structure(p_off)
    assert all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda a, b: bool(np.all(a == b)), p_plain, p_off)))
    assert "magnetic_out" not in p_plain["params"] and set(p_plain["params"]) == _expected_modules(plain)
    assert set(params["params"]) == _expected_modules(model) == set(p_plain["params"]) | {"magnetic_out"}
    assert set(p_plain["params"]["embedding"]) < set(params["params"]["embedding"])  # + the mu (1e) input path
    out_plain = jax.jit(lambda p: response_cartesian(model_energy_fn(plain, p, graph), graph, {"forces"}))
    out_off = jax.jit(lambda p: response_cartesian(model_energy_fn(off, p, graph), graph, {"forces"}))
    ref, same = out_plain(p_plain), out_off(p_off)
    for name in ("energy", "forces"):
        assert np.array_equal(np.asarray(ref[name]), np.asarray(same[name])), name


def test_clear_errors(setup):
    model, params, graph, _, _ = setup
    no_flag = {k: v for k, v in MAGNETIC.items() if k != "magnetic"}
    with pytest.raises(ValueError, match="nmr_shielding .*set 'magnetic': true in the model config"):
        build_model(no_flag)
    plain = build_model(BASE)
    with pytest.raises(ValueError, match="set 'magnetic': true"):
        magnetic_energy_fn(plain, None, graph)
    with pytest.raises(ValueError, match="'magnetic': true"):
        plain.apply_direct(plain.init(jax.random.PRNGKey(0), graph), graph, magnetic_field=jnp.zeros((4, 3)))
    with pytest.raises(ValueError, match="magnetic.shielding_cartesian"):
        response_cartesian(model_energy_fn(model, params, graph), graph, {"nmr_shielding"})
    with pytest.raises(ValueError, match="needs 1e channels in hidden_irreps"):
        build_model({**MAGNETIC, "hidden_irreps": "4x0e + 2x1o + 2x2e"})
    with pytest.raises(ConfigError, match="magnetic: expected true or false"):
        validate_model_config({**MAGNETIC, "magnetic": "yes"})


def test_index_convention_on_an_analytic_energy(setup):
    """E_g = sum_{I in g} B_g . S_I . mu_I (+ terms without B.mu) gives sigma_I = S_I: a is B's index, b mu's."""
    _, _, graph, _, _ = setup
    s = np.random.default_rng(9).normal(size=(len(graph.positions), 3, 3))

    def energy(b, m):
        per_node = jnp.einsum("na,nab,nb->n", b[graph.node_graph], s, m) + jnp.sum(b[graph.node_graph] ** 2, 1)
        return jax.ops.segment_sum(per_node + jnp.sum(m**2, 1), graph.node_graph, num_segments=4)

    sigma = np.asarray(jax.jit(lambda g: shielding_cartesian(energy, g))(graph))
    mask = np.asarray(graph.node_mask)
    np.testing.assert_allclose(sigma[mask], s[mask], atol=1e-12)
    assert np.all(sigma[~mask] == 0)


def test_model_file_round_trip(setup, tmp_path):
    from aiida_eqml.ml.modelfile import load_model, save_model

    model, params, _, _, _ = setup
    save_model(tmp_path / "nmr.eqml", model.config, params)
    loaded, loaded_params, _ = load_model(tmp_path / "nmr.eqml")  # the checks expect the magnetic_out weights
    assert loaded.config["magnetic"] is True and loaded.heads["nmr_shielding"] == model.heads["nmr_shielding"]
    assert jax.tree_util.tree_structure(loaded_params) == jax.tree_util.tree_structure(params)
