"""Checks of an atomic structure before anything builds a neighbour list from it.

:func:`validate_structure` is the one definition of "a structure we can make a graph of"; the ML
layer (:func:`aiida_eqml.ml.graph.graph_from_atoms`) and the AiiDA entry points that take
structures call it. Every failure is a :class:`StructureError` (a ``ValueError``) that names the
field and the offending value.

Why before the neighbour list: vesin 0.6.2 (the neighbour-list library) does not fail cleanly on
bad input, it takes the interpreter down. Measured here (cutoff 3 A): a non-periodic structure
wider than ~2.5e5 A, a NaN in the cell, and zero or parallel periodic vectors with
``pbc=(T, T, F)`` all end the process with SIGFPE (exit 136), and a slab whose non-periodic
extent is 1e5 A runs for minutes (the time grows with the extent: 5 s at 3e4 A). These are vesin
bugs (it should raise); until a fixed release is pinned, the guards below keep such input away
from it. To report upstream (https://github.com/Luthaf/vesin): SIGFPE instead of an error for
non-finite boxes, degenerate periodic boxes and very large non-periodic extents.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "StructureError",
    "MIN_INTERATOMIC_DISTANCE",
    "MAX_NONPERIODIC_EXTENT",
    "validate_structure",
    "validate_atoms",
    "check_min_distance",
]

#: Angstrom. Far below any chemical bond (H2: 0.74 A); only coincident or overlapping atoms are
#: refused, not strained geometries (test structures with random positions reach 0.3 A).
MIN_INTERATOMIC_DISTANCE = 0.1
#: Angstrom, along each non-periodic direction. Far beyond any cluster or slab a DFT-trained model
#: describes, and far below what slows or crashes the neighbour list (see the module docstring).
MAX_NONPERIODIC_EXTENT = 1000.0


class StructureError(ValueError):
    """A structure that no graph (and no prediction) can be made of; the message names field and value."""


def _finite(name: str, array: np.ndarray) -> None:
    bad = ~np.isfinite(array)
    if np.any(bad):
        where = np.argwhere(bad)[:3].tolist()
        raise StructureError(f"{name} contains NaN/inf at index {where}: {array[bad][:3].tolist()}")


def _check_periodic_vectors(cell: np.ndarray, pbc: np.ndarray, min_distance: float) -> None:
    """Periodic lattice vectors must be non-zero, independent, and not pack images closer than ``min_distance``."""
    periodic = [k for k in range(3) if pbc[k]]
    for k in periodic:
        if np.linalg.norm(cell[k]) < min_distance:
            raise StructureError(
                f"cell vector {k} ({cell[k].tolist()}) is periodic (pbc {pbc.tolist()}) but has length "
                f"{np.linalg.norm(cell[k]):.3g} A < {min_distance} A: zero or too short"
            )
    if not periodic:
        return
    vectors = cell[periodic]
    # Heights of the (sub-)lattice: a periodic image closer than min_distance along the normal of the other
    # vectors is an overlapping atom, and makes the number of images within the cutoff explode.
    gram = vectors @ vectors.T
    volume = np.sqrt(max(np.linalg.det(gram), 0.0))
    for i, k in enumerate(periodic):
        others = np.delete(vectors, i, axis=0)
        face = np.sqrt(max(np.linalg.det(others @ others.T), 0.0)) if len(others) else 1.0
        height = volume / face if face > 0 else 0.0
        if height < min_distance:
            raise StructureError(
                f"the periodic cell vectors {periodic} (pbc {pbc.tolist()}) are degenerate "
                f"(zero, parallel or coplanar): cell {cell.tolist()}, height along vector {k} {height:.3g} A "
                f"< {min_distance} A"
            )


def _check_extent(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, max_extent: float) -> None:
    """Bounded extent along the non-periodic directions (measured normal to the periodic vectors)."""
    if np.all(pbc) or len(positions) == 0:
        return
    basis = np.eye(3)
    periodic = cell[pbc]
    if len(periodic):  # project out the periodic directions: extent there is wrapped, not a size
        q, _ = np.linalg.qr(periodic.T)
        basis = np.eye(3) - q @ q.T
    projected = positions @ basis
    extent = float(np.ptp(projected, axis=0).max())
    if extent > max_extent:
        raise StructureError(
            f"positions span {extent:.6g} A along the non-periodic directions (pbc {pbc.tolist()}); "
            f"at most {max_extent} A is accepted (atoms far apart in vacuum; wrong units?)"
        )


def validate_structure(
    positions,
    cell,
    pbc,
    *,
    min_distance: float = MIN_INTERATOMIC_DISTANCE,
    max_extent: float = MAX_NONPERIODIC_EXTENT,
    allow_empty: bool = False,
) -> None:
    """Raise :class:`StructureError` unless the structure can safely go to a neighbour list.

    Checks shapes, finite positions and cell, non-degenerate periodic vectors (no zero, parallel or
    coplanar vectors along periodic directions) and a bounded extent along non-periodic ones. The
    minimum interatomic distance needs the neighbour list: :func:`check_min_distance` does it from
    the edge lengths afterwards (within the cutoff, which is where overlaps matter).
    """
    positions = np.asarray(positions, dtype=np.float64)
    cell = np.asarray(cell, dtype=np.float64)
    pbc = np.asarray(pbc, dtype=bool)
    if positions.ndim != 2 or positions.shape[1] != 3:
        raise StructureError(f"positions must have shape (n, 3), got {positions.shape}")
    if cell.shape != (3, 3):
        raise StructureError(f"cell must have shape (3, 3), got {cell.shape}")
    if pbc.shape != (3,):
        raise StructureError(f"pbc must have 3 entries, got {pbc.tolist()}")
    if len(positions) == 0 and not allow_empty:
        raise StructureError("the structure has no atoms")
    _finite("cell", cell)
    _finite("positions", positions)
    _check_periodic_vectors(cell, pbc, min_distance)
    _check_extent(positions, cell, pbc, max_extent)


def validate_atoms(atoms, **kwargs) -> None:
    """:func:`validate_structure` of an ``ase.Atoms`` (what the AiiDA entry points call on ``structure.get_ase()``)."""
    validate_structure(atoms.positions, atoms.cell[:], atoms.pbc, **kwargs)


def check_min_distance(lengths, senders, receivers, min_distance: float = MIN_INTERATOMIC_DISTANCE) -> None:
    """Raise :class:`StructureError` if an edge (pair within the cutoff, images included) is shorter than
    ``min_distance``."""
    lengths = np.asarray(lengths, dtype=np.float64)
    if lengths.size == 0:
        return
    k = int(np.argmin(lengths))
    if lengths[k] < min_distance:
        raise StructureError(
            f"atoms {int(senders[k])} and {int(receivers[k])} are {lengths[k]:.3g} A apart (< {min_distance} A): "
            "overlapping atoms (a duplicated atom, or an atom on its own periodic image)"
        )
