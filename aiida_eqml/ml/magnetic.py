"""Magnetic response: the NMR shielding tensor as a mixed derivative of a B- and mu-dependent energy E(R, B, mu).

With ``"magnetic": true`` in the model config the network sees two pseudovector (``1e``, even under inversion)
inputs besides the geometry:

* a uniform magnetic field B, one vector per graph (``graph.globals["magnetic_field"]``, ``IrrepsArray("1e")``
  ``[G, 3]``, zero when absent), coupled into the node features after the trunk by
  x <- x + W [x (x) phi(B)], phi(B) = B (1e) + B (x) B (0e + 2e) (:class:`aiida_eqml.ml.layers.FieldCoupling`,
  module ``magnetic_out``; the identity at B = 0);
* a nuclear magnetic moment mu_I per atom (``graph.node_attrs["nuclear_moments"]``, ``IrrepsArray("1e")``
  ``[N, 3]``, zero when absent), an extra input of the species-indexed node embedding, so it reaches the ``1e``
  hidden features of its own atom and, through the trunk, of its neighbours.

The energy head then contains terms sum_I B.sigma_I(R).mu_I with sigma_I any rank-2 tensor (0e + 1e + 2e) that the
trunk's features can represent, and

    sigma_{I,ab} = d2E / dB_a dmu_{I,b}      at B = 0, mu = 0 (or at the graph's B and mu)

(sign, index order and unit: the ``nmr_shielding`` entry of :mod:`aiida_eqml.ml.targets`). It is computed like the
Born charges of :mod:`aiida_eqml.ml.response`: one reverse pass gives dE/dmu [N, 3], ``jax.jvp`` along the three
field directions (vmapped, every graph at once) differentiates it in B, so one compiled program per padded shape
serves any number of atoms. mu_I moves with every periodic image of atom I, so sigma_I is the response to the
lattice of moments; with the model's finite receptive field that is a per-site quantity, equal in a supercell.

At B = 0 and mu = 0 the coupling is the identity and mu adds zeros to the embedding, so the energy, forces, Born
charges... of a magnetic model are functions of the geometry (and F) alone; it is still a larger network than the
same config without the flag (its 1e embedding channels are no longer structurally zero, so e3nn-jax builds the
paths that read them). A model without the flag is the model of before: same config, parameter tree and outputs.
"""

from __future__ import annotations

from collections.abc import Callable

import e3nn_jax as e3nn
import jax
import jax.numpy as jnp

from .graph import Graph
from .targets import MAGNETIC_QUANTITIES

__all__ = [
    "MAGNETIC_FLAG",
    "MAGNETIC_QUANTITIES",
    "check_magnetic_config",
    "magnetic_inputs",
    "magnetic_energy_fn",
    "shielding_cartesian",
    "magnetic_heads",
]

#: the model config key that switches the magnetic inputs on (absent = off: configs of before stay as they were)
MAGNETIC_FLAG = "magnetic"


def _missing_flag(what: str) -> ValueError:
    return ValueError(
        f"{what} is a derivative in the magnetic field B and the nuclear moments mu: the model must take them as "
        f"inputs; set {MAGNETIC_FLAG!r}: true in the model config"
    )


def check_magnetic_config(config: dict, quantities) -> None:
    """Raise ``ValueError`` when magnetic ``quantities`` are asked of a config that cannot give them."""
    wanted = sorted(set(quantities) & MAGNETIC_QUANTITIES)
    if not config.get(MAGNETIC_FLAG, False):
        if wanted:
            raise _missing_flag(", ".join(wanted))
        return
    if "1e" not in {str(ir) for _, ir in e3nn.Irreps(config["hidden_irreps"])}:
        # mu enters through the 1e channels of the embedding: without them the trunk drops it and sigma is 0.
        raise ValueError(
            f"{MAGNETIC_FLAG!r}: true needs 1e channels in hidden_irreps (the nuclear moments are 1e), "
            f"got {config['hidden_irreps']!r}"
        )


def _magnetic_features(bfield: jnp.ndarray) -> e3nn.IrrepsArray:
    """phi(B) = B (1e) + B (x) B (0e + 2e) for each graph: first order gives the shielding, second the
    magnetisability, as phi(F) does for the electric field."""
    b = e3nn.IrrepsArray("1e", bfield)
    return e3nn.concatenate([b, e3nn.tensor_product(b, b, filter_ir_out=["0e", "2e"])])


def _values(graph: Graph, dtype, magnetic_field=None, nuclear_moments=None) -> tuple[jnp.ndarray, jnp.ndarray]:
    """``(B [G, 3], mu [N, 3])``: the overrides, else the graph's entries, else zero."""
    if magnetic_field is None:
        entry = graph.globals.get("magnetic_field")
        magnetic_field = entry.array if entry is not None else jnp.zeros((graph.cells.shape[0], 3), dtype)
    if nuclear_moments is None:
        entry = graph.node_attrs.get("nuclear_moments")
        nuclear_moments = entry.array if entry is not None else jnp.zeros((graph.positions.shape[0], 3), dtype)
    return magnetic_field.astype(dtype), nuclear_moments.astype(dtype)


def magnetic_inputs(graph: Graph, dtype, magnetic_field=None, nuclear_moments=None):
    """``(mu as IrrepsArray 1e [N, 3], phi(B) broadcast to the nodes)`` for the network."""
    bfield, moments = _values(graph, dtype, magnetic_field, nuclear_moments)
    return e3nn.IrrepsArray("1e", moments), _magnetic_features(bfield)[graph.node_graph]


def magnetic_energy_fn(model, params, graph: Graph) -> Callable:
    """``(bfield [G, 3], moments [N, 3]) -> energies [G]`` of a magnetic model's energy head."""
    if not model.config.get(MAGNETIC_FLAG, False):
        raise _missing_flag("the magnetic energy E(R, B, mu)")

    def energy(bfield, moments):
        out = model.apply_direct(params, graph, magnetic_field=bfield, nuclear_moments=moments)
        return out[model.energy_head].array[:, 0]

    return energy


def shielding_cartesian(energy_fn: Callable, graph: Graph, bfield=None, moments=None) -> jnp.ndarray:
    """sigma_{I,ab} = d2E/dB_a dmu_{I,b} ``[N, 3, 3]`` of ``energy_fn(bfield [G,3], moments [N,3]) -> [G]``,
    at the given B and mu (default: the graph's, else zero), zero on padding nodes."""
    dtype = graph.positions.dtype
    bfield, moments = _values(graph, dtype, bfield, moments)
    gmask = graph.graph_mask.astype(dtype)

    def grad_moments(b):
        return jax.grad(lambda m: jnp.sum(energy_fn(b, m) * gmask))(moments)

    # B_a is one direction for all graphs at once: each node's dE/dmu depends only on its own graph's B.
    directions = jnp.broadcast_to(jnp.eye(3, dtype=dtype)[:, None, :], (3,) + bfield.shape)
    d2 = jax.vmap(lambda t: jax.jvp(grad_moments, (bfield,), (t,))[1])(directions)  # [a, N, b]
    return jnp.transpose(d2, (1, 0, 2)) * graph.node_mask.astype(dtype)[:, None, None]


def magnetic_heads(model, params, graph: Graph, heads: dict) -> dict[str, e3nn.IrrepsArray]:
    """The magnetic derivative heads of ``model`` (all ``nmr_shielding`` today) as irreps arrays."""
    check_magnetic_config(model.config, {h.quantity for h in heads.values()})
    sigma = shielding_cartesian(magnetic_energy_fn(model, params, graph), graph)
    return {name: head.tensor.to_irreps(sigma) for name, head in heads.items()}
