"""The local magnetic order of a Hubbard site: a spin-swap-invariant scalar that tells FM from AFM environments.

The on-site descriptors (:mod:`aiida_eqml.ml.hubbard.occupations`) are invariant under the global spin swap
up <-> down *per site*, so they cannot tell a site whose neighbours' moments are parallel to its own (FM) from one
whose neighbours' are antiparallel (AFM): the occupation matrices of an Mn2+ site are nearly the same in both. The
U that hp.x returns is not: the campaign's FM rock salts have a U 10-20 % below their AFM-II counterparts (MnO
2.9-3.5 against 3.4-4.5 eV, NiO 5.0-5.4 against 5.5-6.3 eV; the FM gap is smaller and screens more). The product
of two sites' moments m_I m_J is invariant under the global swap, so it may enter an invariant model.

Which neighbours: the superexchange partners, i.e. sites J with the same manifold l as I that share a ligand K
(a path I-K-J of two bonds, K without a manifold of that l: O for a TM 3d site, a TM for an O 2p one), counted
with the product of the two bonds' smooth weights. This follows the chemistry instead of a distance shell, so a
strained cell keeps its partners (in rock salt: the 12 nearest TM at 90 degrees, over two O each, and the 6
next-nearest at 180 degrees, over one, whatever the strain, and never the third shell):

    o_I = sum_{K, J} w(r_IK) w(r_KJ) (m_I / M0) (m_J / M0) / max(sum_{K, J} w(r_IK) w(r_KJ), 1)

with m the trace of n^up - n^down over the site's manifold and M0 = 5 (a d5 moment), so |o| <= 1: +1 for a fully
polarised FM d5 environment, -1/5 for rock-salt AFM-II (30 paths: 24 to the nearest, half of them antiparallel,
6 to the next-nearest, all antiparallel; MnO -0.18, FM MnO +0.90 in the campaign's scf runs), 0 when
non-magnetic. The max(., 1) keeps a site with almost no partner from dividing by ~0.
Paths back to the site itself (J = I, same cell) are skipped; J may be I's own periodic image (an FM chain of a
one-site cell is parallel to itself). Rotation, translation, supercell and spin-swap invariant, smooth in the
positions through w. Pure numpy + ASE's neighbour list (no aiida import).
"""

from __future__ import annotations

import numpy as np

__all__ = ["BOND_ON", "BOND_CUTOFF", "MOMENT_SCALE", "site_moments", "bond_weight", "spin_order"]

#: Bond weight 1 below BOND_ON, cosine ramp to 0 at BOND_CUTOFF (A): every TM-O bond of the campaign's oxides
#: (1.9-2.4 A, strained cells included) counts fully, Ba-O or Sr-O contacts (>= 2.6 A) of an A cation without a
#: manifold do not matter (only paths between sites of one manifold l count), and a short TM-TM contact (NiO at
#: 94 %: 2.78 A) is no ligand because the ligand must not carry the sites' manifold.
BOND_ON = 2.5
BOND_CUTOFF = 2.9
#: Moments enter in units of a d5 moment (5 mu_B), so |o| <= 1.
MOMENT_SCALE = 5.0


def site_moments(occupations, hubbard_l) -> np.ndarray:
    """``[n]`` tr(n^up - n^down) of each atom's manifold (``occupations`` ``[n, nspin, D, D]``, QE order; 0 where
    an atom has no manifold or the run is not spin-polarised)."""
    occupations = np.asarray(occupations, dtype=np.float64)
    hubbard_l = np.asarray(hubbard_l, dtype=np.int64).reshape(-1)
    moments = np.zeros(len(hubbard_l))
    if occupations.ndim != 4 or occupations.shape[1] != 2:
        return moments
    for atom, l in enumerate(hubbard_l):
        if l >= 0:
            d = 2 * int(l) + 1
            moments[atom] = np.trace(occupations[atom, 0, :d, :d]) - np.trace(occupations[atom, 1, :d, :d])
    return moments


def bond_weight(distances) -> np.ndarray:
    """1 below ``BOND_ON``, a cosine ramp to 0 at ``BOND_CUTOFF`` (continuous with its first derivative)."""
    r = np.asarray(distances, dtype=np.float64)
    x = np.clip((r - BOND_ON) / (BOND_CUTOFF - BOND_ON), 0.0, 1.0)
    return 0.5 * (1.0 + np.cos(np.pi * x))


def spin_order(numbers, positions, cell, pbc, occupations, hubbard_l) -> np.ndarray:
    """``[n]`` local magnetic order o_I of each atom (0 for atoms without a manifold); see the module docstring."""
    import ase
    from ase.neighborlist import neighbor_list

    hubbard_l = np.asarray(hubbard_l, dtype=np.int64).reshape(-1)
    moments = site_moments(occupations, hubbard_l) / MOMENT_SCALE
    order = np.zeros(len(hubbard_l))
    if not np.any(moments):
        return order
    atoms = ase.Atoms(numbers=np.asarray(numbers), positions=np.asarray(positions, dtype=np.float64),
                      cell=np.asarray(cell, dtype=np.float64), pbc=np.asarray(pbc, dtype=bool))
    first, second, dist, shift = neighbor_list("ijdS", atoms, BOND_CUTOFF, self_interaction=False)
    weight = bond_weight(dist)
    bonds_of = [np.flatnonzero(first == k) for k in range(len(atoms))]
    for atom in np.flatnonzero(hubbard_l >= 0):
        total, weights = 0.0, 0.0
        for b1 in bonds_of[atom]:  # I -> K
            ligand = second[b1]
            if hubbard_l[ligand] == hubbard_l[atom]:
                continue  # a direct contact of two sites of the manifold, not a ligand
            for b2 in bonds_of[ligand]:  # K -> J
                partner = second[b2]
                if hubbard_l[partner] != hubbard_l[atom]:
                    continue
                if partner == atom and not np.any(shift[b1] + shift[b2]):
                    continue  # the path back to the site itself
                w = weight[b1] * weight[b2]
                total += w * moments[atom] * moments[partner]
                weights += w
        order[atom] = total / max(weights, 1.0)
    return order
