"""Hubbard records -> what the generic trainer reads, so Hubbard models train through the same entry point.

:func:`aiida_eqml.ml.train_cli` (what the ``eqml.train`` CalcJob runs) calls :func:`prepare_hubbard_training`
when its dataset is a Hubbard record (:mod:`aiida_eqml.ml.hubbard.records`): the raw occupation matrices become
descriptor attributes, the model config gets the descriptor irreps and the U / V heads, and the descriptor slots
(``manifold_ls``, ``pair_ls``) are returned for the model file's metadata under ``"hubbard"``. Prediction reads the
slots from there, so a model trained on one record reads the occupations of any other scf the same way.
"""
from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from aiida_eqml.ml.dataset import Dataset, EdgeValues
from aiida_eqml.ml.hubbard.models import hubbard_model_config
from aiida_eqml.ml.hubbard.records import (
    HUBBARD_TARGET_SPECS,
    RAW_NODE_ATTRS,
    hubbard_training_dataset,
    record_manifolds,
)
from aiida_eqml.ml.train_config import DEFAULT_TRAINING_CONFIG

__all__ = ("is_hubbard_record", "descriptor_slots", "labelled_species", "scf_values", "residual_targets",
           "add_scf_values", "prepare_hubbard_training")


#: The keys of a training config's ``"hubbard"`` section (their defaults live in ``DEFAULT_TRAINING_CONFIG``).
HUBBARD_TRAINING_KEYS = tuple(DEFAULT_TRAINING_CONFIG["hubbard"])


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


def labelled_species(record: Dataset) -> dict[str, list]:
    """``{"u_species": [element with a U label], "v_species_pairs": [[A, B] with a V label, A <= B]}``.

    What the descriptor cannot tell: it knows a site's shell (l), not which element carries it, so a model trained
    on Ni 3d and Ti 3d reads a Co 3d site as readily (and as blindly) as a Ni one. The ML loop refuses a structure
    that asks U of an element, or V of an element pair, outside these lists
    (:func:`aiida_eqml.workflows.hubbard.domain.check_model_domain`). Taken over every sample of the record the
    model is trained on (its validation and test samples included: a random split of one record's samples).
    """
    import ase.data

    u_species, v_pairs = set(), set()
    for s in record.samples:
        symbols = [ase.data.chemical_symbols[int(z)] for z in s.numbers]
        u = s.node_targets.get("hubbard_u")
        if u is not None:
            u_species |= {symbols[i] for i in np.flatnonzero(np.isfinite(np.asarray(u, np.float64).reshape(-1)))}
        v = s.edge_targets.get("hubbard_v")
        if v is not None and len(v.keys):
            finite = np.isfinite(np.asarray(v.values, np.float64).reshape(-1))
            v_pairs |= {tuple(sorted((symbols[int(i)], symbols[int(j)]))) for i, j in v.keys[finite, :2]}
    return {"u_species": sorted(u_species), "v_species_pairs": [list(p) for p in sorted(v_pairs)]}


def scf_values(sample, kind: str, keys=None) -> np.ndarray:
    """The U (``kind="U"``: ``[n, 1]``, 0 without a manifold) or V (``"V"``: ``[len(keys), 1]`` on the couples
    ``keys``, 0 on couples the scf did not carry) that the scf of ``sample`` ran with, in eV."""
    if kind == "U":
        return np.asarray(sample.node_attrs["hubbard_u_scf"], np.float64).reshape(-1, 1)
    from aiida_eqml.ml.graph import match_edges

    keys = np.asarray(keys, np.int64).reshape(-1, 5)
    used = sample.edge_attrs.get("hubbard_v_scf")
    if used is None or not len(used.keys) or not len(keys):
        return np.zeros((len(keys), 1))
    where = match_edges(used.keys[:, 0], used.keys[:, 1], used.keys[:, 2:], keys)
    return np.where(where[:, None] >= 0, used.values.reshape(-1, 1)[np.maximum(where, 0)], 0.0)


