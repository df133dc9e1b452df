"""Hubbard U/V learning: occupation-matrix descriptors (``occupations``)."""

from .occupations import (
    ORBITAL_L,
    block_irreps,
    occupation_irreps,
    pair_descriptor_irreps,
    pair_descriptors,
    qe_real_spherical_harmonics,
    qe_to_e3nn_matrix,
    qe_wigner_matrix,
    site_descriptor_irreps,
    site_descriptors,
    spin_invariant_irreps,
    spin_invariant_irreps_of,
    to_e3nn_basis,
)

__all__ = [
    "ORBITAL_L",
    "block_irreps",
    "occupation_irreps",
    "pair_descriptor_irreps",
    "pair_descriptors",
    "qe_real_spherical_harmonics",
    "qe_to_e3nn_matrix",
    "qe_wigner_matrix",
    "site_descriptor_irreps",
    "site_descriptors",
    "spin_invariant_irreps",
    "spin_invariant_irreps_of",
    "to_e3nn_basis",
]
