"""Types and ranges of the model config and the training config: one definition, checked at every boundary.

:func:`validate_model_config` runs where a model config enters (training, a model file being loaded or stored as
an ``eqml.model`` node); :func:`validate_training_config` where a training config does (``training_config``, so
also the ``eqml.train`` CalcJob's pre-submission check); :func:`check_training_data` once the data is known
(batch size bounded by the training set, every trained target labelled somewhere). A failure is a
:class:`ConfigError` (a ``ValueError``) that names the key and the value: ``num_layers: -2`` trained a model
without interactions before, a NaN learning rate trained NaNs, all-NaN targets trained at loss 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["ConfigError", "validate_model_config", "validate_training_config", "check_training_data"]

_MAX_Z = 118
_MAX_CUTOFF = 100.0  # Angstrom: beyond any equivariant-model cutoff; bounds the neighbour lists it implies


class ConfigError(ValueError):
    """A config value of the wrong type or outside its range; the message names the key and the value."""


def _fail(key: str, value, expected: str):
    raise ConfigError(f"{key}: expected {expected}, got {value!r}")


def _int(key: str, value, minimum: int = 0, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        _fail(key, value, "an integer")
    if value < minimum or (maximum is not None and value > maximum):
        _fail(key, value, f"an integer in [{minimum}, {maximum if maximum is not None else 'inf'}]")


def _number(key: str, value, *, low: float, high: float = math.inf, low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        _fail(key, value, "a number")
    value = float(value)
    if not math.isfinite(value) or value < low or (low_open and value == low) or value > high:
        _fail(key, value, f"a finite number in {'(' if low_open else '['}{low}, {high}]")


def _irreps(key: str, value, allow_empty: bool = False) -> None:
    import e3nn_jax as e3nn

    try:
        dim = e3nn.Irreps(value).dim
    except Exception:  # noqa: BLE001 - e3nn raises several types for a bad string
        _fail(key, value, "an irreps string such as '8x0e + 4x1o'")
    if dim == 0 and not allow_empty:
        _fail(key, value, "non-empty irreps")


def _species(key: str, value) -> None:
    from ase.data import chemical_symbols

    if not isinstance(value, (list, tuple)) or not value:
        _fail(key, value, "a non-empty list of chemical symbols")
    for item in value:
        ok = (
            item in chemical_symbols[1 : _MAX_Z + 1]
            if isinstance(item, str)
            else (isinstance(item, (int, np.integer)) and not isinstance(item, bool) and 1 <= item <= _MAX_Z)
        )
        if not ok:
            _fail(f"{key} entry", item, "a chemical symbol (or atomic number 1..118)")
    if len(set(value)) != len(value):
        _fail(key, value, "distinct species")


_MODEL_CHECKS = {
    "species": _species,
    "cutoff": lambda k, v: _number(k, v, low=0.0, high=_MAX_CUTOFF, low_open=True),
    "architecture": lambda k, v: _architecture(k, v),
    "num_layers": lambda k, v: _int(k, v, 1, 64),
    "hidden_irreps": _irreps,
    "sh_lmax": lambda k, v: _int(k, v, 0, 8),
    "num_radial_basis": lambda k, v: _int(k, v, 1, 256),
    "envelope_p": lambda k, v: _int(k, v, 1, 64),
    "radial_hidden": lambda k, v: (
        (isinstance(v, (list, tuple)) and [_int(f"{k} entry", x, 1, 4096) for x in v])
        or _fail(k, v, "a list of layer widths")
    ),
    "avg_num_neighbors": lambda k, v: _number(k, v, low=0.0, low_open=True),
    "correlation": lambda k, v: _int(k, v, 1, 8),
    "mace_channels": lambda k, v: _int(k, v, 1, 4096),
    "mace_lmax": lambda k, v: _int(k, v, 0, 8),
    "readout_product_mul": lambda k, v: _int(k, v, 1, 4096),
    "node_attrs": lambda k, v: _irreps_dict(k, v),
    "edge_attrs": lambda k, v: _irreps_dict(k, v),
    "heads": lambda k, v: isinstance(v, dict) or _fail(k, v, "an object {name: head spec}"),
    "energy_head": lambda k, v: isinstance(v, str) or _fail(k, v, "a head name"),
    "field": lambda k, v: isinstance(v, bool) or _fail(k, v, "true or false"),
    "magnetic": lambda k, v: isinstance(v, bool) or _fail(k, v, "true or false"),
    "normalization": lambda k, v: isinstance(v, dict) or _fail(k, v, "an object {head: {scale, species_shift}}"),
    "dtype": lambda k, v: v in ("float32", "float64") or _fail(k, v, "'float32' or 'float64'"),
}


def _architecture(key: str, value) -> None:
    from .architectures import ARCHITECTURES  # the registry imports this module's checks: import it late

    if not isinstance(value, str) or value not in ARCHITECTURES:
        _fail(key, value, "one of " + ", ".join(repr(name) for name in sorted(ARCHITECTURES)))


def _irreps_dict(key: str, value) -> None:
    if not isinstance(value, dict):
        _fail(key, value, "an object {name: irreps}")
    for name, irreps in value.items():
        _irreps(f"{key}.{name}", irreps)


def validate_model_config(config: Mapping[str, Any], where: str = "model") -> None:
    """Types and ranges of the keys present in a model config.

    Defaults and unknown keys: ``models.normalize_config``; an architecture's own keys: its registry entry."""
    if not isinstance(config, Mapping):
        _fail(where, config, "an object")
    for key, check in _MODEL_CHECKS.items():
        if key in config:
            check(f"{where}.{key}", config[key])
    from .architectures import ARCHITECTURES

    own = ARCHITECTURES[config["architecture"]].checks if config.get("architecture") in ARCHITECTURES else {}
    for key, check in own.items():  # an architecture's own keys (unknown keys are refused by normalize_config)
        if key in config:
            check(f"{where}.{key}", config[key])
    for name, head in (config.get("heads") or {}).items():
        if not isinstance(head, dict):
            _fail(f"{where}.heads.{name}", head, "an object (level, irreps or tensor, route...)")


