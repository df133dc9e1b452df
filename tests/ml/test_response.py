"""Derivative heads from E(R, eps, F), NequIP and Allegro: equivariance, sum rules, finite differences (float64)."""

import e3nn_jax as e3nn
import jax
import numpy as np
import pytest
from conftest import CUTOFF, SPECIES, TINY_CORE

from aiida_eqml.ml.graph import batch_graphs, graph_from_atoms
from aiida_eqml.ml.models import build_model
from aiida_eqml.ml.response import EPS0

CONFIG = {
    **TINY_CORE,
    "dtype": "float64",
    "heads": {
        "energy": {"level": "graph", "irreps": "0e"},
        "forces": {"route": "derivative"},
        "stress": {"route": "derivative"},
        "dipole": {"route": "derivative"},
        "born_charges": {"route": "derivative"},
        "dielectric": {"route": "derivative"},
        "susceptibility": {"route": "derivative"},
        "raman": {"route": "derivative"},
        "born_direct": {"level": "node", "tensor": "ij"},
        "raman_direct": {"level": "node", "tensor": "ijk=jik"},
    },
}
N_ATOMS = 4
FIELD = np.array([[0.02, -0.03, 0.05], [0.0, 0.0, 0.0]])  # V/A; second slot is the padding graph


def _atoms():
    import ase

    rng = np.random.default_rng(3)
    cell = 3.6 * (np.eye(3) + 0.1 * rng.normal(size=(3, 3)))
    frac = np.array([[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0.0], [0.0, 0.5, 0.5]]) + 0.05 * rng.normal(size=(4, 3))
    return ase.Atoms(["Ba", "Ti", "O", "O"], scaled_positions=frac, cell=cell, pbc=True)


# Allegro's own sizes, tiny like the rest (its trunk reaches the field through the node embedding).
OWN_KEYS = {"allegro": {"allegro_channels": 2, "allegro_lmax": 2, "allegro_latent": [8]}}


@pytest.fixture(scope="module", params=["nequip", "allegro"])
def setup(request):
    with jax.enable_x64(True):
        g = graph_from_atoms(_atoms(), CUTOFF, SPECIES)
        graph = batch_graphs([g], N_ATOMS + 2, len(g.senders) + 6, 2, dtype=np.float64)
        graph = graph._replace(globals={"field": e3nn.IrrepsArray("1o", FIELD.copy())})
        model = build_model({**CONFIG, "architecture": request.param, **OWN_KEYS.get(request.param, {})})
        params = model.init(jax.random.PRNGKey(0), graph)
        apply = jax.jit(model.apply)

        def cartesian(graph_):
            with jax.enable_x64(True):
                out = apply(params, graph_)
                res = {}
                for name, head in model.heads.items():
                    t = head.tensor if head.tensor is not None else None
                    arr = np.asarray(out[name].array)
                    res[name] = t.to_cartesian(arr) if t is not None else arr
                return res

        # One compiled apply for the whole module: compiling the third derivatives is most of these tests' time.
        yield model, params, graph, cartesian, apply


def test_derivative_heads_have_direct_head_irreps(setup):
    model, _, _, _, _ = setup
    assert model.heads["born_charges"].irreps == model.heads["born_direct"].irreps == e3nn.Irreps("0e+1e+2e")
    assert model.heads["raman"].irreps == model.heads["raman_direct"].irreps == e3nn.Irreps("2x1o+2o+3o")
    assert model.heads["dielectric"].irreps == e3nn.Irreps("0e+2e")
    assert model.config["field"] is True  # forced on by the field derivatives


@pytest.mark.parametrize("improper", [False, True])
def test_derivative_heads_equivariant(setup, rotation, improper):
    model, params, graph, _, apply = setup
    rot = rotation(5, improper)
    with jax.enable_x64(True):
        out = apply(params, graph)
        rotated = graph._replace(
            positions=graph.positions @ rot.T,
            cells=graph.cells @ rot.T,
            globals={"field": e3nn.IrrepsArray("1o", FIELD @ rot.T)},
        )
        out_rot = apply(params, rotated)
    for name, value in out.items():
        d = np.asarray(value.irreps.D_from_matrix(rot))
        expected = np.asarray(value.array) @ d.T
        scale = max(1.0, float(np.abs(expected).max()))
        np.testing.assert_allclose(np.asarray(out_rot[name].array), expected, atol=1e-5 * scale, err_msg=name)


