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

import functools
from collections.abc import Sequence

import e3nn_jax as e3nn
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "radial_basis",
    "safe_norm_vectors",
    "RadialMLP",
    "Convolution",
    "fused_convolution",
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


class _Kernel(nn.Module):
    """The kernel of a bias-free ``flax.linen.Dense`` (same name, shape and initialiser), returned unapplied."""

    features: int
    alpha: float
    gradient_normalization: float

    @nn.compact
    def __call__(self, num_in: int, dtype) -> jnp.ndarray:
        stddev = jnp.sqrt(self.alpha) ** (1.0 - self.gradient_normalization)  # as e3nn.flax.MultiLayerPerceptron
        return self.param("kernel", nn.initializers.normal(stddev=stddev), (num_in, self.features), dtype)


class _FactorisedMLP(nn.Module):
    """``e3nn.flax.MultiLayerPerceptron(hidden + (num_out,), silu, output_activation=False)`` with the same parameter
    names and initialisation, returning ``(h, kernel)`` such that its output is ``h @ kernel``: the last layer is left
    to the caller, who may apply only (or repeat) some of its columns."""

    hidden: Sequence[int]
    num_out: int

    @nn.compact
    def __call__(self, x: jnp.ndarray):
        gn = e3nn.config("gradient_normalization")
        gn = {"element": 0.0, "path": 1.0}[gn] if isinstance(gn, str) else gn
        act = e3nn.normalize_function(jax.nn.silu)
        for i, h in enumerate(tuple(self.hidden)):
            alpha = 1 / x.shape[-1]
            dense = nn.Dense(
                h,
                use_bias=False,
                kernel_init=nn.initializers.normal(stddev=jnp.sqrt(alpha) ** (1.0 - gn)),
                param_dtype=x.dtype,
                name=f"Dense_{i}",
            )
            x = act(jnp.sqrt(alpha) ** gn * dense(x))
        alpha = 1 / x.shape[-1]
        kernel = _Kernel(self.num_out, alpha, float(gn), name=f"Dense_{len(tuple(self.hidden))}")(x.shape[-1], x.dtype)
        return x * jnp.sqrt(alpha) ** gn, kernel


class _FactorisedRadialMLP(nn.Module):
    """:class:`RadialMLP`'s parameters (``MultiLayerPerceptron_0/Dense_i/kernel``), output as ``(h, kernel)``."""

    hidden: Sequence[int]
    num_out: int

    @nn.compact
    def __call__(self, radial: jnp.ndarray):
        return _FactorisedMLP(self.hidden, self.num_out, name="MultiLayerPerceptron_0")(radial)


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
