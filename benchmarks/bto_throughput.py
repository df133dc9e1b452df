"""CPU throughput on one 135-atom BaTiO3 structure: aiida-eqml (JAX) vs e3nn (PyTorch) vs tensorial.

    .venv-bench/bin/python benchmarks/bto_throughput.py --data .bto400 --repeats 5

Runs in the benchmark venv (``.venv-bench``: torch, e3nn 0.6 for PyTorch, tensorial, plus this
project installed with ``pip install -e . --no-deps``) so the three implementations run side by
side in one process, on the same structure, graph (edges from vesin) and threads:

* ``aiida_eqml``: ``build_model`` (architecture ``nequip``) with a direct Z* head, as trained by
  ``benchmarks/bto_response.py``;
* ``e3nn_torch``: the same NequIP-style network written here with e3nn for PyTorch
  (``o3.TensorProduct`` "uvu" convolution weighted by a radial MLP, linear maps, species
  self-connection, ``nn.Gate``, residual);
* ``tensorial``: the seed's own package, ``tensorial.gcnn.InteractionBlock`` (its NequIP layer)
  with the same embedding, edge features and readout around it.

All three: hidden irreps ``32x0e + 8x0o + 16x1o + 8x1e + 8x2e + 4x2o``, spherical harmonics up to
l = 2, 8 Bessel radial functions x polynomial envelope (p = 6), radial MLP 8 -> 32 -> 32, two
layers, cutoff 5 Angstrom, float32, readout to the Z* irreps ``0e + 1e + 2e``.

Measured: inference (structures/s: forward pass, positions -> Z*) and training (steps/s: forward,
backward of an MSE loss on Z*, Adam update). Each measurement is repeated ``--repeats`` times
after a warm-up (JIT compilation excluded) and the median is reported with the spread.
Each model is also checked for rotation equivariance before it is timed, so the three are
real, working networks.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bto_response import MODEL_CONFIG, merge_json  # noqa: E402

SPECIES = ["O", "Ti", "Ba"]
Z_IRREPS = "0e + 1e + 2e"  # Born charges: 1o x 1o


# ============================================================== data
def load_structure(data: Path, index: str):
    """One structure and its Born charges (the loader's cif reader; labels as in the files)."""
    from aiida_eqml.ml.datasets.bto import read_p1_cif

    atoms = read_p1_cif(data / "structures" / "cif" / f"structure_{index}.cif")
    born = np.load(data / "born_charges" / f"{index}.npy", allow_pickle=False)
    return atoms, born


def random_rotation(seed=0) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


# ============================================================== timing
def timed(fn, repeats: int, min_time: float) -> dict:
    """Calls/s of ``fn`` (which must block until done): median over ``repeats`` windows of at
    least ``min_time`` s each."""
    rates = []
    for _ in range(repeats):
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            dt = time.perf_counter() - t0
            if dt >= min_time:
                break
        rates.append(n / dt)
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates), "runs": [round(r, 4) for r in rates]}


# ============================================================== aiida-eqml (JAX)
def bench_aiida_eqml(atoms, born, avg_nn, repeats, min_time, log):
    import e3nn_jax as e3nn
    import jax
    import jax.numpy as jnp
    import optax

    from aiida_eqml.ml.graph import graph_from_atoms
    from aiida_eqml.ml.models import build_model
    from aiida_eqml.ml.tensors import tensor_type

    config = {**MODEL_CONFIG, "species": SPECIES, "avg_num_neighbors": avg_nn,
              "heads": {"born_charges": {"level": "node", "tensor": "ij"}}}
    model = build_model(config)
    graph = graph_from_atoms(atoms, MODEL_CONFIG["cutoff"], SPECIES)
    graph = jax.tree_util.tree_map(lambda x: x.astype(np.float32) if x.dtype == np.float64 else x, graph)
    ttype = tensor_type("ij")
    target = jnp.asarray(ttype.to_irreps(born).array, jnp.float32)
    params = model.init(jax.random.PRNGKey(0), graph)
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))

    predict = jax.jit(lambda p, g: model.apply(p, g)["born_charges"].array)
    # Equivariance: rotate positions and cell rows, the Z* irreps rotate with D(R).
    rot = random_rotation()
    out = np.asarray(predict(params, graph))
    rotated = graph._replace(positions=graph.positions @ rot.T, cells=graph.cells @ rot.T)
    out_rot = np.asarray(predict(params, rotated))
    d = np.asarray(e3nn.Irreps(Z_IRREPS).D_from_matrix(jnp.asarray(rot)))
    equiv = float(np.abs(out_rot - out @ d.T).max() / np.abs(out).max())

    optimizer = optax.adam(1e-3)
    opt_state = optimizer.init(params)

    def loss_fn(p, g):
        return jnp.mean((model.apply(p, g)["born_charges"].array - target) ** 2)

    @jax.jit
    def train_step(p, s, g):
        loss, grads = jax.value_and_grad(loss_fn)(p, g)
        updates, s = optimizer.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    state = {"p": params, "s": opt_state}

    def step():
        state["p"], state["s"], loss = train_step(state["p"], state["s"], graph)
        loss.block_until_ready()

    t0 = time.perf_counter()
    predict(params, graph).block_until_ready()
    step()
    compile_s = time.perf_counter() - t0
    log(f"aiida_eqml: {n_params} parameters, equivariance error {equiv:.1e}, warm-up (jit) {compile_s:.1f} s")
    return {
        "parameters": int(n_params),
        "equivariance_rel_error": equiv,
        "warmup_s": compile_s,
        "inference_structures_per_s": timed(lambda: predict(params, graph).block_until_ready(), repeats, min_time),
        "training_steps_per_s": timed(step, repeats, min_time),
    }, graph


