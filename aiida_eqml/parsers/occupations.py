"""Parsers of Hubbard occupation matrices written by pw.x (QE 7.2), plus the glue to AiiDA nodes.

aiida-quantumespresso's ``PwParser`` does not parse them, and ``calcnode.tools.get_occupations()``
reads only the on-site XML blocks without provenance. Sources in a finished ``PwCalculation``'s
``retrieved`` folder:

* ``data-file-schema.xml``, ``output/dft/dftU/Hubbard_ns`` (one element per atom and spin,
  ``dims`` padded to the largest manifold, ``order="F"``): on-site n^{I,s}_{m m'} for DFT+U and
  DFT+U+V (``lda_plus_u_kind`` 0 or 2);
* ``occup.txt`` (``out/<prefix>.save/occup.txt``, retrieve it with
  ``metadata.options.additional_retrieve_list``): for DFT+U+V (``lda_plus_u_kind = 2``) a
  list-directed dump of QE's complex array ``nsg(ldim, ldim, max_num_neighbors, nat, nspin)``
  (``PW/src/io_rho_xml.f90``); ``nsg(m2, m1, viz, I, s) = sum f <phi^I_m1|psi><psi|phi^J_m2>`` where
  J = ``neighood(I)%neigh(viz)`` (``PW/src/new_nsg.f90``) is an atom of QE's 3x3x3 virtual supercell;
* ``aiida.out``: the ``i j dist V =`` table printed by ``alloc_neighborhood`` (the only place the
  neighbour order ``viz`` and the symmetry-completed V couples are written), and the
  ``Tr[ns(I)] (up, down, total)`` lines used to cross-check the parsed matrices.

Supercell atom ``J`` maps to (unit-cell index, translation) with aiida-quantumespresso's
``QE_TRANSLATIONS`` (the same map ``HubbardUtils.get_hubbard_card`` uses to write the card), so
the keys ``(i, j, S1, S2, S3)`` are those of ``HubbardStructureData.hubbard.parameters`` and of
``docs/architecture.md`` (edge vector ``r_j + S.cell - r_i``).

Matrices are kept in QE's m order (ylmr2: m = 0, +1, -1, +2, -2); ``aiida_eqml.ml.hubbard``
converts them to e3nn's basis.
"""

from __future__ import annotations

import dataclasses
import re
import xml.etree.ElementTree as ElementTree
from typing import IO

import numpy as np

from aiida_eqml.ml.orbitals import manifold_l

__all__ = [
    "SUPPORTED_QE_VERSIONS",
    "RY_TO_EV",
    "OccupationParsingError",
    "UnsupportedOutputError",
    "HubbardManifold",
    "OnsiteOccupations",
    "NeighbourEntry",
    "IntersiteBlock",
    "parse_onsite_occupations_xml",
    "parse_occup_txt",
    "parse_hubbard_neighbours",
    "parse_printed_traces",
    "intersite_blocks",
    "onsite_from_nsg",
    "nsg_shape",
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


_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eEdD][-+]?\d+)?"
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


# ----------------------------------------------------------------------------------------------
# AiiDA-facing glue (aiida imported lazily so the parsers above stay usable without a profile)
# ----------------------------------------------------------------------------------------------

XML_FILENAME = "data-file-schema.xml"
STDOUT_FILENAME = "aiida.out"  # PwCalculation's default output file
OCCUP_FILENAME = "occup.txt"
BOHR_TO_ANGSTROM = 0.529177210903  # CODATA 2018, as QE 7.2


class MissingHubbardError(OccupationParsingError):
    """The calculation has no Hubbard correction (or its structure is not a HubbardStructureData)."""


class MissingFileError(OccupationParsingError):
    """A file needed for this kind of run is not in the retrieved folder."""


def _read_retrieved(retrieved, name: str) -> str | None:
    """Text of ``name`` at the top of ``retrieved`` (where ``additional_retrieve_list`` puts it)
    or anywhere below it, None if absent."""
    names = retrieved.base.repository.list_object_names()
    if name in names:
        return retrieved.base.repository.get_object_content(name)
    for root, _, files in retrieved.base.repository.walk():
        if name in files:
            return retrieved.base.repository.get_object_content(str(root / name))
    return None


def _pair_distance(structure, i: int, j: int, translation) -> float:
    cell = np.asarray(structure.cell)
    positions = np.array([site.position for site in structure.sites])
    return float(np.linalg.norm(positions[j] + np.asarray(translation) @ cell - positions[i]))


