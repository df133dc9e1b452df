"""Checkpoints and logs of a run, written so that an interrupted run leaves a consistent directory.

Every file is replaced atomically (a reader, or a run stopped mid-write, sees the old file or the new one); the
checkpoint (flax msgpack: arrays, numbers, strings, no pickle) and the logs of an epoch are written with SIGTERM /
SIGINT held back, so they always agree. File names: :mod:`aiida_eqml.ml.rundir`.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
from collections.abc import Mapping
from typing import Any

from aiida_eqml.ml import rundir

__all__ = ["save_checkpoint", "load_checkpoint", "write_logs", "termination_deferred", "replaced_atomically"]


@contextlib.contextmanager
def replaced_atomically(path: str | os.PathLike, mode: str = "w", **kwargs):
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
    with replaced_atomically(path, "wb") as handle:
        handle.write(data)


def load_checkpoint(path: str | os.PathLike) -> dict:
    from flax import serialization

    with open(path, "rb") as handle:
        data = handle.read()
    try:
        return serialization.msgpack_restore(data)
    except Exception as exc:
        raise ValueError(f"{os.fspath(path)}: corrupt or truncated checkpoint ({type(exc).__name__}: {exc})") from exc


def write_logs(out_dir: str, history: list[dict]) -> None:
    """``log.csv`` (one row per epoch) and ``log.json`` (the same rows), each replaced atomically."""
    if not history:
        return
    fields = list(dict.fromkeys(k for row in history for k in row))
    with replaced_atomically(os.path.join(out_dir, rundir.LOG_CSV), newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(history)
    with replaced_atomically(os.path.join(out_dir, rundir.LOG_JSON)) as handle:
        json.dump(history, handle, indent=1)


@contextlib.contextmanager
def termination_deferred():
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
