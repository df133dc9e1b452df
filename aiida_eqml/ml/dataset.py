"""The dataset record shared by every producer and consumer of training data.

A :class:`Dataset` is a list of :class:`Sample` (one atomic structure each, with Cartesian
labels as DFT gives them) plus ``target_specs`` describing every label::

    {"born_charges": {"level": "node", "tensor": "ij", "unit": "e"},
     "dielectric":   {"level": "graph", "tensor": "ij=ji", "unit": "1"},
     "hubbard_v":    {"level": "edge", "irreps": "0e", "unit": "eV"}}

NaN marks a missing label (masked in the loss); any other non-finite number is an error.
The on-disk format is one ``.npz`` (arrays concatenated over samples + per-sample counts,
metadata as a JSON string) that loads with ``allow_pickle=False``.

This module holds the container and its file format (:meth:`Dataset.save` / :meth:`Dataset.load`); its parts live
in one module each and every name is importable from here:

* :mod:`aiida_eqml.ml.samples`: :class:`Sample` and :class:`EdgeValues` (``EdgeTarget``), one structure each;
* :mod:`aiida_eqml.ml.dataset_checks`: ``LEVELS``, :func:`target_shape` and the checks of :meth:`Dataset.validate`;
* :mod:`aiida_eqml.ml.batching`: ``make_batches`` turns a dataset into padded, jit-friendly batches (``Graph`` +
  irreps targets + masks) for a model config; it uses ``graph.py`` and ``tensors.py``;
* :mod:`aiida_eqml.ml.dataset_file`: the defensive reading of a file behind :meth:`Dataset.load`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from aiida_eqml.ml.batching import Batch, build_graphs, make_batches, target_irreps_type
from aiida_eqml.ml.dataset_checks import LEVELS, check_spec, target_shape, validate_sample
from aiida_eqml.ml.samples import EdgeTarget, EdgeValues, Sample

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
    "build_graphs",
    "target_irreps_type",
]

DATASET_FORMAT = "aiida-eqml-dataset"
DATASET_SCHEMA_VERSION = 1
# Separator inside npz member names; chosen because it cannot appear in a Python identifier
# (target names are identifiers) and avoids '/' (zip directories).
_SEP = "::"


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
        """Raise ``ValueError`` naming sample, field, expected and found values for any fault (the checks:
        :mod:`aiida_eqml.ml.dataset_checks`)."""
        for name, spec in self.target_specs.items():
            check_spec(name, spec)
        for index, sample in enumerate(self.samples):
            validate_sample(self.target_specs, index, sample)

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

