"""Allegro (Musaelian et al., arXiv:2204.05249): a strictly local equivariant trunk built on edges, not atoms.

Every feature lives on an ordered pair (edge ``i <- j``, centre ``i`` = receiver, neighbour ``j`` = sender) and
depends only on the atoms within the cutoff of the centre ``i``; no information travels between atoms, so the
receptive field is the cutoff sphere whatever ``num_layers`` is (a message-passing trunk grows it by one cutoff per
layer). Per edge there are two tracks:

* a scalar latent ``x_ij`` (an MLP of the radial basis and the scalar embeddings of ``i`` and ``j``), multiplied by
  the smooth cutoff envelope ``u(r_ij)`` after every update, so every feature of an edge vanishes smoothly as the
  neighbour leaves the cutoff;
* a tensor track ``V_ij`` of ``allegro_channels`` copies of every irrep up to ``allegro_lmax`` (both parities),
  started from the edge's spherical harmonics and the two atoms' embeddings, weighted by the latent.

Each of ``num_layers`` layers couples the tensor track with the centre's environment
``Gamma_i = sum_k w(x_ik) Y(r_ik) / sqrt(avg_num_neighbors)`` by a channel-wise tensor product
``V_ij (x) Gamma_i`` (the only many-body step: it sees every neighbour k of i, never a neighbour of k), mixes the
channels linearly, and feeds the product's scalars into the latent MLP (residual update). At the end the edge
features are mapped to ``hidden_irreps`` and summed onto the centre once, plus a species-indexed linear map of the
centre's own embedding (an atom without neighbours keeps a species-dependent output). The heads of
:mod:`aiida_eqml.ml.models` read those node features like those of the other architectures: node and graph heads
directly, edge heads from both end atoms and the edge geometry.

The electric field (``field`` in the model config) couples into the node embedding before the edges are built and,
through the network, into the node features after the trunk.
"""

from __future__ import annotations

from collections.abc import Sequence

import e3nn_jax as e3nn
import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["Allegro", "allegro_trunk", "cutoff_envelope"]


def cutoff_envelope(lengths: jnp.ndarray, cutoff: float, p: int) -> jnp.ndarray:
    """``u(r / cutoff)``: the same polynomial envelope as the radial basis (1 at 0, smooth zero at the cutoff)."""
    x = lengths / cutoff
    return jnp.where(x < 1.0, e3nn.poly_envelope(p - 1, 2)(x), 0.0)


def _irs(irreps) -> list[e3nn.Irrep]:
    # Bare irreps for filter_ir_out: e3nn-jax 0.21 misreads multiplicities there (see layers._irs).
    return sorted({ir for _, ir in e3nn.Irreps(irreps)})


def _tensor_irreps(lmax: int) -> e3nn.Irreps:
    """One copy of each irrep ``l <= lmax`` with both parities (what one channel of the tensor track holds)."""
    return e3nn.Irreps([e3nn.Irrep(l, p) for l in range(lmax + 1) for p in (1, -1)]).regroup()


def _mlp(widths: Sequence[int], name: str | None = None):
    # No biases: an MLP of a latent that the envelope has sent to zero stays zero.
    return e3nn.flax.MultiLayerPerceptron(tuple(widths), act=jax.nn.silu, output_activation=False, name=name)


