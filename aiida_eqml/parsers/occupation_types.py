"""Types, units and text helpers shared by the parsers of pw.x's Hubbard occupation matrices (QE 7.2).

The errors (:class:`OccupationParsingError`, :class:`UnsupportedOutputError`), the records the parsers return
(:class:`HubbardManifold`, :class:`OnsiteOccupations`, :class:`NeighbourEntry`, :class:`IntersiteBlock`), QE's
order of the 27 cells of its virtual supercell (:func:`qe_supercell_translations`) and the unit constants.
No aiida import; :mod:`aiida_eqml.parsers.occupations` re-exports every public name.
"""

from __future__ import annotations

import dataclasses
from typing import IO

import numpy as np

__all__ = [
    "SUPPORTED_QE_VERSIONS",
    "HARTREE_TO_EV",
    "RY_TO_EV",
    "TextSource",
    "OccupationParsingError",
    "UnsupportedOutputError",
    "HubbardManifold",
    "OnsiteOccupations",
    "NeighbourEntry",
    "IntersiteBlock",
    "qe_supercell_translations",
]

SUPPORTED_QE_VERSIONS = ("7.2",)
HARTREE_TO_EV = 27.211386245988  # CODATA 2018, what QE 7.2 uses (constants.f90)
RY_TO_EV = HARTREE_TO_EV / 2.0

TextSource = str | bytes | IO


class OccupationParsingError(ValueError):
    """The files do not hold the occupation matrices we expect (message says what is wrong)."""


class UnsupportedOutputError(OccupationParsingError):
    """The output comes from a QE version or a kind of calculation this parser does not handle."""


@dataclasses.dataclass(frozen=True)
class HubbardManifold:
    """One Hubbard manifold: 0-based atom index, kind name, label like ``3d`` and its l."""

    atom_index: int
    kind_name: str
    label: str
    l: int


@dataclasses.dataclass
class OnsiteOccupations:
    """On-site matrices of one run: ``matrices[atom_index]`` is ``[nspin, 2l+1, 2l+1]`` (QE m order)."""

    qe_version: str
    lda_plus_u_kind: int
    nspin: int
    manifolds: list[HubbardManifold]
    matrices: dict[int, np.ndarray]
    atom_names: list[str]  # kind name of every atom, in QE's (= the input structure's) order
    hubbard_u_ev: dict[str, float]  # "<kind>-<label>" -> U (eV), DFT+U (lda_plus_u_kind 0)
    hubbard_v_ev: dict[tuple[int, int], float]  # (atom, supercell atom), 0-based -> V (eV), DFT+U+V

    def onsite_u_ev(self) -> dict[int, float]:
        """U (eV) of each Hubbard atom in this scf: Hubbard_U of its kind, or its V(I, I) for U+V."""
        out = {}
        for manifold in self.manifolds:
            i = manifold.atom_index
            if (i, i) in self.hubbard_v_ev:
                out[i] = self.hubbard_v_ev[(i, i)]
            else:
                out[i] = self.hubbard_u_ev.get(f"{manifold.kind_name}-{manifold.label}", 0.0)
        return out


@dataclasses.dataclass(frozen=True)
class NeighbourEntry:
    """One row of QE's ``i j dist V =`` table (1-based i, supercell j; V in eV, stan-stan first)."""

    atom: int
    supercell_atom: int
    distance_bohr: float
    hubbard_v_ev: tuple[float, float, float, float]


@dataclasses.dataclass
class IntersiteBlock:
    """n^{IJ,s}: ``matrix[s, m_I, m_J]`` for atom ``i`` and neighbour ``j`` at ``translation``."""

    i: int
    j: int
    translation: tuple[int, int, int]
    distance_bohr: float
    hubbard_v_ev: float
    matrix: np.ndarray


def qe_supercell_translations() -> tuple[tuple[int, int, int], ...]:
    """QE's order of the 27 cells of its virtual supercell (``alloc_neighborhood``).

    Same as aiida-quantumespresso's ``QE_TRANSLATIONS``: the home cell first, then nx, ny, nz in
    -1..1 (z fastest). Written out here so the pure parsers need no aiida import.
    """
    cells = [(nx, ny, nz) for nx in (-1, 0, 1) for ny in (-1, 0, 1) for nz in (-1, 0, 1)]
    cells.remove((0, 0, 0))
    return tuple([(0, 0, 0)] + cells)


def _read_text(source: TextSource) -> str:
    if hasattr(source, "read"):
        source = source.read()
    if isinstance(source, bytes):
        source = source.decode()
    return source


_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eEdD][-+]?\d+)?"  # a Fortran real as pw.x prints it
