"""The point convolution of NequIP / MACE (:mod:`aiida_eqml.ml.layers`).

* :class:`Convolution`: sum_j R(r_ij) [x_j (x) Y(r_ij)] / sqrt(avg_num_neighbors), weights from a radial MLP.
* :func:`fused_convolution`: the same numbers and layout as the e3nn-jax composition in few, large ops, planned
  once per irreps signature (``_ConvPlan``, cached).

Padding edges are masked (their radial weights zeroed) before aggregation.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import e3nn_jax as e3nn
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .irreps import _irs
from .radial import RadialMLP, _FactorisedRadialMLP

__all__ = ["Convolution", "fused_convolution"]


class _ConvPlan:
    """Static layout of the convolution messages ``concatenate([x_j.filter(keep), x_j (x) Y]).regroup()``.

    ``blocks``: in the (stable, by irrep) sorted order e3nn-jax gives them, each ``(irrep, mul, source)`` with
    source ``("self", i)`` (chunk ``i`` of x itself) or ``("tp", i1, path)`` (path ``path`` of input chunk ``i1``).
    Per input chunk ``i1`` of the regrouped x: ``cg[i1]`` = ``[d1, A, K]`` with the CG coefficients of all its
    paths (columns ``(path, v, k)``), ``paths[i1]`` = ``[(mul_2, ir_out, column offset)]``. ``weight_start``:
    where each block's weights start in the radial MLP output (one weight per message irrep, e3nn order).
    """

    def __init__(self, irreps_x: e3nn.Irreps, irreps_y: e3nn.Irreps, irreps_out: e3nn.Irreps, normalization: str):
        keep = set(_irs(irreps_out))
        irreps_y = e3nn.Irreps(irreps_y)
        self.irreps_x = e3nn.Irreps(irreps_x)
        y_offsets = np.cumsum([0] + [mul * ir.dim for mul, ir in irreps_y])
        self.x_offsets = [int(o) for o in np.cumsum([0] + [mul * ir.dim for mul, ir in self.irreps_x])]
        generated = []  # (ir, mul, source) before sorting: self blocks, then tensor-product blocks
        for i, (mul, ir) in enumerate(self.irreps_x):
            if ir in keep:
                generated.append((ir, mul, ("self", i)))
        self.cg, self.paths = [], []
        for i1, (mul_1, ir_1) in enumerate(self.irreps_x):
            columns, paths = [], []
            for (mul_2, ir_2), y_off in zip(irreps_y, y_offsets):
                for ir_out in ir_1 * ir_2:
                    if ir_out not in keep:
                        continue
                    cg = np.asarray(e3nn.clebsch_gordan(ir_1.l, ir_2.l, ir_out.l), np.float64)
                    if normalization == "component":
                        cg = cg * np.sqrt(ir_out.dim)
                    elif normalization == "norm":
                        cg = cg * np.sqrt(ir_1.dim * ir_2.dim)
                    elif normalization != "none":
                        raise ValueError(f"irrep_normalization={normalization} not supported")
                    block = np.zeros((ir_1.dim, irreps_y.dim, mul_2, ir_out.dim))
                    for v in range(mul_2):
                        start = int(y_off) + v * ir_2.dim
                        block[:, start : start + ir_2.dim, v, :] = cg
                    paths.append((mul_2, ir_out, sum(c.shape[-1] for c in columns)))
                    columns.append(block.reshape(ir_1.dim, irreps_y.dim, mul_2 * ir_out.dim))
                    generated.append((ir_out, mul_1 * mul_2, ("tp", i1, len(paths) - 1)))
            self.cg.append(np.concatenate(columns, axis=-1) if columns else None)
            self.paths.append(paths)
        order = sorted(range(len(generated)), key=lambda k: (generated[k][0], k))
        self.blocks = [generated[k] for k in order]
        self.irreps_messages = e3nn.Irreps([(mul, ir) for ir, mul, _ in self.blocks]).simplify()
        starts, start = {}, 0
        for _, mul, source in self.blocks:
            starts[source] = start
            start += mul
        self.weight_start = starts
        self.num_weights = start


def fused_convolution(
    x: e3nn.IrrepsArray,
    edge_angular: e3nn.IrrepsArray,
    weights,
    senders: jnp.ndarray,
    receivers: jnp.ndarray,
    irreps_out: e3nn.Irreps,
) -> e3nn.IrrepsArray:
    """``scatter_sum_j(weights * concatenate([x_j.filter(keep=irreps_out), x_j (x) Y]).regroup())`` in few, large ops.

    The same numbers (to float rounding) and layout as the e3nn-jax composition of ``Convolution(fused=False)``;
    per input irrep chunk one matmul of Y with the stacked CG coefficients of all its paths and one contraction
    with x_j, the per-channel weights broadcast elementwise (e3nn-jax's ``IrrepsArray * weights`` runs one small
    tensor product per irrep), one ``segment_sum`` per input chunk, and the reordering into e3nn's layout done on
    the nodes after aggregation. ``weights``: ``[E, plan.num_weights]`` in the e3nn order (one per message irrep), or
    factorised as ``(h [E, H], kernel [H, num_weights])`` (the radial MLP's last layer, not applied): each chunk then
    takes the kernel columns it needs, repeated over the irrep components, and applies them in one dense matmul (XLA:CPU
    gathers and transposes a ``[E, num_weights]`` array slowly, forward and backward).
    """
    plan = _conv_plan(x.irreps, edge_angular.irreps, irreps_out)
    dtype = x.dtype
    num_edges, num_nodes = senders.shape[0], x.shape[0]
    x_j = x.array[senders]
    y = edge_angular.array
    pieces, layout = [], {}  # edge arrays to aggregate; where each block lives in them
    offset = 0

    def chunk(i):
        mul, ir = plan.irreps_x[i]
        start = plan.x_offsets[i]
        return x_j[:, start : start + mul * ir.dim].reshape(num_edges, mul, ir.dim)

    for ir, mul, source in plan.blocks:  # self blocks: x_j times its weights
        if source[0] != "self":
            continue
        i = source[1]
        w = _weight_columns(weights, np.arange(plan.weight_start[source], plan.weight_start[source] + mul))
        pieces.append((chunk(i) * w[:, :, None]).reshape(num_edges, mul * ir.dim))
        layout[source] = (offset, mul, ir.dim, None)
        offset += mul * ir.dim
    for i1, (mul_1, ir_1) in enumerate(plan.irreps_x):
        if plan.cg[i1] is None:
            continue
        cg = jnp.asarray(plan.cg[i1], dtype)  # [d1, A, K]
        num_cols = cg.shape[-1]
        z = jnp.einsum("ea,iak->eik", y, cg)  # [E, d1, K]: Y contracted with all CG of this chunk
        xc = chunk(i1)
        if ir_1.dim == 1:
            out = xc[:, :, 0, None] * z[:, 0, None, :]
        else:
            out = jnp.einsum("eui,eik->euk", xc, z)  # [E, mul_1, K]
        index = np.zeros((mul_1, num_cols), np.int32)  # weight of each output column (u, (path, v, k))
        for p, (mul_2, ir_out, col) in enumerate(plan.paths[i1]):
            start = plan.weight_start[("tp", i1, p)]
            for v in range(mul_2):
                index[:, col + v * ir_out.dim : col + (v + 1) * ir_out.dim] = (start + np.arange(mul_1) * mul_2 + v)[
                    :, None
                ]
        out = out * _weight_columns(weights, index.reshape(-1)).reshape(num_edges, mul_1, num_cols)
        pieces.append(out.reshape(num_edges, mul_1 * num_cols))
        layout[("chunk", i1)] = (offset, mul_1, None, num_cols)
        offset += mul_1 * num_cols
    # One segment_sum per piece: XLA:CPU concatenates wide [E, D] arrays slowly (several times the scatter's cost).
    nodes = jnp.concatenate(
        [jax.ops.segment_sum(piece, receivers, num_segments=num_nodes) for piece in pieces], axis=-1
    )
    out_blocks = []
    for _, mul, source in plan.blocks:  # e3nn's layout, on the (few) nodes
        if source[0] == "self":
            start, _, d, _ = layout[source]
            out_blocks.append(nodes[:, start : start + mul * d])
        else:
            _, i1, p = source
            start, mul_1, _, num_cols = layout[("chunk", i1)]
            mul_2, ir_out, col = plan.paths[i1][p]
            block = nodes[:, start : start + mul_1 * num_cols].reshape(num_nodes, mul_1, num_cols)
            block = block[:, :, col : col + mul_2 * ir_out.dim]
            out_blocks.append(block.reshape(num_nodes, mul_1 * mul_2 * ir_out.dim))
    return e3nn.IrrepsArray(plan.irreps_messages, jnp.concatenate(out_blocks, axis=-1))


def _weight_columns(weights, columns: np.ndarray) -> jnp.ndarray:
    """``weights[:, columns]`` for ``[E, W]`` weights, or ``h @ kernel[:, columns]`` for factorised ``(h, kernel)``."""
    if isinstance(weights, tuple):
        h, kernel = weights
        return h @ kernel[:, columns]
    return jnp.take(weights, jnp.asarray(columns), axis=1)


@functools.lru_cache(maxsize=256)
def _conv_plan_cached(irreps_x: str, irreps_y: str, irreps_out: str, normalization: str) -> _ConvPlan:
    return _ConvPlan(e3nn.Irreps(irreps_x), e3nn.Irreps(irreps_y), e3nn.Irreps(irreps_out), normalization)


def _conv_plan(irreps_x, irreps_y, irreps_out) -> _ConvPlan:
    return _conv_plan_cached(
        str(irreps_x), str(irreps_y), str(e3nn.Irreps(irreps_out)), e3nn.config("irrep_normalization")
    )


class Convolution(nn.Module):
    """NequIP/MACE point convolution: sum_j R(r_ij) [x_j (x) Y(r_ij)] / sqrt(avg_num_neighbors).

    ``edge_angular`` holds the edge spherical harmonics (and optional extra edge irreps); the
    radial MLP weights each path of the tensor product ("uvu": one weight per path and channel).
    ``fused`` (default): :func:`fused_convolution`, the same parameters and numbers as the e3nn-jax
    composition (``fused=False``, kept as the reference) in far fewer operations.
    """

    irreps_out: e3nn.Irreps
    avg_num_neighbors: float
    radial_hidden: Sequence[int]
    fused: bool = True

    @nn.compact
    def __call__(self, node_feats, edge_angular, edge_scalars, senders, receivers, edge_mask):
        irreps_out = e3nn.Irreps(self.irreps_out)
        fused = (
            self.fused
            and node_feats.irreps == node_feats.irreps.regroup()
            and edge_angular.irreps == edge_angular.irreps.regroup()
        )
        if fused:
            plan = _conv_plan(node_feats.irreps, edge_angular.irreps, irreps_out)
            h, kernel = _FactorisedRadialMLP(self.radial_hidden, plan.num_weights, name="RadialMLP_0")(edge_scalars)
            h = h * edge_mask[:, None].astype(h.dtype)
            aggregated = fused_convolution(node_feats, edge_angular, (h, kernel), senders, receivers, irreps_out)
            return aggregated / jnp.sqrt(self.avg_num_neighbors)
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
