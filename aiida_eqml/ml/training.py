"""Training: optax optimisation of an equivariant model on a :class:`~aiida_eqml.ml.dataset.Dataset`.

One function, :func:`train`, does the whole job from a plain JSON-able training config:

* seeded train/validation/test split (:func:`split_indices`);
* model config completed from the data (species, ``avg_num_neighbors``) and normalisation
  statistics computed on the training set only (:func:`compute_normalization`, written into
  ``model_config["normalization"]`` so the model file is self-describing);
* weighted multi-target loss on irreps arrays, dimensionless through each head's scale, with
  padding and NaN labels masked (:func:`loss_sums`);
* optax adam/adamw with warmup + cosine / exponential / constant schedules, gradient clipping;
* data parallelism with ``jax.sharding``: each step takes ``num_shards`` padded batches stacked
  on a leading axis that is sharded over a ``Mesh`` of devices while the parameters are
  replicated. The loss is a ratio of sums over all shards, so the same step on one device
  (``num_shards`` batches on one device) gives the same loss and update;
* early stopping on the validation loss (the best parameters are kept);
* checkpoint after every epoch (flax msgpack, no pickle) and exact resume: the shuffling order
  depends only on ``(seed, epoch)`` and the schedule on the step count stored in the optimiser
  state, so a resumed run reproduces the uninterrupted one;
* per-epoch CSV + JSON logs, tqdm progress bar (``progress=False`` to disable);
* :class:`NaNLossError` / :class:`DivergenceError` for a NaN or exploding loss.

Metrics (MAE / RMSE / relative error per target and per species) are computed in Cartesian
units with :mod:`aiida_eqml.ml.metrics` by :func:`evaluate`.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from aiida_eqml.ml.config_schema import check_training_data, validate_training_config
from aiida_eqml.ml.dataset import Batch, Dataset, build_graphs, make_batches, target_irreps_type
from aiida_eqml.ml.dataset_file import dataset_digest
from aiida_eqml.ml.metrics import MetricAccumulator

__all__ = [
    "DEFAULT_TRAINING_CONFIG",
    "TrainingError",
    "NaNLossError",
    "DivergenceError",
    "TrainResult",
    "split_indices",
    "complete_model_config",
    "compute_normalization",
    "make_optimizer",
    "make_schedule",
    "loss_sums",
    "evaluate",
    "train",
    "save_checkpoint",
    "load_checkpoint",
    "training_config",
    "write_logs",
]

DEFAULT_TRAINING_CONFIG: dict[str, Any] = {
    "model": {},  # the ModelConfig (models.py); species / avg_num_neighbors / normalization filled in
    "targets": None,  # {name: {"weight": w}}; None: every head with a label in the dataset, weight 1
    "seed": 0,
    "epochs": 100,
    "batch_size": 4,  # graphs per shard
    "num_shards": None,  # padded batches per step; None: number of devices used
    "devices": 1,  # how many of jax.devices() to shard over ("all" for every device)
    "split": {"val_fraction": 0.1, "test_fraction": 0.1},  # or {"train": [...], "val": [...], "test": [...]}
    "optimizer": {
        "name": "adam",  # adam | adamw
        "learning_rate": 5e-3,
        "weight_decay": 0.0,  # adamw only
        "schedule": "cosine",  # cosine | exponential | constant
        "warmup_epochs": 0,
        "decay_rate": 0.1,  # exponential: factor over the whole run; cosine: final lr fraction
        "clip_norm": 10.0,  # global gradient norm clip (None: off)
    },
    "early_stopping": {"patience": 50, "min_delta": 0.0},
    "divergence_factor": 1.0e4,  # loss > factor * first-epoch loss -> DivergenceError
    "normalization": "auto",  # auto: from the training set unless model["normalization"] is given
    "progress": True,
}


class TrainingError(RuntimeError):
    """Base class of training failures with a distinct exit code in the CLI."""

    exit_code = 1


class NaNLossError(TrainingError):
    """The loss became NaN or infinite."""

    exit_code = 3


class DivergenceError(TrainingError):
    """The loss exploded (far above its first-epoch value)."""

    exit_code = 4


@dataclasses.dataclass
class TrainResult:
    model: Any
    params: Any  # best parameters (lowest validation loss)
    model_config: dict  # completed config incl. normalization (what the model file stores)
    history: list[dict]
    metrics: dict  # {"train"|"val"|"test": {target: metrics}}
    split: dict[str, list[int]]
    stopped_early: bool = False
    best_epoch: int = -1


# ====================================================================== config helpers
def _merge(defaults: Mapping, overrides: Mapping) -> dict:
    out = copy.deepcopy(dict(defaults))
    for key, value in (overrides or {}).items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping) and key != "model":
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def training_config(config: Mapping[str, Any] | None) -> dict:
    """Defaults filled in; unknown keys rejected (a typo must not silently change a run)."""
    config = dict(config or {})
    unknown = set(config) - set(DEFAULT_TRAINING_CONFIG)
    if unknown:
        raise ValueError(f"unknown training config keys {sorted(unknown)}; known: {sorted(DEFAULT_TRAINING_CONFIG)}")
    for section in ("optimizer", "early_stopping"):
        bad = set(config.get(section) or {}) - set(DEFAULT_TRAINING_CONFIG[section])
        if bad:
            raise ValueError(f"unknown {section} keys {sorted(bad)}; known: {sorted(DEFAULT_TRAINING_CONFIG[section])}")
    full = _merge(DEFAULT_TRAINING_CONFIG, config)
    if "split" in config:  # a split is either fractions or explicit indices, never merged
        full["split"] = copy.deepcopy(config["split"])
    if full["optimizer"]["name"] not in ("adam", "adamw"):
        raise ValueError(f"optimizer name must be 'adam' or 'adamw', got {full['optimizer']['name']!r}")
    if full["optimizer"]["schedule"] not in ("cosine", "exponential", "constant"):
        raise ValueError(f"schedule must be cosine, exponential or constant, got {full['optimizer']['schedule']!r}")
    validate_training_config(full)  # types and ranges (aiida_eqml.ml.config_schema): ConfigError naming key and value
    return full


def split_indices(n: int, split: Mapping[str, Any], seed: int) -> dict[str, list[int]]:
    """Seeded random split of ``range(n)``; or explicit ``{"train", "val", "test"}`` index lists.

    The validation set is never empty when ``n >= 2`` (early stopping needs it).
    """
    if "train" in split:
        out = {k: [int(i) for i in split.get(k, [])] for k in ("train", "val", "test")}
        everything = sum(out.values(), [])
        if len(set(everything)) != len(everything):
            raise ValueError("explicit split: an index appears in more than one subset")
        if everything and (min(everything) < 0 or max(everything) >= n):
            raise ValueError(f"explicit split: indices must be in 0..{n - 1}")
        if not out["train"]:
            raise ValueError("explicit split: empty training set")
        return out
    val_fraction = float(split.get("val_fraction", 0.1))
    test_fraction = float(split.get("test_fraction", 0.1))
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"split fractions must be in [0, 1) with sum < 1, got val {val_fraction}, test {test_fraction}")
    perm = np.random.default_rng(seed).permutation(n)
    n_test = int(round(test_fraction * n))
    n_val = int(round(val_fraction * n))
    if n >= 2 and val_fraction > 0:
        n_val = max(n_val, 1)
    if n - n_val - n_test < 1:
        raise ValueError(f"split leaves no training samples ({n} samples, {n_val} val, {n_test} test)")
    return {
        "test": sorted(perm[:n_test].tolist()),
        "val": sorted(perm[n_test : n_test + n_val].tolist()),
        "train": sorted(perm[n_test + n_val :].tolist()),
    }


def complete_model_config(model_config: Mapping[str, Any], dataset: Dataset, graphs: Sequence | None = None) -> dict:
    """Fill in what the data determines: ``species`` (sorted by atomic number) when absent and
    ``avg_num_neighbors`` (mean edges per node of ``graphs``) when absent; check the heads
    against the dataset's target specs."""
    import ase.data

    config = copy.deepcopy(dict(model_config))
    present = [ase.data.chemical_symbols[z] for z in dataset.atomic_numbers]
    if "species" not in config:
        config["species"] = present
    else:
        missing = sorted(set(present) - set(config["species"]))
        if missing:
            raise ValueError(f"dataset has element(s) {missing} not in the model's species {config['species']}")
    heads = config.get("heads")
    if not heads:
        raise ValueError("model config has no 'heads'")
    for name, head in heads.items():
        spec = dataset.target_specs.get(name)
        if spec is None or head.get("route", "direct") == "derivative":
            continue
        if head.get("level") is not None and head["level"] != spec["level"]:
            raise ValueError(f"head {name!r} has level {head['level']!r} but the dataset target is {spec['level']!r}")
        head_irreps = target_irreps_type(head)[0] if ("tensor" in head or "irreps" in head) else None
        if head_irreps is not None and head_irreps != target_irreps_type(spec)[0]:
            raise ValueError(f"head {name!r} has irreps {head_irreps} but the dataset target has {target_irreps_type(spec)[0]}")
    if "avg_num_neighbors" not in config and graphs:
        n_nodes = sum(int(np.sum(g.n_node)) for g in graphs)
        n_edges = sum(int(np.sum(g.n_edge)) for g in graphs)
        config["avg_num_neighbors"] = max(n_edges / max(n_nodes, 1), 1.0)
    return config


