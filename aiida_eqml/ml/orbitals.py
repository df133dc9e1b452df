"""Angular momentum of a Quantum ESPRESSO Hubbard manifold label: the one definition of the letter -> l map.

Pure Python (no jax): the parsers and the loop's domain check import it without loading the ML stack.
"""
from __future__ import annotations

__all__ = ('ORBITAL_L', 'manifold_l')

ORBITAL_L = {'s': 0, 'p': 1, 'd': 2, 'f': 3}


def manifold_l(label: str) -> int:
    """``'3d'`` -> 2. A QE 7 label may name two shells (``'3d-4s'``, the standard and the second manifold): the
    first one is the Hubbard manifold of the occupation matrix. Raises ``ValueError`` naming the label."""
    shell = label.strip().split('-')[0]
    letter = shell[-1:].lower()
    if letter not in ORBITAL_L:
        raise ValueError(f'cannot read an orbital angular momentum from Hubbard manifold label {label!r}')
    return ORBITAL_L[letter]
