"""Reference prototypes as supercells: the same crystal, magnetic order and Hubbard manifolds in more atoms."""
import numpy as np
import pytest


def neighbour_distances(atoms, index, cutoff=3.5):
    from ase.neighborlist import neighbor_list

    first, distances = neighbor_list('id', atoms, cutoff)
    return distances[first == index]


@pytest.mark.parametrize('name, repeat', [('LiNiO2-layered', (2, 1, 1)), ('MnO-rocksalt-afm2', (1, 2, 2))])
def test_supercell_is_the_same_crystal(aiida_profile, name, repeat):
    from aiida_eqml.local.hubbard_materials import MATERIALS, hubbard_structure

    material = MATERIALS[name]
    cell = hubbard_structure(name)
    supercell = hubbard_structure(name, repeat=repeat)
    factor = int(np.prod(repeat))
    small, large = cell.get_ase(), supercell.get_ase()
    assert len(large) == factor * len(small)
    assert large.get_volume() == pytest.approx(factor * small.get_volume())
    # every kind (spin sublattice) appears factor times as often, with the same neighbour shells
    kinds = [site.kind_name for site in cell.sites]
    super_kinds = [site.kind_name for site in supercell.sites]
    assert sorted(super_kinds) == sorted(kinds * factor)
    for kind in set(kinds):
        i, j = kinds.index(kind), super_kinds.index(kind)
        shell = np.sort(neighbour_distances(small, i))
        np.testing.assert_allclose(np.sort(neighbour_distances(large, j)), shell, atol=1e-8)
        assert len(shell) >= 6
    # the cell's site order is kept per block (Hubbard atoms first, as hp.x requires)
    assert [s.kind_name for s in supercell.sites][::factor] == kinds
    # U on every transition-metal kind; with V (QE's per-atom card) on every transition-metal site
    u_sites = {p.atom_index for p in supercell.hubbard.parameters
               if p.atom_index == p.neighbour_index and tuple(p.translation) == (0, 0, 0)}
    metal_sites = {i for i, site in enumerate(supercell.sites) if site.kind_name.rstrip('12') in material.metals}
    if material.hubbard == 'U+V':
        assert u_sites == metal_sites
    else:
        assert {super_kinds[i] for i in u_sites} == {super_kinds[i] for i in metal_sites}

def test_supercell_factors_must_be_positive(aiida_profile):
    from aiida_eqml.local.hubbard_materials import hubbard_structure

    with pytest.raises(ValueError, match=r'\(0, 1, 1\)'):
        hubbard_structure('NiO-rocksalt-afm2', repeat=(0, 1, 1))


def test_anatase_is_the_experimental_crystal():
    """TiO2-anatase: the body-centred primitive cell of I4_1/amd (a = 3.785, c = 9.514 A, u = 0.2081) holds half the
    conventional cell; each Ti has two apical O at u c = 1.980 A and four equatorial O at 1.934 A, the distances
    computed here from the Wyckoff positions (Ti 4a at 0; O 8e at (0, 0, u c) and, around the neighbouring Ti
    column, at (a/2, 0, c/4 - u c)), not from the builder."""
    import spglib

    from aiida_eqml.local.hubbard_materials import MATERIALS

    a, c, u = 3.785, 9.514, 0.2081
    cell, sites = MATERIALS['TiO2-anatase'].sites()
    symbols = [s for s, _, _ in sites]
    assert symbols == ['Ti', 'Ti', 'O', 'O', 'O', 'O']  # Hubbard atoms first
    assert abs(np.linalg.det(cell)) == pytest.approx(a * a * c / 2)
    numbers = [22 if s == 'Ti' else 8 for s in symbols]
    fractional = np.linalg.solve(np.asarray(cell).T, np.array([p for *_, p in sites]).T).T
    assert spglib.get_spacegroup((cell, fractional, numbers)) == 'I4_1/amd (141)'
    apical = u * c  # Ti at 0, O at (0, 0, u c)
    equatorial = np.hypot(a / 2, c / 4 - u * c)  # Ti at 0, O at (a/2, 0, c/4 - u c) of the other Ti's column
    import ase

    atoms = ase.Atoms(symbols, positions=[p for *_, p in sites], cell=cell, pbc=True)
    for ti in (0, 1):
        shell = np.sort(neighbour_distances(atoms, ti, cutoff=2.5))
        np.testing.assert_allclose(shell, sorted([equatorial] * 4 + [apical] * 2), atol=1e-6)
    assert equatorial == pytest.approx(1.934, abs=1e-3) and apical == pytest.approx(1.980, abs=1e-3)