def compute_normalization(dataset: Dataset, model_config: Mapping[str, Any], graphs: Sequence | None = None) -> dict:
    """Per-head ``{"scale", "species_shift"}`` from the (training) dataset, labels in irreps.

    Shift: per-species mean of the ``0e`` components (the model only uses those: a non-scalar
    shift would break equivariance); graph heads fit the shift by least squares on the
    composition (sum or mean reduce), edge heads average by (sender, receiver) species.
    Scale: RMS of the shifted labels over all components, so the network learns O(1) numbers.
    Derivative heads are skipped (they follow the energy head).
    """
    from aiida_eqml.ml.models import build_model

    model = build_model(model_config)
    species = model.species
    index = {s: i for i, s in enumerate(species)}
    import ase.data

    out = {}
    for name, head in model.heads.items():
        spec = dataset.target_specs.get(name)
        if head.route != "direct" or spec is None:
            continue
        irreps, to_irreps = target_irreps_type(spec)
        scalar = np.concatenate([np.full(ir.dim * mul, ir.l == 0 and ir.p == 1) for mul, ir in irreps])
        rows, species_rows = [], []
        for k, s in enumerate(dataset.samples):
            sp = np.array([index[ase.data.chemical_symbols[z]] for z in s.numbers])
            if head.level == "node" and name in s.node_targets:
                values = s.node_targets[name]
                ok = np.all(np.isfinite(values.reshape(s.n_atoms, -1)), axis=1)
                rows.append(to_irreps(np.nan_to_num(values))[ok])
                species_rows.append(sp[ok])
            elif head.level == "graph" and name in s.graph_targets:
                values = s.graph_targets[name]
                if np.all(np.isfinite(values)):
                    rows.append(to_irreps(values[None]))
                    counts = np.bincount(sp, minlength=len(species)).astype(float)
                    species_rows.append(counts / (len(sp) if head.reduce == "mean" else 1.0))
            elif head.level == "edge" and name in s.edge_targets:
                ev = s.edge_targets[name]
                ok = np.all(np.isfinite(ev.values.reshape(len(ev.keys), -1)), axis=1)
                rows.append(to_irreps(np.nan_to_num(ev.values))[ok])
                species_rows.append(np.stack([sp[ev.keys[ok, 0]], sp[ev.keys[ok, 1]]], axis=1))
        if not rows or sum(len(r) for r in rows) == 0:
            continue
        y = np.concatenate(rows)
        S = len(species)
        if head.level == "node":
            sp = np.concatenate(species_rows)
            shift = np.zeros((S, irreps.dim))
            for i in range(S):
                if np.any(sp == i):
                    shift[i] = y[sp == i].mean(axis=0)
            baseline = shift[sp]
        elif head.level == "graph":
            composition = np.stack(species_rows)
            coef, *_ = np.linalg.lstsq(composition, y, rcond=None)
            shift = coef
            baseline = composition @ coef
        else:
            pairs = np.concatenate(species_rows)
            shift = np.zeros((S, S, irreps.dim))
            for i in range(S):
                for j in range(S):
                    sel = (pairs[:, 0] == i) & (pairs[:, 1] == j)
                    if np.any(sel):
                        shift[i, j] = y[sel].mean(axis=0)
            baseline = shift[pairs[:, 0], pairs[:, 1]]
        shift = shift * scalar  # what the model actually adds
        baseline = baseline * scalar
        scale = float(np.sqrt(np.mean((y - baseline) ** 2)))
        if not np.isfinite(scale) or scale < 1e-8:
            scale = 1.0
        out[name] = {"scale": scale, "species_shift": shift.tolist()}
    return out


