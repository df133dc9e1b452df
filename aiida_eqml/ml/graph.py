"""Periodic atomic graphs with fixed (padded) shapes.

The :class:`Graph` NamedTuple is the contract between the ML modules (see
``docs/architecture.md``). One structure becomes one unpadded graph with
:func:`graph_from_atoms`; several graphs are concatenated and padded to fixed shapes with
:func:`batch_graphs` so that a jitted model compiles once per padding bucket
(:func:`padding_bucket`, :class:`PaddingBuckets`).

Edge convention (vesin / ASE ``neighbor_list``)::

    r_ij = positions[receivers] - positions[senders] + shifts @ cells[edge_graph]

An edge is keyed by ``(sender, receiver, shift)``: two periodic images of the same pair are two
distinct edges, and an atom sees its own periodic images when they are within the cutoff.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import e3nn_jax as e3nn
import jax
import jax.numpy as jnp
import numpy as np

from .structure_checks import MIN_INTERATOMIC_DISTANCE, StructureError, check_min_distance, validate_structure

__all__ = [
    "Graph",
    "graph_from_atoms",
    "batch_graphs",
    "padding_bucket",
    "PaddingBuckets",
    "edge_vectors",
    "match_edges",
    "species_indices",
]


class Graph(NamedTuple):
    """A batch of periodic atomic graphs, padded to fixed shapes (a jax pytree).

    Shapes: ``N`` nodes, ``E`` edges, ``G`` graphs; the last graph slot of a padded batch
    holds the padding nodes and edges (see ``docs/architecture.md``).
    """

    positions: jnp.ndarray  # [N, 3] Angstrom
    species: jnp.ndarray  # [N] int32, index into the model's species list
    cells: jnp.ndarray  # [G, 3, 3] lattice vectors as rows, Angstrom
    senders: jnp.ndarray  # [E] int32
    receivers: jnp.ndarray  # [E] int32
    shifts: jnp.ndarray  # [E, 3] float with integer values
    node_graph: jnp.ndarray  # [N] int32
    edge_graph: jnp.ndarray  # [E] int32
    n_node: jnp.ndarray  # [G] int32
    n_edge: jnp.ndarray  # [G] int32
    node_mask: jnp.ndarray  # [N] bool
    edge_mask: jnp.ndarray  # [E] bool
    graph_mask: jnp.ndarray  # [G] bool
    node_attrs: dict  # name -> e3nn.IrrepsArray [N, irreps]
    edge_attrs: dict  # name -> e3nn.IrrepsArray [E, irreps]
    globals: dict  # name -> e3nn.IrrepsArray [G, irreps]

    @property
    def num_nodes(self) -> int:
        return self.positions.shape[0]

    @property
    def num_edges(self) -> int:
        return self.senders.shape[0]

    @property
    def num_graphs(self) -> int:
        return self.cells.shape[0]


def edge_vectors(graph: Graph, positions=None, cells=None) -> jnp.ndarray:
    """Edge vectors ``r_ij = x_j - x_i + S @ cell`` ([E, 3]).

    ``positions`` / ``cells`` override the graph's (used to differentiate with respect to them).
    """
    positions = graph.positions if positions is None else positions
    cells = graph.cells if cells is None else cells
    xnp = jnp if not isinstance(positions, np.ndarray) else np
    offsets = xnp.einsum("ei,eij->ej", graph.shifts, cells[graph.edge_graph])
    return positions[graph.receivers] - positions[graph.senders] + offsets


def species_indices(symbols: Sequence[str], species: Sequence[str]) -> np.ndarray:
    """Map chemical symbols to indices in the model's ``species`` list (ValueError if unknown)."""
    index = {s: i for i, s in enumerate(species)}
    unknown = sorted({s for s in symbols if s not in index})
    if unknown:
        raise ValueError(
            f"element(s) {', '.join(unknown)} not in the model's species {list(species)}"
        )
    return np.array([index[s] for s in symbols], dtype=np.int32)


