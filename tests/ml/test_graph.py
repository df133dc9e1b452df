"""Graph construction, batching and padding buckets."""

import ase
import ase.neighborlist
import e3nn_jax as e3nn
import numpy as np
import pytest

from aiida_eqml.ml.graph import (
    PaddingBuckets,
    batch_graphs,
    edge_vectors,
    graph_from_atoms,
    match_edges,
    padding_bucket,
)

SPECIES = ["Ba", "Ti", "O"]


def _edge_set(i, j, S):
    return {(int(a), int(b), *map(int, np.rint(s))) for a, b, s in zip(i, j, S)}


def test_edges_match_ase_neighbor_list_and_vectors_follow_convention(random_atoms):
    atoms = random_atoms(seed=1, n_atoms=5)
    cutoff = 4.5
    graph = graph_from_atoms(atoms, cutoff, SPECIES)
    i, j, S, D = ase.neighborlist.neighbor_list("ijSD", atoms, cutoff)
    assert _edge_set(graph.senders, graph.receivers, graph.shifts) == _edge_set(i, j, S)
    vectors = edge_vectors(graph)
    assert np.all(np.linalg.norm(vectors, axis=1) < cutoff)
    # r_ij = x_j - x_i + S @ cell, compared with ASE's D for the same (i, j, S) key.
    where = match_edges(i, j, S, np.c_[graph.senders, graph.receivers, graph.shifts.astype(int)])
    np.testing.assert_allclose(vectors, D[where], atol=1e-10)


def test_single_atom_sees_its_periodic_images_as_distinct_edges(random_atoms):
    atoms = ase.Atoms("Ti", positions=[[0, 0, 0]], cell=np.eye(3) * 3.0, pbc=True)
    graph = graph_from_atoms(atoms, 3.5, SPECIES)
    assert len(graph.senders) == 6  # +-a, +-b, +-c
    assert set(map(tuple, graph.shifts.astype(int))) == {
        (1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)
    }
    np.testing.assert_allclose(np.linalg.norm(edge_vectors(graph), axis=1), 3.0)


def test_non_periodic_and_slab_directions(random_atoms):
    molecule = ase.Atoms("TiO", positions=[[0, 0, 0], [0, 0, 1.8]], pbc=False)  # zero cell
    graph = graph_from_atoms(molecule, 3.0, SPECIES)
    assert len(graph.senders) == 2 and np.all(graph.shifts == 0)
    # Slab periodic in x, y only, degenerate c vector: no shifts along z.
    slab = ase.Atoms("Ti", positions=[[0, 0, 0]], cell=[[3, 0, 0], [0, 3, 0], [0, 0, 0]], pbc=[True, True, False])
    graph = graph_from_atoms(slab, 3.5, SPECIES)
    assert len(graph.senders) == 4 and np.all(graph.shifts[:, 2] == 0)


def test_unknown_species_is_rejected_with_names(random_atoms):
    atoms = ase.Atoms("TiFe", positions=[[0, 0, 0], [1.5, 0, 0]], cell=np.eye(3) * 4, pbc=True)
    with pytest.raises(ValueError, match=r"Fe.*\['Ba', 'Ti', 'O'\]"):
        graph_from_atoms(atoms, 3.0, SPECIES)


def test_node_and_edge_attrs_are_placed_on_their_edges(random_atoms):
    atoms = random_atoms(seed=2, n_atoms=3)
    g0 = graph_from_atoms(atoms, 3.5, SPECIES)
    keys = np.c_[g0.senders[:2], g0.receivers[:2], g0.shifts[:2].astype(int)]
    values = e3nn.IrrepsArray("0e+1o", np.arange(8.0).reshape(2, 4))
    occ = e3nn.IrrepsArray("0e+2e", np.ones((3, 6)))
    graph = graph_from_atoms(atoms, 3.5, SPECIES, node_attrs={"occ": occ}, edge_attrs={"v": (keys, values)})
    np.testing.assert_array_equal(graph.edge_attrs["v"].array[:2], values.array)
    assert np.all(graph.edge_attrs["v"].array[2:] == 0)
    assert graph.node_attrs["occ"].irreps == e3nn.Irreps("0e+2e")
    far = np.array([[0, 1, 9, 9, 9]])
    with pytest.raises(ValueError, match="not edges within cutoff"):
        graph_from_atoms(atoms, 3.5, SPECIES, edge_attrs={"v": (far, values[:1])})
    with pytest.raises(ValueError, match="leading dimension 2, expected 3"):
        graph_from_atoms(atoms, 3.5, SPECIES, node_attrs={"occ": occ[:2]})


def test_batch_graphs_pads_into_last_graph_slot(random_atoms):
    graphs = [graph_from_atoms(random_atoms(seed=s, n_atoms=n), 3.5, SPECIES) for s, n in [(0, 3), (1, 4)]]
    n_nodes = 7
    n_edges = sum(len(g.senders) for g in graphs)
    batch = batch_graphs(graphs, 10, n_edges + 5, 4)
    assert batch.positions.shape == (10, 3) and batch.senders.shape == (n_edges + 5,) and batch.cells.shape == (4, 3, 3)
    assert batch.node_mask.sum() == n_nodes and batch.edge_mask.sum() == n_edges
    np.testing.assert_array_equal(batch.graph_mask, [True, True, False, False])
    np.testing.assert_array_equal(batch.node_graph[:n_nodes], [0, 0, 0, 1, 1, 1, 1])
    assert np.all(batch.node_graph[n_nodes:] == 3) and np.all(batch.edge_graph[n_edges:] == 3)
    assert int(batch.n_node.sum()) == 10 and int(batch.n_edge.sum()) == n_edges + 5
    # Edge vectors of the batch equal those of the single graphs; padding edges have zero length.
    vec = edge_vectors(batch)
    np.testing.assert_allclose(vec[: len(graphs[0].senders)], edge_vectors(graphs[0]), atol=1e-5)
    assert np.all(vec[n_edges:] == 0)
    with pytest.raises(ValueError, match="n_node=7 too small"):
        batch_graphs(graphs, 7, n_edges, 4)
    with pytest.raises(ValueError, match="n_graph=2 too small"):
        batch_graphs(graphs, 10, n_edges, 2)


def test_padding_buckets_give_few_shapes(random_atoms):
    assert padding_bucket(5, 40, 2) == (6, 48, 3)
    assert padding_bucket(6, 64, 3) == (8, 64, 4)
    sizes = {padding_bucket(n, 10 * n, 1)[0] for n in range(1, 200)}
    assert len(sizes) <= 16
    for n in range(1, 500):
        N = padding_bucket(n, 1, 1)[0]
        assert n + 1 <= N <= 1.5 * (n + 1) + 1
    graphs = [graph_from_atoms(random_atoms(seed=s, n_atoms=3 + s % 3), 3.5, SPECIES) for s in range(6)]
    fixed = PaddingBuckets.fixed(graphs, batch_size=2)
    shapes = {fixed(graphs[k : k + 2]).positions.shape for k in range(0, 6, 2)}
    assert len(shapes) == 1