# ====================================================================== optimiser
def make_schedule(opt: Mapping[str, Any], total_steps: int, steps_per_epoch: int) -> Callable:
    import optax

    lr = float(opt["learning_rate"])
    warmup = int(opt.get("warmup_epochs", 0)) * steps_per_epoch
    decay_steps = max(total_steps - warmup, 1)
    kind = opt.get("schedule", "cosine")
    if kind == "cosine":
        decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=float(opt.get("decay_rate", 0.1)))
    elif kind == "exponential":
        decay = optax.exponential_decay(lr, decay_steps, decay_rate=float(opt.get("decay_rate", 0.1)))
    else:
        decay = optax.constant_schedule(lr)
    if warmup <= 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(lr / 100.0, lr, warmup), decay], [warmup])


def make_optimizer(opt: Mapping[str, Any], total_steps: int, steps_per_epoch: int):
    """``(optax optimiser, schedule)``; the schedule is read by the log (learning rate column)."""
    import optax

    schedule = make_schedule(opt, total_steps, steps_per_epoch)
    if opt["name"] == "adamw":
        core = optax.adamw(schedule, weight_decay=float(opt.get("weight_decay", 0.0)))
    else:
        core = optax.adam(schedule)
    clip = opt.get("clip_norm")
    chain = [optax.clip_by_global_norm(float(clip))] if clip else []
    return optax.chain(*chain, core), schedule


