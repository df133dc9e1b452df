"""The JAX implementations timed by ``benchmarks/bto_throughput.py``: ours (``build_model``, architecture ``nequip``)
and tensorial's NequIP layer inside our embedding and readout, each returned as a ready-to-time ``Bench``, and the
profile of the pieces of our layer (convolution fused and e3nn reference, full layer, edge geometry)."""

from __future__ import annotations

import statistics
import time

import numpy as np
from bto_throughput_common import SPECIES, Z_IRREPS, Bench, _equivariance, random_rotation, window


# ============================================================== aiida-eqml (JAX)
def bench_ours(cfg, graph, target, avg_nn, log) -> Bench:
    import e3nn_jax as e3nn
    import jax
    import jax.numpy as jnp
    import optax

    from aiida_eqml.ml.models import build_model

    config = {
        **cfg,
        "species": SPECIES,
        "avg_num_neighbors": avg_nn,
        "heads": {"born_charges": {"level": "node", "tensor": "ij"}},
    }
    model = build_model(config)
    params = model.init(jax.random.PRNGKey(0), graph)
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    predict = jax.jit(lambda p, g: model.apply(p, g)["born_charges"].array)
    rot = random_rotation()
    d = np.asarray(e3nn.Irreps(Z_IRREPS).D_from_matrix(jnp.asarray(rot)))
    equiv = _equivariance(
        lambda pos, cell: predict(params, graph._replace(positions=pos, cells=cell)),
        graph.positions,
        graph.cells,
        (),
        rot,
        d,
    )
    optimizer = optax.adam(1e-3)

    def loss_fn(p, g):
        return jnp.mean((model.apply(p, g)["born_charges"].array - target) ** 2)

    @jax.jit
    def train_step(p, s, g):
        loss, grads = jax.value_and_grad(loss_fn)(p, g)
        updates, s = optimizer.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    state = {"p": params, "s": optimizer.init(params)}

    def step():
        state["p"], state["s"], loss = train_step(state["p"], state["s"], graph)
        loss.block_until_ready()

    t0 = time.perf_counter()
    predict(params, graph).block_until_ready()
    step()
    warm = time.perf_counter() - t0
    log(f"  ours: {n_params} parameters, equivariance error {equiv:.1e}, warm-up (jit) {warm:.1f} s")
    return Bench("ours", n_params, lambda: predict(params, graph).block_until_ready(), step, equiv, warm)


# ============================================================== tensorial (JAX)
def bench_tensorial(cfg, graph, target, avg_nn, log) -> Bench:
    import e3nn_jax as e3nn
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import optax

    # tensorial.gcnn exports NequipLayer (a jraph.GraphsTuple wrapper around this block with tensorial's keys);
    # the block itself takes plain arrays like ours.
    from tensorial.gcnn._nequip import InteractionBlock

    from aiida_eqml.ml.graph import edge_vectors
    from aiida_eqml.ml.layers import NodeReadout, radial_basis

    hidden = e3nn.Irreps(cfg["hidden_irreps"]).regroup()

    class TensorialNequIP(nn.Module):
        """Embedding, edge features and readout as in aiida_eqml; the layers are tensorial's."""

        @nn.compact
        def __call__(self, positions, cells, species, senders, receivers):
            vectors = edge_vectors(graph._replace(positions=positions, cells=cells), positions, cells)
            # l = 0..l_max as our model (an int l_max would give e3nn-jax's l = l_max harmonics only).
            sh = e3nn.spherical_harmonics(
                list(range(cfg["sh_lmax"] + 1)),
                e3nn.IrrepsArray("1o", vectors),
                normalize=True,
                normalization="component",
            )
            radial = radial_basis(
                jnp.linalg.norm(vectors, axis=-1), cfg["cutoff"], cfg["num_radial_basis"], cfg["envelope_p"]
            )
            ones = e3nn.IrrepsArray("0e", jnp.ones((positions.shape[0], 1), positions.dtype))
            x = e3nn.flax.Linear(hidden, num_indexed_weights=len(SPECIES), force_irreps_out=True)(species, ones)
            for _ in range(cfg["num_layers"]):
                y = InteractionBlock(
                    hidden,
                    radial_num_layers=len(cfg["radial_hidden"]),
                    radial_num_neurons=cfg["radial_hidden"][0],
                    radial_activation="silu",
                    avg_num_neighbours=avg_nn,
                    num_species=len(SPECIES),
                )(x, sh, radial, senders, receivers, species)
                y = y.regroup()
                x = (y + x) / jnp.sqrt(2.0) if y.irreps == x.irreps else y
            return NodeReadout(e3nn.Irreps(Z_IRREPS), len(SPECIES), cfg["readout_product_mul"])(x, species).array

    net = TensorialNequIP()
    args = (
        jnp.asarray(graph.positions),
        jnp.asarray(graph.cells),
        jnp.asarray(graph.species),
        jnp.asarray(graph.senders),
        jnp.asarray(graph.receivers),
    )
    params = jax.jit(net.init)(jax.random.PRNGKey(0), *args)
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    predict = jax.jit(net.apply)
    rot = random_rotation()
    d = np.asarray(e3nn.Irreps(Z_IRREPS).D_from_matrix(jnp.asarray(rot)))
    equiv = _equivariance(
        lambda pos, cell, *rest: predict(params, pos, cell, *rest), args[0], args[1], args[2:], rot, d
    )
    optimizer = optax.adam(1e-3)

    @jax.jit
    def train_step(p, s):
        loss, grads = jax.value_and_grad(lambda q: jnp.mean((net.apply(q, *args) - target) ** 2))(p)
        updates, s = optimizer.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    state = {"p": params, "s": optimizer.init(params)}

    def step():
        state["p"], state["s"], loss = train_step(state["p"], state["s"])
        loss.block_until_ready()

    t0 = time.perf_counter()
    predict(params, *args).block_until_ready()
    step()
    warm = time.perf_counter() - t0
    log(f"  tensorial: {n_params} parameters, equivariance error {equiv:.1e}, warm-up (jit) {warm:.1f} s")
    return Bench("tensorial", n_params, lambda: predict(params, *args).block_until_ready(), step, equiv, warm)


