"""Throughput at equal weights on one 135-atom BaTiO3 structure (aiida-eqml vs tensorial vs e3nn for PyTorch), and
the Predictor's latency.

    .venv/bin/python benchmarks/bto_throughput.py                  # writes docs/benchmarks/throughput.json

Runs the three implementations side by side in one process, on the same structure, graph (edges from vesin) and
threads, the timing windows interleaved (ours, tensorial, torch, ours, ...) so that the load of a shared machine hits
them alike; the median over ``--repeats`` windows is reported with the spread and the load average.

* ``ours``: ``build_model`` (architecture ``nequip``) with a direct Z* head (``NodeReadout``);
* ``tensorial``: ``tensorial.gcnn._nequip.InteractionBlock`` (tensorial's NequIP layer, camml-lab) inside our
  embedding, edge features (spherical harmonics l = 0..l_max, Bessel x envelope) and the same ``NodeReadout``;
* ``e3nn_torch``: the same network written with e3nn 0.6 for PyTorch (eager): "uvu" ``o3.TensorProduct`` convolution
  weighted by a radial MLP, linear maps, species self-connection, ``nn.Gate``, residual, and the same readout
  (linear compression, ``FullTensorProduct``, species-indexed ``FullyConnectedTensorProduct``). torch is imported
  from ``--torch-path`` (default ``.venv-torch``, made by ``pip install --target .venv-torch torch==2.13.0+cpu
  e3nn==0.6.0``) when it is not in the environment: installed in ``.venv`` it would be imported by ``vesin`` in every
  process that builds a graph.

Configurations (``--configs``): ``equal`` (the ``equal_weights`` section): hidden ``32x0e + 16x1o + 8x2e``, where
the three networks have the same weights (every hidden irrep can be produced by the first layer, so no
implementation carries weights for features that are structurally zero); ``bto``: the ``bto_response.py`` model
(hidden ``32x0e + 8x0o + 16x1o + 8x1e + 8x2e + 4x2o``), where our first layer has gates for 1e / 2o features it
cannot produce yet (1 920 weights more than tensorial) and PyTorch carries weights for zero features. Both: l_max 2,
8 Bessel functions x polynomial envelope (p = 6), radial MLP 8 -> 32 -> 32, two layers, cutoff 5 A, float32.

Measured: inference (structures/s: jitted forward pass, positions -> Z*) and training (steps/s: forward, backward
of an MSE loss on Z*, Adam update), compilation excluded (reported as ``warmup_s``); every network is checked for
rotation equivariance before it is timed. ``--profile`` adds the time of the pieces of our layer.

Predictor latency (``--latency``, default on): a 4-atom cell of the shipped Hubbard reference ensemble
(``aiida_eqml/ml/hubbard/reference/hubbard-tmo``, 4 members) and the 135-atom structure with a BaTiO3 Z* model (the
``bto`` config, untrained weights saved as a model file): each in a fresh process with an empty persistent
compilation cache (first call: graph, compilation, prediction; warm call: the same structure again), then in a
second fresh process with the cache the first one filled (``cached_new_process``: its first call). The cache is the
Predictor's default one (``enable_compilation_cache``), pointed at a temporary directory through
``AIIDA_EQML_XLA_CACHE``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

SPECIES = ["O", "Ti", "Ba"]
Z_IRREPS = "0e + 1e + 2e"  # Born charges: 1o x 1o
BASE = {
    "architecture": "nequip",
    "cutoff": 5.0,
    "num_layers": 2,
    "sh_lmax": 2,
    "num_radial_basis": 8,
    "radial_hidden": [32, 32],
    "envelope_p": 6,
    "readout_product_mul": 4,
}
CONFIGS = {
    "equal": {**BASE, "hidden_irreps": "32x0e + 16x1o + 8x2e"},
    "bto": {**BASE, "hidden_irreps": "32x0e + 8x0o + 16x1o + 8x1e + 8x2e + 4x2o"},  # bto_response.MODEL_CONFIG
}


# ============================================================== helpers
def git_commit() -> str:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "benchmarks/bto_throughput.py", "aiida_eqml/ml"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def load_average():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def load_structure(data: Path, index: str):
    """One structure and its Born charges (the loader's cif reader)."""
    from aiida_eqml.ml.datasets.bto import read_p1_cif

    atoms = read_p1_cif(data / "structures" / "cif" / f"structure_{index}.cif")
    born = np.load(data / "born_charges" / f"{index}.npy", allow_pickle=False)
    return atoms, born


def random_rotation(seed=0) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def window(fn, min_time: float) -> float:
    """Calls/s of ``fn`` (which blocks until done) over one window of at least ``min_time`` s."""
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        dt = time.perf_counter() - t0
        if dt >= min_time:
            return n / dt


def summary(rates: list[float]) -> dict:
    return {
        "median": statistics.median(rates),
        "min": min(rates),
        "max": max(rates),
        "runs": [round(r, 4) for r in rates],
    }


def import_torch(torch_path: str | None):
    try:
        import torch  # noqa: F401
    except ImportError:
        if torch_path and Path(torch_path).is_dir():
            sys.path.append(str(Path(torch_path).resolve()))  # after the venv: its packages win
    import e3nn
    import torch

    return torch, e3nn


class Bench:
    """A network ready to time: ``infer()`` and ``step()`` block until done."""

    def __init__(self, name, params, infer, step, equivariance, warmup_s, extra=None):
        self.name, self.params, self.infer, self.step = name, int(params), infer, step
        self.equivariance, self.warmup_s, self.extra = float(equivariance), float(warmup_s), dict(extra or {})


def _equivariance(predict, positions, cells, rest, rot, d):
    out = np.asarray(predict(positions, cells, *rest))
    out_rot = np.asarray(predict(positions @ rot.T, cells @ rot.T, *rest))
    return float(np.abs(out_rot - out @ d.T).max() / np.abs(out).max())


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


# ============================================================== e3nn for PyTorch
def build_torch_model(cfg, avg_nn: float):
    import torch
    from e3nn import nn as enn
    from e3nn import o3

    hidden = o3.Irreps(cfg["hidden_irreps"]).sort().irreps.simplify()
    sh_irreps = o3.Irreps.spherical_harmonics(cfg["sh_lmax"])
    species_irreps = o3.Irreps(f"{len(SPECIES)}x0e")
    act = {1: torch.nn.functional.silu, -1: torch.tanh}

    def bessel_envelope(r: torch.Tensor) -> torch.Tensor:
        """sqrt(2/c) sin(n pi r/c)/r times the p = 6 polynomial envelope (e3nn-jax's bessel and poly_envelope(5, 2))."""
        c, p = cfg["cutoff"], cfg["envelope_p"]
        n = torch.arange(1, cfg["num_radial_basis"] + 1, dtype=r.dtype)
        x = (r / c)[:, None]
        basis = (2.0 / c) ** 0.5 * torch.sin(n * torch.pi * x) / r[:, None]
        env = 1 - (p + 1) * (p + 2) / 2 * x**p + p * (p + 2) * x ** (p + 1) - p * (p + 1) / 2 * x ** (p + 2)
        return basis * env * (x < 1)

    def producible(irreps_in):
        """Irreps of ``hidden`` that irreps_in (x) Y can give (as e3nn-jax, which drops structurally zero irreps)."""
        reach = {ir_out for _, ir_in in irreps_in for _, ir_sh in sh_irreps for ir_out in ir_in * ir_sh}
        return o3.Irreps([(m, ir) for m, ir in hidden if ir in reach])

    class Layer(torch.nn.Module):
        """NequIP layer: linear, "uvu" tensor-product convolution weighted by a radial MLP plus the self path x_j
        weighted per channel (as ours), linear, species self-connection, gate, residual."""

        def __init__(self, irreps_in):
            super().__init__()
            out = producible(irreps_in)
            scalars = o3.Irreps([(m, ir) for m, ir in out if ir.l == 0])
            gated = o3.Irreps([(m, ir) for m, ir in out if ir.l > 0])
            self.gate = enn.Gate(
                scalars, [act[ir.p] for _, ir in scalars], f"{gated.num_irreps}x0e", [torch.sigmoid], gated
            )
            pre_gate = self.gate.irreps_in
            self.linear_up = o3.Linear(irreps_in, irreps_in)
            mid, instructions = [], []
            for i, (mul, ir_in) in enumerate(irreps_in):
                for j, (_, ir_sh) in enumerate(sh_irreps):
                    for ir_out in ir_in * ir_sh:
                        if ir_out in pre_gate:
                            instructions.append((i, j, len(mid), "uvu", True))
                            mid.append((mul, ir_out))
            self.tp = o3.TensorProduct(
                irreps_in, sh_irreps, o3.Irreps(mid), instructions, shared_weights=False, internal_weights=False
            )
            # the self path of ours (x_j itself, weighted per channel, beside x_j (x) Y)
            keep = {ir for _, ir in pre_gate}
            self.self_index = [k for k, (m, ir) in enumerate(irreps_in) if ir in keep]
            self.self_irreps = o3.Irreps([irreps_in[k] for k in self.self_index])
            slices = irreps_in.slices()
            self.self_columns = torch.cat([torch.arange(slices[k].start, slices[k].stop) for k in self.self_index])
            self.self_weight_index = torch.cat(
                [
                    torch.arange(m).repeat_interleave(ir.dim) + sum(irreps_in[j].mul for j in self.self_index[:n])
                    for n, (m, ir) in enumerate(self.self_irreps)
                ]
            )
            self.radial = enn.FullyConnectedNet(
                [cfg["num_radial_basis"], *cfg["radial_hidden"], self.tp.weight_numel + self.self_irreps.num_irreps],
                torch.nn.functional.silu,
            )
            self.linear_down = o3.Linear(self.tp.irreps_out + self.self_irreps, pre_gate)
            self.self_connection = o3.FullyConnectedTensorProduct(irreps_in, species_irreps, pre_gate)
            self.residual = irreps_in == self.gate.irreps_out

        def forward(self, x, onehot, sh, radial, senders, receivers):
            h = self.linear_up(x)
            weights = self.radial(radial)
            h_j = h[senders]
            w_tp, w_self = weights[:, : self.tp.weight_numel], weights[:, self.tp.weight_numel :]
            messages = torch.cat(
                [self.tp(h_j, sh, w_tp), h_j[:, self.self_columns] * w_self[:, self.self_weight_index]], dim=-1
            )
            agg = torch.zeros(x.shape[0], messages.shape[1], dtype=x.dtype).index_add_(0, receivers, messages)
            out = self.gate(self.linear_down(agg / avg_nn**0.5) + self.self_connection(x, onehot))
            return (out + x) / 2**0.5 if self.residual else out

    class Readout(torch.nn.Module):
        """As NodeReadout: x and the pairwise products of a compressed copy, species-indexed linear map."""

        def __init__(self, irreps_in):
            super().__init__()
            small = o3.Irreps([(min(m, cfg["readout_product_mul"]), ir) for m, ir in irreps_in])
            self.compress = o3.Linear(irreps_in, small)
            self.products = o3.FullTensorProduct(small, small, filter_ir_out=[ir for _, ir in o3.Irreps(Z_IRREPS)])
            self.out = o3.FullyConnectedTensorProduct(
                irreps_in + self.products.irreps_out, species_irreps, o3.Irreps(Z_IRREPS)
            )

        def forward(self, x, onehot):
            s = self.compress(x)
            return self.out(torch.cat([x, self.products(s, s)], dim=-1), onehot)

    class TorchNequIP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            first = o3.Irreps([(m, ir) for m, ir in hidden if ir == o3.Irrep("0e")])  # the embedding: scalars only
            self.embedding = o3.Linear(species_irreps, first)
            self.layers = torch.nn.ModuleList()
            irreps = first
            for _ in range(cfg["num_layers"]):
                self.layers.append(Layer(irreps))
                irreps = self.layers[-1].gate.irreps_out
            self.readout = Readout(irreps)

        def forward(self, positions, cell, onehot, senders, receivers, shifts):
            vectors = positions[receivers] - positions[senders] + shifts @ cell
            sh = o3.spherical_harmonics(sh_irreps, vectors, normalize=True, normalization="component")
            radial = bessel_envelope(vectors.norm(dim=-1))
            x = self.embedding(onehot)
            for layer in self.layers:
                x = layer(x, onehot, sh, radial, senders, receivers)
            return self.readout(x, onehot)

    return TorchNequIP()


def bench_torch(cfg, graph, born, avg_nn, torch_path, log) -> Bench:
    torch, _ = import_torch(torch_path)
    from e3nn import o3

    torch.manual_seed(0)
    model = build_torch_model(cfg, avg_nn)
    n_params = sum(p.numel() for p in model.parameters())
    t = lambda a, dtype=torch.float32: torch.as_tensor(np.asarray(a), dtype=dtype)  # noqa: E731
    positions, cell, shifts = t(graph.positions), t(graph.cells[0]), t(graph.shifts)
    onehot = torch.nn.functional.one_hot(t(graph.species, torch.long), len(SPECIES)).float()
    senders, receivers = t(graph.senders, torch.long), t(graph.receivers, torch.long)
    args = (positions, cell, onehot, senders, receivers, shifts)
    # Target in e3nn-torch's basis: its 1o components are (y, z, x); permute the Cartesian axes, then project.
    ct = o3.ReducedTensorProducts("ij", i="1o", j="1o")
    yzx = [1, 2, 0]
    target = torch.einsum("nij,kij->nk", t(born[:, yzx][:, :, yzx]), ct.change_of_basis.float())
    rot = torch.as_tensor(random_rotation(), dtype=torch.float32)
    with torch.no_grad():
        out = model(*args)
        out_rot = model(positions @ rot.T, cell @ rot.T, *args[2:])
    d = o3.Irreps(Z_IRREPS).D_from_matrix(rot)
    equiv = float((out_rot - out @ d.T).abs().max() / out.abs().max())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def infer():
        with torch.no_grad():
            model(*args)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = torch.mean((model(*args) - target) ** 2)
        loss.backward()
        optimizer.step()

    t0 = time.perf_counter()
    infer()
    step()
    warm = time.perf_counter() - t0
    log(
        f"  e3nn_torch: {n_params} parameters, equivariance error {equiv:.1e}, warm-up {warm:.1f} s, "
        f"{torch.get_num_threads()} threads"
    )
    return Bench(
        "e3nn_torch", n_params, infer, step, equiv, warm, {"threads": torch.get_num_threads(), "mode": "eager"}
    )


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


# ============================================================== Predictor latency (child processes)
def latency_child(kind: str, model_path: str, data: str, structure: str) -> dict:
    """One fresh process: first call (graph + compilation + prediction) and a warm call of the Predictor."""
    t_start = time.perf_counter()
    from aiida_eqml.ml.predict import load_predictor

    t_import = time.perf_counter() - t_start
    t0 = time.perf_counter()
    predictor = load_predictor(model_path)
    t_load = time.perf_counter() - t0
    if kind == "hubbard":
        from aiida_eqml.ml.dataset import Dataset

        record = Dataset.load(Path(model_path) / "record.npz")
        sample = next(s for s in record.samples if len(s.positions) == 4)
        one = Dataset([sample], record.target_specs)
        call = lambda: predictor.predict_hubbard(one)  # noqa: E731
        atoms_n = len(sample.positions)
    else:
        atoms, _ = load_structure(Path(data), structure)
        call = lambda: predictor.predict(atoms)  # noqa: E731
        atoms_n = len(atoms)
    t0 = time.perf_counter()
    call()
    first = time.perf_counter() - t0
    warm = []
    for _ in range(5):
        t0 = time.perf_counter()
        call()
        warm.append(time.perf_counter() - t0)
    return {
        "atoms": atoms_n,
        "members": len(predictor),
        "import_s": t_import,
        "load_s": t_load,
        "first": first,
        "warm": statistics.median(warm),
        "warm_runs": warm,
        "traces": predictor.trace_count,
        "cache_dir_in_use": predictor.compilation_cache_dir,
    }


def measure_latency(args, log) -> dict:
    import jax

    from aiida_eqml.ml.graph import graph_from_atoms
    from aiida_eqml.ml.modelfile import save_model
    from aiida_eqml.ml.models import build_model

    tmp = Path(tempfile.mkdtemp(prefix="eqml-latency-"))
    atoms, _ = load_structure(Path(args.data), args.structure)
    config = {
        **CONFIGS["bto"],
        "species": SPECIES,
        "avg_num_neighbors": 46.5,
        "heads": {"born_charges": {"level": "node", "tensor": "ij"}},
    }
    model = build_model(config)
    graph = graph_from_atoms(atoms, config["cutoff"], SPECIES)
    params = model.init(jax.random.PRNGKey(0), graph)
    bto_model = tmp / "bto_zstar.eqml"
    save_model(bto_model, model.config, params, metadata={"note": "untrained weights: latency only"})
    cases = {
        "hubbard_4_atoms": ("hubbard", str(ROOT / "aiida_eqml" / "ml" / "hubbard" / "reference" / "hubbard-tmo")),
        "bto_135_atoms": ("bto", str(bto_model)),
    }
    out = {}
    for name, (kind, path) in cases.items():
        cache = tmp / f"xla-{name}"
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")
        }
        env["AIIDA_EQML_XLA_CACHE"] = str(cache)
        runs = []
        for _ in range(2):  # empty cache, then the cache the first process filled
            cmd = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--latency-child",
                kind,
                path,
                "--data",
                args.data,
                "--structure",
                args.structure,
            ]
            res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
            if res.returncode != 0:
                raise RuntimeError(f"latency child failed: {res.stderr[-2000:]}")
            runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
        files = sum(1 for _ in cache.rglob("*") if _.is_file()) if cache.exists() else 0
        out[name] = {
            "first": runs[0]["first"],
            "warm": runs[0]["warm"],
            "cached_new_process": runs[1]["first"],
            "cached_new_process_warm": runs[1]["warm"],
            "atoms": runs[0]["atoms"],
            "members": runs[0]["members"],
            "load_s": [runs[0]["load_s"], runs[1]["load_s"]],
            "import_s": [runs[0]["import_s"], runs[1]["import_s"]],
            "traces_per_process": [runs[0]["traces"], runs[1]["traces"]],
            "cache_files": files,
            "cache_dir_in_use_is_default_mechanism": runs[0]["cache_dir_in_use"] == str(cache),
        }
        log(
            f"  {name}: first {out[name]['first']:.2f} s, warm {out[name]['warm'] * 1e3:.1f} ms, "
            f"first call in a new process with the cache {out[name]['cached_new_process']:.2f} s ({files} cache files)"
        )
    return out