def build_occupations_node(retrieved, structure):
    """``OccupationMatricesData`` (unstored) from a PwCalculation's ``retrieved`` folder and its
    ``HubbardStructureData``; raises an ``OccupationParsingError`` subclass saying what is wrong.

    Checks that the output belongs to this structure (atom count, kind names, every I-J distance
    QE printed equals |r_j + S.cell - r_i| of the structure) and that every Hubbard parameter of
    the structure has its block, with the value QE used.
    """
    from aiida_quantumespresso.data.hubbard_structure import HubbardStructureData

    from aiida_eqml.data.occupations import OccupationMatricesData

    if not isinstance(structure, HubbardStructureData):
        raise MissingHubbardError(
            f"the structure is a {type(structure).__name__}, not a HubbardStructureData: not a DFT+U(+V) calculation"
        )
    if not structure.hubbard.parameters:
        raise MissingHubbardError("the HubbardStructureData has no Hubbard parameters")
    xml_text = _read_retrieved(retrieved, XML_FILENAME)
    if xml_text is None:
        raise MissingFileError(f"the retrieved folder has no {XML_FILENAME}")
    onsite = parse_onsite_occupations_xml(xml_text)

    sites = structure.sites
    kinds = [site.kind_name for site in sites]
    if onsite.atom_names != kinds:
        raise OccupationParsingError(f"the output's atoms {onsite.atom_names} are not the structure's kinds {kinds}")
    for manifold in onsite.manifolds:
        if kinds[manifold.atom_index] != manifold.kind_name:
            raise OccupationParsingError(
                f"Hubbard_ns index {manifold.atom_index + 1} is {manifold.kind_name}, "
                f"the structure has {kinds[manifold.atom_index]}"
            )
    nat = len(sites)

    intersite = []
    if onsite.lda_plus_u_kind == 2:
        occup_text = _read_retrieved(retrieved, OCCUP_FILENAME)
        if occup_text is None:
            raise MissingFileError(
                f"DFT+U+V run without {OCCUP_FILENAME}: add 'out/aiida.save/{OCCUP_FILENAME}' to "
                "metadata.options.additional_retrieve_list of the PwCalculation"
            )
        stdout_text = _read_retrieved(retrieved, STDOUT_FILENAME)
        if stdout_text is None:
            raise MissingFileError(f"the retrieved folder has no {STDOUT_FILENAME} (needed for QE's neighbour order)")
        neighbours = parse_hubbard_neighbours(stdout_text)
        nsg = parse_occup_txt(occup_text, nsg_shape(occup_text, onsite.manifolds, nat, onsite.nspin))
        for atom, block in onsite_from_nsg(nsg, neighbours, onsite.manifolds).items():
            if not np.allclose(block, onsite.matrices[atom], atol=1e-6):
                raise OccupationParsingError(
                    f"on-site block of atom {atom + 1} differs between {OCCUP_FILENAME} and {XML_FILENAME}"
                )
        for block in intersite_blocks(nsg, neighbours, onsite.manifolds, nat):
            distance = _pair_distance(structure, block.i, block.j, block.translation)
            if abs(distance - block.distance_bohr * BOHR_TO_ANGSTROM) > 1e-4:
                raise OccupationParsingError(
                    f"couple ({block.i}, {block.j}, {block.translation}): "
                    f"QE distance {block.distance_bohr * BOHR_TO_ANGSTROM:.5f} A, "
                    f"structure {distance:.5f} A: the output does not belong to this structure"
                )
            supercell_j = block.j + qe_supercell_translations().index(block.translation) * nat
            value = onsite.hubbard_v_ev.get((block.i, supercell_j), block.hubbard_v_ev)
            intersite.append(((block.i, block.j, *block.translation), block.matrix, value, distance))

    node = OccupationMatricesData(
        nat=nat,
        nspin=onsite.nspin,
        hubbard_type="U+V" if onsite.lda_plus_u_kind == 2 else "U",
        qe_version=onsite.qe_version,
        onsite=onsite.matrices,
        onsite_labels={m.atom_index: m.label for m in onsite.manifolds},
        onsite_kinds={m.atom_index: m.kind_name for m in onsite.manifolds},
        onsite_hubbard_u=onsite.onsite_u_ev(),
        intersite=intersite,
    )
    _check_against_parameters(node, structure)
    return node


def _check_against_parameters(node, structure) -> None:
    """Every Hubbard parameter of the structure must have its block, with the value QE used."""
    onsite_u = dict(zip(node.get_array("onsite_atoms").tolist(), node.get_array("onsite_hubbard_u").tolist()))
    keys = [tuple(k) for k in node.get_array("intersite_keys").tolist()]
    values_v = node.get_array("intersite_hubbard_v")
    for parameter in structure.hubbard.parameters:
        if parameter.hubbard_type not in ("U", "Ueff", "V"):
            continue
        i, j, translation = parameter.atom_index, parameter.neighbour_index, tuple(parameter.translation)
        if i == j and translation == (0, 0, 0):
            if i not in onsite_u:
                raise OccupationParsingError(f"structure has U on atom {i} but the output has no on-site block for it")
            if abs(onsite_u[i] - parameter.value) > 1e-4:
                raise OccupationParsingError(
                    f"structure has U={parameter.value} eV on atom {i}, the run used {onsite_u[i]:.6f} eV"
                )
            continue
        key = (i, j, *translation)
        if key not in keys:
            raise OccupationParsingError(f"structure has V on (i, j, S) = {key} but the output has no block for it")
        used = values_v[keys.index(key)]
        if abs(used - parameter.value) > 1e-4:
            raise OccupationParsingError(f"structure has V={parameter.value} eV on {key}, the run used {used:.6f} eV")
