"""Padded, jit-friendly batches of a dataset for a model config: :func:`make_batches` and :func:`build_graphs`.

A :class:`Batch` is a padded :class:`~aiida_eqml.ml.graph.Graph` (``graph.py``) with the targets whose names match
the model's heads as irreps arrays (Cartesian labels converted with ``tensors.py``) and boolean masks: padding and
missing (NaN) labels are masked. The dataset is a :class:`aiida_eqml.ml.dataset.Dataset` (which re-exports these
names); it is passed in, not imported, because ``dataset.py`` is the module that re-exports this one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from aiida_eqml.ml.samples import Sample

__all__ = ["Batch", "target_irreps_type", "build_graphs", "make_batches"]


@dataclasses.dataclass
class Batch:
    """A padded batch: graph + per-head irreps targets and boolean masks (True = real label).

    ``targets[name]`` is an ``e3nn.IrrepsArray`` of shape ``[N|E|G, irreps.dim]`` (padding and
    missing labels hold zeros); ``masks[name]`` has shape ``[N|E|G]``.
    """

    graph: Any
    targets: dict
    masks: dict
    sample_indices: np.ndarray  # [G] index into the dataset of each graph slot, -1 on padding


def _label_mask(values: np.ndarray, entry_ndim: int) -> np.ndarray:
    """An entry is labelled when all its components are finite (NaN anywhere = missing)."""
    axes = tuple(range(values.ndim - entry_ndim, values.ndim))
    return np.all(np.isfinite(values), axis=axes) if axes else np.isfinite(values)


def target_irreps_type(spec: Mapping[str, Any]):
    """``(irreps, to_irreps)`` for a target spec: Cartesian tensors go through ``tensors.py``."""
    import e3nn_jax as e3nn

    if "tensor" in spec:
        from aiida_eqml.ml.tensors import tensor_type

        ttype = tensor_type(spec["tensor"])
        return ttype.irreps, lambda x: np.asarray(ttype.to_irreps(np.asarray(x, np.float64)).array)
    irreps = e3nn.Irreps(spec["irreps"])
    return irreps, lambda x: np.asarray(x, np.float64).reshape(x.shape[0], irreps.dim)


def _config_species(model_config: Mapping[str, Any]) -> list[str]:
    import ase.data

    species = list(model_config["species"])
    # Accept atomic numbers or symbols in the config; graph.py works with symbols.
    return [ase.data.chemical_symbols[int(s)] if not isinstance(s, str) else s for s in species]


def build_graphs(dataset, model_config: Mapping[str, Any]) -> list:
    """One unpadded :class:`~aiida_eqml.ml.graph.Graph` per sample of a :class:`~aiida_eqml.ml.dataset.Dataset`
    (cutoff/species of the model).

    Unknown elements raise ``ValueError`` naming the sample.
    """
    import ase.data
    import e3nn_jax as e3nn

    from aiida_eqml.ml.graph import graph_from_atoms

    species = _config_species(model_config)
    cutoff = float(model_config["cutoff"])
    attr_irreps = dict(model_config.get("node_attrs", {}))
    edge_attr_irreps = dict(model_config.get("edge_attrs", {}))
    graphs = []
    for index, s in enumerate(dataset.samples):
        symbols = [ase.data.chemical_symbols[int(z)] for z in s.numbers]
        unknown = sorted(set(symbols) - set(species))
        if unknown:
            raise ValueError(f"{s.label(index)}: element(s) {unknown} not in the model's species {species}")
        node_attrs = {}
        for name, irreps in attr_irreps.items():
            if name not in s.node_attrs:
                raise ValueError(
                    f"{s.label(index)}: the model needs node attribute {name!r}, the sample has {list(s.node_attrs)}"
                )
            node_attrs[name] = e3nn.IrrepsArray(irreps, s.node_attrs[name].reshape(s.n_atoms, -1))
        edge_attrs = {}
        for name, irreps in edge_attr_irreps.items():
            if name not in s.edge_attrs:
                raise ValueError(
                    f"{s.label(index)}: the model needs edge attribute {name!r}, the sample has {list(s.edge_attrs)}"
                )
            ev = s.edge_attrs[name]
            # reshape to the irreps' width, not -1: a sample without such couples (a DFT+U label in a U+V record)
            # has zero rows, and numpy cannot infer -1 from an empty array
            width = e3nn.Irreps(irreps).dim
            edge_attrs[name] = (ev.keys, e3nn.IrrepsArray(irreps, ev.values.reshape(len(ev.keys), width)))
        try:
            graphs.append(graph_from_atoms(s.to_ase(), cutoff, species, node_attrs=node_attrs, edge_attrs=edge_attrs))
        except ValueError as exc:
            raise ValueError(f"{s.label(index)}: {exc}") from exc
    return graphs


def _sample_targets(index, sample: Sample, graph, specs, heads) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-sample irreps targets ``[n|E|1, dim]`` (NaN -> 0) and label masks, by head name."""
    from aiida_eqml.ml.graph import match_edges

    out = {}
    for name in heads:
        spec = specs.get(name)
        if spec is None:
            continue  # the model predicts something this dataset has no label for
        irreps, to_irreps = target_irreps_type(spec)
        level = spec["level"]
        if level == "node":
            n = sample.n_atoms
            values = sample.node_targets.get(name)
            if values is None:
                out[name] = (np.zeros((n, irreps.dim)), np.zeros(n, bool))
                continue
            entry_ndim = values.ndim - 1
            mask = _label_mask(values, entry_ndim)
            out[name] = (to_irreps(np.where(np.isfinite(values), values, 0.0).reshape(values.shape)), mask)
        elif level == "graph":
            values = sample.graph_targets.get(name)
            if values is None:
                out[name] = (np.zeros((1, irreps.dim)), np.zeros(1, bool))
                continue
            mask = np.array([np.all(np.isfinite(values))])
            out[name] = (to_irreps(np.where(np.isfinite(values), values, 0.0)[None]), mask)
        else:
            n_edges = len(graph.senders)
            array, mask = np.zeros((n_edges, irreps.dim)), np.zeros(n_edges, bool)
            ev = sample.edge_targets.get(name)
            if ev is not None and len(ev.keys):
                where = match_edges(graph.senders, graph.receivers, graph.shifts, ev.keys)
                if np.any(where < 0):
                    missing = ev.keys[where < 0][:3].tolist()
                    raise ValueError(
                        f"{sample.label(index)}: edge target {name!r}: keys {missing} are not edges of the graph "
                        "(beyond the cutoff?)"
                    )
                values = ev.values
                entry_mask = _label_mask(values, values.ndim - 1)
                array[where] = to_irreps(np.where(np.isfinite(values), values, 0.0))
                mask[where] = entry_mask
            out[name] = (array, mask)
    return out


