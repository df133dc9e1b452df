"""Hubbard U / V models built from the model core (``aiida_eqml.ml.models``).

* **U per Hubbard site**: a node head ``hubbard_u`` (``0e``), read on the atoms that carry a
  manifold (the others are masked in the loss and reported as NaN).
* **V per couple (i, j, S)**: an edge head ``hubbard_v`` (``0e``) on the graph edge keyed
  ``(sender, receiver, shift)`` -- the couples of ``HubbardStructureData.hubbard.parameters``
  (neighbour j at ``r_j + S.cell``), matched to edges with :func:`aiida_eqml.ml.graph.match_edges`.
  The cutoff must therefore exceed the longest V couple (:func:`pair_edge_indices` says which
  couple is missing otherwise). With ``v_sum_images`` the head is summed over the periodic images of each
  couple (``reduce: "images"``, :func:`aiida_eqml.ml.graph.sum_over_images`): the V of hp.x at q = Gamma is
  sum_S V(i, j + S), so the network learns the local V of each image and a supercell gets what hp.x at q = Gamma
  gives there, instead of the primitive cell's value on every couple. With ``u_sum_images`` the U of a site is
  its node head plus an edge head summed over its edges to its own periodic images (i -> i + S, S != 0): hp.x at
  q = Gamma perturbs a site together with its images, so its U holds the site's coupling to them (rutile's
  6-atom cell: 2.998 eV, its 1x1x2 supercell at the same seeds: 3.949 eV, docs/hubbard.md).

The inputs are the descriptors of :mod:`aiida_eqml.ml.hubbard.records` given as node / edge
attributes (``config["node_attrs"]`` / ``config["edge_attrs"]``): on-site and inter-site
occupation invariants of the scf plus the U / V it used. Rotation equivariance of the network and of
the descriptors makes U and V invariant under rotations of the crystal (with its occupation
matrices), the descriptors' construction makes them invariant under the spin swap up <-> down, and
message passing makes them depend on the environment (geometry, neighbours' occupations), so the
same model works for any crystal.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from types import SimpleNamespace
from typing import Any

import e3nn_jax as e3nn
import numpy as np

from aiida_eqml.ml.dataset import Dataset
from aiida_eqml.ml.graph import match_edges
from aiida_eqml.ml.targets import head_spec

from .records import PAIR_ATTR, SITE_ATTR

__all__ = [
    "SMALL_HUBBARD_CONFIG",
    "hubbard_model_config",
    "pair_edge_indices",
    "hubbard_predictions",
    "shape_record",
    "predict_hubbard",
]

#: A small network for few labels (tens of hp.x runs): two NequIP layers, l <= 2 features.
SMALL_HUBBARD_CONFIG: dict[str, Any] = {
    "architecture": "nequip",
    "num_layers": 2,
    "hidden_irreps": "16x0e + 4x1o + 4x1e + 4x2e + 2x2o",
    "sh_lmax": 2,
    "num_radial_basis": 6,
    "radial_hidden": [16, 16],
    "readout_product_mul": 4,
}


def hubbard_model_config(
    species: Sequence[str],
    attrs: Mapping[str, Mapping[str, str]],
    *,
    cutoff: float = 4.0,
    predict_u: bool = True,
    predict_v: bool | None = None,
    v_sum_images: bool = False,
    u_sum_images: bool = False,
    **overrides,
) -> dict:
    """Model config (plain JSON) with heads ``hubbard_u`` (node) and / or ``hubbard_v`` (edge).

    ``attrs`` is the second item returned by
    :func:`aiida_eqml.ml.hubbard.records.hubbard_training_dataset` (descriptor irreps).
    ``predict_v`` defaults to whether pair descriptors are present. ``overrides`` replace any
    model-core key (see :mod:`aiida_eqml.ml.models`), e.g. ``hidden_irreps`` or ``num_layers``.
    ``v_sum_images``: V of a couple is the head summed over all its periodic images (the module docstring);
    ``u_sum_images``: U of a site is its node head plus an edge head summed over its edges to its own images.
    """
    node_attrs = dict(attrs.get("node_attrs", {}))
    edge_attrs = dict(attrs.get("edge_attrs", {}))
    if SITE_ATTR not in node_attrs:
        raise ValueError(f"attrs['node_attrs'] lacks the site descriptor {SITE_ATTR!r}: {node_attrs}")
    if predict_v is None:
        predict_v = PAIR_ATTR in edge_attrs
    heads = {}
    if predict_u:
        heads["hubbard_u"] = head_spec("hubbard_u")
        if u_sum_images:
            heads["hubbard_u"]["reduce"] = "images"
    if predict_v:
        heads["hubbard_v"] = head_spec("hubbard_v")
        if v_sum_images:
            heads["hubbard_v"]["reduce"] = "images"
    if not heads:
        raise ValueError("a Hubbard model must predict U, V or both")
    config = copy.deepcopy(SMALL_HUBBARD_CONFIG)
    config.update(
        {
            "species": list(species),
            "cutoff": float(cutoff),
            "node_attrs": node_attrs,
            "edge_attrs": edge_attrs,
            "heads": heads,
        }
    )
    config.update(copy.deepcopy(overrides))
    return config


def pair_edge_indices(graph, keys, cutoff: float | None = None) -> np.ndarray:
    """Edge index of each V couple ``(i, j, S1, S2, S3)`` in an (unpadded) graph; ValueError if absent."""
    keys = np.asarray(keys, dtype=np.int64).reshape(-1, 5)
    where = match_edges(graph.senders, graph.receivers, graph.shifts, keys)
    if np.any(where < 0):
        missing = keys[where < 0][:3].tolist()
        beyond = f" (beyond the cutoff {cutoff} A? raise it above the longest V couple)" if cutoff else ""
        raise ValueError(f"V couples {missing} are not edges of the graph{beyond}")
    return where


def _descriptor_dataset(record: Dataset, group) -> Dataset:
    """The descriptors one member group reads: a descriptor dataset as it is, a raw record through the slots the
    model stored at training (``metadata["hubbard"]``; older models: the record's own)."""
    from aiida_eqml.ml.predict import PredictionError

    from .records import hubbard_training_dataset
    from .training import descriptor_slots

    if all(SITE_ATTR in s.node_attrs for s in record.samples):
        return record
    stored = group.metadata.get("hubbard") or {}
    manifold_ls, pair_ls = descriptor_slots(record, stored, with_pairs=PAIR_ATTR in group.edge_attrs)
    try:
        dataset, attrs = hubbard_training_dataset(record, manifold_ls, pair_ls,
                                                  spin_order=bool(stored.get("spin_order")),
                                                  scf_inputs=bool(stored.get("scf_inputs", True)))
    except ValueError as exc:
        raise PredictionError(
            f"the occupations cannot be read as this model's descriptors: {exc}", f"node_attrs.{SITE_ATTR}"
        ) from exc
    for level, declared in (("node_attrs", group.node_attrs), ("edge_attrs", group.edge_attrs)):
        for name, irreps in declared.items():
            if name in (SITE_ATTR, PAIR_ATTR) and e3nn.Irreps(attrs[level].get(name, "")) != e3nn.Irreps(irreps):
                raise PredictionError(
                    f"the model reads {name} with irreps {irreps}, the occupations of this scf give "
                    f"{attrs[level].get(name)} (Hubbard manifolds l={manifold_ls}, pairs {pair_ls}): not the kind of "
                    "system it was trained on", f"{level}.{name}")
    return dataset


def hubbard_predictions(
    predictor, record: Dataset, members: bool = False, graphs: Sequence | None = None
) -> list[dict]:
    """Per sample ``{"hubbard_u": [n] eV (NaN on atoms without a manifold), "hubbard_v": [M] eV, "hubbard_v_keys":
    [M, 5]}`` with ``_std`` (population, 0 for one member), or ``[members, ...]`` arrays with ``members=True``.

    ``record``: a Hubbard record (raw occupations) or its descriptor dataset. V is reported on the couples of the
    sample's ``hubbard_v`` target when it has one, else on those of its ``hubbard_v_scf`` input (those the scf used).
    """
    from aiida_eqml.ml.predict import ensemble_statistics

    by_slots: dict[str, list] = {}
    for group in predictor._groups:
        by_slots.setdefault(json.dumps(group.metadata.get("hubbard"), sort_keys=True), []).append(group)
    raw, dataset = None, record
    for k, groups in enumerate(by_slots.values()):
        dataset = _descriptor_dataset(record, groups[0])
        items = [(s.to_ase(), s.node_attrs, s.edge_attrs, f"{s.label(i)}: ") for i, s in enumerate(dataset.samples)]
        given = {groups[0].graph_key: graphs} if graphs is not None and k == 0 else None
        raw = predictor._member_outputs(items, given, groups=groups, into=raw)
        if (groups[0].metadata.get("hubbard") or {}).get("residual"):  # trained on U - U_scf (hubbard.training)
            from .training import add_scf_values

            indices = [index for group in groups for index in group.indices]
            for s, entry in zip(dataset.samples, raw):
                add_scf_values(entry, s, indices)
    results = []
    for s, out in zip(dataset.samples, predictor._stack(raw or [], members=True)):
        entry: dict[str, Any] = {}
        if "hubbard_u" in out:
            u = out["hubbard_u"][..., 0].copy()
            if "hubbard_l" in s.node_attrs:
                u[:, np.asarray(s.node_attrs["hubbard_l"]) < 0] = np.nan
            entry["hubbard_u"] = u
        if "hubbard_v" in out:
            source = s.edge_targets.get("hubbard_v") or s.edge_attrs.get("hubbard_v_scf")
            keys = source.keys if source is not None else np.zeros((0, 5), np.int64)
            edges = out["hubbard_v_keys"]
            graph = SimpleNamespace(senders=edges[:, 0], receivers=edges[:, 1], shifts=edges[:, 2:])
            entry["hubbard_v"] = out["hubbard_v"][:, pair_edge_indices(graph, keys, predictor.config["cutoff"]), 0]
            entry["hubbard_v_keys"] = keys
        results.append(entry if members else ensemble_statistics(
            [{k: (v if k.endswith("_keys") else v[m]) for k, v in entry.items()} for m in range(len(predictor))],
            always_std=True))
    return results


def shape_record(atoms, hubbard_l: Mapping[int, int], couples: Sequence[Sequence[int]]) -> Dataset:
    """A one-sample Hubbard record with the shapes of an scf's (``hubbard_l[atom]`` = l of its manifold, inter-site
    ``couples`` = (i, j, S1, S2, S3)) and placeholder occupations (half-filled, no inter-site coupling).

    Its prediction is meaningless but compiles the same padding bucket as the real one: the graph depends on the
    atoms and the cutoff, the attributes' shapes on the manifolds only (what
    :func:`aiida_eqml.ml.predict.warm_up_in_background` needs before the scf has run)."""
    from .records import HUBBARD_TARGET_SPECS, hubbard_record_sample

    onsite = {int(a): 0.5 * np.eye(2 * int(l) + 1)[None].repeat(2, axis=0) for a, l in hubbard_l.items()}
    intersite = {tuple(int(x) for x in key): np.zeros((2, 2 * int(hubbard_l[key[0]]) + 1,
                                                       2 * int(hubbard_l[key[1]]) + 1)) for key in couples}
    sample = hubbard_record_sample(
        atoms, onsite, {a: 0.0 for a in onsite}, intersite=intersite or None,
        hubbard_v_scf={key: 0.0 for key in intersite} or None, info={"placeholder": True})
    return Dataset([sample], {"hubbard_u": HUBBARD_TARGET_SPECS["hubbard_u"]})


def predict_hubbard(
    model, params, dataset: Dataset, batch_size: int = 8, graphs: Sequence | None = None, residual: bool = False
) -> list[dict[str, Any]]:
    """Per sample ``{"hubbard_u": [n] eV (NaN on atoms without a manifold), "hubbard_v": (keys, [M] eV)}`` of one
    model: a thin wrapper of :meth:`aiida_eqml.ml.predict.Predictor.predict_hubbard` (same jitted path).

    V is reported on the couples of the sample's ``hubbard_v`` target when it has one, else on
    those of its ``hubbard_v_scf`` input (the couples the scf used). ``residual``: the model was trained on
    ``U - U_scf`` (``config["hubbard"]["residual"]``, :mod:`aiida_eqml.ml.hubbard.training`).
    """
    from aiida_eqml.ml.predict import Predictor

    metadata = {"hubbard": {"residual": True}} if residual else None
    predictor = Predictor.from_model(model, params, metadata=metadata, batch_size=batch_size)
    results = []
    for out in hubbard_predictions(predictor, dataset, members=True, graphs=graphs):
        entry: dict[str, Any] = {}
        if "hubbard_u" in out:
            entry["hubbard_u"] = out["hubbard_u"][0]
        if "hubbard_v" in out:
            entry["hubbard_v"] = (out["hubbard_v_keys"], out["hubbard_v"][0])
        results.append(entry)
    return results
