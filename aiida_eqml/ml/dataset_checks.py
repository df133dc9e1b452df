"""What makes a dataset valid: target specs (names, levels, per-entry shapes) and the per-sample checks.

:meth:`aiida_eqml.ml.dataset.Dataset.validate` runs :func:`check_spec` on every target spec and
:func:`validate_sample` on every sample; each fault is a ``ValueError`` naming sample, field, expected and
found values. NaN marks a missing label (masked in the loss); any other non-finite label, and any
non-finite input (positions, cell, attributes), is an error. ``LEVELS`` and :func:`target_shape` are
also what :mod:`aiida_eqml.ml.dataset_file` checks a file's arrays against.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from aiida_eqml.ml.samples import EdgeValues, Sample

__all__ = ["LEVELS", "target_shape", "check_spec", "validate_sample", "validate_edge"]

LEVELS = ("node", "edge", "graph")
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_MAX_Z = 118


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


def check_spec(name: str, spec: Mapping[str, Any]) -> None:
    """A target name is an identifier (it becomes part of npz member names), its level one of ``LEVELS``, and its
    spec gives a shape (:func:`target_shape`)."""
    if not _NAME_RE.match(name):
        raise ValueError(f"target name {name!r} must be an identifier (letters, digits, '_')")
    level = spec.get("level")
    if level not in LEVELS:
        raise ValueError(f"target {name!r}: unknown level {level!r}; expected one of {LEVELS}")
    target_shape(spec)


def validate_sample(target_specs: Mapping[str, Mapping[str, Any]], index: int, s: Sample) -> None:
    """Check one sample against ``target_specs``; ``ValueError`` naming sample, field, expected and found values."""
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
            spec = target_specs.get(tname)
            if spec is None:
                raise ValueError(
                    f"{where}: target {tname!r} is not declared in target_specs {list(target_specs)}"
                )
            if spec["level"] != level:
                raise ValueError(
                    f"{where}: target {tname!r} is declared at level {spec['level']!r} "
                    f"but given as a {level} target"
                )
            per_entry = target_shape(spec)
            if level == "edge":
                validate_edge(where, f"target {tname!r}", value, n, per_entry)
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
        validate_edge(where, f"edge attribute {aname!r}", value, n, None)
        if not np.all(np.isfinite(value.values)):
            raise ValueError(f"{where}: edge attribute {aname!r} contains NaN/inf (inputs cannot be missing)")
    try:
        json.dumps(s.info)
    except TypeError as exc:
        raise ValueError(f"{where}: info must be JSON-serialisable: {exc}") from exc


def validate_edge(where, what, value: EdgeValues, n, per_entry):
    """An :class:`EdgeValues` of a sample of ``n`` atoms: one value per key, of shape ``per_entry`` (``None``: any),
    keys within the sample's atoms and distinct; ``where`` / ``what`` name the sample and the field in the message."""
    m = value.keys.shape[0]
    if value.values.shape[:1] != (m,):
        raise ValueError(f"{where}: {what}: {m} keys but values of shape {value.values.shape}")
    if per_entry is not None and value.values.shape[1:] != per_entry:
        raise ValueError(f"{where}: {what}: expected shape {(m,) + per_entry}, got {value.values.shape}")
    if m and (value.keys[:, :2].min() < 0 or value.keys[:, :2].max() >= n):
        raise ValueError(f"{where}: {what}: edge keys reference atoms outside 0..{n - 1}")
    if m and len(np.unique(value.keys, axis=0)) != m:
        raise ValueError(f"{where}: {what}: duplicate edge keys (i, j, S)")

