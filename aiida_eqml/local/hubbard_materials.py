"""Crystal prototypes of the Hubbard reference set: transition-metal oxides of six structure types.

Each :class:`HubbardMaterial` knows its cell (experimental lattice parameters, rounded), its kinds (one per spin
sublattice), its magnetic order, and its Hubbard manifolds: U on the transition-metal 3d shell, and for ``U+V``
materials V on the nearest TM 3d - O 2p pairs (the couples that hp.x then returns; see :func:`hubbard_structure`
for why O 2p gets no U). Strained
cells scale the lattice isotropically (``strain`` = a/a0). The Hubbard atoms come first, as aiida-hubbard
requires.

The geometry is built with ASE; :func:`hubbard_structure` turns it into an (unstored) ``HubbardStructureData``.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

__all__ = ('HubbardMaterial', 'MATERIALS', 'hubbard_structure', 'material_key', 'supercell_sites')

#: Starting U / V (eV) of the first scf of a self-consistent cycle (hp.x computes the response from scratch;
#: the starting values only choose the ground state it perturbs).
U_START_3D = {'Ti': 3.0, 'Mn': 5.0, 'Fe': 5.0, 'Co': 5.0, 'Ni': 5.0}
V_START = 1.0
#: Starting magnetization (QE's fraction of the valence charge) of a spin-up / spin-down TM kind.
MAGNETIZATION = 0.8


@dataclasses.dataclass(frozen=True)
class HubbardMaterial:
    """One material: composition + structure type + magnetic order."""

    name: str  # e.g. 'NiO-rocksalt-afm2'
    structure_type: str
    metal: str  # the transition metal(s) with a U, e.g. 'Ni' or 'Ni,Co' for a mixed-metal cell
    order: str  # 'nm', 'fm', 'afm'
    hubbard: str  # 'U' or 'U+V'
    sites: Callable[[], tuple[np.ndarray, list[tuple[str, str, tuple[float, float, float]]]]]
    note: str = ''
    #: the metals that carry a starting moment in a magnetic order (comma-separated; empty: every metal), e.g. Ni in
    #: NiTiO3, whose Ti4+ is d0
    magnetic: str = ''

    @property
    def metals(self) -> tuple[str, ...]:
        return tuple(self.metal.split(','))

    def magnetization(self) -> dict[str, float] | None:
        """``{kind: starting magnetization}`` or None for a non-magnetic material."""
        if self.order == 'nm':
            return None
        _, sites = self.sites()
        moments = {}
        magnetic = tuple(self.magnetic.split(',')) if self.magnetic else self.metals
        for symbol, kind, _ in sites:
            if symbol in magnetic:
                moments[kind] = -MAGNETIZATION if kind.endswith('2') and self.order == 'afm' else MAGNETIZATION
            else:
                moments[kind] = 0.0
        return moments


def _fractional(cell, sites):
    cell = np.asarray(cell, dtype=float)
    return cell, [(symbol, kind, tuple(float(x) for x in np.dot(frac, cell))) for symbol, kind, frac in sites]


def _wrapped(cell, cartesian):
    """The ``sites`` callable of Cartesian ``(symbol, kind, position)`` sites folded into ``cell`` (fractional
    coordinates in [0, 1)), in the order given."""

    def sites():
        inverse = np.linalg.inv(cell)
        wrapped = [(s, k, np.dot(np.mod(np.dot(np.asarray(r), inverse), 1.0), cell)) for s, k, r in cartesian]
        return cell, [(s, k, tuple(float(x) for x in r)) for s, k, r in wrapped]

    return sites


def _rocksalt_afm2(metal: str, a: float):
    """AFM-II rock salt: rhombohedral 4-atom cell, TM spins alternating on (111) planes."""
    cell = a * np.array([[0.5, 0.5, 1.0], [0.5, 1.0, 0.5], [1.0, 0.5, 0.5]])
    return lambda: _fractional(cell, [
        (metal, f'{metal}1', (0.0, 0.0, 0.0)), (metal, f'{metal}2', (0.5, 0.5, 0.5)),
        ('O', 'O', (0.25, 0.25, 0.25)), ('O', 'O', (0.75, 0.75, 0.75)),
    ])


def _rocksalt_fm(metal: str, a: float):
    cell = 0.5 * a * np.array([[0.0, 1.0, 1.0], [1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    return lambda: _fractional(cell, [(metal, metal, (0.0, 0.0, 0.0)), ('O', 'O', (0.5, 0.5, 0.5))])


def _layered_r3m(metal: str, a: float, c: float, z: float, lithiated: bool, parent_c: float | None = None):
    """alpha-NaFeO2-type LiMO2 (R-3m, 4-atom rhombohedral cell; ``z`` of O 6c with Li on 3a); delithiated MO2 keeps
    the O3 stacking and the MO6 octahedron (the O height above the M plane is that of the parent of c ``parent_c``)."""
    hexagonal = np.array([[a, 0.0, 0.0], [-a / 2, a * np.sqrt(3) / 2, 0.0], [0.0, 0.0, c]])
    to_primitive = np.array([[2 / 3, 1 / 3, 1 / 3], [-1 / 3, 1 / 3, 1 / 3], [-1 / 3, -2 / 3, 1 / 3]])
    cell = to_primitive @ hexagonal
    z = 0.5 - z  # z is tabulated with Li at the origin (3a), here M is
    if parent_c is not None:
        z = 1 / 3 - (1 / 3 - z) * parent_c / c
    cartesian = [(metal, metal, np.zeros(3)), ('O', 'O', np.array([0, 0, z * c])), ('O', 'O', np.array([0, 0, -z * c]))]
    if lithiated:
        cartesian.append(('Li', 'Li', np.array([0, 0, c / 2])))

    return _wrapped(cell, cartesian)


def _layered_r3m_mixed(first: str, second: str, a: float, c: float, z: float):
    """LiM(1/2)M'(1/2)O2: the R-3m cell of :func:`_layered_r3m` doubled along its first vector (8 atoms), the metal of
    one copy replaced by ``second`` (a Ni/Co-ordered approximant of the solid solution; TM sites first)."""
    parent = _layered_r3m(first, a, c, z, True)

    def sites():
        cell, atoms = parent()
        supercell = np.array(cell) * np.array([[2.0], [1.0], [1.0]])
        doubled = []
        for copy in (0, 1):
            for symbol, kind, position in atoms:
                if copy and symbol == first:
                    symbol, kind = second, second
                doubled.append(
                    (symbol, kind, tuple(float(x) for x in np.asarray(position) + copy * np.asarray(cell[0])))
                )
        order = {first: 0, second: 0}
        return supercell, sorted(doubled, key=lambda site: order.get(site[0], 1))

    return sites


def _rutile(metal: str, a: float, c: float, x: float, afm: bool):
    cell = np.diag([a, a, c])
    second = f'{metal}2' if afm else f'{metal}1'
    return lambda: _fractional(cell, [
        (metal, f'{metal}1', (0.0, 0.0, 0.0)), (metal, second, (0.5, 0.5, 0.5)),
        ('O', 'O', (x, x, 0.0)), ('O', 'O', (1 - x, 1 - x, 0.0)),
        ('O', 'O', (0.5 + x, 0.5 - x, 0.5)), ('O', 'O', (0.5 - x, 0.5 + x, 0.5)),
    ])


def _perovskite(metal: str, a_site: str, a: float):
    cell = np.eye(3) * a
    return lambda: _fractional(cell, [
        (metal, metal, (0.5, 0.5, 0.5)),
        ('O', 'O', (0.5, 0.5, 0.0)), ('O', 'O', (0.5, 0.0, 0.5)), ('O', 'O', (0.0, 0.5, 0.5)),
        (a_site, a_site, (0.0, 0.0, 0.0)),
    ])


def _anatase(metal: str, a: float, c: float, u: float):
    """Anatase (I4_1/amd): the 6-atom body-centred primitive cell, from the conventional cell's Wyckoff positions in
    origin choice 1 (M 4a at 0, 0, 0; O 8e at 0, 0, u) of one of its two lattice points."""
    cell = 0.5 * np.array([[-a, a, c], [a, -a, c], [a, a, -c]])
    cartesian = [(metal, metal, (0.0, 0.0, 0.0)), (metal, metal, (0.0, a / 2, c / 4))]
    cartesian += [('O', 'O', (0.0, 0.0, s * u * c)) for s in (1, -1)]
    cartesian += [('O', 'O', (0.0, a / 2, c / 4 + s * u * c)) for s in (1, -1)]

    return _wrapped(cell, cartesian)


def _ruddlesden_popper_n2(metal: str, a_site: str, a: float, c: float, z_a: float, z_m: float, z_apical: float,
                          z_equatorial: float):
    """A3M2O7, the n = 2 Ruddlesden-Popper phase (I4/mmm): the 12-atom body-centred primitive cell, from the
    conventional cell's Wyckoff positions (A 2b + 4e, M 4e, O 2a + 4e + 8g) of one of its two lattice points."""
    cell = 0.5 * np.array([[-a, a, c], [a, -a, c], [a, a, -c]])
    cartesian = [(metal, metal, (0.0, 0.0, s * z_m * c)) for s in (1, -1)]
    cartesian += [('O', 'O', (0.0, 0.0, 0.0))]  # 2a: shared apex of the bilayer
    cartesian += [('O', 'O', (0.0, 0.0, s * z_apical * c)) for s in (1, -1)]  # 4e: outer apices
    cartesian += [('O', 'O', (x, y, s * z_equatorial * c)) for s in (1, -1) for x, y in ((0.0, a / 2), (a / 2, 0.0))]
    cartesian += [(a_site, a_site, (0.0, 0.0, c / 2))] + [(a_site, a_site, (0.0, 0.0, s * z_a * c)) for s in (1, -1)]

    return _wrapped(cell, cartesian)


