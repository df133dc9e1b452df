"""Hubbard occupation matrices written by pw.x (QE 7.2) -> an ``OccupationMatricesData`` node.

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

This module is the AiiDA-facing glue (:func:`build_occupations_node` and its checks); the pure parsers it uses, all
re-exported here, are in :mod:`aiida_eqml.parsers.occupation_types` (errors, records, units),
:mod:`aiida_eqml.parsers.pw_occupations` (``data-file-schema.xml`` and ``aiida.out``) and
:mod:`aiida_eqml.parsers.occup_txt` (``occup.txt`` and its blocks).
"""

from __future__ import annotations

import numpy as np

# Re-exported: every name of the occupation parsers stays importable from here.
from .occup_txt import intersite_blocks, nsg_shape, onsite_from_nsg, parse_occup_txt
from .occupation_types import (  # noqa: F401
    HARTREE_TO_EV,
    RY_TO_EV,
    SUPPORTED_QE_VERSIONS,
    HubbardManifold,
    IntersiteBlock,
    NeighbourEntry,
    OccupationParsingError,
    OnsiteOccupations,
    TextSource,
    UnsupportedOutputError,
    qe_supercell_translations,
)
from .pw_occupations import parse_hubbard_neighbours, parse_onsite_occupations_xml, parse_printed_traces

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


# ----------------------------------------------------------------------------------------------
# AiiDA-facing glue (aiida imported lazily so the parsers stay usable without a profile)
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
