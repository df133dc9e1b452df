"""One prediction path for every user: ``ase.Atoms`` (+ attributes) -> Cartesian tensors, for one model or an ensemble.

>>> predictor = load_predictor("run/model.eqml")          # a file, [files], an ensemble dir or a dir of .eqml files
>>> out = predictor.predict(atoms)                          # {"born_charges": [n, 3, 3], "dielectric": [3, 3], ...}
>>> out = load_predictor(["a.eqml", "b.eqml"]).predict(atoms)   # + "<head>_std" (population std over the members)

The :class:`Predictor` (:mod:`aiida_eqml.ml.predictor`) owns the boundary work that every caller (ASE calculator,
``aiida-eqml predict``, the AiiDA calcfunctions, the Hubbard models and ensembles) used to repeat: graphs from
``ase.Atoms`` with attribute checks that raise :class:`PredictionError` naming the field, one jitted apply per padding
bucket and model config shared by the whole process, the irreps -> Cartesian conversion of tensor heads
(:func:`to_cartesian`) and the ensemble mean and standard deviation (:func:`ensemble_statistics`). This module loads
predictors from model files and keeps them for the process; every name of the prediction path is importable from
here.

Output layout per structure (the ``ArrayData`` layout of ``predict_tensors``): node heads ``[n, ...]``, graph heads
``[...]``, edge heads ``[E, ...]`` with ``<head>_keys [E, 5]`` = (i, j, S1, S2, S3); Cartesian ``[..., 3, ..., 3]``
for tensor heads, ``[..., irreps.dim]`` otherwise.

:func:`cached_predictor` keeps loaded predictors per model hash for the life of the process, so a daemon worker
that predicts in every iteration of a loop loads and compiles a model once.

Across processes, a Predictor turns on JAX's persistent compilation cache (:func:`enable_compilation_cache`, in
:mod:`aiida_eqml.ml.xla_cache`, which says where the cache lives and how to turn it off): a new process then loads
the compiled executables instead of compiling again (``docs/benchmarks.md``, Predictor latency).
"""

from __future__ import annotations

import collections
import json
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

from aiida_eqml.ml.predictor import PredictionError, Predictor, ensemble_statistics, to_cartesian
from aiida_eqml.ml.xla_cache import CACHE_ENV, default_compilation_cache_dir, enable_compilation_cache

__all__ = [
    "PredictionError",
    "Predictor",
    "load_predictor",
    "cached_predictor",
    "clear_predictor_cache",
    "warm_up_in_background",
    "is_cached",
    "ensemble_statistics",
    "to_cartesian",
    "enable_compilation_cache",
    "default_compilation_cache_dir",
    "CACHE_ENV",
    "CACHE_SIZE",
]


# ====================================================================== loading and the process cache
def _model_files(source) -> tuple[list[str], list[str] | None]:
    """Model files of ``source`` and, for an ensemble directory, the sha256 its manifest records."""
    if isinstance(source, (list, tuple)):
        return [os.fspath(p) for p in source], None
    from aiida_eqml.ml.ensemble import ENSEMBLE_MANIFEST

    source = os.fspath(source)
    if os.path.isdir(source):
        manifest = os.path.join(source, ENSEMBLE_MANIFEST)
        if os.path.exists(manifest):
            with open(manifest) as handle:
                entries = json.load(handle).get("members") or []
            return [os.path.join(source, e["file"]) for e in entries], [e["sha256"] for e in entries]
        files = sorted(os.path.join(source, f) for f in os.listdir(source) if f.endswith(".eqml"))
        if not files:
            raise FileNotFoundError(f"{source}: no {ENSEMBLE_MANIFEST} and no .eqml model file in this directory")
        return files, None
    if not os.path.exists(source):
        raise FileNotFoundError(f"{source}: no such model file or directory")
    return [source], None


