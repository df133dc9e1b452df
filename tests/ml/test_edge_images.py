"""Edge heads summed over periodic images (``reduce: "images"``): the q = 0 component of a pair interaction.

hp.x at q = Gamma perturbs an atom with all its periodic images, so its V_ij is sum_S V(i, j + S). A head summed
this way must (1) give every edge i -> j the sum over all edges i -> j, (2) stay rotation invariant (proper and
improper), and (3) on a supercell split the primitive cell's value among the images that became distinct atoms:
V_super(i, j) + V_super(i, j') = V_prim(i, j) when j and j' are the two images of j.
"""

import ase
import e3nn_jax as e3nn
import jax
import numpy as np
import pytest
from conftest import TINY_CORE

from aiida_eqml.ml.graph import batch_graphs, graph_from_atoms, match_edges, padding_bucket, sum_over_images
from aiida_eqml.ml.models import build_model
from aiida_eqml.ml.normalization import compute_normalization

SPECIES = ["O", "Ti"]
CUTOFF = 4.0


def _rutile(repeat=(1, 1, 1)):
    """Rutile TiO2 (6 atoms; c = 2.96 A < cutoff, so each Ti-O couple has several images)."""
    a, c, u = 4.594, 2.959, 0.3048
    frac = [(0, 0, 0), (0.5, 0.5, 0.5), (u, u, 0), (1 - u, 1 - u, 0), (0.5 + u, 0.5 - u, 0.5), (0.5 - u, 0.5 + u, 0.5)]
    atoms = ase.Atoms("Ti2O4", scaled_positions=frac, cell=np.diag([a, a, c]), pbc=True)
    return atoms.repeat(repeat)


def _config(reduce="images"):
    return {**TINY_CORE, "architecture": "nequip", "species": SPECIES, "cutoff": CUTOFF,
            "heads": {"v": {"level": "edge", "irreps": "0e", "reduce": reduce}}}


def _apply(model, params, atoms):
    graph = graph_from_atoms(atoms, CUTOFF, SPECIES)
    batch = batch_graphs([graph], *padding_bucket(len(atoms), len(graph.senders), 1))
    out = jax.jit(model.apply)(params, batch)["v"].array[: len(graph.senders), 0]
    return graph, np.asarray(out)


@pytest.fixture(scope="module")
def summed_model():
    model = build_model(_config())
    graph = graph_from_atoms(_rutile(), CUTOFF, SPECIES)
    params = model.init(jax.random.PRNGKey(3), batch_graphs([graph], *padding_bucket(6, len(graph.senders), 1)))
    return model, params


def test_every_edge_gets_the_sum_over_its_couples_images():
    rng = np.random.default_rng(0)
    senders = np.array([0, 0, 0, 1, 1, 2, 3, 3])
    receivers = np.array([1, 1, 2, 0, 0, 2, 3, 3])
    mask = np.array([1, 1, 1, 1, 0, 1, 0, 0], bool)  # the last ones are padding
    values = rng.normal(size=(8, 2))
    out = np.asarray(sum_over_images(e3nn.IrrepsArray("2x0e", values), senders, receivers, mask).array)
    for e in range(8):
        same = (senders == senders[e]) & (receivers == receivers[e]) & mask
        expected = values[same].sum(axis=0) if mask[e] else 0.0
        np.testing.assert_allclose(out[e], expected, atol=1e-6)


def test_summed_head_is_invariant_under_proper_and_improper_rotations(summed_model):
    model, params = summed_model
    atoms = _rutile()
    graph, ref = _apply(model, params, atoms)
    assert np.abs(ref).max() > 1e-6
    for rotation in (e3nn.rand_matrix(jax.random.PRNGKey(1), ()), -np.eye(3)):  # proper, then the inversion
        rotated = atoms.copy()
        r = np.asarray(rotation)
        rotated.set_cell(atoms.cell.array @ r.T, scale_atoms=True)
        g2, out = _apply(model, params, rotated)
        where = match_edges(g2.senders, g2.receivers, g2.shifts,
                            np.column_stack([graph.senders, graph.receivers, np.rint(graph.shifts)]))
        assert np.all(where >= 0)
        np.testing.assert_allclose(out[where], ref, atol=1e-5)


def test_a_supercell_splits_the_primitive_value_among_the_images(summed_model):
    model, params = summed_model
    prim_graph, prim = _apply(model, params, _rutile())
    super_graph, sup = _apply(model, params, _rutile((1, 1, 2)))
    n = 6
    prim_value = {(int(s), int(r)): float(v) for s, r, v in zip(prim_graph.senders, prim_graph.receivers, prim)}
    split = 0
    for (i, j), value in prim_value.items():
        # the supercell couples (i, r) whose r is an image of j: each carries its own sum over images
        per_couple = {int(r): float(v) for s, r, v in zip(super_graph.senders, super_graph.receivers, sup)
                      if s == i and r % n == j}
        np.testing.assert_allclose(sum(per_couple.values()), value, rtol=1e-4, atol=1e-6, err_msg=f"couple {(i, j)}")
        split += len(per_couple) > 1
    assert split > 0, "no couple of the primitive cell has images that the supercell makes distinct atoms"
    # without the sum the head is the same on every image (supercell invariant), so the totals would double
    each = build_model(_config("sum"))
    _, plain = _apply(each, params, _rutile())
    assert not np.allclose(plain, prim)


def test_normalization_shift_counts_the_images():
    """The pair shift of a summed head is mean(label / images): each image adds it once."""
    from aiida_eqml.ml.dataset import Dataset, EdgeValues, Sample

    atoms = _rutile()
    graph = graph_from_atoms(atoms, CUTOFF, SPECIES)
    pairs = {}
    for s, r, t in zip(graph.senders, graph.receivers, np.rint(graph.shifts).astype(int)):
        pairs.setdefault((int(s), int(r)), []).append(t)
    (i, j), shifts = next((k, v) for k, v in pairs.items() if atoms[k[0]].symbol == "Ti" and
                          atoms[k[1]].symbol == "O" and len(v) > 1)
    keys = np.array([[i, j, *shifts[0]]])
    sample = Sample(numbers=atoms.numbers, positions=atoms.positions, cell=np.asarray(atoms.cell), pbc=atoms.pbc,
                    edge_targets={"v": EdgeValues(keys, np.array([[2.0 * len(shifts)]]))})
    dataset = Dataset([sample], {"v": {"level": "edge", "irreps": "0e"}})
    norm = compute_normalization(dataset, _config())
    ti, o = SPECIES.index("Ti"), SPECIES.index("O")
    assert norm["v"]["species_shift"][ti][o][0] == pytest.approx(2.0)