# ====================================================================== loss
def loss_sums(outputs: Mapping, targets: Mapping, masks: Mapping, scales: Mapping[str, float]) -> dict:
    """``{head: (sum of squared scaled errors, number of labelled components)}`` for one batch.

    ``jnp.where`` (not multiplication by the mask) keeps padding garbage or NaN out of the sums.
    """
    import jax.numpy as jnp

    out = {}
    for name, target in targets.items():
        pred = outputs[name].array
        true = target.array
        mask = masks[name][:, None]
        diff = (pred - true) / scales[name]
        sq = jnp.sum(jnp.where(mask, diff * diff, 0.0))
        count = jnp.sum(mask) * true.shape[-1]
        out[name] = (sq, count.astype(sq.dtype))
    return out


def _combine(sums: Mapping, weights: Mapping[str, float]):
    """Weighted sum over heads of mean squared scaled errors (ratio of sums over all shards)."""
    import jax.numpy as jnp

    total = 0.0
    per_head = {}
    for name, (sq, count) in sums.items():
        mse = sq / jnp.maximum(count, 1.0)
        per_head[name] = mse
        total = total + weights[name] * mse
    return total, per_head


def _stack(trees: Sequence):
    import jax

    return jax.tree_util.tree_map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)


def _empty_like_batch(batch: Batch) -> Batch:
    """Same shapes, nothing labelled: fills the last step when batches do not divide evenly."""
    return Batch(graph=batch.graph, targets=batch.targets, masks={k: np.zeros_like(v) for k, v in batch.masks.items()}, sample_indices=np.full_like(batch.sample_indices, -1))


class _Steps:
    """Jitted train / loss functions over batches stacked on a leading shard axis."""

    def __init__(self, model, optimizer, weights, scales, devices):
        import jax
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        self.model = model
        self.weights = dict(weights)
        self.scales = dict(scales)
        self.mesh = Mesh(np.array(devices), ("data",))
        self.batch_sharding = NamedSharding(self.mesh, PartitionSpec("data"))
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        heads = list(self.weights)

        def stacked_loss(params, graph, targets, masks):
            def one(g, t, m):
                return loss_sums(model.apply(params, g, heads=heads), t, m, self.scales)

            sums = jax.vmap(one)(graph, targets, masks)
            sums = {k: (jax.numpy.sum(sq), jax.numpy.sum(c)) for k, (sq, c) in sums.items()}
            total, per_head = _combine(sums, self.weights)
            return total, (per_head, sums)

        def train_step(params, opt_state, graph, targets, masks):
            (loss, (per_head, _)), grads = jax.value_and_grad(stacked_loss, has_aux=True)(params, graph, targets, masks)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            params = jax.tree_util.tree_map(lambda p, u: p + u, params, updates)
            return params, opt_state, loss, per_head

        self.train_step = jax.jit(train_step, donate_argnums=(0, 1))
        self.eval_sums = jax.jit(lambda p, g, t, m: stacked_loss(p, g, t, m)[1][1])
        self.predict = jax.jit(lambda p, g: model.apply(p, g, heads=heads))

    def place(self, tree, sharded: bool):
        import jax

        return jax.device_put(tree, self.batch_sharding if sharded else self.replicated)