def _ruddlesden_popper_n1(metal: str, a_site: str, a: float, c: float, z_a: float, z_apical: float):
    """A2MO4, the n = 1 Ruddlesden-Popper (K2NiF4) phase (I4/mmm): the 7-atom body-centred primitive cell, from the
    conventional cell's Wyckoff positions (M 2a, O 4c + 4e, A 4e) of one of its two lattice points."""
    cell = 0.5 * np.array([[-a, a, c], [a, -a, c], [a, a, -c]])
    cartesian = [(metal, metal, (0.0, 0.0, 0.0))]
    cartesian += [('O', 'O', (x, y, 0.0)) for x, y in ((0.0, a / 2), (a / 2, 0.0))]  # 4c: equatorial
    cartesian += [('O', 'O', (0.0, 0.0, s * z_apical * c)) for s in (1, -1)]  # 4e: apical
    cartesian += [(a_site, a_site, (0.0, 0.0, s * z_a * c)) for s in (1, -1)]

    return _wrapped(cell, cartesian)


def _ilmenite(metal: str, a: float, c: float, z_metal: float, z_ti: float, oxygen: tuple[float, float, float]):
    """MTiO3 ilmenite (R-3): the 10-atom rhombohedral primitive cell, from the hexagonal cell's Wyckoff positions
    (M and Ti on 6c at (0, 0, z), O on 18f), built by ASE's space-group expansion; metals first, one kind each
    (ferromagnetic M layers)."""

    def sites():
        from ase.spacegroup import crystal

        atoms = crystal([metal, 'Ti', 'O'], basis=[(0, 0, z_metal), (0, 0, z_ti), oxygen], spacegroup=148,
                        cellpar=[a, a, c, 90, 90, 120], primitive_cell=True)
        rank = {metal: 0, 'Ti': 1, 'O': 2}
        ordered = sorted(zip(atoms.get_chemical_symbols(), atoms.positions), key=lambda site: rank[site[0]])
        return np.array(atoms.cell), [(s, s, tuple(float(x) for x in r)) for s, r in ordered]

    return sites


