"""Interaction blocks of the equivariant networks (:mod:`aiida_eqml.ml.layers`).

* :class:`NequIPLayer`: tensor-product convolution with edge spherical harmonics whose weights
  come from a radial MLP, species-indexed self-connection, gated nonlinearity, residual.
* :class:`MACELayer`: the same convolution builds the atomic basis ``A``; a product basis of
  ``A`` with itself up to ``correlation`` (body order ``correlation + 1``) is then mixed linearly
  (our own small product basis: ``e3nn_jax`` ships the symmetric contraction only for haiku).
* :class:`FieldCoupling`: couples node features to a global field (electric field, 1o) so that
  an energy head becomes a general equivariant function E(R, F).
"""

from __future__ import annotations

from collections.abc import Sequence

import e3nn_jax as e3nn
import flax.linen as nn
import jax.numpy as jnp

from .convolution import Convolution
from .irreps import _irs, gate_irreps

__all__ = ["FieldCoupling", "NequIPLayer", "MACELayer"]


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
        self_connection = e3nn.flax.Linear(pre_gate, num_indexed_weights=self.num_species, force_irreps_out=True)(
            species, node_feats
        )
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
        per_channel = e3nn.Irreps(
            [ir for ir in e3nn.Irreps.spherical_harmonics(self.lmax_a, p=-1)]
            + [e3nn.Irrep(l, -((-1) ** l)) for l in range(self.lmax_a + 1)]
        ).regroup()
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