def _group(batches: list[Batch], num_shards: int) -> list[list[Batch]]:
    groups = [batches[i : i + num_shards] for i in range(0, len(batches), num_shards)]
    if groups and len(groups[-1]) < num_shards:
        groups[-1] = groups[-1] + [_empty_like_batch(groups[-1][0])] * (num_shards - len(groups[-1]))
    return groups


def _stack_group(group: list[Batch]):
    return _stack([b.graph for b in group]), _stack([b.targets for b in group]), _stack([b.masks for b in group])


def _dataset_loss(steps: _Steps, params, groups) -> tuple[float, dict]:
    if not groups:
        return float("nan"), {}
    totals: dict[str, list[float]] = {}
    for group in groups:
        g, t, m = _stack_group(group)
        sums = steps.eval_sums(params, steps.place(g, True), steps.place(t, True), steps.place(m, True))
        for name, (sq, c) in sums.items():
            acc = totals.setdefault(name, [0.0, 0.0])
            acc[0] += float(sq)
            acc[1] += float(c)
    per_head = {k: v[0] / max(v[1], 1.0) for k, v in totals.items()}
    return float(sum(steps.weights[k] * v for k, v in per_head.items())), per_head


def evaluate(model, params, dataset: Dataset, batches: Sequence[Batch], predict: Callable | None = None) -> dict:
    """Cartesian-unit metrics per target (and per species for node targets) over ``batches``."""
    import jax

    from aiida_eqml.ml.tensors import tensor_type

    heads = [h for h in model.heads if h in dataset.target_specs]
    if predict is None:
        predict = jax.jit(lambda p, g: model.apply(p, g, heads=heads))
    acc = MetricAccumulator(model.species)
    for batch in batches:
        outputs = predict(params, batch.graph)
        for name in batch.targets:
            spec = dataset.target_specs[name]
            pred = np.asarray(outputs[name].array, np.float64)
            true = np.asarray(batch.targets[name].array, np.float64)
            if "tensor" in spec:
                ttype = tensor_type(spec["tensor"])
                pred, true = ttype.to_cartesian(pred), ttype.to_cartesian(true)
            species = np.asarray(batch.graph.species) if spec["level"] == "node" else None
            acc.update(name, pred, true, batch.masks[name], species)
    return acc.result()


# ====================================================================== checkpoints
@contextlib.contextmanager
def _replaced_atomically(path: str | os.PathLike, mode: str = "w", **kwargs):
    """Open a temporary file next to ``path`` and move it over ``path`` when the block succeeds, so a reader
    (or a run stopped mid-write) sees the old file or the new one, never a truncated one."""
    tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
    try:
        with open(tmp, mode, **kwargs) as handle:
            yield handle
        os.replace(tmp, os.fspath(path))
    finally:
        if os.path.exists(tmp):  # the block failed: leave no stray temporary file behind
            os.remove(tmp)


def save_checkpoint(path: str | os.PathLike, state: Mapping[str, Any]) -> None:
    """Atomic msgpack checkpoint (flax serialization; arrays, numbers, strings - no pickle)."""
    from flax import serialization

    data = serialization.msgpack_serialize(serialization.to_state_dict(dict(state)))
    with _replaced_atomically(path, "wb") as handle:
        handle.write(data)


def load_checkpoint(path: str | os.PathLike) -> dict:
    from flax import serialization

    with open(path, "rb") as handle:
        data = handle.read()
    try:
        return serialization.msgpack_restore(data)
    except Exception as exc:
        raise ValueError(f"{os.fspath(path)}: corrupt or truncated checkpoint ({type(exc).__name__}: {exc})") from exc


