"""Parsers of what pw.x (QE 7.2) writes about Hubbard occupations outside ``occup.txt``.

* :func:`parse_onsite_occupations_xml`: the on-site matrices, manifolds and U/V values of ``data-file-schema.xml``
  (``output/dft/dftU``);
* :func:`parse_hubbard_neighbours`: the ``i j dist V =`` neighbour table of the pw.x output (QE's neighbour order
  ``viz``, which :mod:`aiida_eqml.parsers.occup_txt` needs to read ``nsg``);
* :func:`parse_printed_traces`: the ``Tr[ns(I)]`` lines of the pw.x output, to cross-check the parsed matrices.

No aiida import; :mod:`aiida_eqml.parsers.occupations` re-exports every public name.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ElementTree

import numpy as np

from aiida_eqml.ml.orbitals import manifold_l

from .occupation_types import (
    _NUMBER,
    HARTREE_TO_EV,
    SUPPORTED_QE_VERSIONS,
    HubbardManifold,
    NeighbourEntry,
    OccupationParsingError,
    OnsiteOccupations,
    TextSource,
    UnsupportedOutputError,
    _read_text,
)

__all__ = ["parse_onsite_occupations_xml", "parse_hubbard_neighbours", "parse_printed_traces"]


def _manifold_l(label: str, where: str) -> int:
    try:
        return manifold_l(label)
    except ValueError as error:
        raise OccupationParsingError(f"{where}: {error}") from None


def parse_onsite_occupations_xml(source: TextSource) -> OnsiteOccupations:
    """On-site occupation matrices from ``data-file-schema.xml`` of a collinear DFT+U(+V) run.

    Raises ``UnsupportedOutputError`` for another QE version, a run without Hubbard, a
    non-collinear run, or a Hubbard manifold with background states (not handled), and
    ``OccupationParsingError`` for a malformed file.
    """
    try:
        root = ElementTree.fromstring(_read_text(source))
    except ElementTree.ParseError as exc:
        raise OccupationParsingError(f"data-file-schema.xml is not valid XML: {exc}") from exc
    creator = root.find("general_info/creator")
    version = creator.get("VERSION") if creator is not None else None
    if version not in SUPPORTED_QE_VERSIONS:
        raise UnsupportedOutputError(
            f"data-file-schema.xml was written by QE {version!r}; supported: {', '.join(SUPPORTED_QE_VERSIONS)}"
        )
    dftu = root.find("output/dft/dftU")
    if dftu is None:
        raise UnsupportedOutputError("data-file-schema.xml has no output/dft/dftU: the run has no Hubbard correction")
    if dftu.find("Hubbard_ns_nc") is not None:
        raise UnsupportedOutputError("non-collinear Hubbard occupations (Hubbard_ns_nc) are not supported")
    if dftu.find("Hubbard_back") is not None or dftu.find("Hubbard_U_back") is not None:
        raise UnsupportedOutputError("Hubbard background manifolds (Hubbard_U_back) are not supported")
    kind_element = dftu.find("lda_plus_u_kind")
    lda_plus_u_kind = int(kind_element.text) if kind_element is not None else 0
    if lda_plus_u_kind not in (0, 2):
        raise UnsupportedOutputError(
            f"lda_plus_u_kind={lda_plus_u_kind} (Liechtenstein) is not supported; only 0 (U) and 2 (U+V)"
        )

    elements = dftu.findall("Hubbard_ns")
    if not elements:
        raise OccupationParsingError("output/dft/dftU has no Hubbard_ns elements")
    blocks: dict[int, dict[int, np.ndarray]] = {}
    manifolds: dict[int, HubbardManifold] = {}
    for element in elements:
        index = int(element.get("index")) - 1
        spin = int(element.get("spin", "1"))
        label = element.get("label")
        l = _manifold_l(label, f"Hubbard_ns index={index + 1}")
        dims = [int(x) for x in element.get("dims").split()]
        values = np.array(element.text.split(), dtype=np.float64)
        if values.size != int(np.prod(dims)):
            raise OccupationParsingError(
                f"Hubbard_ns index={index + 1} spin={spin}: {values.size} numbers for dims {dims}"
            )
        matrix = values.reshape(dims, order=element.get("order", "F"))
        width = 2 * l + 1
        if any(d < width for d in dims):
            raise OccupationParsingError(f"Hubbard_ns index={index + 1}: dims {dims} too small for l={l}")
        # QE pads every block to the largest manifold (e.g. O 2p in a 5x5 block next to Ni 3d).
        blocks.setdefault(index, {})[spin] = matrix[:width, :width]
        manifolds[index] = HubbardManifold(index, element.get("specie"), label, l)

    spins = {tuple(sorted(b)) for b in blocks.values()}
    if len(spins) != 1 or spins.pop() not in ((1,), (1, 2)):
        raise OccupationParsingError(f"inconsistent spin components in Hubbard_ns: {sorted(spins)}")
    nspin = len(next(iter(blocks.values())))
    matrices = {i: np.stack([blocks[i][s] for s in sorted(blocks[i])]) for i in sorted(blocks)}

    # Values from the output section: for U+V it holds the symmetry-completed couples QE used.
    hubbard_u = {
        f"{e.get('specie')}-{e.get('label')}": float(e.text) * HARTREE_TO_EV for e in dftu.findall("Hubbard_U")
    }
    hubbard_v = {
        (int(e.get("index1")) - 1, int(e.get("index2")) - 1): float(e.text) * HARTREE_TO_EV
        for e in dftu.findall("Hubbard_V")
    }
    atom_names = [atom.get("name") for atom in root.findall("output/atomic_structure/atomic_positions/atom")]
    if not atom_names:
        raise OccupationParsingError("data-file-schema.xml has no output/atomic_structure atoms")
    return OnsiteOccupations(
        version,
        lda_plus_u_kind,
        nspin,
        [manifolds[i] for i in sorted(manifolds)],
        matrices,
        atom_names,
        hubbard_u,
        hubbard_v,
    )


_NEIGHBOUR_HEADER = re.compile(r"^\s*i\s+j\s+dist \(Bohr\)\s+stan-stan", re.M)
_NEIGHBOUR_ROW = re.compile(rf"^\s*(\d+)\s+(\d+)\s+({_NUMBER})\s+V =((?:\s+{_NUMBER}){{4}})\s*$")


def parse_hubbard_neighbours(source: TextSource) -> list[NeighbourEntry]:
    """The last ``i j dist (Bohr) V =`` table of pw.x's output (QE repeats it if it adds couples)."""
    text = _read_text(source)
    headers = list(_NEIGHBOUR_HEADER.finditer(text))
    if not headers:
        raise OccupationParsingError(
            "no 'i j dist (Bohr) ... stan-stan' neighbour table in the pw.x output (not a DFT+U+V run?)"
        )
    entries = []
    for line in text[headers[-1].end():].splitlines()[1:]:
        match = _NEIGHBOUR_ROW.match(line)
        if not match:
            break
        v = tuple(float(x) for x in match.group(4).split())
        entries.append(NeighbourEntry(int(match.group(1)), int(match.group(2)), float(match.group(3)), v))
    if not entries:
        raise OccupationParsingError("the neighbour table of the pw.x output is empty")
    return entries


_TRACE_BLOCK = "=================== HUBBARD OCCUPATIONS ==================="
_TRACE = re.compile(rf"Tr\[ns\(\s*(\d+)\)\] \(up, down, total\) =\s+({_NUMBER})\s+({_NUMBER})\s+({_NUMBER})")


def parse_printed_traces(source: TextSource) -> dict[int, tuple[float, ...]]:
    """``{atom (1-based): (up, down, total)}`` from the last HUBBARD OCCUPATIONS block of pw.x."""
    text = _read_text(source)
    start = text.rfind(_TRACE_BLOCK)
    if start < 0:
        raise OccupationParsingError("no HUBBARD OCCUPATIONS block in the pw.x output")
    return {int(m.group(1)): tuple(float(m.group(k)) for k in (2, 3, 4)) for m in _TRACE.finditer(text[start:])}