def load_predictor(source, *, cache: bool = False, **kwargs) -> Predictor:
    """A :class:`Predictor` from a model file, a list of files, an ensemble directory (``Ensemble.save``: every
    member is checked against the sha256 in ``ensemble.json``) or a directory of ``.eqml`` files.
    ``cache=True``: through :func:`cached_predictor`, keyed by the files' sha256."""
    from aiida_eqml.ml.ensemble import ENSEMBLE_MANIFEST
    from aiida_eqml.ml.modelfile import file_sha256, load_model

    files, expected = _model_files(source)
    shas = [file_sha256(f) for f in files]
    for path, sha, want in zip(files, shas, expected or shas):
        if sha != want:
            raise ValueError(f"{path}: sha256 differs from the one in {ENSEMBLE_MANIFEST} (file replaced or corrupted)")

    def load() -> Predictor:
        return Predictor([load_model(f) for f in files], names=[os.path.basename(f) for f in files], **kwargs)

    return cached_predictor(shas, load) if cache else load()


_PREDICTORS: collections.OrderedDict = collections.OrderedDict()
#: Guards _PREDICTORS and _WARMING (the compiled functions of :mod:`~aiida_eqml.ml.predictor` have their own lock:
#: neither is held while taking the other).
_LOCK = threading.Lock()
#: Background warm-ups in flight (:func:`warm_up_in_background`), by the models' hashes.
_WARMING: dict[tuple, threading.Thread] = {}
#: Predictors kept by :func:`cached_predictor` (least recently used dropped first).
CACHE_SIZE = 16


def cached_predictor(sha256s: Sequence[str], load: Callable[[], Predictor | Sequence[tuple]]) -> Predictor:
    """The process-wide Predictor of the models with these file hashes; ``load()`` (a Predictor or its members)
    runs only on the first request, so loading and compilation happen once per process."""
    key = tuple(sha256s)
    with _LOCK:
        warming = _WARMING.get(key)
    if warming is not None and warming is not threading.current_thread():
        warming.join()  # the background warm-up of these models loads and compiles them: wait, do not do it twice
    with _LOCK:
        if key in _PREDICTORS:
            _PREDICTORS.move_to_end(key)
            return _PREDICTORS[key]
    predictor = load()
    predictor = predictor if isinstance(predictor, Predictor) else Predictor(predictor)
    with _LOCK:
        _PREDICTORS[key] = predictor
        while len(_PREDICTORS) > CACHE_SIZE:
            _PREDICTORS.popitem(last=False)
    return predictor


def is_cached(sha256s: Sequence[str]) -> bool:
    """Whether :func:`cached_predictor` holds (or a warm-up is loading) the Predictor of these models."""
    key = tuple(sha256s)
    with _LOCK:
        return key in _PREDICTORS or key in _WARMING


def warm_up_in_background(sha256s: Sequence[str], load: Callable[[], Predictor | Sequence[tuple]],
                          work: Callable[[Predictor], Any]) -> threading.Thread:
    """Load the Predictor of these models (:func:`cached_predictor`) and run ``work(predictor)`` (a prediction of the
    shape to come, which compiles its padding bucket) in a daemon thread; returns the thread.

    For a caller that knows the shape of its next prediction long before it has the inputs: the ML Hubbard loop
    starts this with its first scf, so the first prediction after that scf finds the model loaded and compiled
    instead of paying it (seconds to tens of seconds) on the loop's critical path. A :func:`cached_predictor` call
    for the same models meanwhile waits for the thread. A failure here is only logged: the real prediction then
    loads the model itself and reports what is wrong. ``load`` and ``work`` must not touch AiiDA's ORM (it is not
    thread-safe): read the model files before.
    """
    import logging

    key = tuple(sha256s)

    def run():
        try:
            work(cached_predictor(key, load))
        except Exception as exception:  # noqa: BLE001 - an optimisation: the real prediction reports errors
            logging.getLogger(__name__).warning("prediction warm-up failed (the prediction will retry): %s", exception)
        finally:
            with _LOCK:
                _WARMING.pop(key, None)

    thread = threading.Thread(target=run, name=f"eqml-warm-up-{key[0][:8] if key else ''}", daemon=True)
    with _LOCK:
        if key in _WARMING:  # already warming: one thread per set of models
            return _WARMING[key]
        _WARMING[key] = thread
    thread.start()
    return thread


def clear_predictor_cache() -> None:
    """Forget the cached predictors (the compiled functions stay: they depend on the config only)."""
    with _LOCK:
        _PREDICTORS.clear()