# ============================================================== tensorial (JAX)
def bench_tensorial(graph, born, avg_nn, repeats, min_time, log):
    import e3nn_jax as e3nn
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import optax
    # tensorial.gcnn exports only NequipLayer (a jraph.GraphsTuple wrapper around this block with
    # tensorial's own keys); the block itself takes plain arrays like ours.
    from tensorial.gcnn._nequip import InteractionBlock

    from aiida_eqml.ml.graph import edge_vectors
    from aiida_eqml.ml.layers import radial_basis
    from aiida_eqml.ml.tensors import tensor_type

    cfg = MODEL_CONFIG
    hidden = e3nn.Irreps(cfg["hidden_irreps"]).regroup()

    class TensorialNequIP(nn.Module):
        """Embedding + edge features as in aiida_eqml; the layers are tensorial's."""

        @nn.compact
        def __call__(self, positions, cells, species, senders, receivers):
            g = graph._replace(positions=positions, cells=cells)
            vectors = edge_vectors(g, positions, cells)
            sh = e3nn.spherical_harmonics(cfg["sh_lmax"], e3nn.IrrepsArray("1o", vectors), normalize=True, normalization="component")
            radial = radial_basis(jnp.linalg.norm(vectors, axis=-1), cfg["cutoff"], cfg["num_radial_basis"], 6)
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
                x = (y.regroup() + x) / jnp.sqrt(2.0) if y.regroup().irreps == x.irreps else y.regroup()
            return e3nn.flax.Linear(Z_IRREPS, num_indexed_weights=len(SPECIES), force_irreps_out=True)(species, x).array

    net = TensorialNequIP()
    args = (jnp.asarray(graph.positions), jnp.asarray(graph.cells), jnp.asarray(graph.species),
            jnp.asarray(graph.senders), jnp.asarray(graph.receivers))
    params = jax.jit(net.init)(jax.random.PRNGKey(0), *args)
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    target = jnp.asarray(tensor_type("ij").to_irreps(born).array, jnp.float32)
    predict = jax.jit(net.apply)

    rot = random_rotation()
    out = np.asarray(predict(params, *args))
    out_rot = np.asarray(predict(params, args[0] @ rot.T, args[1] @ rot.T, *args[2:]))
    d = np.asarray(e3nn.Irreps(Z_IRREPS).D_from_matrix(jnp.asarray(rot)))
    equiv = float(np.abs(out_rot - out @ d.T).max() / np.abs(out).max())

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
    compile_s = time.perf_counter() - t0
    log(f"tensorial: {n_params} parameters, equivariance error {equiv:.1e}, warm-up (jit) {compile_s:.1f} s")
    return {
        "parameters": int(n_params),
        "equivariance_rel_error": equiv,
        "warmup_s": compile_s,
        "inference_structures_per_s": timed(lambda: predict(params, *args).block_until_ready(), repeats, min_time),
        "training_steps_per_s": timed(step, repeats, min_time),
    }


