"""Response properties as derivatives of a field-dependent energy E(R, eps, F).

The energy head of a model (graph-level 0e) sees the positions R, the cell (strained by eps)
and a uniform electric field F (V/Angstrom, one 1o vector per graph), so
E(R, F) = U(R) - P(R).F - 1/2 F.alpha(R).F + ... and, by jax autodiff:

=================  ======  ========================================================  ==========
quantity           level   definition                                                unit
=================  ======  ========================================================  ==========
``forces``         node    -dE/dR                                                    eV/A
``stress``         graph   (1/Omega) dE/d eps  (ASE sign convention)                  eV/A^3
``dipole``         graph   -dE/dF                                                    e A
``polarization``   graph   -(1/Omega) dE/dF                                          e/A^2
``born_charges``   node    Z*_{I,ab} = -d2E/dF_a dtau_Ib                             e
``susceptibility`` graph   chi_ab = -(1/(4 pi eps0 Omega)) d2E/dF_a dF_b              1
``dielectric``     graph   eps_inf = 1 + 4 pi chi                                    1
``raman``          node    chi_{I,abc} = d chi_ab / dtau_Ic                          1/A
``nmr_shielding``  node    sigma_{I,ab} = d2E/dB_a dmu_{I,b} (:mod:`.magnetic`)      ppm
=================  ======  ========================================================  ==========

with eps0 = 0.00552635 e/(V A). Field derivatives are taken at the graph's field (zero unless
``graph.globals["field"]`` is set). Mixed derivatives are forward-over-reverse: one reverse pass
gives dE/dR and dE/dF; ``jax.jvp`` along the three field directions (vmapped) gives the
second derivatives, and a nested jvp along field pairs gives the Raman third derivatives.
Translation invariance of E makes sum_I Z*_I = 0 and sum_I chi_I = 0 exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import e3nn_jax as e3nn
import jax
import jax.numpy as jnp
import numpy as np

from .graph import Graph
from .magnetic import magnetic_heads
from .targets import FIELD_QUANTITIES, MAGNETIC_QUANTITIES, RESPONSE_QUANTITIES
from .tensors import tensor_type

__all__ = ["EPS0", "QUANTITIES", "FIELD_QUANTITIES", "response_cartesian", "response_heads", "model_energy_fn"]

#: vacuum permittivity in e / (V Angstrom)
EPS0 = 0.00552635

#: quantity -> (level, Cartesian formula); defined once, with the units, in :mod:`aiida_eqml.ml.targets`
QUANTITIES = RESPONSE_QUANTITIES

# Unique field pairs (a <= b) for the symmetric second field derivative in the Raman tensor.
_PAIRS = np.array([(0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2)])


def model_energy_fn(model, params, graph: Graph) -> Callable:
    """``(positions [N,3], cells [G,3,3], field [G,3]) -> energies [G]`` of a model's energy head."""

    def energy(positions, cells, field):
        out = model.apply_direct(params, graph, positions=positions, cells=cells, field=field)
        return out[model.energy_head].array[:, 0]

    return energy