class Allegro(nn.Module):
    """The edge trunk: node embedding + edge geometry -> node features ``hidden`` (module docstring)."""

    hidden: str
    num_species: int
    num_layers: int
    channels: int
    lmax: int
    latent: Sequence[int]
    avg_num_neighbors: float
    cutoff: float
    envelope_p: int

    @nn.compact
    def __call__(self, x, species, edge_angular, edge_scalars, lengths, senders, receivers, edge_mask):
        hidden = e3nn.Irreps(self.hidden)
        num_nodes, num_edges = x.shape[0], lengths.shape[0]
        per_channel = _tensor_irreps(self.lmax)
        norm = 1.0 / jnp.sqrt(self.avg_num_neighbors)
        u = (cutoff_envelope(lengths, self.cutoff, self.envelope_p) * edge_mask).astype(edge_scalars.dtype)[:, None]
        x_i, x_j = x[receivers], x[senders]

        # Two-body start: latent from distance and both species (and scalar node attributes).
        scalars = jnp.concatenate([edge_scalars, x_i.filter(keep="0e").array, x_j.filter(keep="0e").array], axis=-1)
        latent = _mlp(self.latent, name="two_body")(scalars) * u
        pieces = e3nn.concatenate(
            [edge_angular, x_i, x_j, e3nn.tensor_product(x_j, edge_angular, filter_ir_out=_irs(per_channel))]
        ).regroup()
        pieces = pieces * _mlp([pieces.irreps.num_irreps], name="two_body_weights")(latent)
        tensors = e3nn.flax.Linear(self.channels * per_channel, force_irreps_out=True, name="two_body_tensors")(pieces)
        tensors = tensors.mul_to_axis(self.channels)  # [E, C, per_channel]

        for layer in range(self.num_layers):
            # Environment of the centre: its edges' harmonics weighted per channel by their latents.
            weights = _mlp([self.channels], name=f"env_weights_{layer}")(latent)  # [E, C]
            env = weights[:, :, None] * edge_angular.array[:, None, :]
            gamma = jax.ops.segment_sum(env, receivers, num_segments=num_nodes) * norm
            gamma = e3nn.IrrepsArray(edge_angular.irreps, gamma[receivers])
            product = e3nn.tensor_product(tensors, gamma, filter_ir_out=_irs(per_channel))  # channel-wise
            product_scalars = product.filter(keep="0e").array.reshape(num_edges, -1)
            mixed = e3nn.flax.Linear(self.channels * per_channel, force_irreps_out=True, name=f"tensors_{layer}")(
                product.axis_to_mul()
            )
            tensors = mixed.mul_to_axis(self.channels) * u[:, :, None]
            update = _mlp(list(self.latent), name=f"latent_{layer}")(jnp.concatenate([latent, product_scalars], -1))
            latent = (latent + update * u) / jnp.sqrt(2.0)

        edge_feats = e3nn.concatenate(
            [e3nn.IrrepsArray(f"{latent.shape[-1]}x0e", latent), tensors.axis_to_mul()]
        ).regroup()
        edge_feats = e3nn.flax.Linear(hidden, force_irreps_out=True, name="edge_out")(edge_feats) * u
        summed = jax.ops.segment_sum(edge_feats.array, receivers, num_segments=num_nodes) * norm
        own = e3nn.flax.Linear(hidden, num_indexed_weights=self.num_species, force_irreps_out=True, name="self")(
            species, x
        )
        return e3nn.IrrepsArray(hidden, summed) + own


def allegro_trunk(cfg, x, inputs):
    """The registry's trunk (:mod:`aiida_eqml.ml.architectures`): field coupling of the embedding, then Allegro."""
    from .layers import FieldCoupling

    if inputs.field_feats is not None:
        x = FieldCoupling(name="field_0")(x, inputs.field_feats)
    return Allegro(
        hidden=str(inputs.hidden),
        num_species=len(cfg["species"]),
        num_layers=int(cfg["num_layers"]),
        channels=int(cfg["allegro_channels"]),
        lmax=int(cfg["allegro_lmax"]),
        latent=tuple(cfg["allegro_latent"]),
        avg_num_neighbors=float(cfg["avg_num_neighbors"]),
        cutoff=float(cfg["cutoff"]),
        envelope_p=int(cfg["envelope_p"]),
        name="allegro",
    )(
        x,
        inputs.species,
        inputs.edge_angular,
        inputs.edge_scalars,
        inputs.lengths,
        inputs.senders,
        inputs.receivers,
        inputs.edge_mask,
    )