def _materials() -> dict[str, HubbardMaterial]:
    items = [
        # Rock salt, AFM-II (the magnetic ground state of MnO, FeO, CoO, NiO), U only.
        *[
            HubbardMaterial(f'{m}O-rocksalt-afm2', 'rocksalt', m, 'afm', 'U', _rocksalt_afm2(m, a))
            for m, a in (('Mn', 4.445), ('Fe', 4.334), ('Co', 4.263), ('Ni', 4.17))
        ],
        # Rock salt FM where it is insulating at this protocol (docs/hubbard.md: NiO, MnO), U only.
        *[
            HubbardMaterial(f'{m}O-rocksalt-fm', 'rocksalt', m, 'fm', 'U', _rocksalt_fm(m, a))
            for m, a in (('Mn', 4.445), ('Ni', 4.17))
        ],
        # Layered R-3m and the delithiated O3 frames, U+V.
        HubbardMaterial(
            'LiCoO2-layered',
            'layered-R-3m',
            'Co',
            'nm',
            'U+V',
            _layered_r3m('Co', 2.816, 14.05, 0.2396, True),
            'low-spin Co3+',
        ),
        HubbardMaterial(
            'LiNiO2-layered',
            'layered-R-3m',
            'Ni',
            'fm',
            'U+V',
            _layered_r3m('Ni', 2.878, 14.19, 0.2412, True),
            'low-spin Ni3+, ferromagnetic layers',
        ),
        HubbardMaterial(
            'Li2NiCoO4-layered',
            'layered-R-3m',
            'Ni,Co',
            'fm',
            'U+V',
            _layered_r3m_mixed('Ni', 'Co', 2.847, 14.12, 0.2404),
            '8 atoms, Ni/Co ordered along one rhombohedral vector; low-spin Ni3+ (1 muB) and Co3+',
        ),
        HubbardMaterial(
            'CoO2-layered',
            'layered-R-3m',
            'Co',
            'fm',
            'U+V',
            _layered_r3m('Co', 2.82, 13.50, 0.2396, False, parent_c=14.05),
            'delithiated O3 frame',
        ),
        HubbardMaterial(
            'NiO2-layered',
            'layered-R-3m',
            'Ni',
            'nm',
            'U+V',
            _layered_r3m('Ni', 2.81, 13.30, 0.2412, False, parent_c=14.19),
            'delithiated O3 frame, low-spin Ni4+',
        ),
        # Rutile, U+V.
        HubbardMaterial(
            'MnO2-rutile-afm',
            'rutile',
            'Mn',
            'afm',
            'U+V',
            _rutile('Mn', 4.396, 2.871, 0.3046, True),
            'beta-MnO2, collinear AFM approximant of its helix',
        ),
        HubbardMaterial('TiO2-rutile', 'rutile', 'Ti', 'nm', 'U+V', _rutile('Ti', 4.594, 2.959, 0.3048, False)),
        # Anatase, U+V: a second structure type of the same composition (TiO6 octahedra sharing four edges instead
        # of two), so that a held-out TiO2 is not the only Ti oxide of its kind
        HubbardMaterial('TiO2-anatase', 'anatase', 'Ti', 'nm', 'U+V', _anatase('Ti', 3.785, 9.514, 0.2081)),
        # Cubic perovskite, U+V.
        HubbardMaterial('SrTiO3-perovskite', 'perovskite', 'Ti', 'nm', 'U+V', _perovskite('Ti', 'Sr', 3.905)),
        # Two more titanate perovskites (eleventh session): the A cation changes the Ti-O distance (a/2 = 1.92-2.00 A)
        # and the O 2p - Ti 3d covalency at the same TiO6 topology, so a held-out titanate is not predicted from
        # SrTiO3 alone. Cubic prototypes: BaTiO3's cubic phase (a = 4.00 A above 400 K); CaTiO3 at its
        # room-temperature pseudocubic volume (a = (V/4)^(1/3) = 3.83 A of the Pbnm cell, octahedral tilts left out).
        HubbardMaterial('BaTiO3-perovskite', 'perovskite', 'Ti', 'nm', 'U+V', _perovskite('Ti', 'Ba', 4.00)),
        HubbardMaterial('CaTiO3-perovskite', 'perovskite', 'Ti', 'nm', 'U+V', _perovskite('Ti', 'Ca', 3.83),
                        'cubic prototype at the pseudocubic volume of Pbnm CaTiO3'),
        # Ruddlesden-Popper n = 1, U+V (eleventh session): the single-layer titanate, so that a held-out SrTiO3 or
        # Sr3Ti2O7 is not the only Sr compound (the loop refuses an element its models never saw, even one without a
        # label); 7 atoms, the cheaper relative of Sr3Ti2O7. Structure rounded (a = 3.884, c = 12.60 A; Sr z = 0.3553,
        # apical O z = 0.1565: Ti-O 1.942 A equatorial, 1.972 A apical).
        HubbardMaterial('Sr2TiO4-ruddlesden-popper', 'ruddlesden-popper-n1', 'Ti', 'nm', 'U+V',
                        _ruddlesden_popper_n1('Ti', 'Sr', 3.884, 12.60, 0.3553, 0.1565), '7 atoms, I4/mmm'),
        # Ilmenite, U+V (eleventh session): a structure type with two different TM sites, Ni2+ (d8) or Mn2+ (d5) and
        # Ti4+ (d0), face-sharing MO6/TiO6 octahedra; FM order of the M layers (the ground state is AFM between
        # layers; FM keeps the 10-atom cell and is insulating for d8 and high-spin d5). Structures rounded from
        # single-crystal refinements (NiTiO3: a = 5.030, c = 13.790 A; MnTiO3: a = 5.138, c = 14.283 A).
        HubbardMaterial('NiTiO3-ilmenite-fm', 'ilmenite', 'Ni,Ti', 'fm', 'U+V',
                        _ilmenite('Ni', 5.0302, 13.7903, 0.3513, 0.1447, (0.3185, 0.0205, 0.2447)),
                        '10 atoms, R-3; Ni-O 2.06/2.14 A, Ti-O 1.84/2.08 A', magnetic='Ni'),
        HubbardMaterial('MnTiO3-ilmenite-fm', 'ilmenite', 'Mn,Ti', 'fm', 'U+V',
                        _ilmenite('Mn', 5.1380, 14.2830, 0.3585, 0.1463, (0.3142, 0.0307, 0.2446)),
                        '10 atoms, R-3; Mn-O 2.13/2.24 A, Ti-O 1.89/2.09 A', magnetic='Mn'),
        # Ruddlesden-Popper n = 2 (bilayer perovskite), U+V: 12 atoms, the >= 8-atom held-out material of
        # benchmarks/ml_vs_dfpt.py (non-magnetic d0 Ti4+: an insulator whose scf converges like SrTiO3's)
        HubbardMaterial(
            'Sr3Ti2O7-ruddlesden-popper',
            'ruddlesden-popper-n2',
            'Ti',
            'nm',
            'U+V',
            _ruddlesden_popper_n2('Ti', 'Sr', 3.903, 20.37, 0.3184, 0.0974, 0.1939, 0.0965),
            '12 atoms, I4/mmm; experimental structure rounded',
        ),
    ]
    return {material.name: material for material in items}


