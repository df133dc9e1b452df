"""Architecture registry: the model config's ``architecture`` names one entry, and nothing else branches on it.

An architecture is the trunk of :class:`aiida_eqml.ml.models.EquivariantNetwork`: it maps the species-indexed node
embedding and the edge geometry (:class:`TrunkInputs`) to node features with the config's ``hidden_irreps``, which
the shared readout heads (node, edge, graph; :mod:`aiida_eqml.ml.layers`) turn into outputs. The network around it
(embedding, edge spherical harmonics and radial basis, field features, heads, normalisation) is the same for every
architecture, so a new one is a trunk function plus its own config keys:

=============  ============================================================================  =======================
name           trunk                                                                         own config keys
=============  ============================================================================  =======================
``nequip``     ``num_layers`` x (tensor-product convolution + gate), message passing          none
``mace``       ``num_layers`` x (convolution -> product basis of body order                   ``correlation``,
               ``correlation + 1``), message passing                                          ``mace_channels``,
                                                                                              ``mace_lmax``
``allegro``    strictly local: per-edge scalar and tensor tracks, ``num_layers`` tensor       ``allegro_channels``,
               products with the centre's environment, summed onto the centre once           ``allegro_lmax``,
               (:mod:`aiida_eqml.ml.allegro`, arXiv:2204.05249)                                ``allegro_latent``
=============  ============================================================================  =======================

A trunk is called inside the network's ``nn.compact`` method, so the flax submodules it creates are named in the
network's own scope (``layer_0``, ``field_0``...): moving the NequIP / MACE loops here left the parameter trees,
and so every model file written before the registry, unchanged. The MACE keys stay in
:data:`aiida_eqml.ml.models.DEFAULT_CONFIG` for the same reason (every stored config carries them); keys of
architectures added since live in :attr:`Architecture.defaults` and are filled in only when that architecture is
chosen, so configs of the other architectures (and their content hashes) do not change.

This module imports no jax: :mod:`aiida_eqml.ml.config_schema` reads the registry to check a config cheaply.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from .config_schema import _fail, _int

__all__ = ["Architecture", "TrunkInputs", "ARCHITECTURES", "register_architecture", "get_architecture"]


class TrunkInputs(NamedTuple):
    """What every trunk receives besides the config and the node embedding ``x`` (arrays of one padded batch)."""

    species: Any  # [N] int: index into the config's species
    edge_angular: Any  # IrrepsArray [E, sh (+ edge attrs)]: spherical harmonics of the edge vectors
    edge_scalars: Any  # [E, B]: radial basis (already times the cutoff envelope) and scalar edge attributes
    lengths: Any  # [E]: edge lengths (padding edges: 1, see layers.safe_norm_vectors)
    senders: Any  # [E] int: neighbour j of edge i <- j
    receivers: Any  # [E] int: centre i
    edge_mask: Any  # [E] bool
    field_feats: Any  # IrrepsArray [N, 1o + 0e + 2e] of the electric field, or None without a field
    hidden: Any  # e3nn.Irreps: what the trunk must return per node


@dataclasses.dataclass(frozen=True)
class Architecture:
    """One registered architecture (see the module docstring)."""

    name: str
    trunk: Callable  # (config, x, TrunkInputs) -> IrrepsArray [N, hidden]; builds flax modules in the caller
    description: str
    # config -> names of the top-level flax modules the trunk creates (a model file's weights are checked against
    # them before use, aiida_eqml.ml.modelfile_checks)
    modules: Callable[[Mapping[str, Any]], set[str]] = lambda cfg: set()
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # own config keys, filled in when chosen
    checks: Mapping[str, Callable[[str, Any], None]] = dataclasses.field(default_factory=dict)  # key -> check


ARCHITECTURES: dict[str, Architecture] = {}


def register_architecture(architecture: Architecture) -> Architecture:
    """Add an architecture to the registry (a name is registered once: a model file names it for good)."""
    if architecture.name in ARCHITECTURES:
        raise ValueError(f"architecture {architecture.name!r} is already registered")
    ARCHITECTURES[architecture.name] = architecture
    return architecture


def get_architecture(name: str) -> Architecture:
    try:
        return ARCHITECTURES[name]
    except (KeyError, TypeError):
        raise ValueError(f"architecture must be one of {sorted(ARCHITECTURES)}, got {name!r}") from None


# ---------------------------------------------------------------------------------------------------- built-ins
def _message_passing(layer: Callable) -> Callable:
    """Trunk of ``num_layers`` interaction layers, each preceded by a field coupling when the model sees a field."""

    def trunk(cfg: Mapping[str, Any], x, inputs: TrunkInputs):
        from .layers import FieldCoupling

        common = dict(
            num_species=len(cfg["species"]),
            avg_num_neighbors=float(cfg["avg_num_neighbors"]),
            radial_hidden=tuple(cfg["radial_hidden"]),
        )
        for i in range(cfg["num_layers"]):
            if inputs.field_feats is not None:
                x = FieldCoupling(name=f"field_{i}")(x, inputs.field_feats)
            x = layer(cfg, inputs.hidden, f"layer_{i}", common)(
                x,
                inputs.species,
                inputs.edge_angular,
                inputs.edge_scalars,
                inputs.senders,
                inputs.receivers,
                inputs.edge_mask,
            )
        return x

    return trunk


def _message_passing_modules(cfg: Mapping[str, Any]) -> set[str]:
    layers = range(cfg["num_layers"])
    return {f"layer_{i}" for i in layers} | ({f"field_{i}" for i in layers} if cfg["field"] else set())


def _nequip_layer(cfg, hidden, name, common):
    from .layers import NequIPLayer

    return NequIPLayer(hidden, name=name, **common)


def _mace_layer(cfg, hidden, name, common):
    from .layers import MACELayer

    return MACELayer(
        hidden,
        correlation=int(cfg["correlation"]),
        channels=int(cfg["mace_channels"]),
        lmax_a=int(cfg["mace_lmax"]),
        name=name,
        **common,
    )


def _allegro_trunk(cfg, x, inputs: TrunkInputs):
    from .allegro import allegro_trunk

    return allegro_trunk(cfg, x, inputs)


def _widths(key: str, value) -> None:
    if not isinstance(value, (list, tuple)) or not value:
        _fail(key, value, "a non-empty list of layer widths")
    for width in value:
        _int(f"{key} entry", width, 1, 4096)


register_architecture(
    Architecture(
        "nequip",
        _message_passing(_nequip_layer),
        "tensor-product convolution + gate (message passing)",
        _message_passing_modules,
    )
)
register_architecture(
    Architecture(
        "mace",
        _message_passing(_mace_layer),
        "convolution + product basis of body order correlation + 1",
        _message_passing_modules,
    )
)
register_architecture(
    Architecture(
        "allegro",
        _allegro_trunk,
        "strictly local edge-based tensor products (no message passing between atoms)",
        lambda cfg: {"allegro"} | ({"field_0"} if cfg["field"] else set()),
        defaults={"allegro_channels": 8, "allegro_lmax": 2, "allegro_latent": [32, 32]},
        checks={
            "allegro_channels": lambda k, v: _int(k, v, 1, 4096),
            "allegro_lmax": lambda k, v: _int(k, v, 0, 6),
            "allegro_latent": _widths,
        },
    )
)
