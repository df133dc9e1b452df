"""Reference structures used by the demo job and the test fixtures."""
from __future__ import annotations

import numpy as np

#: Rock-salt NiO lattice constant (Angstrom), experiment.
NIO_A_CUBIC = 4.17


def nio_afm_hubbard_structure(a_cubic: float = NIO_A_CUBIC, u_ni_3d: float = 5.0):
    """Unstored ``HubbardStructureData`` of antiferromagnetic (AFM-II) NiO with U on Ni 3d.

    The rhombohedral 4-atom cell whose two Ni (kinds ``Ni1``, ``Ni2``: opposite spins) sit on alternating
    (111) planes; the Hubbard atoms come first, as aiida-hubbard requires; ortho-atomic projectors.
    """
    from aiida_quantumespresso.data.hubbard_structure import HubbardStructureData

    cell = a_cubic * np.array([[0.5, 0.5, 1.0], [0.5, 1.0, 0.5], [1.0, 0.5, 0.5]])
    sites = [
        ('Ni', 'Ni1', (0.0, 0.0, 0.0)),
        ('Ni', 'Ni2', (0.5, 0.5, 0.5)),
        ('O', 'O', (0.25, 0.25, 0.25)),
        ('O', 'O', (0.75, 0.75, 0.75)),
    ]
    structure = HubbardStructureData(
        cell=cell.tolist(),
        sites=[(symbol, kind, tuple(float(x) for x in np.dot(frac, cell))) for symbol, kind, frac in sites],
    )
    for kind in ('Ni1', 'Ni2'):
        structure.initialize_onsites_hubbard(kind, '3d', u_ni_3d, 'Ueff', use_kinds=True)
    return structure


#: Starting magnetic moments (Bohr magneton) of the AFM order, keyed by kind name.
NIO_AFM_MAGNETIC_MOMENTS = {'Ni1': 2.0, 'Ni2': -2.0, 'O': 0.0}
