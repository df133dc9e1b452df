"""Equivariant building blocks (flax modules on ``e3nn.IrrepsArray``).

* :func:`radial_basis`: Bessel functions times a smooth polynomial envelope (NequIP / MACE).
* :class:`NequIPLayer`: tensor-product convolution with edge spherical harmonics whose weights
  come from a radial MLP, species-indexed self-connection, gated nonlinearity, residual.
* :class:`MACELayer`: the same convolution builds the atomic basis ``A``; a product basis of
  ``A`` with itself up to ``correlation`` (body order ``correlation + 1``) is then mixed linearly
  (our own small product basis: ``e3nn_jax`` ships the symmetric contraction only for haiku).
* :class:`FieldCoupling`: couples node features to a global field (electric field, 1o) so that
  an energy head becomes a general equivariant function E(R, F).
* :class:`NodeReadout`, :class:`EdgeReadout`: readouts to any irreps.

All modules work on padded arrays; padding edges are masked before aggregation.
"""

from __future__ import annotations

from typing import Sequence

import e3nn_jax as e3nn
import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = [
    "radial_basis",
    "safe_norm_vectors",
    "RadialMLP",
    "Convolution",
    "NequIPLayer",
    "MACELayer",
    "FieldCoupling",
    "NodeReadout",
    "EdgeReadout",
    "gate_irreps",
]


def radial_basis(lengths: jnp.ndarray, cutoff: float, num_basis: int, envelope_p: int = 6) -> jnp.ndarray:
    """``[E] -> [E, num_basis]``: Bessel basis times polynomial envelope u_p(r/cutoff), 0 beyond."""
    x = lengths / cutoff
    envelope = e3nn.poly_envelope(envelope_p - 1, 2)(x)
    envelope = jnp.where(x < 1.0, envelope, 0.0)
    return e3nn.bessel(lengths, num_basis, x_max=cutoff) * envelope[:, None]