# ============================================================== e3nn for PyTorch
def build_torch_model(avg_nn: float):
    import torch
    from e3nn import nn as enn
    from e3nn import o3

    cfg = MODEL_CONFIG
    hidden = o3.Irreps(cfg["hidden_irreps"]).sort().irreps.simplify()
    sh_irreps = o3.Irreps.spherical_harmonics(cfg["sh_lmax"])
    species_irreps = o3.Irreps(f"{len(SPECIES)}x0e")
    act = {1: torch.nn.functional.silu, -1: torch.tanh}

    def bessel_envelope(r: torch.Tensor) -> torch.Tensor:
        """sqrt(2/c) sin(n pi r/c)/r times the p = 6 polynomial envelope (as e3nn-jax's bessel
        and poly_envelope(5, 2) used by aiida_eqml)."""
        c, p = cfg["cutoff"], 6
        n = torch.arange(1, cfg["num_radial_basis"] + 1, dtype=r.dtype)
        x = (r / c)[:, None]
        basis = (2.0 / c) ** 0.5 * torch.sin(n * torch.pi * x) / r[:, None]
        env = 1 - (p + 1) * (p + 2) / 2 * x**p + p * (p + 2) * x ** (p + 1) - p * (p + 1) / 2 * x ** (p + 2)
        return basis * env * (x < 1)

    class Layer(torch.nn.Module):
        """NequIP layer: linear, "uvu" tensor-product convolution weighted by a radial MLP,
        linear, species self-connection (tensor product with the one-hot, as NequIP), gate,
        residual."""

        def __init__(self, irreps_in):
            super().__init__()
            scalars = o3.Irreps([(m, ir) for m, ir in hidden if ir.l == 0])
            gated = o3.Irreps([(m, ir) for m, ir in hidden if ir.l > 0])
            self.gate = enn.Gate(scalars, [act[ir.p] for _, ir in scalars], f"{gated.num_irreps}x0e", [torch.sigmoid], gated)
            pre_gate = self.gate.irreps_in
            self.linear_up = o3.Linear(irreps_in, irreps_in)
            mid, instructions = [], []
            for i, (mul, ir_in) in enumerate(irreps_in):
                for j, (_, ir_sh) in enumerate(sh_irreps):
                    for ir_out in ir_in * ir_sh:
                        if ir_out in pre_gate:
                            instructions.append((i, j, len(mid), "uvu", True))
                            mid.append((mul, ir_out))
            self.tp = o3.TensorProduct(irreps_in, sh_irreps, o3.Irreps(mid), instructions, shared_weights=False, internal_weights=False)
            self.radial = enn.FullyConnectedNet([cfg["num_radial_basis"], *cfg["radial_hidden"], self.tp.weight_numel], torch.nn.functional.silu)
            self.linear_down = o3.Linear(self.tp.irreps_out, pre_gate)
            self.self_connection = o3.FullyConnectedTensorProduct(irreps_in, species_irreps, pre_gate)
            self.residual = irreps_in == self.gate.irreps_out

        def forward(self, x, onehot, sh, radial, senders, receivers):
            h = self.linear_up(x)
            messages = self.tp(h[senders], sh, self.radial(radial))
            agg = torch.zeros(x.shape[0], messages.shape[1], dtype=x.dtype).index_add_(0, receivers, messages)
            out = self.gate(self.linear_down(agg / avg_nn**0.5) + self.self_connection(x, onehot))
            return (out + x) / 2**0.5 if self.residual else out

    class TorchNequIP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = o3.Linear(species_irreps, hidden)
            self.layers = torch.nn.ModuleList()
            irreps = hidden
            for _ in range(cfg["num_layers"]):
                self.layers.append(Layer(irreps))
                irreps = self.layers[-1].gate.irreps_out
            self.readout = o3.FullyConnectedTensorProduct(irreps, species_irreps, o3.Irreps(Z_IRREPS))

        def forward(self, positions, cell, onehot, senders, receivers, shifts):
            vectors = positions[receivers] - positions[senders] + shifts @ cell
            lengths = vectors.norm(dim=-1)
            sh = o3.spherical_harmonics(sh_irreps, vectors, normalize=True, normalization="component")
            radial = bessel_envelope(lengths)
            x = self.embedding(onehot)
            for layer in self.layers:
                x = layer(x, onehot, sh, radial, senders, receivers)
            return self.readout(x, onehot)

    return TorchNequIP()


def bench_torch(graph, born, avg_nn, repeats, min_time, log):
    import torch
    from e3nn import o3

    torch.manual_seed(0)
    model = build_torch_model(avg_nn)
    n_params = sum(p.numel() for p in model.parameters())
    t = lambda a, dtype=torch.float32: torch.as_tensor(np.asarray(a), dtype=dtype)  # noqa: E731
    positions, cell, shifts = t(graph.positions), t(graph.cells[0]), t(graph.shifts)
    onehot = torch.nn.functional.one_hot(t(graph.species, torch.long), len(SPECIES)).float()
    senders, receivers = t(graph.senders, torch.long), t(graph.receivers, torch.long)
    args = (positions, cell, onehot, senders, receivers, shifts)

    # Target in e3nn-torch's irreps basis: its 1o components are ordered (y, z, x), so permute
    # the Cartesian Z* axes first, then project on the orthonormal change of basis.
    ct = o3.ReducedTensorProducts("ij", i="1o", j="1o")
    if o3.Irreps(ct.irreps_out) != o3.Irreps(Z_IRREPS):
        raise RuntimeError(f"unexpected Z* irreps in e3nn-torch: {ct.irreps_out}")
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
    log(f"e3nn_torch: {n_params} parameters, equivariance error {equiv:.1e}, warm-up {warm:.1f} s, {torch.get_num_threads()} threads")
    return {
        "parameters": int(n_params),
        "equivariance_rel_error": equiv,
        "warmup_s": warm,
        "threads": torch.get_num_threads(),
        "inference_structures_per_s": timed(infer, repeats, min_time),
        "training_steps_per_s": timed(step, repeats, min_time),
    }