# ============================================================== profile of our layer
def profile_ours(cfg, graph, avg_nn, min_time, log) -> dict:
    """ms per call of the pieces of one of our NequIP layers (the second: all hidden irreps present), forward and
    forward + backward, jitted separately on the real edges."""
    import e3nn_jax as e3nn
    import jax
    import jax.numpy as jnp

    from aiida_eqml.ml.graph import edge_vectors
    from aiida_eqml.ml.layers import Convolution, NequIPLayer, gate_irreps, radial_basis, safe_norm_vectors

    hidden = e3nn.Irreps(cfg["hidden_irreps"]).regroup()
    n = graph.positions.shape[0]
    x = e3nn.normal(hidden, jax.random.PRNGKey(1), (n,))

    def geometry(pos):
        v = safe_norm_vectors(edge_vectors(graph, pos, graph.cells), graph.edge_mask)
        sh = e3nn.spherical_harmonics(
            list(range(cfg["sh_lmax"] + 1)), e3nn.IrrepsArray("1o", v), normalize=True, normalization="component"
        )
        return sh, radial_basis(jnp.linalg.norm(v, axis=-1), cfg["cutoff"], cfg["num_radial_basis"], cfg["envelope_p"])

    sh, radial = jax.jit(geometry)(graph.positions)
    pre_gate = gate_irreps(hidden)
    edge = (sh, radial, graph.senders, graph.receivers, graph.edge_mask)
    pieces = {}
    for name, fused in (("convolution_fused", True), ("convolution_e3nn_reference", False)):
        conv = Convolution(pre_gate, avg_nn, tuple(cfg["radial_hidden"]), fused=fused)
        p = conv.init(jax.random.PRNGKey(0), x, *edge)
        fwd = jax.jit(lambda p, xa, conv=conv: conv.apply(p, e3nn.IrrepsArray(hidden, xa), *edge).array)
        grad = jax.jit(
            jax.grad(
                lambda p, xa, conv=conv: jnp.sum(conv.apply(p, e3nn.IrrepsArray(hidden, xa), *edge).array ** 2),
                argnums=(0, 1),
            )
        )
        pieces[name] = (
            lambda fwd=fwd, p=p: fwd(p, x.array).block_until_ready(),
            lambda grad=grad, p=p: jax.block_until_ready(grad(p, x.array)),
        )
    layer = NequIPLayer(
        hidden, num_species=len(SPECIES), avg_num_neighbors=avg_nn, radial_hidden=tuple(cfg["radial_hidden"])
    )
    species = jnp.asarray(graph.species)
    pl = layer.init(jax.random.PRNGKey(0), x, species, *edge)
    lf = jax.jit(lambda p, xa: layer.apply(p, e3nn.IrrepsArray(hidden, xa), species, *edge).array)
    lg = jax.jit(
        jax.grad(
            lambda p, xa: jnp.sum(layer.apply(p, e3nn.IrrepsArray(hidden, xa), species, *edge).array ** 2),
            argnums=(0, 1),
        )
    )
    pieces["nequip_layer"] = (
        lambda: lf(pl, x.array).block_until_ready(),
        lambda: jax.block_until_ready(lg(pl, x.array)),
    )
    geo = jax.jit(geometry)
    geo_grad = jax.jit(jax.grad(lambda pos: sum(jnp.sum(a.array if hasattr(a, "array") else a) for a in geometry(pos))))
    pieces["edge_geometry_sh_radial"] = (
        lambda: jax.block_until_ready(geo(graph.positions)),
        lambda: jax.block_until_ready(geo_grad(graph.positions)),
    )
    out = {}
    for name, (f, g) in pieces.items():
        f(), g()
        fr = [window(f, min_time / 3) for _ in range(3)]
        gr = [window(g, min_time / 3) for _ in range(3)]
        out[name] = {"forward_ms": 1e3 / statistics.median(fr), "forward_backward_ms": 1e3 / statistics.median(gr)}
        log(
            f"  {name:28s} forward {out[name]['forward_ms']:8.2f} ms   "
            f"forward+backward {out[name]['forward_backward_ms']:8.2f} ms"
        )
    return out
