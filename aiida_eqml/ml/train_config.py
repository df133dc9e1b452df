"""The training config: defaults, validation, the data split, and what a resumed run must share with its checkpoint.

A training config is plain JSON (it travels to a cluster as ``config.json``, :mod:`aiida_eqml.ml.rundir`): every key
has a default in :data:`DEFAULT_TRAINING_CONFIG`, unknown keys are refused (a typo must not silently change a run),
types and ranges are checked by :mod:`aiida_eqml.ml.config_schema`.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from aiida_eqml.ml.config_schema import validate_training_config

__all__ = ["DEFAULT_TRAINING_CONFIG", "training_config", "split_indices", "config_fingerprint"]

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
    # Hubbard records only (aiida_eqml.ml.hubbard.training): "residual": learn U - U_scf and V - V_scf;
    # "v_sum_images": V of a couple is the V head summed over its periodic images (what hp.x at q = Gamma gives);
    # "u_sum_images": U of a site adds an edge head summed over its edges to its own periodic images;
    # "spin_order": the site descriptor ends with the local magnetic order (aiida_eqml.ml.hubbard.spin_order);
    # "scf_inputs": the descriptors carry the U / V the scf ran with (False: those slots are zero)
    "hubbard": {"residual": False, "v_sum_images": False, "u_sum_images": False, "spin_order": False,
                "scf_inputs": True},
}


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
    for section in ("optimizer", "early_stopping", "hubbard"):
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
    for key in DEFAULT_TRAINING_CONFIG["hubbard"]:
        if not isinstance(full["hubbard"][key], bool):
            raise ValueError(f"hubbard.{key} must be true or false, got {full['hubbard'][key]!r}")
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
        raise ValueError(
            f"split fractions must be in [0, 1) with sum < 1, got val {val_fraction}, test {test_fraction}"
        )
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


def config_fingerprint(cfg: Mapping[str, Any]) -> str:
    """What a resumed run must share with the checkpoint (display options excluded; ``hubbard`` too: the Hubbard
    preparer consumes it before the trainer sees the config, and checkpoints written before the key existed resume)."""
    return json.dumps({k: v for k, v in cfg.items() if k not in ("progress", "hubbard")}, sort_keys=True, default=str)