def _optimizer(opt: Mapping[str, Any]) -> None:
    _number(
        "optimizer.learning_rate", opt["learning_rate"], low=0.0, low_open=True
    )  # large rates may diverge: the loop stops them
    _number("optimizer.weight_decay", opt["weight_decay"], low=0.0)
    _int("optimizer.warmup_epochs", opt["warmup_epochs"], 0)
    if opt["schedule"] == "exponential":
        _number("optimizer.decay_rate", opt["decay_rate"], low=0.0, high=1.0, low_open=True)
    else:  # cosine: the final learning-rate fraction
        _number("optimizer.decay_rate", opt["decay_rate"], low=0.0, high=1.0)
    if opt["clip_norm"] is not None:
        _number("optimizer.clip_norm", opt["clip_norm"], low=0.0, low_open=True)


def _split(split) -> None:
    if not isinstance(split, Mapping):
        _fail("split", split, "an object of fractions or of index lists")
    if "train" in split:
        for name in ("train", "val", "test"):
            indices = split.get(name, [])
            if not isinstance(indices, (list, tuple)):
                _fail(f"split.{name}", indices, "a list of sample indices")
            for index in indices:
                _int(f"split.{name} entry", index, 0)
        return
    for name in ("val_fraction", "test_fraction"):
        if name in split:
            _number(f"split.{name}", split[name], low=0.0, high=1.0)


def validate_training_config(cfg: Mapping[str, Any]) -> None:
    """Types and ranges of a complete training config (defaults filled in by ``training.training_config``)."""
    _int("seed", cfg["seed"], 0)
    _int("epochs", cfg["epochs"], 1)
    _int("batch_size", cfg["batch_size"], 1)
    if cfg["num_shards"] is not None:
        _int("num_shards", cfg["num_shards"], 1)
    if cfg["devices"] not in ("all", None):
        _int("devices", cfg["devices"], 1)
    _split(cfg["split"])
    _optimizer(cfg["optimizer"])
    _int("early_stopping.patience", cfg["early_stopping"]["patience"], 0)
    _number("early_stopping.min_delta", cfg["early_stopping"]["min_delta"], low=0.0)
    _number("divergence_factor", cfg["divergence_factor"], low=1.0, low_open=True)
    if cfg["normalization"] not in ("auto", "off"):
        _fail("normalization", cfg["normalization"], "'auto' or 'off'")
    if not isinstance(cfg["progress"], bool):
        _fail("progress", cfg["progress"], "true or false")
    targets = cfg["targets"]
    if targets is not None:
        if not isinstance(targets, Mapping) or not targets:
            _fail("targets", targets, "null or a non-empty object {name: {weight}}")
        for name, entry in targets.items():
            if not isinstance(entry, Mapping):
                _fail(f"targets.{name}", entry, "an object {weight}")
            _number(f"targets.{name}.weight", entry.get("weight", 1.0), low=0.0)
        if not any(float(entry.get("weight", 1.0)) > 0 for entry in targets.values()):
            _fail("targets", targets, "at least one positive weight")
    validate_model_config(cfg["model"], "model")


def _labelled(sample, name: str, level: str) -> bool:
    value = {"node": sample.node_targets, "graph": sample.graph_targets}.get(level, {}).get(name)
    if level == "edge":
        edge = sample.edge_targets.get(name)
        value = None if edge is None else edge.values
    return value is not None and bool(np.any(np.isfinite(value)))


def check_training_data(train_set, heads: Mapping[str, str], batch_size: int) -> None:
    """The training split can train these heads (``{name: level}``) with this batch size."""
    if batch_size > len(train_set):
        _fail("batch_size", batch_size, f"at most the {len(train_set)} samples of the training split")
    for name, level in heads.items():
        if not any(_labelled(s, name, level) for s in train_set.samples):
            raise ConfigError(
                f"target {name!r}: no labelled entry in the {len(train_set)} training samples (all NaN or absent); "
                "training it would run at loss 0 and learn nothing"
            )
