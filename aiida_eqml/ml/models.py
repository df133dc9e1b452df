"""Equivariant models built from a plain JSON-able config.

>>> model = build_model({"species": ["Ba", "Ti", "O"], "cutoff": 5.0,
...                      "heads": {"born_charges": {"level": "node", "tensor": "ij"}}})
>>> params = model.init(jax.random.PRNGKey(0), graph)
>>> out = model.apply(params, graph)          # {"born_charges": IrrepsArray [N, 0e+1e+2e]}

Config keys (defaults in :data:`DEFAULT_CONFIG`):

``species`` (required)
    list of chemical symbols; ``graph.species`` indexes it.
``cutoff``
    neighbour cutoff (Angstrom) used for the graphs and the radial envelope.
``architecture``
    a name in :data:`aiida_eqml.ml.architectures.ARCHITECTURES`: ``"nequip"`` (tensor-product
    convolution + gate), ``"mace"`` (adds a product basis of ``correlation`` atomic-basis copies:
    body order ``correlation + 1``) or ``"allegro"`` (strictly local, edge-based tensor products,
    :mod:`aiida_eqml.ml.allegro`; its keys ``allegro_channels``, ``allegro_lmax``,
    ``allegro_latent`` exist only in Allegro configs).
``num_layers``, ``hidden_irreps``, ``sh_lmax``, ``num_radial_basis``, ``envelope_p``,
``radial_hidden``, ``avg_num_neighbors``, ``correlation``, ``mace_channels``, ``mace_lmax``
    network sizes (the ``mace_*`` and ``correlation`` keys are in every config: files written before the
    registry carry them).
``node_attrs``, ``edge_attrs``
    ``{name: irreps}`` extra inputs expected in ``graph.node_attrs`` / ``graph.edge_attrs``;
    node attributes are mixed (species-indexed linear map) into the initial node features,
    edge attributes join the edge spherical harmonics in every convolution (and their scalars
    the radial MLP input).
``heads``
    ``{name: {"level": "node"|"edge"|"graph", "irreps": str | "tensor": formula or
    {"formula", "index_irreps"}, "route": "direct"|"derivative", "reduce": "sum"|"mean"|"images",
    "quantity": ...}}``. Graph heads reduce a node readout over the nodes (``reduce``, default
    ``sum``). An edge head with ``reduce: "images"`` gives every edge i -> j the sum of its readout over all
    edges i -> j (every translation S within the cutoff; :func:`aiida_eqml.ml.graph.sum_over_images`); a node head
    with it adds to node i the sum of an edge readout over i's edges to its own images i -> i + S (S != 0), the
    coupling of a site to its periodic images that a q = Gamma response in the cell contains (hp.x's U).
    Derivative heads come from the energy head ``config["energy_head"]``
    (default ``"energy"``, a graph ``0e`` head added automatically when missing) through
    :mod:`aiida_eqml.ml.response`; ``quantity`` (default: the head name) is one of
    :data:`aiida_eqml.ml.response.QUANTITIES`. Their level and irreps are fixed by the quantity.
``field``
    whether the network takes the electric field (``graph.globals["field"]``, 1o, V/A); forced
    on when a derivative head needs field derivatives.
``magnetic`` (optional, absent = false, and a false one is dropped: configs of before stay as they were)
    whether the network takes a magnetic field B (graph, 1e) and nuclear moments mu (node, 1e), for the
    ``nmr_shielding`` derivative head (:mod:`aiida_eqml.ml.magnetic`); never forced on: asking for a magnetic
    quantity without it is an error.
``normalization``
    ``{head: {"scale": float, "species_shift": [[...] * irreps.dim] * num_species}}`` for
    direct heads: ``out = scale * net + shift[species]`` (graph heads: shifts summed / averaged
    over the nodes; edge heads: ``species_shift`` is ``[S][S][dim]`` by (sender, receiver)).
    Only the ``0e`` entries of a shift are used: a shift of a non-scalar irrep would break
    equivariance. Derivative heads inherit the energy head's normalisation.
``dtype``
    ``"float32"`` (default) or ``"float64"`` for the parameters.
"""

from __future__ import annotations

import copy
import json
from typing import Any, NamedTuple

import e3nn_jax as e3nn
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .architectures import TrunkInputs, get_architecture
from .graph import Graph, edge_vectors, sum_over_images
from .layers import EdgeReadout, FieldCoupling, NodeReadout, radial_basis, safe_norm_vectors
from .magnetic import check_magnetic_config, magnetic_inputs
from .tensors import CartesianTensorType, tensor_type