def safe_norm_vectors(vectors: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """Replace masked (padding, zero-length) edge vectors by a dummy unit vector.

    Padding edges have r = 0, where |r| and r/|r| have NaN derivatives; ``where`` before the norm
    keeps gradients (and forward-over-reverse Hessians) finite and zero for them.
    """
    dummy = jnp.array([1.0, 0.0, 0.0], dtype=vectors.dtype)
    return jnp.where(mask[:, None], vectors, dummy)


def _irs(irreps) -> list[e3nn.Irrep]:
    """Irrep list for ``filter_ir_out``: e3nn-jax 0.21 misreads an ``Irreps`` with
    multiplicities there (it builds ``Irrep(mul_ir)``), so always pass bare irreps."""
    return sorted({ir for _, ir in e3nn.Irreps(irreps)})


def gate_irreps(irreps_out: e3nn.Irreps) -> e3nn.Irreps:
    """Irreps to feed ``e3nn.gate`` so that it returns ``irreps_out`` (extra scalars as gates)."""
    irreps_out = e3nn.Irreps(irreps_out).regroup()
    scalars = e3nn.Irreps([(mul, ir) for mul, ir in irreps_out if ir.l == 0])
    vectors = e3nn.Irreps([(mul, ir) for mul, ir in irreps_out if ir.l > 0])
    num_gates = vectors.num_irreps
    return (scalars + e3nn.Irreps(f"{num_gates}x0e") + vectors).simplify() if num_gates else scalars


class RadialMLP(nn.Module):
    """Scalar MLP of the radial embedding giving one weight per message irrep."""

    hidden: Sequence[int]
    num_out: int

    @nn.compact
    def __call__(self, radial: jnp.ndarray) -> jnp.ndarray:
        return e3nn.flax.MultiLayerPerceptron(
            tuple(self.hidden) + (self.num_out,), act=jax.nn.silu, output_activation=False
        )(radial)


class Convolution(nn.Module):
    """NequIP/MACE point convolution: sum_j R(r_ij) [x_j (x) Y(r_ij)] / sqrt(avg_num_neighbors).

    ``edge_angular`` holds the edge spherical harmonics (and optional extra edge irreps); the
    radial MLP weights each path of the tensor product.
    """

    irreps_out: e3nn.Irreps
    avg_num_neighbors: float
    radial_hidden: Sequence[int]

    @nn.compact
    def __call__(self, node_feats, edge_angular, edge_scalars, senders, receivers, edge_mask):
        irreps_out = e3nn.Irreps(self.irreps_out)
        x_j = node_feats[senders]
        messages = e3nn.concatenate(
            [
                x_j.filter(keep=irreps_out),
                e3nn.tensor_product(x_j, edge_angular, filter_ir_out=_irs(irreps_out)),
            ]
        ).regroup()
        weights = RadialMLP(self.radial_hidden, messages.irreps.num_irreps)(edge_scalars)
        weights = weights * edge_mask[:, None].astype(weights.dtype)
        messages = messages * weights
        aggregated = e3nn.scatter_sum(messages, dst=receivers, output_size=node_feats.shape[0])
        return aggregated / jnp.sqrt(self.avg_num_neighbors)


class FieldCoupling(nn.Module):
    """x <- x + W [x (x) phi(F)], phi(F) = (F, F (x) F) = 1o + 0e + 2e, polynomial in F.

    ``field_feats`` is phi(F) broadcast to nodes. At F = 0 this is the identity, and since phi has
    terms of order 1 and 2 in F (and layers compose), E(R, F) contains P(R).F, F.alpha(R).F and
    higher couplings with any R dependence the network can represent.
    """

    @nn.compact
    def __call__(self, node_feats, field_feats):
        coupled = e3nn.tensor_product(node_feats, field_feats, filter_ir_out=_irs(node_feats.irreps))
        update = e3nn.flax.Linear(node_feats.irreps, force_irreps_out=True)(coupled)
        return node_feats + update


class NequIPLayer(nn.Module):
    """Convolution + species-indexed self-connection + gate, with a residual connection."""

    irreps_out: e3nn.Irreps
    num_species: int
    avg_num_neighbors: float
    radial_hidden: Sequence[int]

    @nn.compact
    def __call__(self, node_feats, species, edge_angular, edge_scalars, senders, receivers, edge_mask):
        irreps_out = e3nn.Irreps(self.irreps_out).regroup()
        pre_gate = gate_irreps(irreps_out)
        x = e3nn.flax.Linear(node_feats.irreps)(node_feats)
        conv = Convolution(pre_gate, self.avg_num_neighbors, self.radial_hidden)(
            x, edge_angular, edge_scalars, senders, receivers, edge_mask
        )
        conv = e3nn.flax.Linear(pre_gate, force_irreps_out=True)(conv)
        self_connection = e3nn.flax.Linear(
            pre_gate, num_indexed_weights=self.num_species, force_irreps_out=True
        )(species, node_feats)
        out = e3nn.gate(conv + self_connection)
        out = out.regroup()
        if out.irreps == node_feats.irreps:
            out = (out + node_feats) / jnp.sqrt(2.0)
        return out


class MACELayer(nn.Module):
    """MACE-style interaction: A = conv(x); B = sum_nu W_nu (A (x) ... (x) A) (nu <= correlation).

    The product basis is built per channel (``channels`` copies of ``irreps_a``), so body order
    is ``correlation + 1``; species-indexed linear maps mix the orders and channels (as MACE's
    element-dependent weights do).
    """

    irreps_out: e3nn.Irreps
    num_species: int
    avg_num_neighbors: float
    radial_hidden: Sequence[int]
    correlation: int = 3
    channels: int = 16
    lmax_a: int = 2

    @nn.compact
    def __call__(self, node_feats, species, edge_angular, edge_scalars, senders, receivers, edge_mask):
        irreps_out = e3nn.Irreps(self.irreps_out).regroup()
        per_channel = e3nn.Irreps([ir for ir in e3nn.Irreps.spherical_harmonics(self.lmax_a, p=-1)] +
                                  [e3nn.Irrep(l, -(-1) ** l) for l in range(self.lmax_a + 1)]).regroup()
        x = e3nn.flax.Linear(node_feats.irreps)(node_feats)
        a = Convolution(self.channels * per_channel, self.avg_num_neighbors, self.radial_hidden)(
            x, edge_angular, edge_scalars, senders, receivers, edge_mask
        )
        a = e3nn.flax.Linear(self.channels * per_channel, force_irreps_out=True)(a)
        a = a.mul_to_axis(self.channels)  # [N, channels, per_channel]
        orders = [a]
        b = a
        for nu in range(2, self.correlation + 1):
            b = e3nn.tensor_product(b, a, filter_ir_out=_irs(per_channel))
            b = e3nn.flax.Linear(per_channel, force_irreps_out=True, name=f"product_{nu}")(b)
            orders.append(b)
        basis = e3nn.concatenate(orders, axis=-1).regroup().axis_to_mul()
        pre_gate = gate_irreps(irreps_out)
        message = e3nn.flax.Linear(pre_gate, num_indexed_weights=self.num_species, force_irreps_out=True)(
            species, basis
        )
        self_connection = e3nn.flax.Linear(pre_gate, num_indexed_weights=self.num_species, force_irreps_out=True)(
            species, node_feats
        )
        out = e3nn.gate(message + self_connection).regroup()
        if out.irreps == node_feats.irreps:
            out = (out + node_feats) / jnp.sqrt(2.0)
        return out


def _require(irreps_have: e3nn.Irreps, irreps_want: e3nn.Irreps, what: str) -> None:
    missing = [str(ir) for _, ir in e3nn.Irreps(irreps_want) if ir not in e3nn.Irreps(irreps_have)]
    if missing:
        raise ValueError(
            f"{what}: irreps {', '.join(missing)} cannot be produced from features {irreps_have}; "
            "add them (or irreps whose products give them) to hidden_irreps"
        )


class NodeReadout(nn.Module):
    """Per-node readout to ``irreps_out``: linear in x and in the pairwise products of a
    compressed copy of x (so e.g. 3o comes from 1o (x) 2e), species-indexed weights."""

    irreps_out: e3nn.Irreps
    num_species: int
    product_mul: int = 4

    @nn.compact
    def __call__(self, node_feats, species):
        irreps_out = e3nn.Irreps(self.irreps_out)
        small_irreps = e3nn.Irreps([(min(mul, self.product_mul), ir) for mul, ir in node_feats.irreps.regroup()])
        small = e3nn.flax.Linear(small_irreps)(node_feats)
        products = e3nn.tensor_product(small, small, filter_ir_out=_irs(irreps_out))
        feats = e3nn.concatenate([node_feats.filter(keep=irreps_out), products]).regroup()
        _require(feats.irreps, irreps_out, "node readout")
        return e3nn.flax.Linear(irreps_out, num_indexed_weights=self.num_species, force_irreps_out=True)(
            species, feats
        )


class EdgeReadout(nn.Module):
    """Per-edge readout from sender and receiver features and the edge's own geometry.

    feats = [x_i (x) Y(r_ij), x_j (x) Y(r_ij), x_i (x) x_j] weighted per path by an MLP of the
    radial basis; since Y(r_ij) and |r_ij| enter, two periodic images of a pair get different
    outputs. Not symmetrised in i <-> j (use the target's own convention).
    """

    irreps_out: e3nn.Irreps
    radial_hidden: Sequence[int]
    product_mul: int = 4

    @nn.compact
    def __call__(self, node_feats, edge_angular, edge_scalars, senders, receivers, edge_mask):
        irreps_out = e3nn.Irreps(self.irreps_out)
        small_irreps = e3nn.Irreps([(min(mul, self.product_mul), ir) for mul, ir in node_feats.irreps.regroup()])
        small_i = e3nn.flax.Linear(small_irreps, name="sender")(node_feats)[senders]
        small_j = e3nn.flax.Linear(small_irreps, name="receiver")(node_feats)[receivers]
        want = irreps_out + e3nn.Irreps("0e")
        feats = e3nn.concatenate(
            [
                e3nn.tensor_product(small_i, edge_angular, filter_ir_out=_irs(want)),
                e3nn.tensor_product(small_j, edge_angular, filter_ir_out=_irs(want)),
                e3nn.tensor_product(small_i, small_j, filter_ir_out=_irs(want)),
            ]
        ).regroup()
        _require(feats.irreps, irreps_out, "edge readout")
        scalars_ij = jnp.concatenate(
            [edge_scalars, small_i.filter(keep="0e").array, small_j.filter(keep="0e").array], axis=-1
        )
        weights = RadialMLP(self.radial_hidden, feats.irreps.num_irreps)(scalars_ij)
        feats = feats * weights
        out = e3nn.flax.Linear(irreps_out, force_irreps_out=True)(feats)
        return out * edge_mask[:, None].astype(out.dtype)
