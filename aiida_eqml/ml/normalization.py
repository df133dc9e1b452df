"""What the data determines in a model config: species, ``avg_num_neighbors`` and the per-head normalisation.

Computed on the training split only and written into the model config, so a model file is self-describing (its
outputs are ``scale * network + species_shift``, :mod:`aiida_eqml.ml.models`).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from aiida_eqml.ml.dataset import Dataset, target_irreps_type

__all__ = ["complete_model_config", "compute_normalization"]


def complete_model_config(model_config: Mapping[str, Any], dataset: Dataset, graphs: Sequence | None = None) -> dict:
    """Fill in what the data determines: ``species`` (sorted by atomic number) when absent and
    ``avg_num_neighbors`` (mean edges per node of ``graphs``) when absent; check the heads
    against the dataset's target specs."""
    import ase.data

    config = copy.deepcopy(dict(model_config))
    present = [ase.data.chemical_symbols[z] for z in dataset.atomic_numbers]
    if "species" not in config:
        config["species"] = present
    else:
        missing = sorted(set(present) - set(config["species"]))
        if missing:
            raise ValueError(f"dataset has element(s) {missing} not in the model's species {config['species']}")
    heads = config.get("heads")
    if not heads:
        raise ValueError("model config has no 'heads'")
    for name, head in heads.items():
        spec = dataset.target_specs.get(name)
        if spec is None or head.get("route", "direct") == "derivative":
            continue
        if head.get("level") is not None and head["level"] != spec["level"]:
            raise ValueError(f"head {name!r} has level {head['level']!r} but the dataset target is {spec['level']!r}")
        head_irreps = target_irreps_type(head)[0] if ("tensor" in head or "irreps" in head) else None
        if head_irreps is not None and head_irreps != target_irreps_type(spec)[0]:
            raise ValueError(
                f"head {name!r} has irreps {head_irreps} but the dataset target has {target_irreps_type(spec)[0]}"
            )
    if "avg_num_neighbors" not in config and graphs:
        n_nodes = sum(int(np.sum(g.n_node)) for g in graphs)
        n_edges = sum(int(np.sum(g.n_edge)) for g in graphs)
        config["avg_num_neighbors"] = max(n_edges / max(n_nodes, 1), 1.0)
    return config


def compute_normalization(dataset: Dataset, model_config: Mapping[str, Any], graphs: Sequence | None = None) -> dict:
    """Per-head ``{"scale", "species_shift"}`` from the (training) dataset, labels in irreps.

    Shift: per-species mean of the ``0e`` components (the model only uses those: a non-scalar
    shift would break equivariance); graph heads fit the shift by least squares on the
    composition (sum or mean reduce), edge heads average by (sender, receiver) species (a head summed over
    periodic images, ``reduce: "images"``, averages label / number of images, since each image adds the shift).
    Scale: RMS of the shifted labels over all components, so the network learns O(1) numbers.
    Derivative heads are skipped (they follow the energy head).
    """
    from aiida_eqml.ml.models import build_model

    model = build_model(model_config)
    species = model.species
    index = {s: i for i, s in enumerate(species)}
    import ase.data

    out = {}
    for name, head in model.heads.items():
        spec = dataset.target_specs.get(name)
        if head.route != "direct" or spec is None:
            continue
        irreps, to_irreps = target_irreps_type(spec)
        scalar = np.concatenate([np.full(ir.dim * mul, ir.l == 0 and ir.p == 1) for mul, ir in irreps])
        rows, species_rows, image_rows = [], [], []
        if head.level == "edge" and head.reduce == "images" and graphs is None:
            from aiida_eqml.ml.dataset import build_graphs

            graphs = build_graphs(dataset, model_config)
        for number, s in enumerate(dataset.samples):
            sp = np.array([index[ase.data.chemical_symbols[z]] for z in s.numbers])
            if head.level == "node" and name in s.node_targets:
                values = s.node_targets[name]
                ok = np.all(np.isfinite(values.reshape(s.n_atoms, -1)), axis=1)
                rows.append(to_irreps(np.nan_to_num(values))[ok])
                species_rows.append(sp[ok])
            elif head.level == "graph" and name in s.graph_targets:
                values = s.graph_targets[name]
                if np.all(np.isfinite(values)):
                    rows.append(to_irreps(values[None]))
                    counts = np.bincount(sp, minlength=len(species)).astype(float)
                    species_rows.append(counts / (len(sp) if head.reduce == "mean" else 1.0))
            elif head.level == "edge" and name in s.edge_targets:
                ev = s.edge_targets[name]
                ok = np.all(np.isfinite(ev.values.reshape(len(ev.keys), -1)), axis=1)
                rows.append(to_irreps(np.nan_to_num(ev.values))[ok])
                species_rows.append(np.stack([sp[ev.keys[ok, 0]], sp[ev.keys[ok, 1]]], axis=1))
                if head.reduce == "images":  # edges i -> j of the sample's graph, whatever their translation
                    g = graphs[number]
                    pair_count = {}
                    for i, j in zip(np.asarray(g.senders).tolist(), np.asarray(g.receivers).tolist()):
                        pair_count[(i, j)] = pair_count.get((i, j), 0) + 1
                    image_rows.append(np.array([max(pair_count.get((int(i), int(j)), 1), 1)
                                                for i, j in ev.keys[ok, :2]], float))
        if not rows or sum(len(r) for r in rows) == 0:
            continue
        y = np.concatenate(rows)
        S = len(species)
        if head.level == "node":
            sp = np.concatenate(species_rows)
            shift = np.zeros((S, irreps.dim))
            for i in range(S):
                if np.any(sp == i):
                    shift[i] = y[sp == i].mean(axis=0)
            baseline = shift[sp]
        elif head.level == "graph":
            composition = np.stack(species_rows)
            coef, *_ = np.linalg.lstsq(composition, y, rcond=None)
            shift = coef
            baseline = composition @ coef
        else:
            pairs = np.concatenate(species_rows)
            images = np.concatenate(image_rows)[:, None] if image_rows else np.ones((len(y), 1))
            shift = np.zeros((S, S, irreps.dim))
            for i in range(S):
                for j in range(S):
                    sel = (pairs[:, 0] == i) & (pairs[:, 1] == j)
                    if np.any(sel):
                        shift[i, j] = (y[sel] / images[sel]).mean(axis=0)
            baseline = shift[pairs[:, 0], pairs[:, 1]] * images
        shift = shift * scalar  # what the model actually adds
        baseline = baseline * scalar
        scale = float(np.sqrt(np.mean((y - baseline) ** 2)))
        if not np.isfinite(scale) or scale < 1e-8:
            scale = 1.0
        out[name] = {"scale": scale, "species_shift": shift.tolist()}
    return out
