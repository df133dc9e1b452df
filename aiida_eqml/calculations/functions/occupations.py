"""``extract_occupations``: occupation matrices of a finished DFT+U(+V) ``PwCalculation``, with provenance.

Inputs are the calculation's ``retrieved`` FolderData and its input ``structure`` (a
``HubbardStructureData``), so the returned ``eqml.occupations`` node hangs off the PwCalculation in
the provenance graph::

    calc = ...  # finished PwCalculation (for U+V run it with
                # metadata.options.additional_retrieve_list = ['out/aiida.save/occup.txt'])
    result = extract_occupations(retrieved=calc.outputs.retrieved, structure=calc.inputs.structure)
    occupations = result['occupations']

Bad input ends the process with one of ``EXIT_CODES`` (and no output node).
"""
from __future__ import annotations

from aiida import orm
from aiida.engine import ExitCode, calcfunction

from aiida_eqml.parsers.occupations import (
    MissingFileError,
    MissingHubbardError,
    OccupationParsingError,
    UnsupportedOutputError,
    build_occupations_node,
)

__all__ = ("EXIT_CODES", "extract_occupations")

#: name -> exit status of ``extract_occupations``.
EXIT_CODES = {
    "ERROR_NOT_HUBBARD": 310,
    "ERROR_MISSING_FILE": 311,
    "ERROR_UNSUPPORTED_OUTPUT": 312,
    "ERROR_INVALID_OUTPUT": 313,
}


@calcfunction
def extract_occupations(retrieved: orm.FolderData, structure: orm.StructureData):
    """Return ``{'occupations': OccupationMatricesData}`` parsed from ``retrieved`` (see module doc)."""
    try:
        node = build_occupations_node(retrieved, structure)
    except MissingHubbardError as exc:
        return ExitCode(EXIT_CODES["ERROR_NOT_HUBBARD"], f"not a Hubbard calculation: {exc}")
    except MissingFileError as exc:
        return ExitCode(EXIT_CODES["ERROR_MISSING_FILE"], f"missing file: {exc}")
    except UnsupportedOutputError as exc:
        return ExitCode(EXIT_CODES["ERROR_UNSUPPORTED_OUTPUT"], f"unsupported QE output: {exc}")
    except OccupationParsingError as exc:
        return ExitCode(EXIT_CODES["ERROR_INVALID_OUTPUT"], f"invalid QE output: {exc}")
    return {"occupations": node}