def make_batches(
    dataset,
    model_config: Mapping[str, Any],
    batch_size: int,
    buckets=None,
    *,
    order: Sequence[int] | None = None,
    graphs: Sequence | None = None,
    dtype=np.float32,
    drop_last: bool = False,
) -> list[Batch]:
    """Padded batches of ``batch_size`` samples of a :class:`~aiida_eqml.ml.dataset.Dataset` for the model
    described by ``model_config``.

    Args:
        model_config: needs ``species`` (symbols or atomic numbers), ``cutoff`` and ``heads``
            (``{name: {...}}``); targets whose name matches a head become irreps arrays via
            ``tensors.py``; NaN labels and padding are masked.
        buckets: a :class:`~aiida_eqml.ml.graph.PaddingBuckets`; default: one fixed shape large
            enough for any batch of this dataset (a single jit compilation).
        order: sample order (e.g. a shuffled permutation); default dataset order.
        graphs: precomputed :func:`build_graphs` output (saves the neighbour lists every epoch).
    """
    import e3nn_jax as e3nn

    from aiida_eqml.ml.graph import PaddingBuckets

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if graphs is None:
        graphs = build_graphs(dataset, model_config)
    if len(graphs) != len(dataset):
        raise ValueError(f"{len(graphs)} graphs for {len(dataset)} samples")
    if buckets is None:
        buckets = PaddingBuckets.fixed(graphs, batch_size)
    heads = dict(model_config.get("heads", {}))
    order = list(range(len(dataset))) if order is None else [int(i) for i in order]
    batches = []
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        if drop_last and len(chunk) < batch_size:
            break
        chunk_graphs = [graphs[i] for i in chunk]
        graph = buckets(chunk_graphs, dtype=dtype)
        N, E, G = graph.num_nodes, graph.num_edges, graph.num_graphs
        per_sample = [_sample_targets(i, dataset.samples[i], graphs[i], dataset.target_specs, heads) for i in chunk]
        targets, masks = {}, {}
        for name in per_sample[0] if per_sample else ():
            irreps, _ = target_irreps_type(dataset.target_specs[name])
            size = {"node": N, "edge": E, "graph": G}[dataset.target_specs[name]["level"]]
            values = np.concatenate([p[name][0] for p in per_sample], axis=0)
            mask = np.concatenate([p[name][1] for p in per_sample], axis=0)
            padded = np.zeros((size, irreps.dim), dtype)
            padded[: len(values)] = values
            padded_mask = np.zeros(size, bool)
            padded_mask[: len(mask)] = mask
            targets[name] = e3nn.IrrepsArray(irreps, padded)
            masks[name] = padded_mask
        sample_indices = np.full(G, -1, np.int64)
        sample_indices[: len(chunk)] = chunk
        batches.append(Batch(graph=graph, targets=targets, masks=masks, sample_indices=sample_indices))
    return batches