def _neighbour_box(cell: np.ndarray, pbc: np.ndarray, positions: np.ndarray, cutoff: float):
    """A box vesin accepts: non-periodic directions get a vector orthogonal to the periodic ones.

    Shifts along non-periodic directions are always 0, so any box vector works there; a
    user-given one may be zero or nearly parallel to a periodic vector (a near-degenerate box),
    so we always put a vector orthogonal to the periodic ones, longer than the structure plus
    cutoff. The cell itself was validated by :func:`validate_structure` (no degenerate
    periodic vectors, bounded extent).
    """
    if np.all(pbc) or not np.any(pbc):
        return cell
    box = np.array(cell, dtype=float)
    extent = float(np.ptp(positions, axis=0).max()) if len(positions) else 0.0
    length = extent + 2.0 * cutoff + 1.0
    periodic_vectors = [box[k] for k in range(3) if pbc[k]]
    for k in range(3):
        if pbc[k]:
            continue
        # Gram-Schmidt a Cartesian axis against the vectors we already have.
        for axis in np.eye(3):
            v = axis.copy()
            for p in periodic_vectors:
                v -= p * (v @ p) / (p @ p)
            if np.linalg.norm(v) > 1e-6:
                break
        v = v / np.linalg.norm(v) * length
        box[k] = v
        periodic_vectors.append(v)
    return box


def _as_irreps_array(value, n: int, what: str) -> e3nn.IrrepsArray:
    if not isinstance(value, e3nn.IrrepsArray):
        raise TypeError(f"{what} must be an e3nn.IrrepsArray, got {type(value).__name__}")
    if value.shape[0] != n:
        raise ValueError(f"{what} has leading dimension {value.shape[0]}, expected {n}")
    return e3nn.IrrepsArray(value.irreps, np.asarray(value.array))


def match_edges(senders, receivers, shifts, keys) -> np.ndarray:
    """Index of each key ``(i, j, S1, S2, S3)`` in the edge list, -1 where the edge is absent.

    ``keys``: int array ``[M, 5]``. Used to place per-edge targets / attributes on graph edges.
    """
    keys = np.asarray(keys, dtype=np.int64).reshape(-1, 5)
    edge_keys = np.concatenate(
        [
            np.asarray(senders, np.int64)[:, None],
            np.asarray(receivers, np.int64)[:, None],
            np.rint(np.asarray(shifts)).astype(np.int64),
        ],
        axis=1,
    )
    lookup = {tuple(k): e for e, k in enumerate(edge_keys.tolist())}
    return np.array([lookup.get(tuple(k), -1) for k in keys.tolist()], dtype=np.int64)


def sum_over_images(values: e3nn.IrrepsArray, senders, receivers, edge_mask) -> e3nn.IrrepsArray:
    """Every edge i -> j gets the sum of ``values`` over all edges i -> j, whatever their translation S.

    This is what a linear-response calculation at q = 0 in the cell sees of a pair interaction: hp.x at q = Gamma
    perturbs an atom and all its periodic images at once, so its V_ij is sum_S V(i, j + S), the q = 0 Fourier
    component of the real-space V (the inverse of the q = 0 response matrix is the q = 0 component of the inverse).
    A head summed this way learns the local V(i, j + S) of each couple, and its value on a supercell (fewer images
    per couple) is what hp.x at q = Gamma gives there. Padding edges (``edge_mask`` 0) neither add nor receive.
    Static shapes (a sort and a segment sum over the edges), so it jits once per padding bucket.
    """
    senders, receivers = jnp.asarray(senders), jnp.asarray(receivers)
    mask = jnp.asarray(edge_mask, values.array.dtype)[:, None]
    # group the edges by (sender, receiver) with static shapes: sort, mark where the pair changes, number the runs
    order = jnp.lexsort((receivers, senders))
    s_sorted, r_sorted = senders[order], receivers[order]
    starts = jnp.concatenate([jnp.ones((1,), bool), (s_sorted[1:] != s_sorted[:-1]) | (r_sorted[1:] != r_sorted[:-1])])
    group = jnp.zeros_like(order).at[order].set(jnp.cumsum(starts) - 1)
    total = jax.ops.segment_sum(values.array * mask, group, num_segments=senders.shape[0])
    return e3nn.IrrepsArray(values.irreps, total[group] * mask)


