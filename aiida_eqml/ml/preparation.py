"""The trainer's extension point: datasets that must be turned into something else before the generic trainer.

:func:`aiida_eqml.ml.training.train` knows graphs, heads and labels, nothing of the physics behind a dataset. A
domain whose records need a transformation first (a Hubbard record's raw occupation matrices become descriptor
attributes and the model gets U / V heads) registers a *preparer*: ``preparer(dataset, config, parent_metadata)``
returns a :class:`Prepared` for the datasets it recognises and ``None`` for any other. ``train_cli`` (so the
``eqml.train`` CalcJob and ``aiida-eqml train``) calls :func:`prepare_training`; the first preparer that answers
wins, and its ``metadata`` is stored in the model file (what prediction needs to read another input the same way).

Entries of :data:`DATASET_PREPARERS` are callables or ``"module:function"`` strings, imported on first use, so the
generic path imports no domain code until a dataset needs it.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["Prepared", "DATASET_PREPARERS", "register_dataset_preparer", "prepare_training"]


@dataclasses.dataclass
class Prepared:
    """What a preparer hands to the trainer."""

    dataset: Any  # the aiida_eqml.ml.dataset.Dataset to train on
    config: dict  # the training config, model config completed for that dataset
    metadata: dict = dataclasses.field(default_factory=dict)  # merged into the model file's metadata


Preparer = Callable[[Any, dict, Mapping[str, Any] | None], Prepared | None]

#: Tried in order (see the module docstring).
DATASET_PREPARERS: list[Preparer | str] = ["aiida_eqml.ml.hubbard.preparer:prepare_hubbard_dataset"]


def register_dataset_preparer(preparer: Preparer | str, first: bool = False) -> None:
    """Add a preparer (``first``: before the registered ones, e.g. to handle a dataset they would also claim)."""
    if first:
        DATASET_PREPARERS.insert(0, preparer)
    else:
        DATASET_PREPARERS.append(preparer)


def _resolve(entry: Preparer | str) -> Preparer:
    if callable(entry):
        return entry
    module, _, name = entry.partition(":")
    return getattr(importlib.import_module(module), name)


def prepare_training(dataset, config: Mapping[str, Any], parent_metadata: Mapping[str, Any] | None = None) -> Prepared:
    """The first registered preparer's answer, or the dataset and config unchanged (no extra metadata)."""
    for entry in DATASET_PREPARERS:
        prepared = _resolve(entry)(dataset, dict(config), parent_metadata)
        if prepared is not None:
            return prepared
    return Prepared(dataset, dict(config), {})
