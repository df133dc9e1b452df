"""Irreps bookkeeping shared by the equivariant layers (:mod:`aiida_eqml.ml.layers`).

* :func:`_irs`: the bare irrep list to pass as ``filter_ir_out`` (works around e3nn-jax 0.21).
* :func:`gate_irreps`: the irreps to feed ``e3nn.gate`` so that it returns the wanted irreps.
"""

from __future__ import annotations

import e3nn_jax as e3nn

__all__ = ["gate_irreps"]


def _irs(irreps) -> list[e3nn.Irrep]:
    """Irrep list for ``filter_ir_out``: e3nn-jax 0.21 misreads an ``Irreps`` with
    multiplicities there (it builds ``Irrep(mul_ir)``), so always pass bare irreps."""
    return sorted({ir for _, ir in e3nn.Irreps(irreps)})


def gate_irreps(irreps_out: e3nn.Irreps) -> e3nn.Irreps:
    """Irreps to feed ``e3nn.gate`` so that it returns ``irreps_out`` (extra scalars as gates)."""
    irreps_out = e3nn.Irreps(irreps_out).regroup()
    scalars = e3nn.Irreps([(mul, ir) for mul, ir in irreps_out if ir.l == 0])
    vectors = e3nn.Irreps([(mul, ir) for mul, ir in irreps_out if ir.l > 0])
    num_gates = vectors.num_irreps
    return (scalars + e3nn.Irreps(f"{num_gates}x0e") + vectors).simplify() if num_gates else scalars