__all__ = ["DEFAULT_CONFIG", "HeadSpec", "EquivariantModel", "EquivariantNetwork", "build_model", "normalize_config"]

DEFAULT_CONFIG: dict[str, Any] = {
    "architecture": "nequip",
    "cutoff": 5.0,
    "num_layers": 2,
    "hidden_irreps": "32x0e + 8x0o + 16x1o + 8x1e + 8x2e + 4x2o",
    "sh_lmax": 2,
    "num_radial_basis": 8,
    "envelope_p": 6,
    "radial_hidden": [32, 32],
    "avg_num_neighbors": 20.0,
    "correlation": 3,
    "mace_channels": 8,
    "mace_lmax": 2,
    "readout_product_mul": 4,
    "node_attrs": {},
    "edge_attrs": {},
    "heads": {},
    "energy_head": "energy",
    "field": False,
    "normalization": {},
    "dtype": "float32",
}

#: keys known but not filled in: a config that does not use them is the config of before (same content hash)
OPTIONAL_KEYS = frozenset({"magnetic"})

LEVELS = ("node", "edge", "graph")


class HeadSpec(NamedTuple):
    """One output of the model (see ``docs/architecture.md``)."""

    level: str  # node | edge | graph
    irreps: e3nn.Irreps
    tensor: CartesianTensorType | None  # Cartesian type when the head is a tensor
    route: str  # direct | derivative
    quantity: str | None = None  # derivative route: which derivative of the energy
    reduce: str = "sum"  # graph heads from nodes: sum | mean; node and edge heads: sum | images


def _parse_head(name: str, spec: dict, energy_head: str) -> HeadSpec:
    from .response import QUANTITIES

    unknown = set(spec) - {"level", "irreps", "tensor", "route", "reduce", "quantity"}
    if unknown:
        raise ValueError(f"head {name!r}: unknown keys {sorted(unknown)}")
    route = spec.get("route", "direct")
    if route not in ("direct", "derivative"):
        raise ValueError(f"head {name!r}: route must be 'direct' or 'derivative', got {route!r}")
    if route == "derivative":
        quantity = spec.get("quantity", name)
        if quantity not in QUANTITIES:
            raise ValueError(
                f"head {name!r}: derivative quantity {quantity!r} unknown; choose from {sorted(QUANTITIES)}"
            )
        level, formula = QUANTITIES[quantity]
        if spec.get("level", level) != level:
            raise ValueError(f"head {name!r}: {quantity} is a {level}-level quantity, got level {spec['level']!r}")
        ttype = tensor_type(formula)
        if "irreps" in spec and e3nn.Irreps(spec["irreps"]) != ttype.irreps:
            raise ValueError(f"head {name!r}: {quantity} has irreps {ttype.irreps}, got {spec['irreps']!r}")
        if "tensor" in spec and tensor_type(spec["tensor"]) != ttype:
            raise ValueError(f"head {name!r}: {quantity} is tensor {ttype}, got {spec['tensor']!r}")
        return HeadSpec(level, ttype.irreps, ttype, "derivative", quantity, "sum")
    level = spec.get("level")
    if level not in LEVELS:
        raise ValueError(f"head {name!r}: level must be one of {LEVELS}, got {level!r}")
    if ("irreps" in spec) == ("tensor" in spec):
        raise ValueError(f"head {name!r}: give exactly one of 'irreps' or 'tensor'")
    ttype = tensor_type(spec["tensor"]) if "tensor" in spec else None
    irreps = ttype.irreps if ttype is not None else e3nn.Irreps(spec["irreps"])
    reduce = spec.get("reduce", "sum")
    allowed = ("sum", "mean") if level == "graph" else ("sum", "images")
    if reduce not in allowed:
        raise ValueError(f"head {name!r}: a {level} head's reduce must be one of {allowed}, got {reduce!r}")
    return HeadSpec(level, irreps, ttype, "direct", None, reduce)


