"""Hubbard U / V models built from the model core (``aiida_eqml.ml.models``).

* **U per Hubbard site**: a node head ``hubbard_u`` (``0e``), read on the atoms that carry a
  manifold (the others are masked in the loss and reported as NaN).
* **V per couple (i, j, S)**: an edge head ``hubbard_v`` (``0e``) on the graph edge keyed
  ``(sender, receiver, shift)`` -- the couples of ``HubbardStructureData.hubbard.parameters``
  (neighbour j at ``r_j + S.cell``), matched to edges with :func:`aiida_eqml.ml.graph.match_edges`.
  The cutoff must therefore exceed the longest V couple (:func:`pair_edge_indices` says which
  couple is missing otherwise).

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
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from aiida_eqml.ml.dataset import Dataset, build_graphs
from aiida_eqml.ml.graph import PaddingBuckets, match_edges

from .records import PAIR_ATTR, SITE_ATTR

__all__ = [
    "SMALL_HUBBARD_CONFIG",
    "hubbard_model_config",
    "pair_edge_indices",
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
    **overrides,
) -> dict:
    """Model config (plain JSON) with heads ``hubbard_u`` (node) and / or ``hubbard_v`` (edge).

    ``attrs`` is the second item returned by
    :func:`aiida_eqml.ml.hubbard.records.hubbard_training_dataset` (descriptor irreps).
    ``predict_v`` defaults to whether pair descriptors are present. ``overrides`` replace any
    model-core key (see :mod:`aiida_eqml.ml.models`), e.g. ``hidden_irreps`` or ``num_layers``.
    """
    node_attrs = dict(attrs.get("node_attrs", {}))
    edge_attrs = dict(attrs.get("edge_attrs", {}))
    if SITE_ATTR not in node_attrs:
        raise ValueError(f"attrs['node_attrs'] lacks the site descriptor {SITE_ATTR!r}: {node_attrs}")
    if predict_v is None:
        predict_v = PAIR_ATTR in edge_attrs
    heads = {}
    if predict_u:
        heads["hubbard_u"] = {"level": "node", "irreps": "0e"}
    if predict_v:
        heads["hubbard_v"] = {"level": "edge", "irreps": "0e"}
    if not heads:
        raise ValueError("a Hubbard model must predict U, V or both")
    config = copy.deepcopy(SMALL_HUBBARD_CONFIG)
    config.update(
        {"species": list(species), "cutoff": float(cutoff), "node_attrs": node_attrs, "edge_attrs": edge_attrs, "heads": heads}
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


def _jitted_apply(model):
    """One jitted ``apply`` per model object, so repeated predictions do not recompile."""
    apply = getattr(model, "_jitted_apply", None)
    if apply is None:
        apply = jax.jit(model.apply)
        model._jitted_apply = apply
    return apply


def predict_hubbard(
    model, params, dataset: Dataset, batch_size: int = 8, graphs: Sequence | None = None
) -> list[dict[str, Any]]:
    """Per sample ``{"hubbard_u": [n] eV (NaN on atoms without a manifold), "hubbard_v": (keys, [M] eV)}``.

    V is reported on the couples of the sample's ``hubbard_v`` target when it has one, else on
    those of its ``hubbard_v_scf`` input (the couples the scf used).
    """
    config = model.config
    if graphs is None:
        graphs = build_graphs(dataset, config)
    buckets = PaddingBuckets.fixed(graphs, batch_size)
    apply = _jitted_apply(model)
    results = []
    for start in range(0, len(graphs), batch_size):
        chunk = list(range(start, min(start + batch_size, len(graphs))))
        batch = buckets([graphs[i] for i in chunk], dtype=np.dtype(config["dtype"]))
        out = {k: np.asarray(v.array, np.float64) for k, v in apply(params, batch).items()}
        node_off = edge_off = 0
        for i in chunk:
            g, s = graphs[i], dataset.samples[i]
            n, e = len(g.positions), len(g.senders)
            entry: dict[str, Any] = {}
            if "hubbard_u" in out:
                u = out["hubbard_u"][node_off : node_off + n, 0].copy()
                if "hubbard_l" in s.node_attrs:
                    u[np.asarray(s.node_attrs["hubbard_l"]) < 0] = np.nan
                entry["hubbard_u"] = u
            if "hubbard_v" in out:
                source = s.edge_targets.get("hubbard_v") or s.edge_attrs.get("hubbard_v_scf")
                keys = source.keys if source is not None else np.zeros((0, 5), np.int64)
                where = pair_edge_indices(g, keys, config["cutoff"])
                entry["hubbard_v"] = (keys, out["hubbard_v"][edge_off : edge_off + e, 0][where])
            results.append(entry)
            node_off, edge_off = node_off + n, edge_off + e
    return results
