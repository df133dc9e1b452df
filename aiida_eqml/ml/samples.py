"""One atomic structure of a dataset, with its labels and extra inputs: :class:`Sample` and :class:`EdgeValues`.

A :class:`Sample` holds Cartesian labels as DFT gives them (physical units, NaN for a missing label) next to the
structure; edge labels and edge inputs are :class:`EdgeValues` on directed periodic edges. The collection of samples
with the specification of every target is :class:`aiida_eqml.ml.dataset.Dataset`, which re-exports these names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["EdgeValues", "EdgeTarget", "Sample"]


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