def _checked_cutoff(cutoff) -> float:
    try:
        value = float(cutoff)
    except (TypeError, ValueError):
        raise StructureError(f"cutoff must be a number (Angstrom), got {cutoff!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise StructureError(f"cutoff must be a finite positive number (Angstrom), got {cutoff!r}")
    return value


def graph_from_atoms(
    atoms,
    cutoff: float,
    species: Sequence[str],
    node_attrs: Mapping[str, e3nn.IrrepsArray] | None = None,
    edge_attrs: Mapping[str, tuple] | None = None,
    *,
    min_distance: float = MIN_INTERATOMIC_DISTANCE,
) -> Graph:
    """One unpadded graph (numpy arrays, ``G = 1``) from an ``ase.Atoms``.

    Args:
        atoms: ``ase.Atoms``; ``atoms.pbc`` selects the periodic directions.
        cutoff: neighbour cutoff radius in Angstrom.
        species: the model's species order (chemical symbols); unknown elements -> ValueError.
        node_attrs: ``{name: IrrepsArray [n_atoms, irreps]}`` extra per-atom inputs.
        edge_attrs: ``{name: (keys [M, 5] int (i, j, S1, S2, S3), IrrepsArray [M, irreps])}``
            extra per-edge inputs; edges not listed get zeros, keys that are not edges of the
            graph (beyond the cutoff) raise ValueError.
        min_distance: atoms (or periodic images) closer than this (Angstrom) raise
            :class:`~aiida_eqml.ml.structure_checks.StructureError`.

    The structure is validated (:func:`~aiida_eqml.ml.structure_checks.validate_structure`)
    before the neighbour list is built: bad input raises ``StructureError``, it never reaches
    vesin (which crashes the process on some of it).
    """
    symbols = atoms.get_chemical_symbols()
    species_idx = species_indices(symbols, species)
    positions = np.asarray(atoms.positions, dtype=np.float64)
    cell = np.asarray(atoms.cell[:], dtype=np.float64)
    pbc = np.asarray(atoms.pbc, dtype=bool)
    n = len(atoms)
    cutoff = _checked_cutoff(cutoff)
    validate_structure(positions, cell, pbc, min_distance=min_distance)

    import vesin  # local import: only needed when building graphs

    box = _neighbour_box(cell, pbc, positions, cutoff)
    calculator = vesin.NeighborList(cutoff=cutoff, full_list=True, sorted=True)
    senders, receivers, shifts, lengths = calculator.compute(
        points=positions, box=box, periodic=pbc, quantities="ijSd", copy=True
    )
    check_min_distance(lengths, senders, receivers, min_distance)
    n_edges = len(senders)

    nodes = {}
    for name, value in (node_attrs or {}).items():
        nodes[name] = _as_irreps_array(value, n, f"node_attrs[{name!r}]")
    edges = {}
    for name, item in (edge_attrs or {}).items():
        try:
            keys, value = item
        except (TypeError, ValueError):
            raise TypeError(f"edge_attrs[{name!r}] must be a (keys, IrrepsArray) pair") from None
        value = _as_irreps_array(value, len(np.asarray(keys).reshape(-1, 5)), f"edge_attrs[{name!r}]")
        where = match_edges(senders, receivers, shifts, keys)
        if np.any(where < 0):
            missing = np.asarray(keys).reshape(-1, 5)[where < 0][:3].tolist()
            raise ValueError(
                f"edge_attrs[{name!r}]: keys {missing} are not edges within cutoff {cutoff} A"
            )
        array = np.zeros((n_edges, value.irreps.dim), dtype=value.array.dtype)
        array[where] = value.array
        edges[name] = e3nn.IrrepsArray(value.irreps, array)

    return Graph(
        positions=positions,
        species=species_idx,
        cells=cell[None],
        senders=np.asarray(senders, np.int32),
        receivers=np.asarray(receivers, np.int32),
        shifts=np.asarray(shifts, np.float64),
        node_graph=np.zeros(n, np.int32),
        edge_graph=np.zeros(n_edges, np.int32),
        n_node=np.array([n], np.int32),
        n_edge=np.array([n_edges], np.int32),
        node_mask=np.ones(n, bool),
        edge_mask=np.ones(n_edges, bool),
        graph_mask=np.ones(1, bool),
        node_attrs=nodes,
        edge_attrs=edges,
        globals={},
    )


def _pad_irreps_dict(dicts: list[dict], size: int, what: str) -> dict:
    names = set(dicts[0])
    for d in dicts[1:]:
        if set(d) != names:
            raise ValueError(f"all graphs must have the same {what} keys: {sorted(names)} vs {sorted(d)}")
    out = {}
    for name in sorted(names):
        irreps = dicts[0][name].irreps
        for d in dicts[1:]:
            if d[name].irreps != irreps:
                raise ValueError(f"{what}[{name!r}] irreps differ between graphs: {irreps} vs {d[name].irreps}")
        array = np.concatenate([np.asarray(d[name].array) for d in dicts], axis=0)
        padded = np.zeros((size, irreps.dim), dtype=array.dtype)
        padded[: len(array)] = array
        out[name] = e3nn.IrrepsArray(irreps, padded)
    return out


def batch_graphs(
    graphs: Sequence[Graph], n_node: int, n_edge: int, n_graph: int, dtype=np.float32
) -> Graph:
    """Concatenate graphs and pad to ``n_node`` nodes, ``n_edge`` edges, ``n_graph`` graphs.

    The padding nodes and edges belong to the last graph slot, so ``n_graph`` must exceed the
    number of graphs and ``n_node`` the total number of nodes (one padding node at least, the
    end point of padding edges). Padding edges join the last node to itself with zero shift;
    models must mask them (their vector is zero). Floats are cast to ``dtype``.
    """
    graphs = list(graphs)
    if not graphs:
        raise ValueError("batch_graphs needs at least one graph")
    total_nodes = sum(int(np.sum(g.n_node)) for g in graphs)
    total_edges = sum(int(np.sum(g.n_edge)) for g in graphs)
    total_graphs = sum(len(g.n_node) for g in graphs)
    if n_node < total_nodes + 1:
        raise ValueError(f"n_node={n_node} too small: {total_nodes} nodes + 1 padding node needed")
    if n_edge < total_edges:
        raise ValueError(f"n_edge={n_edge} too small: {total_edges} edges")
    if n_graph < total_graphs + 1:
        raise ValueError(f"n_graph={n_graph} too small: {total_graphs} graphs + 1 padding graph needed")

    positions = np.zeros((n_node, 3), dtype)
    species = np.zeros(n_node, np.int32)
    cells = np.zeros((n_graph, 3, 3), dtype)
    senders = np.full(n_edge, n_node - 1, np.int32)
    receivers = np.full(n_edge, n_node - 1, np.int32)
    shifts = np.zeros((n_edge, 3), dtype)
    node_graph = np.full(n_node, n_graph - 1, np.int32)
    edge_graph = np.full(n_edge, n_graph - 1, np.int32)
    n_node_arr = np.zeros(n_graph, np.int32)
    n_edge_arr = np.zeros(n_graph, np.int32)

    node_off = edge_off = graph_off = 0
    for g in graphs:
        nn_, ne, ng = len(g.positions), len(g.senders), len(g.n_node)
        positions[node_off : node_off + nn_] = g.positions
        species[node_off : node_off + nn_] = g.species
        cells[graph_off : graph_off + ng] = g.cells
        senders[edge_off : edge_off + ne] = np.asarray(g.senders) + node_off
        receivers[edge_off : edge_off + ne] = np.asarray(g.receivers) + node_off
        shifts[edge_off : edge_off + ne] = g.shifts
        node_graph[node_off : node_off + nn_] = np.asarray(g.node_graph) + graph_off
        edge_graph[edge_off : edge_off + ne] = np.asarray(g.edge_graph) + graph_off
        n_node_arr[graph_off : graph_off + ng] = g.n_node
        n_edge_arr[graph_off : graph_off + ng] = g.n_edge
        node_off, edge_off, graph_off = node_off + nn_, edge_off + ne, graph_off + ng
    n_node_arr[-1] = n_node - node_off
    n_edge_arr[-1] = n_edge - edge_off

    node_attrs = _pad_irreps_dict([g.node_attrs for g in graphs], n_node, "node_attrs")
    edge_attrs = _pad_irreps_dict([g.edge_attrs for g in graphs], n_edge, "edge_attrs")
    globals_ = _pad_irreps_dict([g.globals for g in graphs], n_graph, "globals")
    cast = lambda d: {k: e3nn.IrrepsArray(v.irreps, v.array.astype(dtype)) for k, v in d.items()}  # noqa: E731

    return Graph(
        positions=positions,
        species=species,
        cells=cells,
        senders=senders,
        receivers=receivers,
        shifts=shifts,
        node_graph=node_graph,
        edge_graph=edge_graph,
        n_node=n_node_arr,
        n_edge=n_edge_arr,
        node_mask=np.arange(n_node) < node_off,
        edge_mask=np.arange(n_edge) < edge_off,
        graph_mask=np.arange(n_graph) < graph_off,
        node_attrs=cast(node_attrs),
        edge_attrs=cast(edge_attrs),
        globals=cast(globals_),
    )


def _round_up(n: int, minimum: int) -> int:
    """Smallest value >= n in {minimum} U {2^k, 3*2^(k-1)}: at most 50 % padding, few shapes."""
    n = max(int(n), minimum)
    k = max(0, math.ceil(math.log2(n)))
    candidates = [2**k, 3 * 2 ** (k - 2) if k >= 2 else 2**k]
    return min(c for c in candidates if c >= n)


def padding_bucket(n_node: int, n_edge: int, n_graph: int) -> tuple[int, int, int]:
    """Padded ``(N, E, G)`` for a batch with these real totals (reserving the padding slots).

    Sizes are rounded up to the sequence 1, 2, 3, 4, 6, 8, 12, 16, 24, ... so a training run
    sees a handful of shapes (one jit compilation each) with at most 50 % padding.
    """
    return (
        _round_up(n_node + 1, 2),
        _round_up(max(n_edge, 1), 2),
        _round_up(n_graph + 1, 2),
    )


class PaddingBuckets:
    """Chooses fixed padded shapes for batches of graphs.

    ``PaddingBuckets()`` rounds each batch up with :func:`padding_bucket`;
    ``PaddingBuckets.fixed(graphs, batch_size)`` gives one shape large enough for any batch of
    ``batch_size`` graphs of the dataset (a single compilation).
    """

    def __init__(self, fixed_shape: tuple[int, int, int] | None = None):
        self.fixed_shape = fixed_shape

    @classmethod
    def fixed(cls, graphs: Sequence[Graph], batch_size: int) -> PaddingBuckets:
        nodes = sorted((int(np.sum(g.n_node)) for g in graphs), reverse=True)[:batch_size]
        edges = sorted((int(np.sum(g.n_edge)) for g in graphs), reverse=True)[:batch_size]
        return cls(padding_bucket(sum(nodes), sum(edges), batch_size))

    def shape(self, graphs: Sequence[Graph]) -> tuple[int, int, int]:
        n = sum(int(np.sum(g.n_node)) for g in graphs)
        e = sum(int(np.sum(g.n_edge)) for g in graphs)
        g_ = sum(len(g.n_node) for g in graphs)
        if self.fixed_shape is not None:
            N, E, G = self.fixed_shape
            if n + 1 > N or e > E or g_ + 1 > G:
                raise ValueError(f"batch ({n} nodes, {e} edges, {g_} graphs) exceeds fixed padding {self.fixed_shape}")
            return self.fixed_shape
        return padding_bucket(n, e, g_)

    def __call__(self, graphs: Sequence[Graph], dtype=np.float32) -> Graph:
        return batch_graphs(graphs, *self.shape(graphs), dtype=dtype)