# ============================================================== main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "bto400"))
    p.add_argument("--structure", default="00000", help="5-digit file index of the structure")
    p.add_argument(
        "--repeats", type=int, default=5, help="interleaved timing windows per measurement (median reported)"
    )
    p.add_argument("--min-time", type=float, default=2.0, help="seconds per timing window")
    p.add_argument("--implementations", default="ours,tensorial,e3nn_torch")
    p.add_argument("--configs", default="equal,bto")
    p.add_argument("--torch-path", default=str(ROOT / ".venv-torch"))
    p.add_argument("--no-latency", action="store_true")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--out-json", default=str(ROOT / "docs" / "benchmarks" / "throughput.json"))
    p.add_argument("--latency-child", nargs=2, metavar=("KIND", "MODEL"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.latency_child:
        print(json.dumps(latency_child(*args.latency_child, args.data, args.structure)))
        return 0
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    wanted = [s.strip() for s in args.implementations.split(",") if s.strip()]

    import e3nn_jax
    import jax
    import jax.numpy as jnp

    from aiida_eqml.ml.graph import graph_from_atoms
    from aiida_eqml.ml.tensors import tensor_type

    atoms, born = load_structure(Path(args.data), args.structure)
    graph = graph_from_atoms(atoms, BASE["cutoff"], SPECIES)
    graph = jax.tree_util.tree_map(lambda x: x.astype(np.float32) if x.dtype == np.float64 else x, graph)
    n_atoms, n_edges = int(graph.n_node[0]), int(graph.n_edge[0])
    avg_nn = n_edges / n_atoms
    target = jnp.asarray(tensor_type("ij").to_irreps(born).array, jnp.float32)
    log(
        f"structure_{args.structure}: {n_atoms} atoms, {n_edges} edges within {BASE['cutoff']} A "
        f"({avg_nn:.1f} per atom)"
    )
    versions = {"jax": jax.__version__, "e3nn_jax": e3nn_jax.__version__}
    try:
        from importlib.metadata import version

        versions["tensorial"] = version("tensorial")
    except Exception:  # noqa: BLE001
        pass
    payload = {
        "command": " ".join(
            shlex.quote(a)
            for a in [os.path.relpath(sys.argv[0], ROOT)] + (sys.argv[1:] if argv is None else list(argv))
        ),
        "commit": git_commit(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "structure": f"structure_{args.structure}",
        "atoms": n_atoms,
        "edges": n_edges,
        "head": "born_charges direct (0e + 1e + 2e), float32",
        "timing": f"median of {args.repeats} interleaved windows of >= {args.min_time} s after warm-up, one process",
        "host": {
            "cpus": os.cpu_count(),
            "load_average_at_start": load_average(),
            "machine": platform.machine(),
            "python": platform.python_version(),
            "note": "shared 2-core machine: a DFT campaign and other sessions ran concurrently; numbers are noisy, "
            "the windows are interleaved so that the load hits the implementations alike",
        },
        "versions": versions,
        "configs": {k: CONFIGS[k] for k in args.configs.split(",")},
        "skipped": {},
    }

    def write():
        Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out_json).write_text(json.dumps(payload, indent=1) + "\n")

    for cname in args.configs.split(","):
        cfg = CONFIGS[cname]
        section = "equal_weights" if cname == "equal" else "bto_response_config"
        log(f"config {cname} ({cfg['hidden_irreps']}):")
        benches = []
        for impl in wanted:
            try:
                if impl == "ours":
                    benches.append(bench_ours(cfg, graph, target, avg_nn, log))
                elif impl == "tensorial":
                    benches.append(bench_tensorial(cfg, graph, target, avg_nn, log))
                elif impl == "e3nn_torch":
                    b = bench_torch(cfg, graph, born, avg_nn, args.torch_path, log)
                    import e3nn
                    import torch

                    versions.update(torch=torch.__version__, e3nn_torch=e3nn.__version__)
                    benches.append(b)
            except ImportError as exc:
                payload["skipped"][f"{cname}/{impl}"] = f"not installed: {exc}"
                log(f"  {impl}: not installed ({exc})")
            except Exception as exc:  # noqa: BLE001 - recorded in the JSON
                payload["skipped"][f"{cname}/{impl}"] = f"failed: {type(exc).__name__}: {exc}"
                log(f"  {impl}: failed ({type(exc).__name__}: {exc})")
        rates = {b.name: {"infer": [], "train": []} for b in benches}
        loads = []
        for _ in range(args.repeats):
            for b in benches:
                rates[b.name]["infer"].append(window(b.infer, args.min_time))
            for b in benches:
                rates[b.name]["train"].append(window(b.step, args.min_time))
            loads.append(load_average()[0] if load_average() else None)
        result = {}
        for b in benches:
            inf, tr = summary(rates[b.name]["infer"]), summary(rates[b.name]["train"])
            result[b.name] = {
                "params": b.params,
                "inference_per_s": inf["median"],
                "train_steps_per_s": tr["median"],
                "inference": inf,
                "training": tr,
                "equivariance_rel_error": b.equivariance,
                "warmup_s": b.warmup_s,
                **b.extra,
            }
            log(
                f"  {b.name:12s} {b.params:7d} params  inference {inf['median']:7.2f}/s "
                f"[{inf['min']:.2f}-{inf['max']:.2f}]"
                f"  training {tr['median']:6.2f} steps/s [{tr['min']:.2f}-{tr['max']:.2f}]"
            )
        if "ours" in result and "tensorial" in result:
            result["ours_over_tensorial"] = {
                "inference": result["ours"]["inference_per_s"] / result["tensorial"]["inference_per_s"],
                "training": result["ours"]["train_steps_per_s"] / result["tensorial"]["train_steps_per_s"],
            }
        if "ours" in result and "e3nn_torch" in result:
            result["ours_over_e3nn_torch"] = {
                "inference": result["ours"]["inference_per_s"] / result["e3nn_torch"]["inference_per_s"],
                "training": result["ours"]["train_steps_per_s"] / result["e3nn_torch"]["train_steps_per_s"],
            }
        result["load_average_1min_per_repeat"] = loads
        payload[section] = result
        write()
        del benches
    if not args.no_profile and "ours" in wanted:
        log("profile of our layer (config equal):")
        payload["profile_ours_ms"] = profile_ours(CONFIGS["equal"], graph, avg_nn, args.min_time, log)
        write()
    if not args.no_latency:
        log("Predictor latency (fresh processes):")
        try:
            payload["predictor_latency_s"] = measure_latency(args, log)
        except Exception as exc:  # noqa: BLE001
            payload["skipped"]["predictor_latency"] = f"failed: {type(exc).__name__}: {exc}"
            log(f"  failed: {exc}")
    payload["host"]["load_average_at_end"] = load_average()
    write()
    log(f"wrote {args.out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