def response_cartesian(energy_fn: Callable, graph: Graph, quantities, field=None) -> dict[str, jnp.ndarray]:
    """Cartesian response quantities of ``energy_fn(positions, cells, field) -> [G]``.

    Returns ``{"energy": [G]} | {q: array}`` for each requested quantity (shapes: node
    ``[N, 3, ...]``, graph ``[G, 3, ...]``), masked on padding.
    """
    quantities = set(quantities)
    unknown = quantities - set(QUANTITIES)
    if unknown:
        raise ValueError(f"unknown response quantities {sorted(unknown)}; known {sorted(QUANTITIES)}")
    if quantities & MAGNETIC_QUANTITIES:
        # energy_fn(positions, cells, field) has no magnetic inputs to differentiate in.
        raise ValueError(
            f"{sorted(quantities & MAGNETIC_QUANTITIES)} are derivatives in B and mu: use "
            "aiida_eqml.ml.magnetic.shielding_cartesian with a model built with 'magnetic': true"
        )
    positions, cells = graph.positions, graph.cells
    dtype = positions.dtype
    n_graph = cells.shape[0]
    if field is None:
        field = graph.globals["field"].array if "field" in graph.globals else jnp.zeros((n_graph, 3), dtype)
    field = field.astype(dtype)
    graph_mask = graph.graph_mask
    gmask = graph_mask.astype(dtype)
    nmask = graph.node_mask.astype(dtype)
    # Volume of padding graphs set to 1 so that masked divisions stay finite.
    volume = jnp.where(graph_mask, jnp.abs(jnp.linalg.det(cells)), 1.0)
    strain0 = jnp.zeros((n_graph, 3, 3), dtype)

    def total_energy(pos, strain, f):
        # Homogeneous strain: x -> x (1 + eps), cell rows -> rows (1 + eps).
        deform = jnp.eye(3, dtype=dtype) + strain
        pos = jnp.einsum("ni,nij->nj", pos, deform[graph.node_graph])
        cel = jnp.einsum("gij,gjk->gik", cells, deform)
        energies = energy_fn(pos, cel, f) * gmask
        return jnp.sum(energies), energies

    def grad_pos_field(f):
        return jax.grad(lambda p, g: total_energy(p, strain0, g)[0], argnums=(0, 1))(positions, f)

    out = {}
    need_strain = "stress" in quantities
    argnums = (0, 1, 2) if need_strain else (0, 2)
    (_, energies), grads = jax.value_and_grad(total_energy, argnums=argnums, has_aux=True)(positions, strain0, field)
    out["energy"] = energies
    grads = dict(zip(argnums, grads))
    if "forces" in quantities:
        out["forces"] = -grads[0] * nmask[:, None]
    if need_strain:
        s = grads[1] / volume[:, None, None]
        out["stress"] = 0.5 * (s + jnp.swapaxes(s, 1, 2)) * gmask[:, None, None]
    if "dipole" in quantities:
        out["dipole"] = -grads[2] * gmask[:, None]
    if "polarization" in quantities:
        out["polarization"] = -grads[2] / volume[:, None] * gmask[:, None]

    directions = jnp.broadcast_to(jnp.eye(3, dtype=dtype)[:, None, :], (3, n_graph, 3))
    chi_factor = -1.0 / (4.0 * jnp.pi * EPS0 * volume)

    if quantities & {"born_charges", "susceptibility", "dielectric"}:
        # d/dF_a of (dE/dR, dE/dF): vmapped forward-mode over the three field directions.
        def along(t):
            return jax.jvp(grad_pos_field, (field,), (t,))[1]

        d2_field_pos, d2_field_field = jax.vmap(along)(directions)  # [a, N, b], [a, G, b]
        if "born_charges" in quantities:
            out["born_charges"] = -jnp.transpose(d2_field_pos, (1, 0, 2)) * nmask[:, None, None]
        chi = jnp.transpose(d2_field_field, (1, 0, 2)) * chi_factor[:, None, None]
        chi = 0.5 * (chi + jnp.swapaxes(chi, 1, 2)) * gmask[:, None, None]
        if "susceptibility" in quantities:
            out["susceptibility"] = chi
        if "dielectric" in quantities:
            out["dielectric"] = (jnp.eye(3, dtype=dtype) + 4.0 * jnp.pi * chi) * gmask[:, None, None]

    if "raman" in quantities:
        # d2/dF_a dF_b of dE/dR for the 6 unique pairs: jvp over jvp over grad.
        def along_pair(ta, tb):
            def first(f):
                return jax.jvp(lambda g: grad_pos_field(g)[0], (f,), (ta,))[1]

            return jax.jvp(first, (field,), (tb,))[1]

        d3 = jax.vmap(along_pair)(directions[_PAIRS[:, 0]], directions[_PAIRS[:, 1]])  # [pair, N, c]
        full = jnp.zeros((3, 3) + d3.shape[1:], dtype)
        full = full.at[_PAIRS[:, 0], _PAIRS[:, 1]].set(d3).at[_PAIRS[:, 1], _PAIRS[:, 0]].set(d3)
        raman = jnp.transpose(full, (2, 0, 1, 3)) * chi_factor[graph.node_graph][:, None, None, None]
        out["raman"] = raman * nmask[:, None, None, None]

    return out


def response_heads(model, params, graph: Graph, heads: dict) -> dict[str, e3nn.IrrepsArray]:
    """Derivative-route heads of ``model`` as irreps arrays (same irreps as the direct heads)."""
    magnetic = {k: h for k, h in heads.items() if h.quantity in MAGNETIC_QUANTITIES}
    heads = {k: h for k, h in heads.items() if k not in magnetic}
    out = {}
    if magnetic:
        out.update(magnetic_heads(model, params, graph, magnetic))
    if not heads:
        return out
    quantities = {h.quantity for h in heads.values()}
    cart = response_cartesian(model_energy_fn(model, params, graph), graph, quantities)
    for name, head in heads.items():
        ttype = head.tensor if head.tensor is not None else tensor_type(QUANTITIES[head.quantity][1])
        out[name] = ttype.to_irreps(cart[head.quantity])
    return out
