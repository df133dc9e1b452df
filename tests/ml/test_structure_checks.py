"""Structures that used to kill the interpreter (SIGFPE in vesin) or hang it are refused with a StructureError."""
import subprocess
import sys
import textwrap

import ase
import numpy as np
import pytest

from aiida_eqml.ml.graph import graph_from_atoms
from aiida_eqml.ml.structure_checks import StructureError, validate_atoms

ENTRY = 'graph_from_atoms (ML API)'

# name -> (ase.Atoms keyword arguments, text the message must contain)
BAD_STRUCTURES = {
    'two atoms 4e5 A apart, no pbc (SIGFPE before)': (
        dict(symbols='OH', positions=[[0, 0, 0], [4e5, 0, 0]]),
        'non-periodic',
    ),
    'NaN in the cell (SIGFPE before)': (
        dict(symbols='OH', positions=[[0, 0, 0], [1, 0, 0]], cell=[[np.nan, 0, 0], [0, 3, 0], [0, 0, 3]], pbc=True),
        'cell',
    ),
    'zero periodic vector, pbc (T, T, F) (SIGFPE before)': (
        dict(
            symbols='OH',
            positions=[[0, 0, 0], [1, 0, 0]],
            cell=[[3, 0, 0], [0, 0, 0], [0, 0, 10]],
            pbc=[True, True, False],
        ),
        'cell vector 1',
    ),
    'parallel periodic vectors, pbc (T, T, F) (SIGFPE before)': (
        dict(
            symbols='OH',
            positions=[[0, 0, 0], [1, 0, 0]],
            cell=[[3, 0, 0], [6, 0, 0], [0, 0, 10]],
            pbc=[True, True, False],
        ),
        'degenerate',
    ),
    'slab atom at z = 1e5 A (hang before)': (
        dict(
            symbols='OH',
            positions=[[0, 0, 0], [1, 0, 1e5]],
            cell=[[3, 0, 0], [0, 3, 0], [0, 0, 0]],
            pbc=[True, True, False],
        ),
        'non-periodic',
    ),
    'NaN position': (dict(symbols='OH', positions=[[0, 0, 0], [np.nan, 0, 0]], cell=[4, 4, 4], pbc=True), 'positions'),
    'two atoms at the same place': (
        dict(symbols='OH', positions=[[1, 1, 1], [1, 1, 1]], cell=[4, 4, 4], pbc=True),
        'overlapping',
    ),
    'periodic cell 0.05 A long (atom on its own image)': (
        dict(symbols='O', positions=[[0, 0, 0]], cell=[0.05, 4, 4], pbc=True),
        'too short',
    ),
    'no atoms': (dict(cell=[4, 4, 4], pbc=True), 'no atoms'),
}


@pytest.mark.parametrize('name', sorted(BAD_STRUCTURES))
def test_bad_structure_raises_structure_error(name, reliability):
    kwargs, text = BAD_STRUCTURES[name]
    error = reliability.raises(ENTRY, name, StructureError, graph_from_atoms, ase.Atoms(**kwargs), 3.0, ['O', 'H'])
    assert isinstance(error, ValueError) and text in str(error)


def test_bad_cutoff_is_refused():
    atoms = ase.Atoms('O', cell=[4, 4, 4], pbc=True)
    for cutoff in (0.0, -1.0, float('nan'), float('inf'), 'x'):
        with pytest.raises(StructureError, match='cutoff'):
            graph_from_atoms(atoms, cutoff, ['O'])


def test_good_structures_still_make_graphs():
    slab = ase.Atoms(
        'OH', positions=[[0, 0, 0], [0, 0, 0.97]], cell=[[3, 0, 0], [0, 3, 0], [0, 0, 0]], pbc=[True, True, False]
    )
    graph = graph_from_atoms(slab, 3.0, ['O', 'H'])
    assert int(graph.n_edge[0]) > 0
    molecule = ase.Atoms('OH', positions=[[0, 0, 0], [0.97, 0, 0]])
    assert int(graph_from_atoms(molecule, 3.0, ['O', 'H']).n_edge[0]) == 2
    validate_atoms(molecule)


def test_crashing_structures_leave_the_interpreter_alive():
    """In a child interpreter (a SIGFPE there would not take pytest down): every case raises, the process exits 0."""
    cases = {name: kwargs for name, (kwargs, _) in BAD_STRUCTURES.items() if 'before' in name}
    script = textwrap.dedent(f"""
        import ase, numpy as np
        from numpy import nan
        from aiida_eqml.ml.graph import graph_from_atoms
        for name, kwargs in {cases!r}.items():
            try:
                graph_from_atoms(ase.Atoms(**kwargs), 3.0, ['O', 'H'])
            except ValueError as exc:
                print('refused:', name, type(exc).__name__)
            else:
                raise SystemExit('accepted: ' + name)
    """)
    proc = subprocess.run(
        [sys.executable, '-c', script],
        capture_output=True,
        text=True,
        timeout=120,
        env={'JAX_PLATFORMS': 'cpu', 'PATH': ''},
    )
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr[-2000:])
    assert proc.stdout.count('refused:') == len(cases) and 'StructureError' in proc.stdout