def normalize_config(config: dict) -> dict:
    """Config with defaults filled in, validated, still plain JSON (a deep copy)."""
    config = copy.deepcopy(dict(config))
    architecture = get_architecture(config.get("architecture", DEFAULT_CONFIG["architecture"]))
    # An architecture's own keys are known (and filled in) only when it is chosen: the configs of the others,
    # and so their stored files and content hashes, stay what they were.
    known = set(DEFAULT_CONFIG) | set(architecture.defaults) | OPTIONAL_KEYS | {"species"}
    unknown = set(config) - known
    if unknown:
        raise ValueError(f"unknown model config keys {sorted(unknown)}; known: {sorted(known)}")
    if not config.get("species"):
        raise ValueError("model config needs 'species': the list of chemical symbols the model knows")
    full = copy.deepcopy(DEFAULT_CONFIG)
    full.update(copy.deepcopy(dict(architecture.defaults)))
    full.update(config)
    if full.get("magnetic") is False:
        del full["magnetic"]
    heads = dict(full["heads"])
    energy = full["energy_head"]
    if any(h.get("route") == "derivative" for h in heads.values()) and energy not in heads:
        heads[energy] = {"level": "graph", "irreps": "0e", "reduce": "sum"}
    full["heads"] = heads
    if not heads:
        raise ValueError("model config has no 'heads'")
    for name in full["normalization"]:
        if name not in heads:
            raise ValueError(f"normalization given for unknown head {name!r}; heads: {sorted(heads)}")
    json.dumps(full)  # must stay JSON-able (the model file stores it)
    return full


def _field_features(field: jnp.ndarray) -> e3nn.IrrepsArray:
    """phi(F) = F (1o) + F (x) F (0e + 2e) for each graph."""
    f = e3nn.IrrepsArray("1o", field)
    return e3nn.concatenate([f, e3nn.tensor_product(f, f, filter_ir_out=["0e", "2e"])])


def _scalar_mask(irreps: e3nn.Irreps) -> np.ndarray:
    return (
        np.concatenate([np.full(ir.dim * mul, ir == e3nn.Irrep("0e")) for mul, ir in irreps])
        if irreps.dim
        else np.zeros(0, bool)
    )


