"""Equivariant building blocks (flax modules on ``e3nn.IrrepsArray``).

* :func:`radial_basis`: Bessel functions times a smooth polynomial envelope (NequIP / MACE).
* :class:`NequIPLayer`: tensor-product convolution with edge spherical harmonics whose weights
  come from a radial MLP, species-indexed self-connection, gated nonlinearity, residual.
* :class:`MACELayer`: the same convolution builds the atomic basis ``A``; a product basis of
  ``A`` with itself up to ``correlation`` (body order ``correlation + 1``) is then mixed linearly
  (our own small product basis: ``e3nn_jax`` ships the symmetric contraction only for haiku).
* :class:`FieldCoupling`: couples node features to a global field (electric field, 1o) so that
  an energy head becomes a general equivariant function E(R, F).
* :class:`NodeReadout`, :class:`EdgeReadout`: readouts to any irreps.

This package only re-exports (import the names from here); the code lives in five submodules:
:mod:`.irreps` (irreps helpers) and :mod:`.radial` (radial basis, edge vectors, radial MLPs), which import neither
of the others; :mod:`.convolution` (the point convolution, fused and reference; uses both);
:mod:`.interaction` (NequIP / MACE layers, field coupling; uses ``convolution`` and ``irreps``) and
:mod:`.readout` (node and edge readout heads; uses ``irreps`` and ``radial``). No submodule imports this package.

All modules work on padded arrays; padding edges are masked before aggregation.
"""

from __future__ import annotations

from .convolution import Convolution, fused_convolution
from .convolution import _conv_plan as _conv_plan
from .convolution import _conv_plan_cached as _conv_plan_cached
from .convolution import _ConvPlan as _ConvPlan
from .convolution import _weight_columns as _weight_columns
from .interaction import FieldCoupling, MACELayer, NequIPLayer
from .irreps import _irs as _irs
from .irreps import gate_irreps
from .radial import RadialMLP, radial_basis, safe_norm_vectors
from .radial import _FactorisedMLP as _FactorisedMLP
from .radial import _FactorisedRadialMLP as _FactorisedRadialMLP
from .radial import _Kernel as _Kernel
from .readout import EdgeReadout, NodeReadout
from .readout import _require as _require

__all__ = [
    "radial_basis",
    "safe_norm_vectors",
    "RadialMLP",
    "Convolution",
    "fused_convolution",
    "NequIPLayer",
    "MACELayer",
    "FieldCoupling",
    "NodeReadout",
    "EdgeReadout",
    "gate_irreps",
]
