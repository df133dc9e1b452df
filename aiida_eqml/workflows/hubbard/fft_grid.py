"""An FFT grid that every symmetry of the crystal maps onto itself, for cells where pw.x's own choice is not one.

hp.x stops in ``scale_sym_ops`` ("found rotation not compatible with FFT grid", aiida-quantumespresso's exit 495)
when a symmetry operation that pw.x kept turns one grid axis into another of a different size. pw.x sizes each
axis on its own and then enlarges an axis until the fractional translations along it fall on grid points, so two
lattice vectors of the same length that a rotation exchanges can end up with different sizes. Measured on the
body-centred primitive cell of anatase TiO2 at 240 Ry: pw.x chose (60, 60, 54) for three vectors of equal length
(the 1/4 translations lie along the first two only), and hp.x failed on every perturbation.

:func:`symmetric_fft_grid` returns the ``nr1``/``nr2``/``nr3`` to put in ``SYSTEM`` for such a cell (each group of
axes that a rotation mixes gets one size, large enough for the cutoff and divisible by every translation's
denominator along the group) and ``{}`` where pw.x's own per-axis choice is already consistent, so the runs of
every other cell stay as they were. :func:`with_symmetric_fft_grid` applies it to pw.x parameters; the ML loop
(each scf, when it has hp.x inputs) and ``eqml.labels.hubbard`` (per structure) call it.
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

__all__ = ('symmetric_fft_grid', 'with_symmetric_fft_grid')

BOHR_ANGSTROM = 0.529177210903


def _good_fft_order(n: int, divisor: int = 1) -> int:
    """The smallest m >= n with prime factors 2, 3 and 5 only (what every FFT backend of QE accepts) that
    ``divisor`` divides."""
    m = max(int(n), 1)
    while True:
        if m % divisor == 0:
            rest = m
            for p in (2, 3, 5):
                while rest % p == 0:
                    rest //= p
            if rest == 1:
                return m
        m += 1


def _axis_sizes(cell: np.ndarray, ecutrho_ry: float) -> list[int]:
    """pw.x's starting size of each axis (``realspace_grid_init``): int(2 G_max |a_i| / 2 pi) + 1, G_max in 1/bohr."""
    g_max = math.sqrt(ecutrho_ry)  # Ry: E = G^2 with G in 1/bohr
    return [int(2.0 * g_max * np.linalg.norm(a) / BOHR_ANGSTROM / (2.0 * math.pi)) + 1 for a in cell]


def symmetric_fft_grid(atoms, ecutrho_ry: float, symprec: float = 1e-5) -> dict[str, int]:
    """``{'nr1': .., 'nr2': .., 'nr3': ..}`` for ``SYSTEM`` when pw.x's per-axis grid could break a symmetry that hp.x
    needs (see the module), else ``{}``. ``atoms``: an ``ase.Atoms`` (e.g. ``StructureData.get_ase()``); its
    magnetic kinds are told apart by their tags, as pw.x tells them apart by species."""
    import spglib

    cell = np.asarray(atoms.cell[:], dtype=float)
    numbers = [int(z) * 1000 + int(t) for z, t in zip(atoms.numbers, atoms.get_tags())]
    dataset = spglib.get_symmetry((cell, atoms.get_scaled_positions(), numbers), symprec=symprec)
    if dataset is None:
        return {}
    rotations, translations = dataset['rotations'], dataset['translations']
    # the smallest n_i that puts every fractional translation along axis i on a grid point
    divisors = [1, 1, 1]
    for t in translations:
        for i in range(3):
            fraction = Fraction(float(t[i]) % 1.0).limit_denominator(48)
            divisors[i] = math.lcm(divisors[i], fraction.denominator)
    # axes that some rotation mixes must share one size (union-find over three axes)
    group = [0, 1, 2]
    for r in rotations:
        for i in range(3):
            for j in range(3):
                if i != j and r[i, j] != 0:
                    a, b = group[i], group[j]
                    group = [a if g == b else g for g in group]
    base = _axis_sizes(cell, ecutrho_ry)
    own = [_good_fft_order(n, divisors[i]) for i, n in enumerate(base)]  # pw.x's choice, axis by axis
    shared = list(own)
    for label in set(group):
        axes = [i for i in range(3) if group[i] == label]
        divisor = math.lcm(*(divisors[i] for i in axes))
        size = _good_fft_order(max(base[i] for i in axes), divisor)
        for i in axes:
            shared[i] = size
    if shared == own:
        return {}  # pw.x's own choice already gives the mixed axes one size
    return {'nr1': shared[0], 'nr2': shared[1], 'nr3': shared[2]}


def with_symmetric_fft_grid(parameters: dict, structure) -> dict:
    """pw.x ``parameters`` (a plain dict) with ``SYSTEM.nr1-3`` of :func:`symmetric_fft_grid` for ``structure`` (a
    ``StructureData``) where pw.x's own grid would stop hp.x; a copy, unchanged where the user set a grid or none
    is needed."""
    system = dict(parameters.get('SYSTEM', {}))
    if any(key in system for key in ('nr1', 'nr2', 'nr3')) or 'ecutrho' not in system:
        return parameters
    grid = symmetric_fft_grid(structure.get_ase(), float(system['ecutrho']))
    return {**parameters, 'SYSTEM': {**system, **grid}} if grid else parameters
