"""The dataset record shared by every producer and consumer of training data.

A :class:`Dataset` is a list of :class:`Sample` (one atomic structure each, with Cartesian
labels as DFT gives them) plus ``target_specs`` describing every label::

    {"born_charges": {"level": "node", "tensor": "ij", "unit": "e"},
     "dielectric":   {"level": "graph", "tensor": "ij=ji", "unit": "1"},
     "hubbard_v":    {"level": "edge", "irreps": "0e", "unit": "eV"}}

NaN marks a missing label (masked in the loss); any other non-finite number is an error.
The on-disk format is one ``.npz`` (arrays concatenated over samples + per-sample counts,
metadata as a JSON string) that loads with ``allow_pickle=False``.

``make_batches`` turns a dataset into padded, jit-friendly batches (``Graph`` + irreps targets +
masks) for a model config; it uses ``graph.py`` and ``tensors.py``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "LEVELS",
    "DATASET_FORMAT",
    "DATASET_SCHEMA_VERSION",
    "EdgeTarget",
    "EdgeValues",
    "Sample",
    "Dataset",
    "target_shape",
    "make_batches",
    "Batch",
]

LEVELS = ("node", "edge", "graph")
DATASET_FORMAT = "aiida-eqml-dataset"
DATASET_SCHEMA_VERSION = 1
# Separator inside npz member names; chosen because it cannot appear in a Python identifier
# (target names are identifiers) and avoids '/' (zip directories).
_SEP = "::"
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_MAX_Z = 118


@dataclasses.dataclass
class EdgeValues:
    """Values living on directed periodic edges, keyed by ``(i, j, S1, S2, S3)``.

    ``keys[m] = (sender, receiver, shift)`` with the edge vector
    ``positions[j] - positions[i] + S @ cell`` (the Graph convention of docs/architecture.md),
    so two periodic images of the same pair are two distinct entries.
    """

    keys: np.ndarray  # [M, 5] int
    values: np.ndarray  # [M, ...]

    def __post_init__(self):
        self.keys = np.asarray(self.keys, dtype=np.int64).reshape(-1, 5)
        self.values = np.asarray(self.values, dtype=np.float64)


# The architecture contract calls edge labels ``EdgeTarget``; edge inputs use the same record.
EdgeTarget = EdgeValues


@dataclasses.dataclass
class Sample:
    """One structure with its labels (Cartesian, physical units) and extra inputs."""

    numbers: np.ndarray  # [n] int atomic numbers
    positions: np.ndarray  # [n, 3] Angstrom
    cell: np.ndarray  # [3, 3] lattice vectors as rows, Angstrom
    pbc: np.ndarray  # [3] bool
    node_targets: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    graph_targets: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    edge_targets: dict[str, EdgeValues] = dataclasses.field(default_factory=dict)
    node_attrs: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    edge_attrs: dict[str, EdgeValues] = dataclasses.field(default_factory=dict)
    info: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        self.numbers = np.asarray(self.numbers, dtype=np.int64).reshape(-1)
        self.positions = np.asarray(self.positions, dtype=np.float64)
        self.cell = np.asarray(self.cell, dtype=np.float64)
        self.pbc = np.broadcast_to(np.asarray(self.pbc, dtype=bool), (3,)).copy()
        self.node_targets = {k: np.asarray(v, dtype=np.float64) for k, v in self.node_targets.items()}
        self.graph_targets = {k: np.asarray(v, dtype=np.float64) for k, v in self.graph_targets.items()}
        self.node_attrs = {k: np.asarray(v, dtype=np.float64) for k, v in self.node_attrs.items()}
        self.edge_targets = {k: _as_edge_values(v) for k, v in self.edge_targets.items()}
        self.edge_attrs = {k: _as_edge_values(v) for k, v in self.edge_attrs.items()}
        self.info = dict(self.info)

    @property
    def n_atoms(self) -> int:
        return int(self.numbers.shape[0])

    def label(self, index: int) -> str:
        """A human name for error messages: ``info['name']`` when present, else the index."""
        name = self.info.get("name")
        return f"sample {index} ({name!r})" if name is not None else f"sample {index}"

    def to_ase(self):
        import ase

        return ase.Atoms(numbers=self.numbers, positions=self.positions, cell=self.cell, pbc=self.pbc)

    @classmethod
    def from_ase(cls, atoms, **kwargs) -> Sample:
        return cls(
            numbers=atoms.numbers,
            positions=atoms.positions,
            cell=np.asarray(atoms.cell[:]),
            pbc=atoms.pbc,
            **kwargs,
        )


def _as_edge_values(value) -> EdgeValues:
    if isinstance(value, EdgeValues):
        return value
    if isinstance(value, Mapping):
        return EdgeValues(keys=value["keys"], values=value["values"])
    keys, values = value
    return EdgeValues(keys=keys, values=values)


def target_shape(spec: Mapping[str, Any]) -> tuple[int, ...]:
    """Per-entry Cartesian shape of a label (without the node/edge axis).

    ``{"tensor": "ijk=jik"}`` -> ``(3, 3, 3)`` (the tensor's Cartesian shape, see ``tensors.py``);
    ``{"irreps": "1o+2e"}`` -> ``(8,)``; ``{"shape": [...]}`` is accepted for plain arrays.
    """
    if "tensor" in spec:
        from aiida_eqml.ml.tensors import tensor_type

        return tuple(tensor_type(spec["tensor"]).shape)
    if "irreps" in spec:
        import e3nn_jax as e3nn

        return (e3nn.Irreps(spec["irreps"]).dim,)
    if "shape" in spec:
        return tuple(int(s) for s in spec["shape"])
    raise ValueError(f"target spec {dict(spec)!r} needs a 'tensor' formula or an 'irreps' string")


def _check_spec(name: str, spec: Mapping[str, Any]) -> None:
    if not _NAME_RE.match(name):
        raise ValueError(f"target name {name!r} must be an identifier (letters, digits, '_')")
    level = spec.get("level")
    if level not in LEVELS:
        raise ValueError(f"target {name!r}: unknown level {level!r}; expected one of {LEVELS}")
    target_shape(spec)


class Dataset:
    """A list of samples plus the specification of every target they carry."""

    def __init__(
        self, samples: Sequence[Sample], target_specs: Mapping[str, Mapping[str, Any]], *, validate: bool = True
    ):
        self.samples = list(samples)
        self.target_specs = {k: dict(v) for k, v in target_specs.items()}
        if validate:
            self.validate()

    # ------------------------------------------------------------------ container protocol
    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)):
            return self.samples[index]
        if isinstance(index, slice):
            return Dataset(self.samples[index], self.target_specs, validate=False)
        return self.subset(index)

    def __iter__(self):
        return iter(self.samples)

    def subset(self, indices: Iterable[int]) -> Dataset:
        return Dataset([self.samples[int(i)] for i in indices], self.target_specs, validate=False)

    def __repr__(self) -> str:
        return f"Dataset({len(self)} samples, targets={list(self.target_specs)})"

    @property
    def atomic_numbers(self) -> list[int]:
        """Sorted distinct atomic numbers over all samples."""
        if not self.samples:
            return []
        return sorted(int(z) for z in np.unique(np.concatenate([s.numbers for s in self.samples])))

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ``ValueError`` naming sample, field, expected and found values for any fault."""
        for name, spec in self.target_specs.items():
            _check_spec(name, spec)
        for index, sample in enumerate(self.samples):
            self._validate_sample(index, sample)

    def _validate_sample(self, index: int, s: Sample) -> None:
        where = s.label(index)
        n = s.n_atoms
        if n == 0:
            raise ValueError(f"{where}: has no atoms")
        if np.any(s.numbers < 1) or np.any(s.numbers > _MAX_Z):
            bad = s.numbers[(s.numbers < 1) | (s.numbers > _MAX_Z)]
            raise ValueError(f"{where}: atomic numbers must be in 1..{_MAX_Z}, got {bad.tolist()}")
        if s.positions.shape != (n, 3):
            raise ValueError(f"{where}: positions: expected shape {(n, 3)}, got {s.positions.shape}")
        if not np.all(np.isfinite(s.positions)):
            rows = np.unique(np.nonzero(~np.isfinite(s.positions))[0]).tolist()
            raise ValueError(f"{where}: positions contain NaN/inf (atoms {rows})")
        if s.cell.shape != (3, 3):
            raise ValueError(f"{where}: cell: expected shape (3, 3), got {s.cell.shape}")
        if not np.all(np.isfinite(s.cell)):
            raise ValueError(f"{where}: cell contains NaN/inf")
        # The lattice vectors of the periodic directions must be linearly independent.
        if np.any(s.pbc) and np.linalg.matrix_rank(s.cell[s.pbc], tol=1e-6) < int(np.sum(s.pbc)):
            raise ValueError(
                f"{where}: the cell vectors of the periodic directions {s.pbc.tolist()} are degenerate: "
                f"{s.cell.tolist()}"
            )

        groups = (("node", s.node_targets), ("graph", s.graph_targets), ("edge", s.edge_targets))
        for level, targets in groups:
            for tname, value in targets.items():
                spec = self.target_specs.get(tname)
                if spec is None:
                    raise ValueError(
                        f"{where}: target {tname!r} is not declared in target_specs {list(self.target_specs)}"
                    )
                if spec["level"] != level:
                    raise ValueError(
                        f"{where}: target {tname!r} is declared at level {spec['level']!r} "
                        f"but given as a {level} target"
                    )
                per_entry = target_shape(spec)
                if level == "edge":
                    self._validate_edge(where, f"target {tname!r}", value, n, per_entry)
                    array = value.values
                else:
                    expected = ((n,) if level == "node" else ()) + per_entry
                    if value.shape != expected:
                        raise ValueError(f"{where}: target {tname!r}: expected shape {expected}, got {value.shape}")
                    array = value
                if np.any(np.isinf(array)):
                    raise ValueError(
                        f"{where}: target {tname!r} contains inf (only NaN is allowed, as a missing-label marker)"
                    )
        for aname, value in s.node_attrs.items():
            if value.ndim < 1 or value.shape[0] != n:
                raise ValueError(
                    f"{where}: node attribute {aname!r}: expected leading axis {n}, got shape {value.shape}"
                )
            if not np.all(np.isfinite(value)):
                raise ValueError(f"{where}: node attribute {aname!r} contains NaN/inf (inputs cannot be missing)")
        for aname, value in s.edge_attrs.items():
            self._validate_edge(where, f"edge attribute {aname!r}", value, n, None)
            if not np.all(np.isfinite(value.values)):
                raise ValueError(f"{where}: edge attribute {aname!r} contains NaN/inf (inputs cannot be missing)")
        try:
            json.dumps(s.info)
        except TypeError as exc:
            raise ValueError(f"{where}: info must be JSON-serialisable: {exc}") from exc

    @staticmethod
    def _validate_edge(where, what, value: EdgeValues, n, per_entry):
        m = value.keys.shape[0]
        if value.values.shape[:1] != (m,):
            raise ValueError(f"{where}: {what}: {m} keys but values of shape {value.values.shape}")
        if per_entry is not None and value.values.shape[1:] != per_entry:
            raise ValueError(f"{where}: {what}: expected shape {(m,) + per_entry}, got {value.values.shape}")
        if m and (value.keys[:, :2].min() < 0 or value.keys[:, :2].max() >= n):
            raise ValueError(f"{where}: {what}: edge keys reference atoms outside 0..{n - 1}")
        if m and len(np.unique(value.keys, axis=0)) != m:
            raise ValueError(f"{where}: {what}: duplicate edge keys (i, j, S)")

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write one compressed ``.npz`` (no pickled objects)."""
        self.validate()
        arrays: dict[str, np.ndarray] = {}
        samples = self.samples
        arrays["n_atoms"] = np.array([s.n_atoms for s in samples], dtype=np.int64)
        arrays["numbers"] = _concat([s.numbers for s in samples], (0,), np.int64)
        arrays["positions"] = _concat([s.positions for s in samples], (0, 3), np.float64)
        arrays["cells"] = np.array([s.cell for s in samples], dtype=np.float64).reshape(-1, 3, 3)
        arrays["pbc"] = np.array([s.pbc for s in samples], dtype=bool).reshape(-1, 3)

        layout: dict[str, dict[str, list[str]]] = {}
        for group in ("node_targets", "graph_targets", "edge_targets", "node_attrs", "edge_attrs"):
            names = sorted({k for s in samples for k in getattr(s, group)})
            layout[group] = names
            for name in names:
                present = np.array([name in getattr(s, group) for s in samples], dtype=bool)
                values = [getattr(s, group)[name] for s in samples if name in getattr(s, group)]
                key = f"{group}{_SEP}{name}"
                arrays[f"{key}{_SEP}present"] = present
                if group.startswith("edge"):
                    arrays[f"{key}{_SEP}count"] = np.array([v.keys.shape[0] for v in values], dtype=np.int64)
                    arrays[f"{key}{_SEP}keys"] = _concat([v.keys for v in values], (0, 5), np.int64)
                    arrays[f"{key}{_SEP}values"] = _concat([v.values for v in values], None, np.float64)
                elif group == "graph_targets":
                    arrays[f"{key}{_SEP}values"] = np.array(values, dtype=np.float64)
                else:
                    arrays[f"{key}{_SEP}values"] = _concat(values, None, np.float64)
        metadata = {
            "format": DATASET_FORMAT,
            "schema_version": DATASET_SCHEMA_VERSION,
            "target_specs": self.target_specs,
            "layout": layout,
            "info": [s.info for s in samples],
        }
        arrays["metadata"] = np.array(json.dumps(metadata))
        path = os.fspath(path)
        with open(path, "wb") as handle:  # an open handle stops numpy from appending '.npz'
            np.savez_compressed(handle, **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike, *, validate: bool = True) -> Dataset:
        """Read a file written by :meth:`save`; any fault is a :class:`~aiida_eqml.ml.dataset_file.DatasetError`
        naming file, field and value (the arrays are checked against the metadata before they are allocated)."""
        from aiida_eqml.ml.dataset_file import DatasetError, read_dataset_arrays

        metadata, arrays = read_dataset_arrays(path)
        try:
            return cls._from_arrays(metadata, arrays, validate)
        except DatasetError:
            raise
        except ValueError as exc:  # Dataset.validate: names sample, field and value
            raise DatasetError(f"{os.fspath(path)}: {exc}") from exc

    @classmethod
    def _from_arrays(cls, metadata: dict, arrays: dict, validate: bool) -> Dataset:
        n_atoms = arrays["n_atoms"]
        atom_offsets = np.concatenate([[0], np.cumsum(n_atoms)])
        n_samples = len(n_atoms)
        per_sample: list[dict[str, dict]] = [
            {g: {} for g in ("node_targets", "graph_targets", "edge_targets", "node_attrs", "edge_attrs")}
            for _ in range(n_samples)
        ]
        for group, names in metadata["layout"].items():
            for name in names:
                key = f"{group}{_SEP}{name}"
                present = np.nonzero(arrays[f"{key}{_SEP}present"])[0]
                values = arrays[f"{key}{_SEP}values"]
                if group.startswith("edge"):
                    counts = arrays[f"{key}{_SEP}count"]
                    offsets = np.concatenate([[0], np.cumsum(counts)])
                    keys = arrays[f"{key}{_SEP}keys"]
                    for k, i in enumerate(present):
                        sl = slice(offsets[k], offsets[k + 1])
                        per_sample[i][group][name] = EdgeValues(keys=keys[sl], values=values[sl])
                elif group == "graph_targets":
                    for k, i in enumerate(present):
                        per_sample[i][group][name] = values[k]
                else:
                    counts = n_atoms[present]
                    offsets = np.concatenate([[0], np.cumsum(counts)])
                    for k, i in enumerate(present):
                        per_sample[i][group][name] = values[offsets[k] : offsets[k + 1]]
        samples = []
        for i in range(n_samples):
            sl = slice(atom_offsets[i], atom_offsets[i + 1])
            samples.append(
                Sample(
                    numbers=arrays["numbers"][sl],
                    positions=arrays["positions"][sl],
                    cell=arrays["cells"][i],
                    pbc=arrays["pbc"][i],
                    info=metadata["info"][i],
                    **per_sample[i],
                )
            )
        return cls(samples, metadata["target_specs"], validate=validate)

    def to_extxyz(self, path: str | os.PathLike) -> None:
        """Write all samples as extended XYZ (ase); node/graph targets become arrays/info fields.

        Edge data has no natural extxyz representation and is skipped.
        """
        import ase.io

        frames = []
        for s in self.samples:
            atoms = s.to_ase()
            for name, value in {**s.node_targets, **s.node_attrs}.items():
                atoms.arrays[name] = value.reshape(s.n_atoms, -1)
            for name, value in s.graph_targets.items():
                atoms.info[name] = np.asarray(value).reshape(-1)
            for key, value in s.info.items():
                if isinstance(value, (str, int, float, bool)):
                    atoms.info[key] = value
            frames.append(atoms)
        ase.io.write(os.fspath(path), frames, format="extxyz")


def _concat(arrays: list[np.ndarray], empty_shape, dtype) -> np.ndarray:
    if arrays:
        return np.concatenate([np.asarray(a, dtype=dtype) for a in arrays], axis=0)
    return np.zeros(empty_shape if empty_shape is not None else (0,), dtype=dtype)


# ====================================================================== batching
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


def build_graphs(dataset: Dataset, model_config: Mapping[str, Any]) -> list:
    """One unpadded :class:`~aiida_eqml.ml.graph.Graph` per sample (cutoff/species of the model).

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
    dataset: Dataset,
    model_config: Mapping[str, Any],
    batch_size: int,
    buckets=None,
    *,
    order: Sequence[int] | None = None,
    graphs: Sequence | None = None,
    dtype=np.float32,
    drop_last: bool = False,
) -> list[Batch]:
    """Padded batches of ``batch_size`` samples for the model described by ``model_config``.

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
