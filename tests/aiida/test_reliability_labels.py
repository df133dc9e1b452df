"""Label work chains check every structure with the shared structure checks before anything runs."""
from __future__ import annotations

import pytest


def _structure(cell, positions, symbols, pbc=(True, True, True)):
    from aiida import orm

    structure = orm.StructureData(cell=cell, pbc=pbc)
    for position, symbol in zip(positions, symbols):
        structure.append_atom(position=position, symbols=symbol)
    return structure


@pytest.mark.parametrize(
    'name,args,text',
    [
        (
            'two atoms at the same place',
            ([[4, 0, 0], [0, 4, 0], [0, 0, 4]], [(1, 1, 1), (1, 1, 1)], ['Si', 'Si']),
            'overlapping',
        ),
        (
            'an atom 4e5 A away, no pbc',
            ([[4, 0, 0], [0, 4, 0], [0, 0, 4]], [(0, 0, 0), (4e5, 0, 0)], ['Si', 'Si'], (False,) * 3),
            'non-periodic',
        ),
        (
            'parallel cell vectors',
            ([[4, 0, 0], [8, 0, 0.001], [0, 0, 4]], [(0, 0, 0), (1, 1, 1)], ['Si', 'Si']),
            'degenerate',
        ),
    ],
)
def test_structure_problem(aiida_profile, reliability, name, args, text):
    from aiida_eqml.workflows.labels import structure_problem

    reason = structure_problem(_structure(*args))
    assert reason is not None and text in reason
    reliability.record('eqml.labels.* structure check (structure_problem)', name, f'refused: {reason}')


def test_good_structure_passes(aiida_profile):
    from aiida_eqml.workflows.labels import structure_problem

    a = 5.43
    si = _structure(
        [[0, a / 2, a / 2], [a / 2, 0, a / 2], [a / 2, a / 2, 0]], [(0, 0, 0), (a / 4, a / 4, a / 4)], ['Si', 'Si']
    )
    assert structure_problem(si) is None


@pytest.mark.qe
def test_energy_labels_refuse_overlapping_atoms(aiida_profile, qe_codes, pseudo_family, reliability):
    """No QE runs: the work chain stops in `setup` with 301 naming the structure."""
    from aiida.engine import run_get_node

    from aiida_eqml.workflows.labels.energies import EnergyLabelsWorkChain

    bad = _structure([[4, 0, 0], [0, 4, 0], [0, 0, 4]], [(1, 1, 1), (1, 1, 1.01)], ['Si', 'Si'])
    builder = EnergyLabelsWorkChain.get_builder_from_protocol(qe_codes['pw'], {'overlap': bad}, protocol='fast')
    results, node = run_get_node(builder)
    assert node.exit_status == 301 and '`overlap`' in node.exit_message and 'overlapping' in node.exit_message
    assert results == {} and not node.called
    reliability.record(
        'eqml.labels.energies (WorkChain)', 'two Si atoms 0.01 A apart', f'exit {node.exit_status}: {node.exit_message}'
    )
