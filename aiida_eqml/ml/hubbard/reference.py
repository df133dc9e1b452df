"""Reference Hubbard models shipped with the package, loadable by name (pure ML layer: no aiida).

    from aiida_eqml.ml.hubbard.reference import load_reference_model, reference_record

    ensemble = load_reference_model("hubbard-tmo")       # aiida_eqml.ml.hubbard.ensemble.Ensemble
    out = ensemble.predict(record)                        # U / V with committee spread per sample
    ensemble.reference["training_materials"], ensemble.reference["errors"], ensemble.reference["protocol"]

A reference model is one directory ``aiida_eqml/ml/hubbard/reference/<name>/`` holding the member model files
(``member_XX.eqml``, each with ``protocol`` and ``hubbard`` descriptor slots in its metadata), ``ensemble.json`` (the
members' sha256 and, under ``metadata``, what the model is: protocol, species, manifolds, training materials and
measured errors), ``record.npz`` (the compact label record it was trained on, flagged labels included) and a
``README.md``. Directories are written by ``benchmarks/hubbard_reference_model.py``; a name the package knows of
but has no data for yet (the label campaign is still running) is refused with a message saying so.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from aiida_eqml.ml.ensemble import ENSEMBLE_MANIFEST

__all__ = [
    "REFERENCE_MODELS",
    "REFERENCE_DIR",
    "UnknownReferenceModelError",
    "ReferenceDataMissingError",
    "available_reference_models",
    "reference_model_path",
    "reference_metadata",
    "reference_record",
    "load_reference_model",
]

#: Where the shipped reference directories live (a plain data directory, not a Python package).
REFERENCE_DIR = Path(__file__).resolve().parent / "reference"

#: The reference models this version of the package is meant to ship, with one line each.
REFERENCE_MODELS: dict[str, str] = {
    "hubbard-tmo": "Hubbard U (TM 3d, O 2p) and V (TM 3d - O 2p) of transition-metal oxides at the reference "
                   "protocol eqml-hubbard-reference-v1 (rock salt, layered R-3m, rutile, perovskite; "
                   "docs/hubbard.md, 'Reference data and model')",
}

_RECORD = "record.npz"
_BUILD = "benchmarks/hubbard_reference_model.py"


class UnknownReferenceModelError(ValueError):
    """No reference model of that name exists."""


class ReferenceDataMissingError(FileNotFoundError):
    """The package knows the reference model but its data directory is absent or incomplete."""


def _directory() -> Path:
    return Path(REFERENCE_DIR)


def available_reference_models() -> list[str]:
    """Names whose data is present (a directory with ``ensemble.json``), sorted."""
    root = _directory()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / ENSEMBLE_MANIFEST).is_file())


def reference_model_path(name: str) -> Path:
    """The directory of reference model ``name``; :class:`UnknownReferenceModelError` for a name that is neither
    known nor present, :class:`ReferenceDataMissingError` for a known name without its data."""
    if not isinstance(name, str) or not name or os.sep in name or name.startswith("."):
        raise UnknownReferenceModelError(f"{name!r} is not a reference model name; known: {sorted(REFERENCE_MODELS)}")
    path = _directory() / name
    if (path / ENSEMBLE_MANIFEST).is_file():
        return path
    available = available_reference_models()
    if name not in REFERENCE_MODELS:
        raise UnknownReferenceModelError(
            f"unknown reference model {name!r}; known: {sorted(REFERENCE_MODELS)}, with data in this installation: "
            f"{available or 'none'}")
    raise ReferenceDataMissingError(
        f"reference model {name!r} is known but its data is not in this installation "
        f"({path / ENSEMBLE_MANIFEST} is missing): "
        f"it is written by `python {_BUILD}` once the label campaign has enough labels (docs/hubbard.md, "
        f"'Reference data and model'); with data here: {available or 'none'}")


def reference_metadata(name: str) -> dict[str, Any]:
    """The ``metadata`` of the reference's ``ensemble.json`` (protocol, species, manifolds, training materials,
    measured errors, ...) plus ``name`` and ``path``."""
    path = reference_model_path(name)
    with open(path / ENSEMBLE_MANIFEST) as handle:
        manifest = json.load(handle)
    return {**dict(manifest.get("metadata") or {}), "name": name, "path": str(path)}


def reference_member_files(name: str) -> list[Path]:
    """The member model files of a reference, in manifest order (for importing them as ``eqml.model`` nodes)."""
    path = reference_model_path(name)
    with open(path / ENSEMBLE_MANIFEST) as handle:
        manifest = json.load(handle)
    files = [path / entry["file"] for entry in manifest.get("members") or []]
    missing = [f.name for f in files if not f.is_file()]
    if missing or not files:
        raise ReferenceDataMissingError(
            f"reference model {name!r}: member files {missing or '(none listed)'} are missing in {path}"
        )
    return files


def reference_record(name: str):
    """The compact label record (:class:`aiida_eqml.ml.dataset.Dataset`) the reference was trained on; samples the
    quality filter rejected are included, with ``info['quality_issues']``."""
    from aiida_eqml.ml.dataset import Dataset

    path = reference_model_path(name) / _RECORD
    if not path.is_file():
        raise ReferenceDataMissingError(f"reference model {name!r}: no {_RECORD} in {path.parent}")
    return Dataset.load(path)


def load_reference_model(name: str = "hubbard-tmo"):
    """The shipped ensemble ``name`` (:class:`aiida_eqml.ml.hubbard.ensemble.Ensemble`, every member checked against
    the sha256 in ``ensemble.json``), with ``.reference`` = :func:`reference_metadata`."""
    from .ensemble import Ensemble

    path = reference_model_path(name)
    ensemble = Ensemble.load(path)
    ensemble.reference = reference_metadata(name)
    return ensemble
