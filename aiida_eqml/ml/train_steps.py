"""One optimisation step and one evaluation pass: optimiser and schedule, masked loss, sharded jitted steps, metrics.

Data parallelism with ``jax.sharding``: each step takes ``num_shards`` padded batches stacked on a leading axis that
is sharded over a ``Mesh`` of devices while the parameters are replicated. The loss is a ratio of sums over all
shards, so the same step on one device (``num_shards`` batches on one device) gives the same loss and update.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from aiida_eqml.ml.dataset import Batch, Dataset
from aiida_eqml.ml.metrics import MetricAccumulator

__all__ = [
    "make_schedule",
    "make_optimizer",
    "loss_sums",
    "TrainSteps",
    "group_batches",
    "stack_group",
    "dataset_loss",
    "evaluate",
    "select_devices",
    "step_count",
]


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
    return Batch(
        graph=batch.graph,
        targets=batch.targets,
        masks={k: np.zeros_like(v) for k, v in batch.masks.items()},
        sample_indices=np.full_like(batch.sample_indices, -1),
    )


class TrainSteps:
    """Jitted train / loss functions over batches stacked on a leading shard axis."""

    def __init__(self, model, optimizer, weights, scales, devices):
        import jax
        import optax
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
            params = optax.apply_updates(params, updates)
            return params, opt_state, loss, per_head

        self.train_step = jax.jit(train_step, donate_argnums=(0, 1))
        self.eval_sums = jax.jit(lambda p, g, t, m: stacked_loss(p, g, t, m)[1][1])
        self.predict = jax.jit(lambda p, g: model.apply(p, g, heads=heads))

    def place(self, tree, sharded: bool):
        import jax

        return jax.device_put(tree, self.batch_sharding if sharded else self.replicated)


def group_batches(batches: list[Batch], num_shards: int) -> list[list[Batch]]:
    groups = [batches[i : i + num_shards] for i in range(0, len(batches), num_shards)]
    if groups and len(groups[-1]) < num_shards:
        groups[-1] = groups[-1] + [_empty_like_batch(groups[-1][0])] * (num_shards - len(groups[-1]))
    return groups


def stack_group(group: list[Batch]):
    return _stack([b.graph for b in group]), _stack([b.targets for b in group]), _stack([b.masks for b in group])


def dataset_loss(steps: TrainSteps, params, groups) -> tuple[float, dict]:
    if not groups:
        return float("nan"), {}
    totals: dict[str, list[float]] = {}
    for group in groups:
        g, t, m = stack_group(group)
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


def select_devices(spec) -> list:
    import jax

    available = jax.devices()
    if spec in ("all", None):
        return available
    n = int(spec)
    if n < 1 or n > len(available):
        raise ValueError(f"devices={n} requested but {len(available)} available ({available})")
    return available[:n]


def step_count(opt_state) -> int:
    """The optimiser's step counter: the last ``count`` in the state, the schedule's (Adam keeps its own too)."""
    import optax

    counts = optax.tree_utils.tree_get_all_with_path(opt_state, "count")
    return counts[-1][1] if counts else 0
