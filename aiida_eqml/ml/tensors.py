"""Exact Cartesian <-> irreps conversion of tensors with index symmetries.

Built on :func:`e3nn_jax.reduced_tensor_product_basis`, which returns an orthonormal change of
basis ``Q`` of shape ``[3, ..., 3, irreps.dim]`` (one axis per Cartesian index) from the
symmetric subspace of the tensor to the irreps. Hence::

    irreps = einsum("ij...,ij...k->k", T, Q)      T = einsum("k,ij...k->ij...", irreps, Q)

and the round trip is exact to float precision for tensors with the declared symmetry
(a tensor without it is projected onto it). In e3nn-jax the ``1o`` components are ``(x, y, z)``,
so Cartesian indices are plain ``x, y, z``.

Formulas (index letters, ``=`` separated signed permutations):

========== ================== =============================== ==============================
formula    index irreps       irreps                          example
========== ================== =============================== ==============================
``i``      ``i=1o``           ``1o``                          force, dipole
``ij``     ``1o, 1o``         ``0e+1e+2e``                    Born charge Z*_{I,ab}
``ij=ji``  ``1o``             ``0e+2e``                       dielectric, stress
``ijk=jik`` ``1o``            ``2x1o+2o+3o``                  Raman tensor d chi_ab/d tau_c
``ij``     ``1e, 1e``         ``0e+1e+2e``                    NMR shielding (axial x axial)
``ij``     ``1o, 1e``         ``0o+1o+2o``                    polar x axial (e.g. dP/dB)
========== ================== =============================== ==============================
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import e3nn_jax as e3nn
import jax.numpy as jnp
import numpy as np

from .targets import TARGETS

__all__ = ["CartesianTensorType", "tensor_type", "KNOWN_TENSORS"]


@functools.cache
def _basis(formula: str, index_irreps: tuple[tuple[str, str], ...]) -> tuple[str, np.ndarray]:
    basis = e3nn.reduced_tensor_product_basis(formula, **dict(index_irreps))
    return str(basis.irreps), np.asarray(basis.array, dtype=np.float64)


class CartesianTensorType:
    """A Cartesian tensor type: index formula + irreps of each index (``1o`` polar, ``1e`` axial).

    >>> raman = CartesianTensorType("ijk=jik")
    >>> raman.irreps
    2x1o+1x2o+1x3o
    """

    def __init__(self, formula: str, index_irreps: Mapping[str, str] | None = None):
        self.formula = formula.replace(" ", "")
        self.indices = self.formula.split("=")[0].lstrip("-")
        if not self.indices or not self.indices.isalpha():
            raise ValueError(f"bad tensor formula {formula!r}: expected e.g. 'ij', 'ij=ji', 'ijk=jik'")
        index_irreps = dict(index_irreps or {})
        for letter, ir in index_irreps.items():
            if letter not in self.indices:
                raise ValueError(f"index {letter!r} of index_irreps is not in formula {formula!r}")
            if e3nn.Irreps(ir) not in (e3nn.Irreps("1o"), e3nn.Irreps("1e")):
                raise ValueError(f"index {letter!r}: irreps must be '1o' (polar) or '1e' (axial), got {ir!r}")
        # Indices tied by a permutation get their irreps from e3nn; give '1o' to the free ones.
        tied = set()
        for perm in self.formula.split("=")[1:]:
            perm = perm.lstrip("-")
            tied |= {b for a, b in zip(self.indices, perm) if a != b}
        for letter in self.indices:
            if letter not in index_irreps and not (
                letter in tied and any(t in index_irreps for t in self._orbit(letter))
            ):
                index_irreps.setdefault(letter, "1o")
        for letter in self.indices:  # tied indices share the irreps of their orbit
            if letter not in index_irreps:
                index_irreps[letter] = next(index_irreps[t] for t in self._orbit(letter) if t in index_irreps)
        self.index_irreps = {k: str(e3nn.Irreps(v)) for k, v in sorted(index_irreps.items())}
        irreps, q = _basis(self.formula, tuple(sorted(self.index_irreps.items())))
        self.irreps = e3nn.Irreps(irreps)
        self._q = q  # [3]*rank + [irreps.dim]
        self.rank = len(self.indices)
        self.shape = (3,) * self.rank

    def _orbit(self, letter: str) -> set[str]:
        orbit = {letter}
        for perm in self.formula.split("=")[1:]:
            perm = perm.lstrip("-")
            for a, b in zip(self.indices, perm):
                if a in orbit or b in orbit:
                    orbit |= {a, b}
        return orbit

    def __repr__(self) -> str:
        return f"CartesianTensorType({self.formula!r}, {self.index_irreps})"

    def __eq__(self, other) -> bool:
        return isinstance(other, CartesianTensorType) and (self.formula, self.index_irreps) == (
            other.formula,
            other.index_irreps,
        )

    def __hash__(self) -> int:
        return hash((self.formula, tuple(self.index_irreps.items())))

    def change_of_basis(self, dtype=np.float64) -> np.ndarray:
        """``Q`` of shape ``[3]*rank + [irreps.dim]``, orthonormal on the symmetric subspace."""
        return self._q.astype(dtype)

    def to_irreps(self, x) -> e3nn.IrrepsArray:
        """Cartesian ``[..., 3, ..., 3]`` -> ``IrrepsArray [..., irreps.dim]``."""
        x = jnp.asarray(x) if not isinstance(x, np.ndarray) else x
        if tuple(x.shape[x.ndim - self.rank :]) != self.shape or x.ndim < self.rank:
            raise ValueError(
                f"{self.formula}: expected trailing shape {self.shape}, got array of shape {tuple(x.shape)}"
            )
        xnp = np if isinstance(x, np.ndarray) else jnp
        q = self._q.astype(x.dtype) if x.dtype.kind == "f" else self._q
        flat = x.reshape(x.shape[: x.ndim - self.rank] + (3**self.rank,))
        return e3nn.IrrepsArray(self.irreps, xnp.matmul(flat, q.reshape(3**self.rank, -1)))

    def to_cartesian(self, x) -> jnp.ndarray:
        """``IrrepsArray [..., irreps.dim]`` (or a plain array) -> Cartesian ``[..., 3, ..., 3]``."""
        if isinstance(x, e3nn.IrrepsArray):
            if x.irreps != self.irreps:
                raise ValueError(f"{self.formula}: expected irreps {self.irreps}, got {x.irreps}")
            x = x.array
        if x.shape[-1] != self.irreps.dim:
            raise ValueError(
                f"{self.formula}: expected trailing dimension {self.irreps.dim} ({self.irreps}), "
                f"got shape {tuple(x.shape)}"
            )
        xnp = np if isinstance(x, np.ndarray) else jnp
        q = self._q.astype(x.dtype)
        flat = xnp.matmul(x, q.reshape(3**self.rank, -1).T)
        return flat.reshape(x.shape[:-1] + self.shape)


#: Named tensor types: generic ones, and every Cartesian target of the registry (aiida_eqml.ml.targets) by its name.
KNOWN_TENSORS = {
    "vector": ("i", {"i": "1o"}),
    **{
        name: (t.tensor, dict(t.index_irreps) if t.index_irreps else None)
        for name, t in TARGETS.items()
        if t.tensor is not None
    },
}


def tensor_type(spec) -> CartesianTensorType:
    """A :class:`CartesianTensorType` from a formula string, a known name, a ``{"formula",
    "index_irreps"}`` dict, or a ``CartesianTensorType``."""
    if isinstance(spec, CartesianTensorType):
        return spec
    if isinstance(spec, Mapping):
        return CartesianTensorType(spec["formula"], spec.get("index_irreps"))
    if spec in KNOWN_TENSORS:
        return CartesianTensorType(*KNOWN_TENSORS[spec])
    return CartesianTensorType(spec)