class EquivariantNetwork(nn.Module):
    """The flax network: graph (+ positions, cells, field overrides) -> direct heads."""

    config: dict

    @nn.compact
    def __call__(
        self, graph: Graph, positions=None, cells=None, field=None, magnetic_field=None, nuclear_moments=None
    ) -> dict[str, e3nn.IrrepsArray]:
        cfg = self.config
        species_list = cfg["species"]
        num_species = len(species_list)
        heads = {name: _parse_head(name, spec, cfg["energy_head"]) for name, spec in cfg["heads"].items()}
        direct = {k: h for k, h in heads.items() if h.route == "direct"}
        hidden = e3nn.Irreps(cfg["hidden_irreps"]).regroup()
        positions = graph.positions if positions is None else positions
        cells = graph.cells if cells is None else cells
        dtype = positions.dtype

        # Edges: geometry -> spherical harmonics + radial basis (padding edges made safe).
        vectors = safe_norm_vectors(edge_vectors(graph, positions, cells), graph.edge_mask)
        lengths = jnp.linalg.norm(vectors, axis=-1)
        sh = e3nn.spherical_harmonics(
            list(range(cfg["sh_lmax"] + 1)), e3nn.IrrepsArray("1o", vectors), normalize=True, normalization="component"
        )
        radial = radial_basis(lengths, cfg["cutoff"], cfg["num_radial_basis"], cfg["envelope_p"])
        edge_angular = [sh]
        edge_scalars = [radial]
        for name, irreps in cfg["edge_attrs"].items():
            attr = _get_attr(graph.edge_attrs, name, irreps, "edge_attrs").astype(dtype)
            edge_angular.append(attr)
            if attr.filter(keep="0e").irreps.dim:
                # Scale scalar attributes by the envelope so messages still vanish at the cutoff.
                edge_scalars.append(attr.filter(keep="0e").array * radial[:, :1])
        edge_angular = e3nn.concatenate(edge_angular).regroup()
        edge_scalars = jnp.concatenate(edge_scalars, axis=-1)

        # Nodes: species one-hot (as the constant 1 with species-indexed weights) + extra attrs.
        ones = e3nn.IrrepsArray("0e", jnp.ones((positions.shape[0], 1), dtype))
        node_inputs = [ones] + [
            _get_attr(graph.node_attrs, name, irreps, "node_attrs").astype(dtype)
            for name, irreps in cfg["node_attrs"].items()
        ]
        magnetic = bool(cfg.get("magnetic", False))
        if magnetic:
            moments, magnetic_feats = magnetic_inputs(graph, dtype, magnetic_field, nuclear_moments)
            node_inputs.append(moments)
        elif magnetic_field is not None or nuclear_moments is not None:
            raise ValueError("magnetic_field / nuclear_moments given to a model without 'magnetic': true")
        node_inputs = e3nn.concatenate(node_inputs).regroup()
        x = e3nn.flax.Linear(hidden, num_indexed_weights=num_species, force_irreps_out=True, name="embedding")(
            graph.species, node_inputs
        )

        use_field = bool(cfg["field"])
        if use_field:
            if field is None:
                field = (
                    graph.globals["field"].array if "field" in graph.globals else jnp.zeros((cells.shape[0], 3), dtype)
                )
            field_feats = _field_features(field.astype(dtype))[graph.node_graph]

        # The trunk (NequIP, MACE, Allegro...) comes from the registry; its modules are named in this scope.
        trunk_inputs = TrunkInputs(
            species=graph.species,
            edge_angular=edge_angular,
            edge_scalars=edge_scalars,
            lengths=lengths,
            senders=graph.senders,
            receivers=graph.receivers,
            edge_mask=graph.edge_mask,
            field_feats=field_feats if use_field else None,
            hidden=hidden,
        )
        x = get_architecture(cfg["architecture"]).trunk(cfg, x, trunk_inputs)
        if use_field:
            x = FieldCoupling(name="field_out")(x, field_feats)
        if magnetic:
            x = FieldCoupling(name="magnetic_out")(x, magnetic_feats)

        outputs = {}
        node_mask = graph.node_mask[:, None].astype(dtype)
        for name, head in direct.items():
            norm = cfg["normalization"].get(name, {})
            scale = float(norm.get("scale", 1.0))
            shift = norm.get("species_shift")
            if head.level == "edge":
                out = EdgeReadout(
                    head.irreps, tuple(cfg["radial_hidden"]), cfg["readout_product_mul"], name=f"head_{name}"
                )(x, edge_angular, edge_scalars, graph.senders, graph.receivers, graph.edge_mask)
                out = out * scale
                if shift is not None:
                    table = _shift_table(shift, (num_species, num_species), head.irreps, name, dtype)
                    pair_shift = table[graph.species[graph.senders], graph.species[graph.receivers]]
                    out = out + e3nn.IrrepsArray(out.irreps, pair_shift * graph.edge_mask[:, None])
                if head.reduce == "images":
                    out = sum_over_images(out, graph.senders, graph.receivers, graph.edge_mask)
                outputs[name] = out
                continue
            out = NodeReadout(head.irreps, num_species, cfg["readout_product_mul"], name=f"head_{name}")(
                x, graph.species
            )
            out = out * scale
            if shift is not None:
                out = out + e3nn.IrrepsArray(
                    out.irreps, _shift_table(shift, (num_species,), head.irreps, name, dtype)[graph.species]
                )
            out = out * node_mask
            if head.reduce == "images":  # a node head: + its coupling to its own periodic images (module docstring)
                to_images = EdgeReadout(
                    head.irreps, tuple(cfg["radial_hidden"]), cfg["readout_product_mul"], name=f"head_{name}_images"
                )(x, edge_angular, edge_scalars, graph.senders, graph.receivers, graph.edge_mask)
                self_edge = ((graph.senders == graph.receivers) & graph.edge_mask.astype(bool)).astype(dtype)
                out = out + e3nn.scatter_sum(to_images * (self_edge[:, None] * scale), dst=graph.senders,
                                             output_size=out.shape[0]) * node_mask
            if head.level == "graph":
                out = e3nn.scatter_sum(out, dst=graph.node_graph, output_size=cells.shape[0])
                if head.reduce == "mean":
                    out = out / jnp.maximum(graph.n_node, 1)[:, None].astype(dtype)
                out = out * graph.graph_mask[:, None].astype(dtype)
            outputs[name] = out
        return outputs


def _get_attr(attrs: dict, name: str, irreps, what: str) -> e3nn.IrrepsArray:
    if name not in attrs:
        raise ValueError(f"graph.{what} lacks {name!r} declared in the model config (has {sorted(attrs)})")
    attr = attrs[name]
    if attr.irreps != e3nn.Irreps(irreps):
        raise ValueError(f"graph.{what}[{name!r}] has irreps {attr.irreps}, the model config declares {irreps}")
    return attr


