"""Readout heads of the equivariant networks (:mod:`aiida_eqml.ml.layers`).

* :class:`NodeReadout`: per-node readout to any irreps (linear in x and in pairwise products of x).
* :class:`EdgeReadout`: per-edge readout from sender, receiver and the edge's own geometry.

Both refuse (``ValueError``) output irreps the features cannot produce.
"""

from __future__ import annotations

from collections.abc import Sequence

import e3nn_jax as e3nn
import flax.linen as nn
import jax.numpy as jnp

from .irreps import _irs
from .radial import RadialMLP

__all__ = ["NodeReadout", "EdgeReadout"]


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
        return e3nn.flax.Linear(irreps_out, num_indexed_weights=self.num_species, force_irreps_out=True)(species, feats)


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