def test_acoustic_sum_rules_and_values(setup):
    _, _, graph, cartesian, _ = setup
    out = cartesian(graph)
    born, raman = out["born_charges"][:N_ATOMS], out["raman"][:N_ATOMS]
    assert np.abs(born).max() > 1e-4 and np.abs(raman).max() > 1e-6
    np.testing.assert_allclose(born.sum(0), 0.0, atol=1e-9 * np.abs(born).max())
    np.testing.assert_allclose(raman.sum(0), 0.0, atol=1e-9 * np.abs(raman).max())
    np.testing.assert_allclose(out["forces"][:N_ATOMS].sum(0), 0.0, atol=1e-9)
    chi = out["susceptibility"][0]
    np.testing.assert_allclose(out["dielectric"][0], np.eye(3) + 4 * np.pi * chi, atol=1e-10)
    np.testing.assert_allclose(raman, np.swapaxes(raman, 1, 2), atol=1e-12)
    assert np.all(out["born_charges"][N_ATOMS:] == 0)  # padding


def _displaced(graph, atom, axis, h):
    positions = np.array(graph.positions)
    positions[atom, axis] += h
    return graph._replace(positions=positions)


def test_finite_differences(setup):
    _, _, graph, cartesian, _ = setup
    h = 1e-4
    ref = cartesian(graph)
    volume = abs(np.linalg.det(np.asarray(graph.cells[0])))
    for atom, axis in [(0, 0), (1, 2), (3, 1)]:
        plus, minus = cartesian(_displaced(graph, atom, axis, h)), cartesian(_displaced(graph, atom, axis, -h))
        force_fd = -(plus["energy"][0, 0] - minus["energy"][0, 0]) / (2 * h)
        np.testing.assert_allclose(ref["forces"][atom, axis], force_fd, rtol=1e-5, atol=1e-8)
        z_fd = (plus["dipole"][0] - minus["dipole"][0]) / (2 * h)  # dP_a / dtau_Ib
        np.testing.assert_allclose(ref["born_charges"][atom, :, axis], z_fd, rtol=1e-5, atol=1e-8)
        raman_fd = (plus["susceptibility"][0] - minus["susceptibility"][0]) / (2 * h)
        np.testing.assert_allclose(ref["raman"][atom, :, :, axis], raman_fd, rtol=1e-4, atol=1e-8)
    for b in range(3):
        fields = []
        for sign in (1, -1):
            f = FIELD.copy()
            f[0, b] += sign * h
            fields.append(cartesian(graph._replace(globals={"field": e3nn.IrrepsArray("1o", f)})))
        dp_df = (fields[0]["dipole"][0] - fields[1]["dipole"][0]) / (2 * h)
        chi_fd = dp_df / (4 * np.pi * EPS0 * volume)
        np.testing.assert_allclose(ref["susceptibility"][0][:, b], chi_fd, rtol=1e-5, atol=1e-9)
    # Stress: symmetric strain of cell and positions.
    for a, b in [(0, 0), (1, 2)]:
        energies = []
        for sign in (1, -1):
            eps = np.zeros((3, 3))
            eps[a, b] += sign * h / 2
            eps[b, a] += sign * h / 2
            deform = np.eye(3) + eps
            strained = graph._replace(
                positions=np.asarray(graph.positions) @ deform, cells=np.asarray(graph.cells) @ deform
            )
            energies.append(cartesian(strained)["energy"][0, 0])
        stress_fd = (energies[0] - energies[1]) / (2 * h) / volume
        np.testing.assert_allclose(ref["stress"][0, a, b], stress_fd, rtol=1e-5, atol=1e-9)
