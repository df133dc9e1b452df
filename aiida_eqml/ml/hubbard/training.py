"""Hubbard records -> what the generic trainer reads, so Hubbard models train through the same entry point.

:func:`aiida_eqml.ml.train_cli` (what the ``eqml.train`` CalcJob runs) calls :func:`prepare_hubbard_training`
when its dataset is a Hubbard record (:mod:`aiida_eqml.ml.hubbard.records`): the raw occupation matrices become
descriptor attributes, the model config gets the descriptor irreps and the U / V heads, and the descriptor slots
(``manifold_ls``, ``pair_ls``) are returned for the model file's metadata under ``"hubbard"``. Prediction reads the
slots from there, so a model trained on one record reads the occupations of any other scf the same way.
"""
from __future__ import annotations

import copy
from typing import Any, Mapping

from aiida_eqml.ml.dataset import Dataset
from aiida_eqml.ml.hubbard.models import hubbard_model_config
from aiida_eqml.ml.hubbard.records import HUBBARD_TARGET_SPECS, RAW_NODE_ATTRS, hubbard_training_dataset, record_manifolds

__all__ = ("is_hubbard_record", "descriptor_slots", "prepare_hubbard_training")


def is_hubbard_record(dataset: Dataset) -> bool:
    """A dataset with U / V targets whose samples carry the raw occupation matrices."""
    return (
        len(dataset) > 0
        and any(name in dataset.target_specs for name in HUBBARD_TARGET_SPECS)
        and all(all(key in s.node_attrs for key in RAW_NODE_ATTRS) for s in dataset.samples)
    )


def descriptor_slots(
    record: Dataset, stored: Mapping[str, Any] | None = None, with_pairs: bool = True
) -> tuple[tuple[int, ...], tuple[tuple[int, int], ...]]:
    """``(manifold_ls, pair_ls)`` for the descriptors: those a trained model stored (its metadata ``"hubbard"``),
    else those present in ``record``. ``with_pairs=False``: no pair slots (a model without pair descriptors)."""
    stored = dict(stored or {})
    found_ls, found_pairs = record_manifolds(record)
    manifold_ls = tuple(int(l) for l in stored.get("manifold_ls", found_ls))
    pair_ls = tuple(tuple(int(l) for l in p) for p in stored.get("pair_ls", found_pairs)) if with_pairs else ()
    return manifold_ls, pair_ls


def prepare_hubbard_training(
    record: Dataset, config: Mapping[str, Any], parent_metadata: Mapping[str, Any] | None = None
) -> tuple[Dataset, dict, dict]:
    """``(descriptor dataset, training config with a complete Hubbard model config, {"manifold_ls", "pair_ls"})``.

    ``config["model"]`` may be partial: ``species`` (default: the record's), ``cutoff`` (default 4 A; every V
    couple must be a graph edge), ``heads`` (default: U and/or V, whichever the record has labels for) and any
    model-core key (``hidden_irreps``, ``num_layers``, ...). Fine-tuning (``parent_metadata`` given) keeps the
    parent's slots and architecture.
    """
    import ase.data

    manifold_ls, pair_ls = descriptor_slots(record, (parent_metadata or {}).get("hubbard"))
    dataset, attrs = hubbard_training_dataset(record, manifold_ls, pair_ls)

    config = copy.deepcopy(dict(config))
    model = dict(config.get("model") or {})
    if parent_metadata is None and "node_attrs" not in model:
        species = model.pop("species", None) or [ase.data.chemical_symbols[z] for z in record.atomic_numbers]
        cutoff = float(model.pop("cutoff", 4.0))
        heads = model.pop("heads", None)
        config["model"] = hubbard_model_config(
            species,
            attrs,
            cutoff=cutoff,
            predict_u="hubbard_u" in record.target_specs,
            predict_v="hubbard_v" in record.target_specs and bool(pair_ls),
            **model,
        )
        if heads:
            config["model"]["heads"] = heads
    return dataset, config, {"manifold_ls": list(manifold_ls), "pair_ls": [list(p) for p in pair_ls]}