@pytest.mark.parametrize('name, metal, a, c', [('NiTiO3-ilmenite-fm', 'Ni', 5.0302, 13.7903),
                                               ('MnTiO3-ilmenite-fm', 'Mn', 5.1380, 14.2830)])
def test_ilmenite_is_the_rhombohedral_primitive_cell(name, metal, a, c):
    """Ilmenite MTiO3: space group R-3, two formula units in a third of the hexagonal cell's volume (a^2 c sqrt3/2),
    metals first, each M and Ti octahedral (six O within 2.3 A, none of another metal closer than 2.8 A), a starting
    moment on M only (Ti4+ is d0)."""
    import ase
    import spglib

    from aiida_eqml.local.hubbard_materials import MATERIALS

    material = MATERIALS[name]
    cell, sites = material.sites()
    symbols = [s for s, _, _ in sites]
    assert symbols == [metal, metal, 'Ti', 'Ti'] + ['O'] * 6
    assert abs(np.linalg.det(cell)) == pytest.approx(a * a * c * np.sqrt(3) / 2 / 3)
    atoms = ase.Atoms(symbols, positions=[p for *_, p in sites], cell=cell, pbc=True)
    assert spglib.get_spacegroup((atoms.cell[:], atoms.get_scaled_positions(), atoms.numbers)) == 'R-3 (148)'
    for index in range(4):
        shell = neighbour_distances(atoms, index, cutoff=2.8)
        assert len(shell) == 6 and shell.max() < 2.3, (index, shell)
    assert material.magnetization() == {metal: 0.8, 'Ti': 0.0, 'O': 0.0}


@pytest.mark.parametrize('name, a', [('BaTiO3-perovskite', 4.00), ('CaTiO3-perovskite', 3.83),
                                     ('SrTiO3-perovskite', 3.905)])
def test_titanate_perovskites_have_ti_o_at_half_the_lattice_parameter(name, a):
    import ase

    from aiida_eqml.local.hubbard_materials import MATERIALS

    cell, sites = MATERIALS[name].sites()
    atoms = ase.Atoms([s for s, _, _ in sites], positions=[p for *_, p in sites], cell=cell, pbc=True)
    assert atoms.get_chemical_symbols()[0] == 'Ti'
    np.testing.assert_allclose(neighbour_distances(atoms, 0, cutoff=0.6 * a), [a / 2] * 6, atol=1e-9)
    assert MATERIALS[name].magnetization() is None


def test_sr2tio4_is_the_k2nif4_primitive_cell():
    """Sr2TiO4 (I4/mmm): 7 atoms in half the conventional cell (a^2 c / 2), Ti first with four equatorial O at a/2
    and two apical O at z c, the distances from the Wyckoff positions (not from the builder)."""
    import ase
    import spglib

    from aiida_eqml.local.hubbard_materials import MATERIALS

    a, c, z_apical = 3.884, 12.60, 0.1565
    cell, sites = MATERIALS['Sr2TiO4-ruddlesden-popper'].sites()
    symbols = [s for s, _, _ in sites]
    assert symbols == ['Ti', 'O', 'O', 'O', 'O', 'Sr', 'Sr']
    assert abs(np.linalg.det(cell)) == pytest.approx(a * a * c / 2)
    atoms = ase.Atoms(symbols, positions=[p for *_, p in sites], cell=cell, pbc=True)
    assert spglib.get_spacegroup((atoms.cell[:], atoms.get_scaled_positions(), atoms.numbers)) == 'I4/mmm (139)'
    shell = np.sort(neighbour_distances(atoms, 0, cutoff=2.3))
    np.testing.assert_allclose(shell, sorted([a / 2] * 4 + [z_apical * c] * 2), atol=1e-9)