def residual_targets(dataset: Dataset) -> Dataset:
    """The same samples with ``hubbard_u`` / ``hubbard_v`` targets minus the scf's own U / V (see the module)."""
    samples = []
    for s in dataset.samples:
        node_targets, edge_targets = dict(s.node_targets), dict(s.edge_targets)
        if "hubbard_u" in node_targets:
            u = np.asarray(node_targets["hubbard_u"], np.float64)
            node_targets["hubbard_u"] = u - scf_values(s, "U").reshape(u.shape)
        if "hubbard_v" in edge_targets:
            v = edge_targets["hubbard_v"]
            edge_targets["hubbard_v"] = EdgeValues(
                v.keys, v.values - scf_values(s, "V", v.keys).reshape(v.values.shape)
            )
        samples.append(dataclasses.replace(s, node_targets=node_targets, edge_targets=edge_targets))
    return Dataset(samples, dataset.target_specs)


def add_scf_values(entry: dict, sample, members) -> None:
    """Residual predictions -> absolute U / V, in place, for the member indices ``members`` of one sample's
    ``{head: [per member ...]}`` entry (:meth:`aiida_eqml.ml.predict.Predictor._member_outputs`)."""
    if "hubbard_u" in entry:
        u_scf = scf_values(sample, "U")
        for m in members:
            entry["hubbard_u"][m] = entry["hubbard_u"][m] + u_scf.reshape(np.shape(entry["hubbard_u"][m]))
    if "hubbard_v" in entry:
        v_scf = scf_values(sample, "V", entry["hubbard_v_keys"])
        for m in members:
            entry["hubbard_v"][m] = entry["hubbard_v"][m] + v_scf.reshape(np.shape(entry["hubbard_v"][m]))


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

    config = copy.deepcopy(dict(config))
    options = dict(config.pop("hubbard", None) or {})
    parent_slots = (parent_metadata or {}).get("hubbard") or {}
    unknown = set(options) - set(HUBBARD_TRAINING_KEYS)
    if unknown:
        raise ValueError(f"unknown hubbard training keys {sorted(unknown)}; known: {list(HUBBARD_TRAINING_KEYS)}")
    flags = {}
    # descriptor / target choices a fine-tuned model inherits, with their defaults (that of a model file without them)
    for key, default in (("residual", False), ("spin_order", False), ("scf_inputs", True)):
        flags[key] = bool(options.get(key, default) if parent_metadata is None else parent_slots.get(key, default))
        if parent_metadata is not None and key in options and bool(options[key]) != flags[key]:
            raise ValueError(
                f"hubbard.{key}: {options[key]!r}, but the parent model was trained with {flags[key]!r}"
            )
    residual, spin_order, scf_inputs = flags["residual"], flags["spin_order"], flags["scf_inputs"]
    manifold_ls, pair_ls = descriptor_slots(record, parent_slots)
    dataset, attrs = hubbard_training_dataset(record, manifold_ls, pair_ls, spin_order=spin_order,
                                              scf_inputs=scf_inputs)
    if residual:
        dataset = residual_targets(dataset)
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
            v_sum_images=bool(options.get("v_sum_images", False)),
            u_sum_images=bool(options.get("u_sum_images", False)),
            **model,
        )
        if heads:
            config["model"]["heads"] = heads
    slots = {"manifold_ls": list(manifold_ls), "pair_ls": [list(p) for p in pair_ls]}
    labelled = labelled_species(record)
    if parent_metadata is not None and "u_species" not in parent_slots:
        labelled = {}  # a parent from before these lists: what it was trained on is unknown, so nothing is claimed
    elif parent_metadata is not None:  # fine-tuning keeps what the parent learnt
        parent_u = set(parent_slots.get("u_species", []))
        parent_v = {tuple(p) for p in parent_slots.get("v_species_pairs", [])}
        pairs = parent_v | set(map(tuple, labelled["v_species_pairs"]))
        labelled = {"u_species": sorted(parent_u | set(labelled["u_species"])),
                    "v_species_pairs": [list(p) for p in sorted(pairs)]}
    slots.update(labelled)
    if residual:
        slots["residual"] = True  # absent (not False) otherwise: the metadata of earlier models stays as it was
    if spin_order:
        slots["spin_order"] = True  # likewise: the site descriptor ends with the local magnetic order
    if not scf_inputs:
        slots["scf_inputs"] = False  # likewise (absent: True): the U_scf / V_scf slots are zero
    return dataset, config, slots
