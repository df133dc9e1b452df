"""Occupation-matrix extraction from real QE 7.2 pw.x output (fixtures in tests/fixtures/qe72).

The fixtures are real runs of the embedded pw.x on AFM NiO (see tests/fixtures/qe72/README.md):
``nio_u`` (DFT+U) and ``nio_uv`` (DFT+U+V). The structures built here are the HubbardStructureData
whose HUBBARD card (as aiida-quantumespresso writes it) is the one those runs used.
"""
from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest

from aiida_eqml.parsers.occupations import (
    BOHR_TO_ANGSTROM,
    OccupationParsingError,
    UnsupportedOutputError,
    intersite_blocks,
    nsg_shape,
    onsite_from_nsg,
    parse_hubbard_neighbours,
    parse_occup_txt,
    parse_onsite_occupations_xml,
    parse_printed_traces,
    qe_supercell_translations,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "qe72"
NIO_A_CUBIC = 4.17


def read(case: str, name: str) -> str:
    return (FIXTURES / case / name).read_text()


def printed_matrices(stdout: str) -> dict[tuple[int, int], np.ndarray]:
    """{(atom, spin): matrix} of the last 'occupation matrix ns (before diag.)' blocks pw.x printed."""
    text = stdout[stdout.rfind("=== HUBBARD OCCUPATIONS ==="):]
    out, atom, spin = {}, None, None
    lines = text.splitlines()
    for k, line in enumerate(lines):
        if m := re.search(r"ATOM\s+(\d+)", line):
            atom = int(m.group(1))
        elif m := re.match(r"\s*SPIN\s+(\d+)", line):
            spin = int(m.group(1))
        elif "occupation matrix ns (before diag.)" in line:
            rows = []
            for row in lines[k + 1:]:
                try:
                    rows.append([float(x) for x in row.split()])
                except ValueError:
                    break
                if not rows[-1]:
                    rows.pop()
                    break
            out[(atom, spin)] = np.array(rows)
    return out


# ------------------------------------------------------------------ pure parsers, real output


def test_supercell_translations_match_aiida_quantumespresso():
    from aiida_quantumespresso.utils.hubbard import QE_TRANSLATIONS

    assert qe_supercell_translations() == QE_TRANSLATIONS


@pytest.mark.parametrize("case", ["nio_u", "nio_uv"])
def test_xml_matrices_reproduce_what_pw_printed(case):
    onsite = parse_onsite_occupations_xml(read(case, "data-file-schema.xml"))
    stdout = read(case, "aiida.out")
    assert onsite.qe_version == "7.2" and onsite.nspin == 2
    assert onsite.lda_plus_u_kind == (2 if case == "nio_uv" else 0)
    assert [(m.atom_index, m.kind_name, m.label, m.l) for m in onsite.manifolds] == [
        (0, "Ni1", "3d", 2), (1, "Ni2", "3d", 2), (2, "O", "2p", 1), (3, "O", "2p", 1)
    ]
    traces = parse_printed_traces(stdout)
    assert sorted(traces) == [1, 2, 3, 4]
    for atom, (up, down, total) in traces.items():
        ours = np.trace(onsite.matrices[atom - 1], axis1=1, axis2=2)
        np.testing.assert_allclose(ours, [up, down], atol=6e-6)
        assert abs(ours.sum() - total) < 2e-5
    printed = printed_matrices(stdout)
    assert len(printed) == 8
    for (atom, spin), matrix in printed.items():
        np.testing.assert_allclose(onsite.matrices[atom - 1][spin - 1], matrix, atol=6e-4)
    # AFM NiO: Ni 3d carries a moment of about 1.4-1.5 muB, O none.
    assert np.trace(onsite.matrices[0][0] - onsite.matrices[0][1]) > 1.2


def test_occup_txt_of_u_plus_v_run():
    onsite = parse_onsite_occupations_xml(read("nio_uv", "data-file-schema.xml"))
    text = read("nio_uv", "occup.txt")
    neighbours = parse_hubbard_neighbours(read("nio_uv", "aiida.out"))
    shape = nsg_shape(text, onsite.manifolds, 4, 2)
    assert shape == (5, 5, 7, 4, 2)  # each atom: itself + its 6 nearest neighbours
    nsg = parse_occup_txt(text, shape)
    # the on-site blocks of occup.txt are the XML ones: same layout, same run
    for atom, block in onsite_from_nsg(nsg, neighbours, onsite.manifolds).items():
        np.testing.assert_allclose(block, onsite.matrices[atom], atol=1e-12)
    blocks = intersite_blocks(nsg, neighbours, onsite.manifolds, 4)
    assert len(blocks) == 24
    by_key = {(b.i, b.j, b.translation): b for b in blocks}
    for b in blocks:
        # Ni-O at a/2 only, with the V QE symmetry-completed from the two input couples
        assert {b.i, b.j} in ({0, 2}, {0, 3}, {1, 2}, {1, 3})
        assert abs(b.distance_bohr * BOHR_TO_ANGSTROM - NIO_A_CUBIC / 2) < 1e-4
        assert b.hubbard_v_ev == 1.0
        # hermiticity: n^{IJ}(S) = n^{JI}(-S)^T, a check of the (j, S) <-> supercell map and transposition
        reverse = by_key[(b.j, b.i, tuple(-t for t in b.translation))]
        np.testing.assert_allclose(b.matrix, np.transpose(reverse.matrix, (0, 2, 1)), atol=1e-12)
        assert b.matrix.shape == ((2, 5, 3) if b.i < 2 else (2, 3, 5))
        assert np.abs(b.matrix).max() > 1e-3
    assert sorted(onsite.hubbard_v_ev.values()) == pytest.approx([1.0] * 24 + [5.0] * 2, abs=1e-9)


def test_parsers_reject_bad_input():
    xml = read("nio_u", "data-file-schema.xml")
    with pytest.raises(UnsupportedOutputError, match="QE '6.8'"):
        parse_onsite_occupations_xml(xml.replace('NAME="PWSCF" VERSION="7.2"', 'NAME="PWSCF" VERSION="6.8"'))
    no_dftu = re.sub(r"<dftU.*?</dftU>", "", xml, flags=re.S)
    with pytest.raises(UnsupportedOutputError, match="no Hubbard correction"):
        parse_onsite_occupations_xml(no_dftu)
    with pytest.raises(OccupationParsingError, match="not valid XML"):
        parse_onsite_occupations_xml(xml[: len(xml) // 2])
    with pytest.raises(OccupationParsingError, match="expected 700"):
        parse_occup_txt(read("nio_uv", "occup.txt"), (5, 5, 7, 4, 1))
    with pytest.raises(OccupationParsingError, match="complex numbers"):
        parse_occup_txt("0.1 0.2 0.3", (1, 3))
    with pytest.raises(OccupationParsingError, match="neighbour table"):
        parse_hubbard_neighbours(read("nio_u", "aiida.out"))


# ------------------------------------------------------------------ AiiDA: calcfunction + node


@pytest.fixture
def occupations_entry_point(entry_points):
    """Register ``aiida.data:eqml.occupations`` for the test unless the installed package already does."""
    from aiida.plugins.entry_point import get_entry_point_names

    if "eqml.occupations" not in get_entry_point_names("aiida.data"):
        entry_points.add("aiida_eqml.data.occupations:OccupationMatricesData", "aiida.data:eqml.occupations")
    return entry_points


def nio_structure(with_v: bool):
    """HubbardStructureData of the fixture runs (the conftest AFM NiO + the fixtures' extra terms)."""
    from conftest import make_nio_afm_hubbard_structure

    structure = make_nio_afm_hubbard_structure()
    if with_v:
        # the nearest-O image of each Ni the fixture run used (one of six equivalent ones; pymatgen's
        # ``initialize_intersites_hubbard`` may pick another: see test_extract_any_equivalent_image)
        structure.append_hubbard_parameter(0, "3d", 2, "2p", 1.0, (-1, 0, 0), "V")
        structure.append_hubbard_parameter(1, "3d", 2, "2p", 1.0, (0, 0, 1), "V")
    else:
        structure.initialize_onsites_hubbard("O", "2p", 1.0, "Ueff", use_kinds=True)
    return structure


def hubbard_card_lines(text: str) -> list[str]:
    card = text[text.index("HUBBARD"):]
    return [" ".join(line.replace("{", "").replace("}", "").split()) for line in card.splitlines() if line.strip()]


@pytest.mark.parametrize("case,with_v", [("nio_u", False), ("nio_uv", True)])
def test_fixture_runs_used_the_card_aiida_writes(aiida_profile, case, with_v):
    from aiida_quantumespresso.utils.hubbard import HubbardUtils

    card = HubbardUtils(nio_structure(with_v)).get_hubbard_card()
    assert hubbard_card_lines(card) == hubbard_card_lines(read(case, "aiida.in"))


def retrieved_folder(case: str, files=("aiida.out", "data-file-schema.xml", "occup.txt"), replace=None):
    from aiida import orm

    folder = orm.FolderData()
    for name in files:
        path = FIXTURES / case / name
        if path.exists():
            content = path.read_text()
            if replace and name in replace:
                content = content.replace(*replace[name])
            folder.base.repository.put_object_from_filelike(io.BytesIO(content.encode()), name)
    return folder.store()


def test_extract_occupations_u(aiida_profile, occupations_entry_point):
    from aiida import orm

    from aiida_eqml.calculations.functions.occupations import extract_occupations
    from aiida_eqml.data.occupations import OccupationMatricesData

    retrieved, structure = retrieved_folder("nio_u"), nio_structure(False).store()
    result, node = extract_occupations.run_get_node(retrieved=retrieved, structure=structure)
    assert node.is_finished_ok
    occupations = result["occupations"]
    assert isinstance(occupations, OccupationMatricesData) and occupations.is_stored
    # provenance: the output node is created by the calcfunction whose inputs are the calculation's nodes
    assert occupations.creator.pk == node.pk
    assert {link.node.pk for link in node.base.links.get_incoming().all()} == {retrieved.pk, structure.pk}
    assert occupations.hubbard_type == "U" and occupations.nspin == 2
    assert occupations.base.attributes.get("onsite_manifolds") == ["Ni1-3d", "Ni2-3d", "O-2p", "O-2p"]
    np.testing.assert_allclose(occupations.get_array("onsite_hubbard_u"), [5.0, 5.0, 1.0, 1.0], atol=1e-9)
    assert occupations.get_onsite(0).shape == (2, 5, 5) and occupations.get_onsite(3).shape == (2, 3, 3)
    printed = parse_printed_traces(read("nio_u", "aiida.out"))
    np.testing.assert_allclose(
        occupations.base.attributes.get("onsite_traces"), [printed[a][:2] for a in (1, 2, 3, 4)], atol=6e-6
    )
    assert occupations.base.attributes.get("num_intersite") == 0
    found = orm.QueryBuilder().append(
        orm.Data, filters={"id": occupations.pk, "attributes.hubbard_type": "U", "attributes.qe_version": "7.2"}
    ).count()
    assert found == 1


def test_extract_occupations_u_plus_v(aiida_profile, occupations_entry_point):
    from aiida_eqml.calculations.functions.occupations import extract_occupations

    structure = nio_structure(True)
    result, node = extract_occupations.run_get_node(retrieved=retrieved_folder("nio_uv"), structure=structure)
    assert node.is_finished_ok, node.exit_message
    occupations = result["occupations"]
    assert occupations.hubbard_type == "U+V"
    keys = occupations.get_array("intersite_keys")
    assert keys.shape == (24, 5)
    # every V of the HubbardStructureData is found under its own (i, j, S) key
    for parameter in structure.hubbard.parameters:
        if parameter.atom_index != parameter.neighbour_index:
            block = occupations.get_intersite(parameter.atom_index, parameter.neighbour_index, parameter.translation)
            assert block.shape == (2, 5, 3) and np.abs(block).max() > 1e-3
    np.testing.assert_allclose(occupations.get_array("intersite_distances"), NIO_A_CUBIC / 2, atol=1e-6)
    np.testing.assert_allclose(occupations.get_array("intersite_hubbard_v"), 1.0, atol=1e-9)
    np.testing.assert_allclose(occupations.get_array("onsite_hubbard_u"), [5.0, 5.0, 0.0, 0.0], atol=1e-9)
    inputs = occupations.descriptor_inputs()
    assert inputs["onsite"].shape == (4, 2, 5, 5) and inputs["pair_l"].tolist().count([2, 1]) == 12


def test_extract_any_equivalent_image(aiida_profile, occupations_entry_point):
    """aiida-quantumespresso's own neighbour pick is found too: QE completes V over equivalent couples."""
    from conftest import make_nio_afm_hubbard_structure

    from aiida_eqml.calculations.functions.occupations import extract_occupations

    structure = make_nio_afm_hubbard_structure()
    for kind in ("Ni1", "Ni2"):
        structure.initialize_intersites_hubbard(kind, "3d", "O", "2p", 1.0, "V", use_kinds=True)
    result, node = extract_occupations.run_get_node(retrieved=retrieved_folder("nio_uv"), structure=structure)
    assert node.is_finished_ok, node.exit_message
    intersite = [p for p in structure.hubbard.parameters if p.atom_index != p.neighbour_index]
    assert len(intersite) == 2
    for parameter in intersite:
        block = result["occupations"].get_intersite(
            parameter.atom_index, parameter.neighbour_index, parameter.translation
        )
        assert block.shape == (2, 5, 3)


@pytest.mark.parametrize(
    "case,structure_kind,files,replace,status,message",
    [
        ("nio_u", "plain", None, None, 310, "not a HubbardStructureData"),
        ("nio_uv", "uv", ("aiida.out", "data-file-schema.xml"), None, 311, "additional_retrieve_list"),
        ("nio_u", "u", ("aiida.out",), None, 311, "no data-file-schema.xml"),
        (
            "nio_u", "u", None,
            {"data-file-schema.xml": ('NAME="PWSCF" VERSION="7.2"', 'NAME="PWSCF" VERSION="7.3"')},
            312, "QE '7.3'",
        ),
        ("nio_uv", "u", None, None, 313, "structure has U=1.0 eV on atom 2, the run used 0.000000 eV"),
        ("nio_uv", "strained", None, None, 313, "does not belong to this structure"),
    ],
)
def test_extract_occupations_bad_input(
    aiida_profile, occupations_entry_point, case, structure_kind, files, replace, status, message
):
    from aiida import orm

    from aiida_eqml.calculations.functions.occupations import extract_occupations

    if structure_kind == "plain":
        structure = orm.StructureData(cell=nio_structure(False).cell)
        for site in nio_structure(False).sites:
            structure.append_atom(position=site.position, symbols=site.kind_name[:2].rstrip("12"), name=site.kind_name)
    elif structure_kind == "strained":
        from conftest import make_nio_afm_hubbard_structure

        structure = make_nio_afm_hubbard_structure(a_cubic=4.20)
        structure.hubbard = nio_structure(True).hubbard
    else:
        structure = nio_structure(structure_kind == "uv")
    kwargs = {"files": files} if files else {}
    retrieved = retrieved_folder(case, replace=replace, **kwargs)
    result, node = extract_occupations.run_get_node(retrieved=retrieved, structure=structure)
    assert node.exit_status == status
    assert message in node.exit_message
    assert not node.base.links.get_outgoing().all()
    assert result == {}


# ------------------------------------------------------------------ end to end: a real PwCalculation


@pytest.mark.qe
@pytest.mark.slow
def test_real_pw_calculation_u_plus_v(aiida_profile, occupations_entry_point, qe_codes, pseudo_family):
    """DFT+U+V PwCalculation of AFM NiO through AiiDA with occup.txt retrieved, then extraction: the
    output node is linked to the calculation, and the matrices are those of its own files."""
    from aiida import orm
    from aiida.engine import run_get_node
    from aiida_quantumespresso.calculations.pw import PwCalculation

    from aiida_eqml.calculations.functions.occupations import extract_occupations

    structure = nio_structure(True)
    builder = PwCalculation.get_builder()
    builder.code = qe_codes["pw"]
    builder.structure = structure
    builder.pseudos = pseudo_family.get_pseudos(structure=structure)
    builder.parameters = orm.Dict(
        {
            "CONTROL": {"calculation": "scf"},
            "SYSTEM": {
                "ecutwfc": 30.0, "ecutrho": 120.0, "occupations": "smearing", "smearing": "cold",
                "degauss": 0.01, "nspin": 2, "starting_magnetization": {"Ni1": 0.5, "Ni2": -0.5, "O": 0.0},
            },
            "ELECTRONS": {"conv_thr": 1e-7, "mixing_beta": 0.4},
        }
    )
    builder.kpoints = orm.KpointsData()
    builder.kpoints.set_kpoints_mesh([2, 2, 2])
    builder.metadata.options = {
        "resources": {"num_machines": 1, "num_mpiprocs_per_machine": 1},
        "withmpi": False,
        "additional_retrieve_list": ["out/aiida.save/occup.txt"],
    }
    _, calc = run_get_node(builder)
    assert calc.is_finished_ok, calc.exit_message

    result, extraction = extract_occupations.run_get_node(
        retrieved=calc.outputs.retrieved, structure=calc.inputs.structure
    )
    assert extraction.is_finished_ok, extraction.exit_message
    occupations = result["occupations"]
    # provenance: PwCalculation -> retrieved -> extract_occupations -> occupations
    assert occupations.creator.inputs.retrieved.creator.pk == calc.pk
    assert occupations.creator.inputs.structure.pk == calc.inputs.structure.pk
    assert occupations.hubbard_type == "U+V" and len(occupations.get_array("intersite_keys")) == 24
    printed = parse_printed_traces(calc.outputs.retrieved.base.repository.get_object_content("aiida.out"))
    np.testing.assert_allclose(
        occupations.base.attributes.get("onsite_traces"), [printed[a][:2] for a in (1, 2, 3, 4)], atol=6e-6
    )
