"""Training: optax optimisation of an equivariant model on a :class:`~aiida_eqml.ml.dataset.Dataset`.

:func:`train` does the whole job from a plain JSON-able training config; its parts live in one module each:

==========================================  ===========================================================================
:mod:`aiida_eqml.ml.train_config`           defaults, validation, seeded train/validation/test split
:mod:`aiida_eqml.ml.normalization`          model config completed from the data (species, ``avg_num_neighbors``),
                                            per-head scale and species shift from the training split only
:mod:`aiida_eqml.ml.train_steps`            optax adam/adamw, warmup + cosine / exponential / constant schedules,
                                            clipping; masked multi-target loss; jitted steps sharded over devices;
                                            Cartesian-unit metrics (:func:`evaluate`)
:mod:`aiida_eqml.ml.checkpoints`            atomic msgpack checkpoints and CSV / JSON logs, SIGTERM held back
this module                                 the epoch loop: early stopping on the validation loss (the best
                                            parameters are kept), exact resume, NaN / divergence errors
==========================================  ===========================================================================

Exact resume: the shuffling order depends only on ``(seed, epoch)`` and the schedule on the step count stored in the
optimiser state, so a resumed run reproduces the uninterrupted one. Datasets of a domain (Hubbard records) reach
this generic trainer already prepared (:mod:`aiida_eqml.ml.preparation`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from aiida_eqml.ml import rundir
from aiida_eqml.ml.checkpoints import load_checkpoint, save_checkpoint, termination_deferred, write_logs
from aiida_eqml.ml.config_schema import check_training_data
from aiida_eqml.ml.dataset import Dataset, build_graphs, make_batches
from aiida_eqml.ml.dataset_file import dataset_digest
from aiida_eqml.ml.normalization import complete_model_config, compute_normalization
from aiida_eqml.ml.train_config import DEFAULT_TRAINING_CONFIG, config_fingerprint, split_indices, training_config
from aiida_eqml.ml.train_steps import (
    TrainSteps,
    dataset_loss,
    evaluate,
    group_batches,
    loss_sums,
    make_optimizer,
    make_schedule,
    select_devices,
    stack_group,
    step_count,
)

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

# The names these functions had when they lived here (tests and scripts import them from this module).
_termination_deferred = termination_deferred
_config_fingerprint = config_fingerprint


class TrainingError(RuntimeError):
    """Base class of training failures with a distinct exit code in the CLI."""

    exit_code = rundir.EXIT_CODES["error"]


class NaNLossError(TrainingError):
    """The loss became NaN or infinite."""

    exit_code = rundir.EXIT_CODES["nan_loss"]


class DivergenceError(TrainingError):
    """The loss exploded (far above its first-epoch value)."""

    exit_code = rundir.EXIT_CODES["diverged"]


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


@dataclasses.dataclass
class _Setup:
    """Everything the epoch loop needs, decided before the first step."""

    model: Any
    model_config: dict
    graphs: list
    split: dict[str, list[int]]
    subsets: dict[str, Dataset]
    weights: dict[str, float]
    scales: dict[str, float]
    batch_config: dict


@dataclasses.dataclass
class _State:
    """What a checkpoint restores: parameters, optimiser state, best epoch, history, early-stopping counters."""

    params: Any
    opt_state: Any
    best: dict
    history: list
    bad_epochs: int = 0
    start_epoch: int = 0
    first_loss: float | None = None


def _setup(dataset: Dataset, cfg: Mapping[str, Any], parent: tuple[dict, Any] | None) -> _Setup:
    """Split, graphs (once per run: neighbour lists depend only on species and cutoff), completed model, weights."""
    from aiida_eqml.ml.models import DEFAULT_CONFIG as DEFAULT_MODEL_CONFIG
    from aiida_eqml.ml.models import build_model

    split = split_indices(len(dataset), cfg["split"], int(cfg["seed"]))
    subsets = {k: dataset.subset(split[k]) for k in ("train", "val", "test")}
    if parent is not None:
        model_config = copy.deepcopy(parent[0])
        model_config.update({k: v for k, v in cfg["model"].items() if k == "heads"})
    else:
        model_config = copy.deepcopy(cfg["model"])
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
        model_config["normalization"] = compute_normalization(
            subsets["train"], model_config, [graphs[i] for i in split["train"]]
        )
    model = build_model(model_config)
    model_config = model.config  # defaults filled in: exactly what the model file stores

    heads_with_labels = [h for h in model.heads if h in dataset.target_specs]
    if cfg["targets"] is None:
        weights = {h: 1.0 for h in heads_with_labels}
    else:
        unknown = set(cfg["targets"]) - set(heads_with_labels)
        if unknown:
            raise ValueError(
                f"targets {sorted(unknown)} are not both model heads and dataset labels ({heads_with_labels})"
            )
        weights = {h: float(v.get("weight", 1.0)) for h, v in cfg["targets"].items()}
    if not weights:
        raise ValueError(
            f"nothing to train: model heads {list(model.heads)} vs dataset targets {list(dataset.target_specs)}"
        )
    scales = {}
    for h in weights:
        norm = model_config["normalization"].get(h) or model_config["normalization"].get(
            model_config["energy_head"], {}
        )
        scales[h] = float(norm.get("scale", 1.0))
    batch_config = {**model_config, "heads": {h: model_config["heads"][h] for h in weights}}
    return _Setup(model, model_config, graphs, split, subsets, weights, scales, batch_config)


def _resume(path, state: _State, cfg: Mapping[str, Any], data_sha256: str) -> _State:
    """The state stored in the checkpoint ``path`` (refused if it belongs to another config or dataset)."""
    from flax import serialization

    ckpt = load_checkpoint(path)
    if ckpt.get("config") != config_fingerprint(cfg):
        raise ValueError(f"{path}: checkpoint was written with a different training config")
    if ckpt.get("dataset_sha256") != data_sha256:
        raise ValueError(
            f"{path}: checkpoint was written for another dataset (content sha256 {ckpt.get('dataset_sha256')}, "
            f"this dataset {data_sha256}); resume only the run it belongs to"
        )
    params = serialization.from_state_dict(state.params, ckpt["params"])
    return _State(
        params=params,
        opt_state=serialization.from_state_dict(state.opt_state, ckpt["opt_state"]),
        best={
            "loss": float(ckpt["best_loss"]),
            "epoch": int(ckpt["best_epoch"]),
            "params": serialization.from_state_dict(params, ckpt["best_params"]),
        },
        history=json.loads(ckpt["history"]),
        bad_epochs=int(ckpt["bad_epochs"]),
        start_epoch=int(ckpt["epoch"]),
        first_loss=float(ckpt["first_loss"]) if ckpt["first_loss"] is not None else None,
    )


def _checkpoint(state: _State, epoch: int, cfg, data_sha256: str, model_config: dict) -> dict:
    """The checkpoint of ``state`` after ``epoch`` (0-based) epochs: numpy arrays, numbers, strings."""
    import jax
    from flax import serialization

    return {
        "config": config_fingerprint(cfg),
        "dataset_sha256": data_sha256,
        "model_config": json.dumps(model_config, sort_keys=True),
        "epoch": epoch + 1,
        "params": jax.tree_util.tree_map(np.asarray, state.params),
        "opt_state": serialization.to_state_dict(jax.tree_util.tree_map(np.asarray, state.opt_state)),
        "best_params": state.best["params"],
        "best_loss": state.best["loss"],
        "best_epoch": state.best["epoch"],
        "bad_epochs": state.bad_epochs,
        "first_loss": state.first_loss,
        "history": json.dumps(state.history),
    }


def _train_epoch(steps: TrainSteps, state: _State, groups, epoch: int) -> tuple[float, dict]:
    """One pass over the shuffled training groups; updates ``state`` in place; ``(mean loss, {head: losses})``."""
    step_losses, head_losses = [], {h: [] for h in steps.weights}
    for group in groups:
        g, t, m = stack_group(group)
        state.params, state.opt_state, loss, per_head = steps.train_step(
            state.params, state.opt_state, steps.place(g, True), steps.place(t, True), steps.place(m, True)
        )
        loss = float(loss)
        if not math.isfinite(loss):
            per_head = {k: float(v) for k, v in per_head.items()}
            raise NaNLossError(f"epoch {epoch + 1}: training loss is {loss} (per head {per_head})")
        step_losses.append(loss)
        for h, v in per_head.items():
            head_losses[h].append(float(v))
    return float(np.mean(step_losses)), head_losses


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
    from tqdm.auto import tqdm

    from aiida_eqml.ml.graph import PaddingBuckets

    cfg = training_config(config)
    seed = int(cfg["seed"])
    s = _setup(dataset, cfg, parent)
    model, split, weights = s.model, s.split, s.weights
    train_set, val_set = s.subsets["train"], s.subsets["val"]

    devices = select_devices(cfg["devices"])
    num_shards = int(cfg["num_shards"] or len(devices))
    if num_shards % len(devices):
        raise ValueError(f"num_shards={num_shards} must be a multiple of the {len(devices)} devices")
    batch_size = int(cfg["batch_size"])
    check_training_data(train_set, {h: model.heads[h].level for h, w in weights.items() if w > 0}, batch_size)
    data_sha256 = dataset_digest(dataset)  # in the checkpoint: resuming on other data is refused
    steps_per_epoch = math.ceil(math.ceil(len(train_set) / batch_size) / num_shards)
    epochs = int(cfg["epochs"])
    optimizer, schedule = make_optimizer(cfg["optimizer"], epochs * steps_per_epoch, steps_per_epoch)

    # One padded shape for every batch: a single compilation, and shards stack.
    buckets = PaddingBuckets.fixed(s.graphs, batch_size)
    train_graphs = [s.graphs[i] for i in split["train"]]

    def batches(subset, indices, order=None):
        return make_batches(
            subset, s.batch_config, batch_size, buckets, order=order, graphs=[s.graphs[i] for i in indices]
        )

    val_groups = group_batches(batches(val_set, split["val"]) if len(val_set) else [], num_shards)

    steps = TrainSteps(model, optimizer, weights, s.scales, devices)
    if parent is not None:
        params = jax.tree_util.tree_map(np.array, parent[1])
    else:
        init_batch = make_batches(train_set, s.batch_config, batch_size, buckets, order=[0], graphs=train_graphs)[0]
        params = model.init(jax.random.PRNGKey(seed), init_batch.graph)
    state = _State(params, optimizer.init(params), {"loss": float("inf"), "epoch": -1, "params": params}, [])
    if resume is not None:
        state = _resume(resume, state, cfg, data_sha256)
    state.params = steps.place(state.params, False)
    state.opt_state = steps.place(state.opt_state, False)

    patience = int(cfg["early_stopping"]["patience"])
    min_delta = float(cfg["early_stopping"]["min_delta"])
    out_path = None if out_dir is None else os.fspath(out_dir)
    if out_path:
        os.makedirs(out_path, exist_ok=True)
    stopped_early = False
    end_epoch = epochs if stop_after_epochs is None else min(epochs, state.start_epoch + int(stop_after_epochs))
    bar = tqdm(range(state.start_epoch, end_epoch), disable=not cfg["progress"], desc="training", unit="epoch")
    for epoch in bar:
        t0 = time.perf_counter()
        # The order depends only on (seed, epoch): resuming reproduces it exactly.
        order = np.random.default_rng([seed, epoch]).permutation(len(train_set))
        groups = group_batches(
            make_batches(train_set, s.batch_config, batch_size, buckets, order=order, graphs=train_graphs), num_shards
        )
        lr = float(schedule(int(jax.device_get(step_count(state.opt_state)))))
        train_loss, head_losses = _train_epoch(steps, state, groups, epoch)
        if state.first_loss is None:
            state.first_loss = train_loss
        if train_loss > float(cfg["divergence_factor"]) * max(state.first_loss, 1e-12):
            raise DivergenceError(
                f"epoch {epoch + 1}: training loss {train_loss:.4g} > {cfg['divergence_factor']} x first-epoch loss "
                f"{state.first_loss:.4g}"
            )
        val_loss, val_heads = dataset_loss(steps, state.params, val_groups) if val_groups else (train_loss, {})
        if not math.isfinite(val_loss):
            raise NaNLossError(f"epoch {epoch + 1}: validation loss is {val_loss}")
        if val_loss < state.best["loss"] - min_delta:
            # np.array copies: the device buffers of `params` are donated to the next step.
            state.best = {"loss": val_loss, "epoch": epoch, "params": jax.tree_util.tree_map(np.array, state.params)}
            state.bad_epochs = 0
        else:
            state.bad_epochs += 1
        state.history.append(
            {
                "epoch": epoch + 1,
                "train_loss": train_loss,
                "val_loss": val_loss,
                "learning_rate": lr,
                "time_s": time.perf_counter() - t0,
                **{f"train_{h}": float(np.mean(v)) for h, v in head_losses.items()},
                **{f"val_{h}": float(v) for h, v in val_heads.items()},
            }
        )
        bar.set_postfix(train=f"{train_loss:.4g}", val=f"{val_loss:.4g}")
        if log is not None:
            log(f"epoch {epoch + 1}: train {train_loss:.5g} val {val_loss:.5g} lr {lr:.3g}")
        if out_path:
            with termination_deferred():
                write_logs(out_path, state.history)
                checkpoint = _checkpoint(state, epoch, cfg, data_sha256, s.model_config)
                save_checkpoint(os.path.join(out_path, rundir.CHECKPOINT), checkpoint)
        if patience > 0 and state.bad_epochs >= patience:
            stopped_early = True
            break
    bar.close()

    best_params = jax.tree_util.tree_map(np.asarray, state.best["params"])
    metrics = {}
    for key, subset in s.subsets.items():
        if len(subset):
            metrics[key] = evaluate(model, best_params, subset, batches(subset, split[key]), steps.predict)
    return TrainResult(
        model=model,
        params=best_params,
        model_config=s.model_config,
        history=state.history,
        metrics=metrics,
        split=split,
        stopped_early=stopped_early,
        best_epoch=state.best["epoch"] + 1,
    )