# ====================================================================== the loop
def _devices(spec) -> list:
    import jax

    available = jax.devices()
    if spec in ("all", None):
        return available
    n = int(spec)
    if n < 1 or n > len(available):
        raise ValueError(f"devices={n} requested but {len(available)} available ({available})")
    return available[:n]


def train(
    dataset: Dataset,
    config: Mapping[str, Any],
    out_dir: str | os.PathLike | None = None,
    *,
    resume: str | os.PathLike | None = None,
    parent: tuple[dict, Any] | None = None,
    stop_after_epochs: int | None = None,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train a model on ``dataset`` as described by the training ``config``.

    Args:
        out_dir: where ``checkpoint.msgpack``, ``log.csv`` and ``log.json`` are written each epoch
            (nothing written when None).
        resume: a checkpoint from an earlier run with the same dataset and config.
        parent: ``(model_config, params)`` of a trained model to fine-tune (its species,
            architecture and normalisation are kept; ``config["model"]`` may change the heads
            only if the parameters still fit).
        stop_after_epochs: stop (as if interrupted) after this many epochs in this call; for
            tests of resume and for time-limited jobs.
    """
    import jax
    from flax import serialization
    from tqdm.auto import tqdm

    from aiida_eqml.ml.models import DEFAULT_CONFIG as DEFAULT_MODEL_CONFIG
    from aiida_eqml.ml.models import build_model

    cfg = training_config(config)
    seed = int(cfg["seed"])
    split = split_indices(len(dataset), cfg["split"], seed)
    train_set, val_set, test_set = (dataset.subset(split[k]) for k in ("train", "val", "test"))

    if parent is not None:
        model_config = copy.deepcopy(parent[0])
        model_config.update({k: v for k, v in cfg["model"].items() if k == "heads"})
    else:
        model_config = copy.deepcopy(cfg["model"])
    # Neighbour lists only depend on species and cutoff: compute them once per split.
    graph_config = {
        "species": model_config.get("species") or [],
        "cutoff": model_config.get("cutoff", DEFAULT_MODEL_CONFIG["cutoff"]),
        **{k: model_config[k] for k in ("node_attrs", "edge_attrs") if k in model_config},
    }
    if not graph_config["species"]:
        import ase.data

        graph_config["species"] = [ase.data.chemical_symbols[z] for z in dataset.atomic_numbers]
    graphs = build_graphs(dataset, graph_config)
    model_config = complete_model_config(model_config, dataset, [graphs[i] for i in split["train"]])
    if parent is None and (cfg["normalization"] == "auto" and not model_config.get("normalization")):
        model_config["normalization"] = compute_normalization(train_set, model_config)
    model = build_model(model_config)
    model_config = model.config  # defaults filled in: exactly what the model file stores

    heads_with_labels = [h for h in model.heads if h in dataset.target_specs]
    if cfg["targets"] is None:
        weights = {h: 1.0 for h in heads_with_labels}
    else:
        unknown = set(cfg["targets"]) - set(heads_with_labels)
        if unknown:
            raise ValueError(f"targets {sorted(unknown)} are not both model heads and dataset labels ({heads_with_labels})")
        weights = {h: float(v.get("weight", 1.0)) for h, v in cfg["targets"].items()}
    if not weights:
        raise ValueError(f"nothing to train: model heads {list(model.heads)} vs dataset targets {list(dataset.target_specs)}")
    scales = {}
    for h in weights:
        norm = model_config["normalization"].get(h) or model_config["normalization"].get(model_config["energy_head"], {})
        scales[h] = float(norm.get("scale", 1.0))
    batch_config = {**model_config, "heads": {h: model_config["heads"][h] for h in weights}}

    devices = _devices(cfg["devices"])
    num_shards = int(cfg["num_shards"] or len(devices))
    if num_shards % len(devices):
        raise ValueError(f"num_shards={num_shards} must be a multiple of the {len(devices)} devices")
    batch_size = int(cfg["batch_size"])
    check_training_data(train_set, {h: model.heads[h].level for h, w in weights.items() if w > 0}, batch_size)
    data_sha256 = dataset_digest(dataset)  # in the checkpoint: resuming on other data is refused
    n_train_batches = math.ceil(len(train_set) / batch_size)
    steps_per_epoch = math.ceil(n_train_batches / num_shards)
    epochs = int(cfg["epochs"])
    optimizer, schedule = make_optimizer(cfg["optimizer"], epochs * steps_per_epoch, steps_per_epoch)

    from aiida_eqml.ml.graph import PaddingBuckets

    # One padded shape for every batch: a single compilation, and shards stack.
    buckets = PaddingBuckets.fixed(graphs, batch_size)
    train_graphs = [graphs[i] for i in split["train"]]
    sub_batches = lambda ds, idx, order=None: make_batches(  # noqa: E731
        ds, batch_config, batch_size, buckets, order=order, graphs=[graphs[i] for i in idx]
    )
    val_batches = sub_batches(val_set, split["val"]) if len(val_set) else []
    val_groups = _group(val_batches, num_shards)

    steps = _Steps(model, optimizer, weights, scales, devices)
    if parent is not None:
        params = jax.tree_util.tree_map(np.array, parent[1])
    else:
        init_batch = make_batches(train_set, batch_config, batch_size, buckets, order=[0], graphs=train_graphs)[0]
        params = model.init(jax.random.PRNGKey(seed), init_batch.graph)
    opt_state = optimizer.init(params)
    history: list[dict] = []
    best = {"loss": float("inf"), "epoch": -1, "params": params}
    bad_epochs = 0
    start_epoch = 0
    first_loss = None
    if resume is not None:
        ckpt = load_checkpoint(resume)
        if ckpt.get("config") != _config_fingerprint(cfg):
            raise ValueError(f"{resume}: checkpoint was written with a different training config")
        if ckpt.get("dataset_sha256") != data_sha256:
            raise ValueError(
                f"{resume}: checkpoint was written for another dataset (content sha256 {ckpt.get('dataset_sha256')}, "
                f"this dataset {data_sha256}); resume only the run it belongs to"
            )
        params = serialization.from_state_dict(params, ckpt["params"])
        opt_state = serialization.from_state_dict(opt_state, ckpt["opt_state"])
        best = {"loss": float(ckpt["best_loss"]), "epoch": int(ckpt["best_epoch"]), "params": serialization.from_state_dict(params, ckpt["best_params"])}
        history = json.loads(ckpt["history"])
        bad_epochs = int(ckpt["bad_epochs"])
        start_epoch = int(ckpt["epoch"])
        first_loss = float(ckpt["first_loss"]) if ckpt["first_loss"] is not None else None
    params = steps.place(params, False)
    opt_state = steps.place(opt_state, False)

    patience = int(cfg["early_stopping"]["patience"])
    min_delta = float(cfg["early_stopping"]["min_delta"])
    out_path = None if out_dir is None else os.fspath(out_dir)
    if out_path:
        os.makedirs(out_path, exist_ok=True)
    stopped_early = False
    end_epoch = epochs if stop_after_epochs is None else min(epochs, start_epoch + int(stop_after_epochs))
    bar = tqdm(range(start_epoch, end_epoch), disable=not cfg["progress"], desc="training", unit="epoch")
    for epoch in bar:
        t0 = time.perf_counter()
        # The order depends only on (seed, epoch): resuming reproduces it exactly.
        order = np.random.default_rng([seed, epoch]).permutation(len(train_set))
        groups = _group(make_batches(train_set, batch_config, batch_size, buckets, order=order, graphs=train_graphs), num_shards)
        step_losses, head_losses = [], {h: [] for h in weights}
        step = int(jax.device_get(_step_count(opt_state)))
        lr = float(schedule(step))
        for group in groups:
            g, t, m = _stack_group(group)
            params, opt_state, loss, per_head = steps.train_step(params, opt_state, steps.place(g, True), steps.place(t, True), steps.place(m, True))
            loss = float(loss)
            if not math.isfinite(loss):
                raise NaNLossError(f"epoch {epoch + 1}: training loss is {loss} (per head {({k: float(v) for k, v in per_head.items()})})")
            step_losses.append(loss)
            for h, v in per_head.items():
                head_losses[h].append(float(v))
        train_loss = float(np.mean(step_losses))
        if first_loss is None:
            first_loss = train_loss
        if train_loss > float(cfg["divergence_factor"]) * max(first_loss, 1e-12):
            raise DivergenceError(f"epoch {epoch + 1}: training loss {train_loss:.4g} > {cfg['divergence_factor']} x first-epoch loss {first_loss:.4g}")
        val_loss, val_heads = _dataset_loss(steps, params, val_groups) if val_groups else (train_loss, {})
        if not math.isfinite(val_loss):
            raise NaNLossError(f"epoch {epoch + 1}: validation loss is {val_loss}")
        improved = val_loss < best["loss"] - min_delta
        if improved:
            # np.array copies: the device buffers of `params` are donated to the next step.
            best = {"loss": val_loss, "epoch": epoch, "params": jax.tree_util.tree_map(np.array, params)}
            bad_epochs = 0
        else:
            bad_epochs += 1
        row = {
            "epoch": epoch + 1,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "learning_rate": lr,
            "time_s": time.perf_counter() - t0,
            **{f"train_{h}": float(np.mean(v)) for h, v in head_losses.items()},
            **{f"val_{h}": float(v) for h, v in val_heads.items()},
        }
        history.append(row)
        bar.set_postfix(train=f"{train_loss:.4g}", val=f"{val_loss:.4g}")
        if log is not None:
            log(f"epoch {epoch + 1}: train {train_loss:.5g} val {val_loss:.5g} lr {lr:.3g}")
        stop = patience > 0 and bad_epochs >= patience
        if out_path:
            with _termination_deferred():
                write_logs(out_path, history)
                save_checkpoint(
                    os.path.join(out_path, "checkpoint.msgpack"),
                    {
                        "config": _config_fingerprint(cfg),
                        "dataset_sha256": data_sha256,
                        "model_config": json.dumps(model_config, sort_keys=True),
                        "epoch": epoch + 1,
                        "params": jax.tree_util.tree_map(np.asarray, params),
                        "opt_state": serialization.to_state_dict(jax.tree_util.tree_map(np.asarray, opt_state)),
                        "best_params": best["params"],
                        "best_loss": best["loss"],
                        "best_epoch": best["epoch"],
                        "bad_epochs": bad_epochs,
                        "first_loss": first_loss,
                        "history": json.dumps(history),
                    },
                )
        if stop:
            stopped_early = True
            break
    bar.close()

    best_params = jax.tree_util.tree_map(np.asarray, best["params"])
    metrics = {}
    for key, subset in (("train", train_set), ("val", val_set), ("test", test_set)):
        if len(subset):
            metrics[key] = evaluate(model, best_params, subset, sub_batches(subset, split[key]), steps.predict)
    return TrainResult(
        model=model,
        params=best_params,
        model_config=model_config,
        history=history,
        metrics=metrics,
        split=split,
        stopped_early=stopped_early,
        best_epoch=best["epoch"] + 1,
    )


def _config_fingerprint(cfg: Mapping[str, Any]) -> str:
    """What a resumed run must share with the checkpoint (display options excluded)."""
    return json.dumps({k: v for k, v in cfg.items() if k != "progress"}, sort_keys=True, default=str)


def _step_count(opt_state) -> int:
    """The optimiser's step counter (``count`` of the schedule state)."""
    import jax

    counts = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0] if "count" in jax.tree_util.keystr(path)]
    return counts[-1] if counts else 0