MATERIALS: dict[str, HubbardMaterial] = _materials()


def material_key(name: str, strain: float) -> str:
    """Link-label-safe key of one cell, e.g. ``NiO_rocksalt_afm2_s100``."""
    return f"{name.replace('-', '_')}_s{round(strain * 100):03d}"


def supercell_sites(material: HubbardMaterial, repeat: tuple[int, int, int] = (1, 1, 1)):
    """The material's cell repeated ``repeat`` times along its lattice vectors, kinds kept (so the magnetic order
    is the same), the Hubbard atoms still first."""
    cell, sites = material.sites()
    cell = np.asarray(cell, dtype=float)
    if tuple(repeat) == (1, 1, 1):
        return cell, sites
    if any(int(n) < 1 for n in repeat):
        raise ValueError(f'supercell repeat {tuple(repeat)}: every factor must be a positive integer')
    shifts = [np.array(t) @ cell for t in np.ndindex(*(int(n) for n in repeat))]
    # every image of a site next to its own: the cell's site order (Hubbard atoms first) is kept
    repeated = [(symbol, kind, tuple(np.asarray(position) + shift)) for symbol, kind, position in sites
                for shift in shifts]
    return cell * np.asarray(repeat, dtype=float)[:, None], repeated


def hubbard_structure(material: HubbardMaterial | str, strain: float = 1.0, repeat: tuple[int, int, int] = (1, 1, 1)):
    """Unstored ``HubbardStructureData`` of the material with its lattice scaled by ``strain`` (a/a0), optionally as
    a ``repeat`` supercell (the same material in a larger cell: e.g. a cost test at more atoms)."""
    from aiida_quantumespresso.data.hubbard_structure import HubbardStructureData

    material = MATERIALS[material] if isinstance(material, str) else material
    cell, sites = supercell_sites(material, repeat)
    structure = HubbardStructureData(
        cell=(np.asarray(cell) * strain).tolist(),
        sites=[(symbol, kind, tuple(float(x) * strain for x in position)) for symbol, kind, position in sites],
    )
    metal_kinds = sorted({kind for symbol, kind, _ in sites if symbol in material.metals})
    u_start = {kind: U_START_3D[symbol] for symbol, kind, _ in sites if symbol in material.metals}
    if material.hubbard == 'U':
        for kind in metal_kinds:  # DFT+U: QE's card holds one U per kind
            structure.initialize_onsites_hubbard(kind, '3d', u_start[kind], 'Ueff', use_kinds=True)
        return structure
    # DFT+U+V: every parameter is per atom in QE's card, so U goes on every TM site (``use_kinds`` would put it on the
    # first site of a kind only), and V is seeded on one TM 3d - O 2p couple per kind, which makes O 2p a Hubbard
    # manifold. No U on O 2p: hp.x computes it (Hubbard_parameters.dat) but writes to HUBBARD.dat, which aiida-hubbard
    # turns into the next scf's parameters, only the TM's U and the TM-O V (measured on LiCoO2: U(O 2p) = 9.7 eV in
    # the first iteration, absent from the second). Seeding it would make the first scf unlike all later ones.
    for index, (symbol, kind, _) in enumerate(sites):
        if symbol in material.metals:
            structure.append_hubbard_parameter(index, '3d', index, '3d', u_start[kind], (0, 0, 0), 'U')
    for kind in metal_kinds:
        structure.initialize_intersites_hubbard(kind, '3d', 'O', '2p', V_START, 'V', use_kinds=True)
    return structure
