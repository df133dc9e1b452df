"""Equivariant descriptors of Hubbard occupation matrices (on-site n^I and inter-site n^IJ).

Pipeline for one block ``n[s, m1, m2]`` as Quantum ESPRESSO writes it (spin ``s``; ``m1`` on atom
I with angular momentum ``l1``, ``m2`` on its neighbour J with ``l2``):

1. ``to_e3nn_basis``: QE's real harmonics (``ylmr2``: m = 0, +1, -1, +2, -2, ... with the
   Condon-Shortley sign and z as polar axis, so p = (z, -x, -y)) -> e3nn-jax's real spherical
   harmonics (l=1 is (x, y, z), y is the polar axis for l >= 2). With ``T_l`` the orthogonal matrix
   ``Y_e3nn(r) = T_l Y_qe(r)``, the block becomes ``T_l1 n T_l2^T``; a rigid rotation R of the
   crystal then acts as ``n -> D_l1(R) n D_l2(R)^T`` with e3nn's Wigner matrices
   (checked against real pw.x runs of a rotated NiO cell in tests/ml/test_hubbard_descriptors.py).
2. ``block_irreps``: l1 x l2 -> sum_L L with orthonormal Clebsch-Gordan coefficients (the map is
   norm preserving). On-site blocks are real symmetric, so only even L survive (d: 0e+2e+4e,
   p: 0e+2e); inter-site blocks are not symmetric: d-p -> 1o+2o+3o, d-d -> 0e+1e+2e+3e+4e,
   p-p -> 0e+1e+2e. Parity of a block is (-1)^(l1+l2).
3. ``spin_invariant_irreps``: invariants of the swap up <-> down (arXiv:2406.02457): the spin mean
   (a + b)/2 and the even-L part of the symmetrised tensor product (a x b + b x a)/2 of the two
   spin channels' irreps ``a``, ``b``. For equal input l the odd-L outputs are antisymmetric under
   the swap, which is why the even-L part is kept.
4. ``site_descriptors`` / ``pair_descriptors``: padded ``[N, irreps]`` / ``[M, irreps]`` arrays with
   one slot per manifold (per pair of manifolds), species one-hot, the U (V) of that scf and, for
   pairs, the I-J distance. Atoms (pairs) without a block get zeros in that slot.

Eigenvalues are never used (their ordering and degeneracies are not smooth functions of n).
Pure numpy/jax/e3nn: no aiida import (docs/architecture.md).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import e3nn_jax as e3nn
import jax
import jax.numpy as jnp
import numpy as np
from scipy.special import lpmv

from ..orbitals import ORBITAL_L

__all__ = [
    "ORBITAL_L",
    "qe_real_spherical_harmonics",
    "qe_to_e3nn_matrix",
    "qe_wigner_matrix",
    "to_e3nn_basis",
    "block_irreps",
    "occupation_irreps",
    "spin_invariant_irreps",
    "spin_invariant_irreps_of",
    "site_descriptor_irreps",
    "site_descriptors",
    "pair_descriptor_irreps",
    "pair_descriptors",
]



def _parity(l: int) -> int:
    return 1 if l % 2 == 0 else -1


def qe_real_spherical_harmonics(l: int, vectors) -> np.ndarray:
    """QE's real spherical harmonics of degree ``l`` (``upflib/ylmr2.f90``), shape ``[..., 2l+1]``.

    Component order m = 0, +1, -1, +2, -2, ...: ``Y_l0 = c Q_l0(cos t)``,
    ``Y_l,+m = c sqrt2 Q_lm cos(m phi)``, ``Y_l,-m = c sqrt2 Q_lm sin(m phi)`` with
    ``c = sqrt((2l+1)/4pi)`` and ``Q_lm = sqrt((l-m)!/(l+m)!) P_l^m`` including the Condon-Shortley
    phase (ylmr2 starts its recursion from ``Q_11 = -sin(t)/sqrt2``); scipy's ``lpmv`` has the same
    phase. Written here because no kept library exposes QE's convention.
    """
    vectors = np.asarray(vectors, dtype=np.float64)
    norm = np.linalg.norm(vectors, axis=-1)
    cos_t = np.where(norm > 0, vectors[..., 2] / np.where(norm > 0, norm, 1.0), 0.0)
    phi = np.arctan2(vectors[..., 1], vectors[..., 0])
    c = math.sqrt((2 * l + 1) / (4 * math.pi))
    out = [c * lpmv(0, l, cos_t)]
    for m in range(1, l + 1):
        q = math.sqrt(math.factorial(l - m) / math.factorial(l + m)) * lpmv(m, l, cos_t)
        out.append(c * math.sqrt(2.0) * q * np.cos(m * phi))
        out.append(c * math.sqrt(2.0) * q * np.sin(m * phi))
    return np.stack(out, axis=-1)


def qe_to_e3nn_matrix(l: int) -> np.ndarray:
    """Orthogonal ``T`` with ``Y_e3nn(r) = T @ Y_qe(r)`` (see ``_qe_to_e3nn_matrix``), cached."""
    return _qe_to_e3nn_matrix(int(l))


@functools.cache
def _qe_to_e3nn_matrix(l: int) -> np.ndarray:
    """Orthogonal ``T`` with ``Y_e3nn(r) = T @ Y_qe(r)`` (e3nn-jax, ``normalization="integral"``).

    Both bases are orthonormal on the sphere, so ``T`` is obtained exactly by least squares on a
    fixed set of directions; it is a signed permutation for l <= 1 and a genuine orthogonal mixing
    for l >= 2 (e3nn's polar axis is y, QE's is z).
    """
    if l < 0 or l > 3:
        raise ValueError(f"angular momentum l={l} is not supported (0..3: s, p, d, f)")
    rng = np.random.default_rng(0)
    points = rng.normal(size=(200, 3))
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    y_qe = qe_real_spherical_harmonics(l, points)
    # constants even when first needed while tracing a jitted function
    with jax.ensure_compile_time_eval():
        y_e3nn = np.asarray(
            e3nn.spherical_harmonics(l, e3nn.IrrepsArray("1o", points), normalize=True, normalization="integral").array,
            dtype=np.float64,
        )
    t, *_ = np.linalg.lstsq(y_qe, y_e3nn, rcond=None)
    t = t.T
    # e3nn computes in float32 by default: snap to the nearest orthogonal matrix.
    u, _, vt = np.linalg.svd(t)
    t = u @ vt
    if not np.allclose(t @ y_qe.T, y_e3nn.T, atol=1e-4):
        raise RuntimeError(f"QE and e3nn real harmonics of l={l} are not related by a rotation of the basis")
    return t


def qe_wigner_matrix(l: int, rotation) -> np.ndarray:
    """Wigner matrix of a 3x3 (proper or improper) rotation in QE's basis: ``T^T D_e3nn(R) T``.

    A crystal rotated by R has on-site blocks ``W_l n W_l^T`` and inter-site ``W_l1 n W_l2^T``.
    """
    l = int(l)
    t = qe_to_e3nn_matrix(l)
    with jax.ensure_compile_time_eval():
        d = np.asarray(
            e3nn.Irrep(l, _parity(l)).D_from_matrix(jnp.asarray(rotation, dtype=jnp.float32)), dtype=np.float64
        )
    return t.T @ d @ t


def to_e3nn_basis(block, l1: int, l2: int):
    """Block(s) ``[..., 2l1+1, 2l2+1]`` from QE's m order to e3nn's basis: ``T_l1 n T_l2^T``."""
    block = jnp.asarray(block)
    if block.shape[-2:] != (2 * l1 + 1, 2 * l2 + 1):
        raise ValueError(
            f"occupation block has trailing shape {block.shape[-2:]}, expected {(2 * l1 + 1, 2 * l2 + 1)} "
            f"for l1={l1}, l2={l2}"
        )
    t1 = jnp.asarray(qe_to_e3nn_matrix(l1), dtype=block.dtype)
    t2 = jnp.asarray(qe_to_e3nn_matrix(l2), dtype=block.dtype)
    return jnp.einsum("am,...mn,bn->...ab", t1, block, t2)


def block_irreps(l1: int, l2: int, symmetric: bool) -> e3nn.Irreps:
    """Irreps of an l1 x l2 occupation block: all L in |l1-l2|..l1+l2, only even L if symmetric."""
    if symmetric and l1 != l2:
        raise ValueError(f"a symmetric block needs l1 == l2, got l1={l1}, l2={l2}")
    parity = _parity(l1 + l2)
    ls = range(abs(l1 - l2), l1 + l2 + 1)
    return e3nn.Irreps([(1, (L, parity)) for L in ls if not (symmetric and L % 2)])


def occupation_irreps(block_e3nn, l1: int, l2: int, symmetric: bool) -> e3nn.IrrepsArray:
    """Decompose block(s) ``[..., 2l1+1, 2l2+1]`` already in e3nn's basis into irreps.

    ``c_L = sqrt(2L+1) sum_ij C^{l1 l2 L}_ij n_ij`` (e3nn Clebsch-Gordan, orthonormal map, so
    ``sum_L |c_L|^2 = |n|_F^2``). ``symmetric=True`` keeps the even L only (on-site blocks).
    """
    block_e3nn = jnp.asarray(block_e3nn)
    irreps = block_irreps(l1, l2, symmetric)
    parts = []
    for mul_ir in irreps:
        cg = jnp.asarray(e3nn.clebsch_gordan(l1, l2, mul_ir.ir.l), dtype=block_e3nn.dtype)
        parts.append(jnp.sqrt(2.0 * mul_ir.ir.l + 1.0) * jnp.einsum("...ij,ijk->...k", block_e3nn, cg))
    return e3nn.IrrepsArray(irreps, jnp.concatenate(parts, axis=-1))


def _even_l_filter(max_l: int) -> list[e3nn.Irrep]:
    return [e3nn.Irrep(L, 1) for L in range(0, max_l + 1, 2)]


def spin_invariant_irreps(up: e3nn.IrrepsArray, down: e3nn.IrrepsArray, max_l: int = 4) -> e3nn.IrrepsArray:
    """Invariants of the exchange up <-> down of two spin channels' irreps (same irreps).

    ``[(a + b)/2, even-L part of (a x b + b x a)/2]``, tensor-product outputs limited to L <= max_l.
    Both inputs have the same parity, so every product output has even parity.
    """
    if up.irreps != down.irreps:
        raise ValueError(f"spin channels have different irreps: {up.irreps} vs {down.irreps}")
    mean = (up + down) * 0.5
    filt = _even_l_filter(max_l)
    product = (
        e3nn.tensor_product(up, down, filter_ir_out=filt) + e3nn.tensor_product(down, up, filter_ir_out=filt)
    ) * 0.5
    return e3nn.concatenate([mean, product])


def spin_invariant_irreps_of(l1: int, l2: int, symmetric: bool, max_l: int = 4) -> e3nn.Irreps:
    """Irreps returned by ``spin_invariant_irreps`` for a block of type (l1, l2, symmetric)."""
    zeros = e3nn.zeros(block_irreps(l1, l2, symmetric), ())
    return spin_invariant_irreps(zeros, zeros, max_l).irreps


def _spin_channels(block_qe, what: str):
    """``[nspin, D1, D2]`` -> (up, down); nspin = 1 (QE's per-spin ns) gives up = down."""
    block_qe = jnp.asarray(block_qe)
    if block_qe.ndim < 3 or block_qe.shape[-3] not in (1, 2):
        raise ValueError(f"{what}: expected shape [..., nspin (1 or 2), 2l1+1, 2l2+1], got {block_qe.shape}")
    if block_qe.shape[-3] == 1:
        return block_qe[..., 0, :, :], block_qe[..., 0, :, :]
    return block_qe[..., 0, :, :], block_qe[..., 1, :, :]


def _block_spin_invariants(block_qe, l1, l2, symmetric, max_l, what):
    up, down = _spin_channels(block_qe, what)
    return _spin_invariants_of_channels(up, down, l1, l2, symmetric, max_l)


# jit with the manifold types static: the descriptor is a fixed chain of small einsums and tensor
# products, compiled once per (shape, l1, l2) instead of dispatched op by op.
@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _spin_invariants_of_channels(up, down, l1: int, l2: int, symmetric: bool, max_l: int) -> e3nn.IrrepsArray:
    a = occupation_irreps(to_e3nn_basis(up, l1, l2), l1, l2, symmetric)
    b = occupation_irreps(to_e3nn_basis(down, l1, l2), l1, l2, symmetric)
    return spin_invariant_irreps(a, b, max_l)


def _scalar(values, n: int, what: str) -> jnp.ndarray:
    values = jnp.asarray(values, dtype=jnp.float32)
    if values.shape != (n,):
        raise ValueError(f"{what} must have shape ({n},), got {values.shape}")
    return values[:, None]


def _one_hot(species, num_species: int, what: str) -> jnp.ndarray:
    species = np.asarray(species)
    if species.size and (species.min() < 0 or species.max() >= num_species):
        raise ValueError(f"{what} must be in 0..{num_species - 1}, got {species.min()}..{species.max()}")
    return jnp.eye(num_species, dtype=jnp.float32)[species]


def site_descriptor_irreps(manifold_ls: Sequence[int], num_species: int, max_l: int = 4) -> e3nn.Irreps:
    """Irreps of ``site_descriptors``: one spin-invariant slot per manifold l, one-hot, U."""
    irreps = e3nn.Irreps("")
    for l in manifold_ls:
        irreps = irreps + spin_invariant_irreps_of(l, l, True, max_l)
    return irreps + e3nn.Irreps(f"{num_species + 1}x0e")


def site_descriptors(
    onsite_qe,
    site_l,
    species,
    num_species: int,
    hubbard_u,
    manifold_ls: Sequence[int] = (1, 2),
    max_l: int = 4,
) -> e3nn.IrrepsArray:
    """Per-atom descriptors ``[N, site_descriptor_irreps(...)]``.

    onsite_qe: ``[N, nspin, D, D]`` on-site blocks in QE's m order, zero-padded to
      ``D = 2 max(manifold_ls) + 1`` (the layout of QE's XML and of the occupations node).
    site_l: ``[N]`` manifold l of each atom, -1 for atoms without a Hubbard manifold (zeros).
    species: ``[N]`` species index; hubbard_u: ``[N]`` U (eV) of that scf, 0 where none.
    """
    onsite_qe = jnp.asarray(onsite_qe)
    site_l = np.asarray(site_l)
    n = site_l.shape[0]
    width = 2 * max(manifold_ls) + 1
    if onsite_qe.shape[0] != n or onsite_qe.shape[-2:] != (width, width):
        raise ValueError(f"onsite_qe must have shape [{n}, nspin, {width}, {width}], got {onsite_qe.shape}")
    unknown = sorted(set(site_l.tolist()) - set(manifold_ls) - {-1})
    if unknown:
        raise ValueError(f"site manifolds with l={unknown} are not in manifold_ls={tuple(manifold_ls)}")
    slots = []
    for l in manifold_ls:
        block = onsite_qe[..., : 2 * l + 1, : 2 * l + 1]
        values = _block_spin_invariants(block, int(l), int(l), True, int(max_l), "onsite_qe")
        mask = jnp.asarray(site_l == l, dtype=values.array.dtype)[:, None]
        slots.append(values * mask)
    scalars = jnp.concatenate(
        [_one_hot(species, num_species, "species"), _scalar(hubbard_u, n, "hubbard_u")], axis=1
    )
    return e3nn.concatenate(slots + [e3nn.IrrepsArray(f"{num_species + 1}x0e", scalars)], axis=-1)


def pair_descriptor_irreps(pair_ls: Sequence[tuple[int, int]], num_species: int, max_l: int = 4) -> e3nn.Irreps:
    """Irreps of ``pair_descriptors``: one slot per (l_I, l_J), two one-hots, V and distance."""
    irreps = e3nn.Irreps("")
    for l1, l2 in pair_ls:
        irreps = irreps + spin_invariant_irreps_of(l1, l2, False, max_l)
    return irreps + e3nn.Irreps(f"{2 * num_species + 2}x0e")


def pair_descriptors(
    intersite_qe,
    pair_l,
    species_pairs,
    num_species: int,
    hubbard_v,
    distances,
    pair_ls: Sequence[tuple[int, int]] = ((2, 1),),
    max_l: int = 4,
) -> e3nn.IrrepsArray:
    """Per-pair (V edge) descriptors ``[M, pair_descriptor_irreps(...)]``.

    intersite_qe: ``[M, nspin, D, D]`` generalized occupations n^{IJ} (QE m order, rows on I,
      columns on the neighbour J at translation S), zero-padded to ``D = 2 lmax + 1``.
    pair_l: ``[M, 2]`` (l_I, l_J), (-1, -1) for padding; species_pairs: ``[M, 2]`` species indices;
    hubbard_v: ``[M]`` V (eV) of that scf; distances: ``[M]`` |r_J + S.cell - r_I| (Angstrom).
    """
    intersite_qe = jnp.asarray(intersite_qe)
    pair_l = np.asarray(pair_l).reshape(-1, 2)
    m = pair_l.shape[0]
    width = 2 * max(max(p) for p in pair_ls) + 1
    if intersite_qe.shape[0] != m or intersite_qe.shape[-2:] != (width, width):
        raise ValueError(f"intersite_qe must have shape [{m}, nspin, {width}, {width}], got {intersite_qe.shape}")
    known = {tuple(p) for p in pair_ls} | {(-1, -1)}
    unknown = sorted({tuple(p) for p in pair_l.tolist()} - known)
    if unknown:
        raise ValueError(f"pairs with (l_I, l_J)={unknown} are not in pair_ls={tuple(pair_ls)}")
    slots = []
    for l1, l2 in pair_ls:
        block = intersite_qe[..., : 2 * l1 + 1, : 2 * l2 + 1]
        values = _block_spin_invariants(block, int(l1), int(l2), False, int(max_l), "intersite_qe")
        mask = jnp.asarray((pair_l[:, 0] == l1) & (pair_l[:, 1] == l2), dtype=values.array.dtype)[:, None]
        slots.append(values * mask)
    species_pairs = np.asarray(species_pairs).reshape(-1, 2)
    scalars = jnp.concatenate(
        [
            _one_hot(species_pairs[:, 0], num_species, "species_pairs"),
            _one_hot(species_pairs[:, 1], num_species, "species_pairs"),
            _scalar(hubbard_v, m, "hubbard_v"),
            _scalar(distances, m, "distances"),
        ],
        axis=1,
    )
    return e3nn.concatenate(slots + [e3nn.IrrepsArray(f"{2 * num_species + 2}x0e", scalars)], axis=-1)