def write_logs(out_dir: str, history: list[dict]) -> None:
    """``log.csv`` (one row per epoch) and ``log.json`` (the same rows), each replaced atomically."""
    if not history:
        return
    fields = list(dict.fromkeys(k for row in history for k in row))
    with _replaced_atomically(os.path.join(out_dir, "log.csv"), newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(history)
    with _replaced_atomically(os.path.join(out_dir, "log.json")) as handle:
        json.dump(history, handle, indent=1)


@contextlib.contextmanager
def _termination_deferred():
    """Hold back SIGTERM/SIGINT while an epoch's logs and checkpoint are written, so they always agree.

    A walltime watchdog or a scheduler stops training with SIGTERM; arriving between the log and the checkpoint it
    would leave a checkpoint whose history the retrieved ``log.csv`` lacks. During the block a Python handler only
    records the signal (Python runs handlers in the main thread whichever thread the kernel picked, which a signal
    mask cannot promise once XLA has started its threads); afterwards the previous handlers come back and a
    recorded signal is raised again, so it takes its normal effect. Outside the main thread nothing is deferred.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {}
    for signum in (signal.SIGTERM, signal.SIGINT):
        previous[signum] = signal.signal(signum, lambda number, frame: received.append(number))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(received):
            signal.raise_signal(signum)