def _shift_table(shift, leading: tuple, irreps: e3nn.Irreps, head: str, dtype) -> jnp.ndarray:
    table = np.asarray(shift, dtype=np.float64)
    if table.shape != leading + (irreps.dim,):
        raise ValueError(
            f"normalization[{head!r}]['species_shift'] must have shape {leading + (irreps.dim,)} "
            f"(species..., irreps {irreps}), got {table.shape}"
        )
    return jnp.asarray(table * _scalar_mask(irreps), dtype=dtype)


class EquivariantModel:
    """``build_model(config)``: ``init(rng, graph)``, ``apply(params, graph)``, ``heads``.

    ``apply`` returns every head as an ``e3nn.IrrepsArray`` (node ``[N, irreps]``, edge
    ``[E, irreps]``, graph ``[G, irreps]``); derivative heads are computed from the energy head
    by :func:`aiida_eqml.ml.response.response_heads`. Wrap in ``jax.jit`` for speed.
    """

    def __init__(self, config: dict):
        self.config = normalize_config(config)
        self.species = list(self.config["species"])
        self.heads: dict[str, HeadSpec] = {
            name: _parse_head(name, spec, self.config["energy_head"]) for name, spec in self.config["heads"].items()
        }
        self.energy_head = self.config["energy_head"]
        self.derivative_heads = {k: h for k, h in self.heads.items() if h.route == "derivative"}
        if self.derivative_heads:
            from .response import FIELD_QUANTITIES

            energy = self.heads[self.energy_head]
            if energy.level != "graph" or energy.irreps != e3nn.Irreps("0e") or energy.route != "direct":
                raise ValueError(f"energy head {self.energy_head!r} must be a direct graph-level 0e head")
            if any(h.quantity in FIELD_QUANTITIES for h in self.derivative_heads.values()):
                self.config["field"] = True
        check_magnetic_config(self.config, {h.quantity for h in self.derivative_heads.values()})
        self.dtype = jnp.dtype(self.config["dtype"])
        self.network = EquivariantNetwork(self.config)

    def __repr__(self) -> str:
        return f"EquivariantModel({self.config['architecture']}, heads={list(self.heads)})"

    def init(self, rng, graph: Graph):
        """Parameters for graphs like ``graph`` (jitted; the key is re-seeded as an ``rbg`` key
        because XLA compiles threefry-heavy initialisers several times slower on CPU)."""
        graph = _cast_graph(graph, self.dtype)
        seed = int(jax.random.randint(rng, (), 0, 2**31 - 1))
        return jax.jit(self.network.init)(jax.random.key(seed, impl="rbg"), graph)

    def apply_direct(self, params, graph: Graph, positions=None, cells=None, field=None, **magnetic) -> dict:
        """Direct heads only (and the energy), with optional positions / cells / field overrides (and, for a
        magnetic model, ``magnetic_field`` [G, 3] / ``nuclear_moments`` [N, 3])."""
        return self.network.apply(params, graph, positions, cells, field, **magnetic)

    def apply(self, params, graph: Graph, heads=None) -> dict[str, e3nn.IrrepsArray]:
        """All heads (or the listed ``heads``) as irreps arrays."""
        graph = _cast_graph(graph, self.dtype)
        wanted = set(self.heads if heads is None else heads)
        unknown = wanted - set(self.heads)
        if unknown:
            raise ValueError(f"unknown heads {sorted(unknown)}; model heads: {sorted(self.heads)}")
        derivative = {k: h for k, h in self.derivative_heads.items() if k in wanted}
        out = {}
        if derivative:
            from .response import response_heads

            out.update(response_heads(self, params, graph, derivative))
        if wanted - set(derivative):
            direct = self.apply_direct(params, graph)
            out.update({k: v for k, v in direct.items() if k in wanted})
        return out


def _cast_graph(graph: Graph, dtype) -> Graph:
    """Floating inputs in the model's dtype (int/bool fields untouched)."""

    def cast(x):
        return x.astype(dtype) if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating) else x

    return graph._replace(
        positions=cast(graph.positions),
        cells=cast(graph.cells),
        shifts=cast(graph.shifts),
        node_attrs={k: v.astype(dtype) for k, v in graph.node_attrs.items()},
        edge_attrs={k: v.astype(dtype) for k, v in graph.edge_attrs.items()},
        globals={k: v.astype(dtype) for k, v in graph.globals.items()},
    )


def build_model(config: dict) -> EquivariantModel:
    """Model from a plain JSON-able config (see the module docstring for keys and defaults)."""
    return EquivariantModel(config)
