"""The :class:`Predictor`: one model or an ensemble, ``ase.Atoms`` (+ attributes) -> Cartesian tensors.

Loading from files and the process cache are :mod:`aiida_eqml.ml.predict`, which re-exports these names (import them
from there). What a Predictor does for every caller:

* graphs from ``ase.Atoms`` with :func:`~aiida_eqml.ml.graph.graph_from_atoms`, node / edge attributes given as in
  the :mod:`~aiida_eqml.ml.dataset` record (``{name: [n, ...]}``, ``{name: (keys [M, 5], values [M, ...])}``; node
  attributes may also come from ``atoms.arrays``), with checks that raise :class:`PredictionError` naming the field;
* a jitted apply over padded batches (:class:`~aiida_eqml.ml.graph.PaddingBuckets`): one trace per padding bucket
  and model config, shared by every Predictor of the process (:attr:`Predictor.trace_count` counts them); members
  with the same config run as one ``vmap`` over their stacked weights;
* the irreps -> Cartesian conversion of tensor heads (:func:`to_cartesian`, :mod:`~aiida_eqml.ml.tensors`);
* the ensemble mean and population standard deviation (:func:`ensemble_statistics`).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from aiida_eqml.ml.xla_cache import enable_compilation_cache

__all__ = ["PredictionError", "Predictor", "ensemble_statistics", "to_cartesian"]


class PredictionError(ValueError):
    """Inputs the model(s) cannot predict for.

    ``field`` names what is wrong: ``"species"``, ``"node_attrs.<name>"``, ``"edge_attrs.<name>"``, ``"structure"``
    or ``"ensemble"`` (members that cannot be combined); ``value`` is the offending value (e.g. unknown elements).
    """

    def __init__(self, message: str, field: str, value: Any = None):
        super().__init__(message)
        self.field = field
        self.value = value


def ensemble_statistics(
    predictions: Sequence[Mapping[str, np.ndarray]], always_std: bool = False
) -> dict[str, np.ndarray]:
    """Mean of each array over the members, ``<name>_std`` the population standard deviation; ``*_keys`` unchanged.

    With one member there is no ``_std`` unless ``always_std`` (then zeros).
    """
    out = {}
    for name in predictions[0]:
        if name.endswith("_keys"):
            out[name] = predictions[0][name]
            continue
        stack = np.stack([np.asarray(p[name]) for p in predictions])
        out[name] = stack.mean(axis=0)
        if len(predictions) > 1 or always_std:
            out[f"{name}_std"] = stack.std(axis=0)
    return out


def to_cartesian(values, spec: Mapping[str, Any] | None = None, head=None) -> np.ndarray:
    """Irreps ``[..., dim]`` -> Cartesian ``[..., 3, ..., 3]`` when the target ``spec`` (``"tensor"``) or the model
    ``head`` (:class:`~aiida_eqml.ml.models.HeadSpec`) is a tensor; otherwise the values unchanged."""
    from aiida_eqml.ml.tensors import tensor_type

    ttype = tensor_type(spec["tensor"]) if spec and "tensor" in spec else getattr(head, "tensor", None)
    values = np.asarray(values, np.float64)
    return np.asarray(ttype.to_cartesian(values), np.float64) if ttype is not None else values


# ====================================================================== compiled apply, shared per model config
class _Compiled:
    """``jit(vmap(model.apply))`` over stacked member weights; ``traces`` counts how often jax traced it (once per
    padding bucket and ensemble size: a trace per call would mean a compilation per call)."""

    def __init__(self, model):
        import jax

        self.traces = 0

        def run(stacked_params, graph):
            self.traces += 1  # Python side effect: runs only while tracing
            return jax.vmap(lambda p: {k: v.array for k, v in model.apply(p, graph).items()})(stacked_params)

        self.fn = jax.jit(run)


_COMPILED: dict[str, _Compiled] = {}
_LOCK = threading.Lock()  # guards _COMPILED: Predictors are built in warm-up threads too


def _compiled(config_key: str, model) -> _Compiled:
    with _LOCK:
        if config_key not in _COMPILED:
            _COMPILED[config_key] = _Compiled(model)
        return _COMPILED[config_key]


class _Group:
    """Members with one config: one compiled function, stacked weights, one kind of graph."""

    def __init__(self, indices, model, params_list, metadata):
        import jax
        import jax.numpy as jnp

        self.indices = list(indices)
        self.model = model
        self.config = model.config
        self.key = json.dumps(self.config, sort_keys=True)
        self.compiled = _compiled(self.key, model)
        self.params = jax.tree_util.tree_map(lambda *x: jnp.stack([jnp.asarray(v) for v in x]), *params_list)
        self.metadata = metadata
        self.species = _symbols(self.config["species"])
        self.node_attrs = dict(self.config.get("node_attrs") or {})
        self.edge_attrs = dict(self.config.get("edge_attrs") or {})
        self.graph_key = json.dumps([self.species, float(self.config["cutoff"]), self.node_attrs, self.edge_attrs])
        self.dtype = np.dtype(self.config["dtype"])


def _symbols(species) -> list[str]:
    import ase.data

    return [ase.data.chemical_symbols[int(s)] if not isinstance(s, str) else s for s in species]


def _edge_pair(value):
    """``(keys [M, 5], values [M, ...])`` from an EdgeValues, a mapping or a pair."""
    if hasattr(value, "keys") and hasattr(value, "values") and not isinstance(value, Mapping):
        keys, values = value.keys, value.values
    elif isinstance(value, Mapping):
        keys, values = value["keys"], value["values"]
    else:
        keys, values = value
    return np.asarray(keys, np.int64).reshape(-1, 5), np.asarray(values, np.float64)


# ====================================================================== the Predictor
class Predictor:
    """One model or an ensemble ``[(model, params, metadata), ...]`` with the same heads (names, levels, irreps).

    Members may differ in architecture, cutoff or normalisation; graphs are built once per (species, cutoff,
    attributes) and each distinct config is one compiled function. ``batch_size`` structures are padded together.
    """

    def __init__(self, members: Sequence[tuple], *, batch_size: int = 8, names: Sequence[str] | None = None):
        if not members:
            raise PredictionError("a predictor needs at least one model", "ensemble")
        self.compilation_cache_dir = enable_compilation_cache()
        members = [tuple(m) + ({},) * (3 - len(m)) for m in members]
        self.models = [m[0] for m in members]
        self.metadata = [dict(m[2] or {}) for m in members]
        self.names = list(names) if names is not None else [f"member {k}" for k in range(len(members))]
        self.batch_size = int(batch_size)
        reference = self.models[0]
        signature = lambda model: {n: (h.level, str(h.irreps)) for n, h in model.heads.items()}  # noqa: E731
        for name, model in zip(self.names, self.models):
            if signature(model) != signature(reference):
                raise PredictionError(
                    f"ensemble members predict different heads: {name} {signature(model)} vs {self.names[0]} "
                    f"{signature(reference)}", "ensemble")
        # One group per config and Hubbard descriptor slots (members that read the occupations differently).
        grouped: dict[str, list[int]] = {}
        for k, (model, meta) in enumerate(zip(self.models, self.metadata)):
            key = json.dumps([model.config, meta.get("hubbard")], sort_keys=True)
            grouped.setdefault(key, []).append(k)
        self._groups = [
            _Group(idx, self.models[idx[0]], [members[k][1] for k in idx], self.metadata[idx[0]])
            for idx in grouped.values()
        ]
        self.heads = dict(reference.heads)
        self.target_specs = dict(self.metadata[0].get("target_specs") or {})
        self.energy_head = reference.energy_head

    @classmethod
    def from_model(cls, model, params, metadata: Mapping | None = None, **kwargs) -> Predictor:
        return cls([(model, params, dict(metadata or {}))], **kwargs)

    def __len__(self) -> int:
        return len(self.models)

    def __repr__(self) -> str:
        return f"Predictor({len(self)} member(s), species={self.species}, heads={list(self.heads)})"

    @property
    def config(self) -> dict:
        return self.models[0].config

    @property
    def species(self) -> list[str]:
        """Elements every member knows."""
        known = [set(g.species) for g in self._groups]
        return [s for s in self._groups[0].species if all(s in k for k in known)]

    @property
    def trace_count(self) -> int:
        """How many times the compiled functions of these members were traced (one per padding bucket)."""
        return sum(g.compiled.traces for g in {id(g.compiled): g for g in self._groups}.values())

    # ---------------------------------------------------------------- graphs and checks
    def _graph(self, group: _Group, atoms, node_attrs, edge_attrs, where: str):
        import e3nn_jax as e3nn

        from aiida_eqml.ml.graph import graph_from_atoms

        symbols = atoms.get_chemical_symbols()
        unknown = sorted(set(symbols) - set(group.species))
        if unknown:
            raise PredictionError(
                f"{where}element(s) {unknown} not in the model's species {group.species}", "species", unknown)
        n = len(atoms)
        given = {**{k: v for k, v in atoms.arrays.items() if k in group.node_attrs}, **dict(node_attrs or {})}
        nodes = {}
        for name, irreps in group.node_attrs.items():
            dim = e3nn.Irreps(irreps).dim
            if name not in given:
                raise PredictionError(
                    f"{where}the model needs node attribute {name!r} ({irreps}: [{n}, {dim}] for this structure); "
                    f"given: {sorted(given) or 'none'}", f"node_attrs.{name}")
            values = np.asarray(given[name], np.float64)
            if values.size != n * dim:
                raise PredictionError(
                    f"{where}node attribute {name!r} has shape {values.shape}, the model needs [{n}, {dim}] ({irreps})",
                    f"node_attrs.{name}", values.shape)
            if not np.all(np.isfinite(values)):
                raise PredictionError(f"{where}node attribute {name!r} has non-finite values", f"node_attrs.{name}")
            nodes[name] = e3nn.IrrepsArray(irreps, values.reshape(n, dim))
        given_edges = dict(edge_attrs or {})
        edges = {}
        for name, irreps in group.edge_attrs.items():
            dim = e3nn.Irreps(irreps).dim
            if name not in given_edges:
                raise PredictionError(
                    f"{where}the model needs edge attribute {name!r} ({irreps}: keys [M, 5] (i, j, S1, S2, S3) and "
                    f"values [M, {dim}]); given: {sorted(given_edges) or 'none'}", f"edge_attrs.{name}")
            keys, values = _edge_pair(given_edges[name])
            if values.size != len(keys) * dim or not np.all(np.isfinite(values)):
                raise PredictionError(
                    f"{where}edge attribute {name!r}: values of shape {values.shape} for {len(keys)} keys, the model "
                    f"needs [{len(keys)}, {dim}] finite values ({irreps})", f"edge_attrs.{name}", values.shape)
            edges[name] = (keys, e3nn.IrrepsArray(irreps, values.reshape(len(keys), dim)))
        try:
            return graph_from_atoms(
                atoms, float(group.config["cutoff"]), group.species, node_attrs=nodes, edge_attrs=edges
            )
        except ValueError as exc:
            field = next((f"edge_attrs.{k}" for k in edges if repr(k) in str(exc)), "structure")
            raise PredictionError(f"{where}{exc}", field) from exc

    def graph(self, atoms, node_attrs=None, edge_attrs=None):
        """The unpadded graph the first member reads (checks included)."""
        return self._graph(self._groups[0], atoms, node_attrs, edge_attrs, "")

    # ---------------------------------------------------------------- apply
    def _member_outputs(self, items: Sequence[tuple], graphs: Mapping[str, Sequence] | None = None, groups=None,
                        into: list[dict] | None = None) -> list[dict]:
        """Per item ``(atoms, node_attrs, edge_attrs, where)``: ``{head: [members, ...] Cartesian}`` (+ ``_keys``).

        ``groups``: only these member groups (their members' entries filled in ``into``, the others left as they
        are); the result is stacked with :meth:`_stack` once every member is filled."""
        from aiida_eqml.ml.graph import PaddingBuckets, match_edges

        buckets = PaddingBuckets()
        groups = self._groups if groups is None else groups
        per_key: dict[str, list] = {}
        for group in groups:  # neighbour lists once per kind of graph
            if group.graph_key not in per_key:
                per_key[group.graph_key] = list(graphs[group.graph_key]) if graphs and group.graph_key in graphs else [
                    self._graph(group, *item) for item in items
                ]
        results = [{} for _ in items] if into is None else into
        for group in groups:
            group_graphs = per_key[group.graph_key]
            for start in range(0, len(items), self.batch_size):
                chunk = group_graphs[start : start + self.batch_size]
                out = group.compiled.fn(group.params, buckets(chunk, dtype=group.dtype))
                out = {name: np.asarray(v, np.float64) for name, v in out.items()}
                node_off = edge_off = 0
                for k, g in enumerate(chunk):
                    n, e = len(g.positions), len(g.senders)
                    entry = results[start + k]
                    for name, head in self.heads.items():
                        values = out[name]
                        rows = {"node": values[:, node_off : node_off + n], "edge": values[:, edge_off : edge_off + e],
                                "graph": values[:, k]}[head.level]
                        entry.setdefault(name, [None] * len(self))
                        cart = to_cartesian(rows, self.target_specs.get(name), head)
                        if head.level == "edge":
                            keys = np.concatenate(
                                [np.asarray(g.senders, np.int64)[:, None], np.asarray(g.receivers, np.int64)[:, None],
                                 np.rint(np.asarray(g.shifts)).astype(np.int64)], axis=1)
                            first = entry.setdefault(f"{name}_keys", keys)
                            if not np.array_equal(first, keys):
                                # members with another cutoff: their values on the first group's edges, NaN where
                                # they have no such edge (a Hubbard V couple lies within every member's cutoff)
                                where = match_edges(keys[:, 0], keys[:, 1], keys[:, 2:], first)
                                found = (where >= 0).reshape((1, -1) + (1,) * (cart.ndim - 2))
                                cart = np.where(found, cart[:, np.maximum(where, 0)], np.nan)
                        for m, index in enumerate(group.indices):
                            entry[name][index] = cart[m]
                    node_off, edge_off = node_off + n, edge_off + e
        return results

    def _stack(self, results: list[dict], members: bool) -> list[dict]:
        """Member lists -> ``[members, ...]`` arrays, or (``members=False``) the ensemble mean and std."""
        stacked = [{k: (v if k.endswith("_keys") else np.stack(v)) for k, v in r.items()} for r in results]
        if members:
            return stacked
        return [ensemble_statistics([{k: (v if k.endswith("_keys") else v[m]) for k, v in r.items()}
                                     for m in range(len(self))]) for r in stacked]

    def _items(self, structures, node_attrs, edge_attrs) -> list[tuple]:
        single = not isinstance(structures, (list, tuple))
        structures = [structures] if single else list(structures)
        node_attrs = (
            [node_attrs] * len(structures)
            if single or isinstance(node_attrs, Mapping) or node_attrs is None
            else node_attrs
        )
        edge_attrs = (
            [edge_attrs] * len(structures)
            if single or isinstance(edge_attrs, Mapping) or edge_attrs is None
            else edge_attrs
        )
        where = (lambda i: "") if single else (lambda i: f"structure {i}: ")
        return [(a, na, ea, where(i)) for i, (a, na, ea) in enumerate(zip(structures, node_attrs, edge_attrs))]

    def predict(self, atoms, node_attrs=None, edge_attrs=None, *, members: bool = False):
        """Cartesian predictions for one ``ase.Atoms`` (a dict) or a list of them (a list of dicts).

        Ensembles: each head is the mean, ``<head>_std`` the population std over the members; ``members=True``
        gives ``{head: [members, ...]}`` instead. For a list, ``node_attrs`` / ``edge_attrs`` are one mapping per
        structure (or one mapping for all).
        """
        items = self._items(atoms, node_attrs, edge_attrs)
        out = []
        for start in range(0, len(items), self.batch_size):  # graphs of one batch at a time in memory
            out.extend(self._stack(self._member_outputs(items[start : start + self.batch_size]), members))
        return out if isinstance(atoms, (list, tuple)) else out[0]

    def iter_predict(self, structures: Iterable, progress: bool = False, **kwargs):
        """``(atoms, prediction)`` for each structure of an iterable, ``batch_size`` at a time (tqdm bar)."""
        from tqdm.auto import tqdm

        chunk = []
        for atoms in tqdm(structures, disable=not progress, desc="predicting", unit="structure"):
            chunk.append(atoms)
            if len(chunk) == self.batch_size:
                yield from zip(chunk, self.predict(chunk, **kwargs))
                chunk = []
        if chunk:
            yield from zip(chunk, self.predict(chunk, **kwargs))

    def predict_dataset(self, dataset, *, members: bool = False, graphs=None) -> list[dict]:
        """:meth:`predict` for every sample of a :class:`~aiida_eqml.ml.dataset.Dataset` (attributes from the
        samples). ``graphs``: precomputed unpadded graphs of the first member's kind (``build_graphs``)."""
        items = [(s.to_ase(), s.node_attrs, s.edge_attrs, f"{s.label(i)}: ") for i, s in enumerate(dataset.samples)]
        given = {self._groups[0].graph_key: graphs} if graphs is not None else None
        return self._stack(self._member_outputs(items, given), members) if items else []

    def predict_hubbard(self, record, *, members: bool = False, graphs=None) -> list[dict]:
        """U / V per sample of a Hubbard record (raw occupations) or of its descriptor dataset:
        ``{"hubbard_u": [n] (NaN off the Hubbard sites), "hubbard_v": [M], "hubbard_v_keys": [M, 5]}`` plus
        ``_std`` (0 for one member); ``members=True``: ``[members, ...]`` arrays (see
        :func:`aiida_eqml.ml.hubbard.models.hubbard_predictions`)."""
        from aiida_eqml.ml.hubbard.models import hubbard_predictions

        return hubbard_predictions(self, record, members=members, graphs=graphs)

