"""The training run directory: every file name, status and exit code that the trainer, ``train_cli``, the
``eqml.train`` CalcJob, its parser and ``aiida-eqml train`` share. One definition each, so the two sides of the
contract (the process that writes the directory and the AiiDA code that stages and reads it) cannot drift.

Written by the training (:mod:`aiida_eqml.ml.train_cli`, :func:`aiida_eqml.ml.training.train`):

============================ ==========================================================
``model.eqml``               the trained model (:mod:`aiida_eqml.ml.modelfile`), best epoch
``metrics.json``             ``status``, metrics per split/target/species, split, timings
``log.csv`` / ``log.json``   one row per epoch
``checkpoint.msgpack``       last epoch's state, for ``--resume``
============================ ==========================================================

Staged by the CalcJob: ``dataset.npz``, ``config.json`` and, optionally, ``parent.eqml`` and ``resume.msgpack``;
its job script adds ``train_exit_status`` (the training's exit status, which the scheduler does not keep) and the
walltime watchdog ``walltime_reached``; stderr goes to ``train.err``.

``metrics.json`` always carries a ``status`` from :data:`EXIT_CODES`; the process exits with the matching code.
Pure Python: no jax, no aiida.
"""

from __future__ import annotations

import json
import os
from typing import Any

__all__ = [
    "MODEL",
    "METRICS",
    "LOG_CSV",
    "LOG_JSON",
    "CHECKPOINT",
    "OUTPUT_FILES",
    "DATASET",
    "CONFIG",
    "PARENT_MODEL",
    "RESUME",
    "STDERR",
    "EXIT_STATUS_FILE",
    "WALLTIME_MARKER",
    "TRAIN_MODULE",
    "EXIT_CODES",
    "write_json",
    "read_metrics",
]

# Written by the training process.
MODEL = "model.eqml"
METRICS = "metrics.json"
LOG_CSV = "log.csv"
LOG_JSON = "log.json"
CHECKPOINT = "checkpoint.msgpack"
OUTPUT_FILES = (MODEL, METRICS, LOG_CSV, LOG_JSON, CHECKPOINT)

# Staged by the CalcJob (inputs) and written by its job script.
DATASET = "dataset.npz"
CONFIG = "config.json"
PARENT_MODEL = "parent.eqml"
RESUME = "resume.msgpack"
STDERR = "train.err"
EXIT_STATUS_FILE = "train_exit_status"
WALLTIME_MARKER = "walltime_reached"  # the watchdog's mark, left just before it stops the training
TRAIN_MODULE = "aiida_eqml.ml.train_cli"  # what the job script runs (and the watchdog signals)

#: ``metrics.json`` status -> exit code of the training process.
EXIT_CODES = {"completed": 0, "error": 1, "invalid_input": 2, "nan_loss": 3, "diverged": 4}


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write JSON next to ``path`` and move it into place: a reader sees the old file or the new one."""
    path = os.fspath(path)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as handle:
        json.dump(data, handle, indent=1, sort_keys=True, default=str)
    os.replace(tmp, path)


def read_metrics(directory: str | os.PathLike) -> dict:
    """``metrics.json`` of a run directory."""
    with open(os.path.join(os.fspath(directory), METRICS)) as handle:
        return json.load(handle)
