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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bto_throughput_common import (  # noqa: E402
    BASE,
    CONFIGS,
    ROOT,
    SPECIES,
    git_commit,
    load_average,
    load_structure,
    summary,
    window,
)
from bto_throughput_jax import bench_ours, bench_tensorial, profile_ours  # noqa: E402
from bto_throughput_torch import bench_torch  # noqa: E402


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
