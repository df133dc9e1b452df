"""Reader of ``occup.txt`` (QE 7.2, DFT+U+V): the array ``nsg`` and the inter-site and on-site blocks in it.

``occup.txt`` (``out/<prefix>.save/occup.txt``) is a list-directed dump of QE's complex array
``nsg(ldim, ldim, max_num_neighbors, nat, nspin)``. :func:`nsg_shape` infers its shape, :func:`parse_occup_txt`
reads it, and :func:`intersite_blocks` / :func:`onsite_from_nsg` cut it into per-couple blocks ``[s, m_I, m_J]``
with the neighbour table of :func:`aiida_eqml.parsers.pw_occupations.parse_hubbard_neighbours`.

No aiida import; :mod:`aiida_eqml.parsers.occupations` re-exports every public name.
"""

from __future__ import annotations

import re

import numpy as np

from .occupation_types import (
    _NUMBER,
    HubbardManifold,
    IntersiteBlock,
    NeighbourEntry,
    OccupationParsingError,
    TextSource,
    _read_text,
    qe_supercell_translations,
)

__all__ = ["parse_occup_txt", "nsg_shape", "intersite_blocks", "onsite_from_nsg"]

_COMPLEX = re.compile(rf"\(\s*({_NUMBER})\s*,\s*({_NUMBER})\s*\)")


def parse_occup_txt(source: TextSource, shape: tuple[int, ...]) -> np.ndarray:
    """QE's list-directed dump of a complex array (``occup.txt`` of DFT+U+V) in Fortran order.

    ``shape`` is the Fortran shape, ``(ldim, ldim, max_num_neighbors, nat, nspin)`` for ``nsg``.
    """
    text = _read_text(source)
    pairs = _COMPLEX.findall(text)
    leftover = _COMPLEX.sub(" ", text).split()
    if not pairs or leftover:
        raise OccupationParsingError(
            "occup.txt is not a list of complex numbers '(re,im)' as written for DFT+U+V (lda_plus_u_kind=2)"
        )
    values = np.array(
        [
            complex(float(re_.replace("D", "E").replace("d", "e")), float(im.replace("D", "E").replace("d", "e")))
            for re_, im in pairs
        ]
    )
    if values.size != int(np.prod(shape)):
        raise OccupationParsingError(
            f"occup.txt holds {values.size} complex numbers, expected {int(np.prod(shape))} for shape {shape}"
        )
    return values.reshape(shape, order="F")


def intersite_blocks(
    nsg: np.ndarray,
    neighbours: list[NeighbourEntry],
    manifolds: list[HubbardManifold],
    nat: int,
    atol_imag: float = 1e-8,
) -> list[IntersiteBlock]:
    """Inter-site blocks n^{IJ} (J != I or S != 0) from ``nsg`` and the neighbour table.

    ``nsg`` has the Fortran shape ``(ldim, ldim, max_num_neighbors, nat, nspin)`` with
    ``nsg[m_J, m_I, viz, I, s]``; the returned ``matrix[s, m_I, m_J]`` is its transpose. QE
    keeps only the real part (``new_nsg.f90``), so a non-zero imaginary part means a wrong layout.
    """
    translations = qe_supercell_translations()
    l_of = {m.atom_index: m.l for m in manifolds}
    ldim, _, max_neighbours, nat_file, nspin = nsg.shape
    if nat_file != nat:
        raise OccupationParsingError(f"occup.txt is for {nat_file} atoms, the structure has {nat}")
    if np.abs(nsg.imag).max() > atol_imag:
        raise OccupationParsingError("occup.txt has non-zero imaginary parts: unexpected layout")
    by_atom: dict[int, list[NeighbourEntry]] = {}
    for entry in neighbours:
        by_atom.setdefault(entry.atom - 1, []).append(entry)
    blocks = []
    for i, entries in sorted(by_atom.items()):
        if len(entries) > max_neighbours:
            raise OccupationParsingError(
                f"atom {i + 1} has {len(entries)} neighbours in the table, occup.txt room for {max_neighbours}"
            )
        for viz, entry in enumerate(entries):
            j, cell = (entry.supercell_atom - 1) % nat, (entry.supercell_atom - 1) // nat
            if cell >= len(translations):
                raise OccupationParsingError(f"supercell atom {entry.supercell_atom} is outside QE's 3x3x3 supercell")
            if j == i and cell == 0:
                continue  # the on-site block: taken from the XML
            if i not in l_of or j not in l_of:
                # pw.x lists the neighbours of every atom (e.g. Li in LiCoO2); V and n^IJ exist only between
                # Hubbard manifolds. The entry still counts for ``viz``, the neighbour's slot in nsg.
                continue
            li, lj = l_of[i], l_of[j]
            block = nsg[: 2 * lj + 1, : 2 * li + 1, viz, i, :].real
            blocks.append(
                IntersiteBlock(
                    i,
                    j,
                    translations[cell],
                    entry.distance_bohr,
                    entry.hubbard_v_ev[0],
                    np.transpose(block, (2, 1, 0)).copy(),
                )
            )
    return blocks


def onsite_from_nsg(
    nsg: np.ndarray, neighbours: list[NeighbourEntry], manifolds: list[HubbardManifold]
) -> dict[int, np.ndarray]:
    """The on-site blocks of ``nsg`` (``viz`` with J = I), ``[nspin, 2l+1, 2l+1]`` per atom."""
    out = {}
    l_of = {m.atom_index: m.l for m in manifolds}
    viz_of: dict[int, int] = {}
    for entry in neighbours:
        viz_of.setdefault(entry.atom - 1, 0)
        if entry.supercell_atom == entry.atom and entry.atom - 1 in l_of:  # atoms without a manifold have no block
            width = 2 * l_of[entry.atom - 1] + 1
            out[entry.atom - 1] = np.transpose(
                nsg[:width, :width, viz_of[entry.atom - 1], entry.atom - 1, :].real, (2, 1, 0)
            )
        viz_of[entry.atom - 1] += 1
    return out


def nsg_shape(text: str, manifolds: list[HubbardManifold], nat: int, nspin: int) -> tuple[int, int, int, int, int]:
    """Fortran shape of ``nsg`` in ``occup.txt``: ldim is the largest manifold, neighbours from the count."""
    ldim = max(2 * m.l + 1 for m in manifolds)
    count = len(_COMPLEX.findall(text))
    per_neighbour = ldim * ldim * nat * nspin
    if count == 0 or count % per_neighbour:
        raise OccupationParsingError(
            f"occup.txt holds {count} complex numbers, not a multiple of ldim^2*nat*nspin={per_neighbour}"
        )
    return (ldim, ldim, count // per_neighbour, nat, nspin)