# ============================================================== main
def main(argv=None) -> int:
    repo = Path(__file__).resolve().parents[1]
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(repo.parent / "shared" / "data" / "bto400"))
    p.add_argument("--structure", default="00000", help="5-digit file index of the structure")
    p.add_argument("--repeats", type=int, default=5, help="timing windows per measurement (median reported)")
    p.add_argument("--min-time", type=float, default=3.0, help="seconds per timing window")
    p.add_argument("--implementations", default="aiida_eqml,e3nn_torch,tensorial")
    p.add_argument("--out-json", default=str(repo / "docs" / "benchmarks" / "bto_response.json"))
    args = p.parse_args(argv)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    wanted = [s.strip() for s in args.implementations.split(",") if s.strip()]

    import e3nn_jax
    import jax

    from aiida_eqml.ml.graph import graph_from_atoms

    atoms, born = load_structure(Path(args.data), args.structure)
    graph = graph_from_atoms(atoms, MODEL_CONFIG["cutoff"], SPECIES)
    graph = jax.tree_util.tree_map(lambda x: x.astype(np.float32) if x.dtype == np.float64 else x, graph)
    n_atoms, n_edges = int(graph.n_node[0]), int(graph.n_edge[0])
    avg_nn = n_edges / n_atoms
    log(f"structure_{args.structure}: {n_atoms} atoms, {n_edges} edges within {MODEL_CONFIG['cutoff']} A ({avg_nn:.1f} per atom)")
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    log(f"host: {os.cpu_count()} CPUs, load average {load}")

    results, versions, skipped = {}, {"jax": jax.__version__, "e3nn_jax": e3nn_jax.__version__}, {}

    def payload():
        return {
            "structure": f"structure_{args.structure}",
            "atoms": n_atoms,
            "edges": n_edges,
            "model": MODEL_CONFIG,
            "head": "born_charges direct (0e + 1e + 2e), float32",
            "timing": f"median of {args.repeats} windows of >= {args.min_time} s after warm-up",
            "host": {"cpus": os.cpu_count(), "load_average_at_start": load, "machine": platform.machine(),
                     "processor": platform.processor(), "python": platform.python_version(),
                     "note": "shared machine: other engineers' jobs ran concurrently, numbers are noisy"},
            "versions": versions,
            "results": results,
            "skipped": skipped,
        }

    def attempt(name, fn):
        # One implementation failing must not lose the others' numbers: record and go on,
        # and write the JSON after each one.
        try:
            results[name] = fn()
        except ImportError as exc:
            skipped[name] = f"not installed: {exc}"
        except Exception as exc:  # noqa: BLE001 - reported in the JSON and the table
            skipped[name] = f"failed: {type(exc).__name__}: {exc}"
        merge_json(Path(args.out_json), "throughput_cpu", payload())

    def run_torch():
        import e3nn
        import torch

        versions.update(torch=torch.__version__, e3nn=e3nn.__version__)
        return bench_torch(graph, born, avg_nn, args.repeats, args.min_time, log)

    def run_tensorial():
        from importlib.metadata import version

        versions["tensorial"] = version("tensorial")
        return bench_tensorial(graph, born, avg_nn, args.repeats, args.min_time, log)

    if "aiida_eqml" in wanted:
        attempt("aiida_eqml", lambda: bench_aiida_eqml(atoms, born, avg_nn, args.repeats, args.min_time, log)[0])
    if "e3nn_torch" in wanted:
        attempt("e3nn_torch", run_torch)
    if "tensorial" in wanted:
        attempt("tensorial", run_tensorial)

    log("")
    log(f"{'implementation':14s} {'params':>8s} {'inference struct/s':>22s} {'training steps/s':>22s}")
    for name, r in results.items():
        inf, tr = r["inference_structures_per_s"], r["training_steps_per_s"]
        log(f"{name:14s} {r['parameters']:8d} {inf['median']:9.2f} [{inf['min']:.2f}-{inf['max']:.2f}] "
            f"{tr['median']:9.2f} [{tr['min']:.2f}-{tr['max']:.2f}]")
    for name, why in skipped.items():
        log(f"{name:14s} skipped: {why}")
    log(f"wrote {args.out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
