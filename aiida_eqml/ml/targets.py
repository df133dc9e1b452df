"""The one registry of target names: level, Cartesian formula (or irreps), unit, and which energy derivative it is.

Loaders (``datasets/bto.py``, ``hubbard/records.py``), the AiiDA harvesters (``calculations/functions/harvest.py``),
the derivative heads (:mod:`aiida_eqml.ml.response`), the calculator and the docs read it, so a name means the same
thing everywhere (as NequIP's ``AtomicDataDict`` keys do). A dataset stores a target's spec
(:func:`target_spec`: ``{"level", "tensor" | "irreps", "unit"}``) next to its arrays, so a file written by another
version still says what it holds; a name not in the registry is allowed (a user's own target) but then the dataset
must give its spec.

==================  ======  =============  ================  ==================================================
name                level   Cartesian      unit              meaning
==================  ======  =============  ================  ==================================================
``energy``          graph   0e             eV                total energy (the energy head of derivative heads)
``forces``          node    ``i``          eV/Angstrom       -dE/dR
``stress``          graph   ``ij=ji``      eV/Angstrom^3     (1/Omega) dE/d eps (ASE sign convention)
``dipole``          graph   ``i``          e*Angstrom        -dE/dF
``polarization``    graph   ``i``          e/Angstrom^2      -(1/Omega) dE/dF
``born_charges``    node    ``ij``         e                 Z*_{I,ab} = dP_a/dtau_Ib (a: field, b: displacement)
``susceptibility``  graph   ``ij=ji``      1                 chi = (eps_inf - 1) / (4 pi)
``dielectric``      graph   ``ij=ji``      1                 eps_inf
``raman``           node    ``ijk=jik``    1/Angstrom        chi_{I,abc} = d chi_ab / dtau_Ic
``raman_tensors``   node    ``ijk=jik``    1/Angstrom        the same quantity under the bto400 data's name
``nmr_shielding``   node    ``ij`` (1e)    ppm               sigma_{I,ab} = d2E/dB_a dmu_{I,b} (B, mu axial: 1e)
``hubbard_u``       node    0e             eV                on-site Hubbard U (hp.x)
``hubbard_v``       edge    0e             eV                inter-site Hubbard V of edge i <- j at cell S
==================  ======  =============  ================  ==================================================

``quantity`` names the response quantity (:data:`RESPONSE_QUANTITIES`) a derivative head computes for that
target; ``field`` marks the quantities that need the electric field, ``magnetic`` those that need the magnetic
inputs (the model config's ``magnetic`` flag: a uniform field B per graph and a nuclear moment mu_I per atom, both
pseudovectors ``1e``). ``index_irreps`` gives the irreps of a tensor's indices when they are not polar (``1o``).

NMR shielding convention: E is the electronic energy of the energy head *without* the bare nuclear Zeeman term
-mu_I.B, and sigma_{I,ab} = d2E/dB_a dmu_{I,b} at B = 0, mu = 0 (first index the field, second the moment, as for
Born charges), so the field at nucleus I is B_loc,b = B_b - sum_a B_a sigma_{I,ab} and a positive isotropic
shielding is diamagnetic (Ramsey's definition, as in Helgaker, Jaszunski and Ruud, Chem. Rev. 99, 293 (1999)).
Unit: ppm (sigma is dimensionless, labels x 1e6), the unit GIPAW (QE, CASTEP) and molecular codes print; B and mu
are internal inputs whose units make d2E/dB dmu come out in ppm, so no physical constant enters the model and the
labels (tens to thousands of ppm) train at O(1) scale instead of 1e-6. Chemical shifts delta = sigma_ref - sigma_iso
need a reference and are not a target. Pure Python: no jax at import.
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = [
    "Target",
    "TARGETS",
    "RESPONSE_QUANTITIES",
    "FIELD_QUANTITIES",
    "MAGNETIC_QUANTITIES",
    "target",
    "target_spec",
    "target_specs",
    "head_spec",
]


@dataclasses.dataclass(frozen=True)
class Target:
    """One target name (see the module table)."""

    level: str  # node | edge | graph
    unit: str
    description: str
    tensor: str | None = None  # Cartesian formula (aiida_eqml.ml.tensors), or None for an irreps target
    irreps: str | None = None  # irreps of a target without a Cartesian form
    quantity: str | None = None  # the response quantity (energy derivative) it is, if any
    field: bool = False  # the quantity is a field derivative: the network must see the electric field
    magnetic: bool = False  # a derivative in B and mu: the model config must set "magnetic": true
    index_irreps: tuple[tuple[str, str], ...] | None = None  # (index, "1o" | "1e") of a tensor's axial indices

    def spec(self) -> dict[str, Any]:
        """What a dataset stores for this target: ``{"level", "tensor" | "irreps", "unit"}``."""
        return {**self.head(), "unit": self.unit}

    def head(self) -> dict[str, Any]:
        """The direct model head that predicts it: ``{"level", "tensor" | "irreps"}`` (``aiida_eqml.ml.models``)."""
        shape = {"tensor": self.tensor_spec()} if self.tensor is not None else {"irreps": self.irreps}
        return {"level": self.level, **shape}

    def tensor_spec(self) -> str | dict[str, Any] | None:
        """The Cartesian type as :func:`aiida_eqml.ml.tensors.tensor_type` reads it: the formula, or
        ``{"formula", "index_irreps"}`` when some index is axial."""
        if self.tensor is None or self.index_irreps is None:
            return self.tensor
        return {"formula": self.tensor, "index_irreps": dict(self.index_irreps)}


TARGETS: dict[str, Target] = {
    "energy": Target("graph", "eV", "total energy", irreps="0e"),
    "forces": Target("node", "eV/Angstrom", "-dE/dR", tensor="i", quantity="forces"),
    "stress": Target("graph", "eV/Angstrom^3", "(1/Omega) dE/d eps, ASE sign", tensor="ij=ji", quantity="stress"),
    "dipole": Target("graph", "e*Angstrom", "-dE/dF", tensor="i", quantity="dipole", field=True),
    "polarization": Target(
        "graph", "e/Angstrom^2", "-(1/Omega) dE/dF", tensor="i", quantity="polarization", field=True
    ),
    "born_charges": Target("node", "e", "Z*_{I,ab} = dP_a/dtau_Ib", tensor="ij", quantity="born_charges", field=True),
    "susceptibility": Target(
        "graph", "1", "chi = (eps_inf - 1)/(4 pi)", tensor="ij=ji", quantity="susceptibility", field=True
    ),
    "dielectric": Target("graph", "1", "eps_inf", tensor="ij=ji", quantity="dielectric", field=True),
    "raman": Target("node", "1/Angstrom", "d chi_ab / dtau_Ic", tensor="ijk=jik", quantity="raman", field=True),
    "raman_tensors": Target(
        "node", "1/Angstrom", "d chi_ab / dtau_Ic (bto400 name)", tensor="ijk=jik", quantity="raman", field=True
    ),
    "nmr_shielding": Target(
        "node",
        "ppm",
        "sigma_{I,ab} = d2E/dB_a dmu_{I,b} (a: field, b: moment)",
        tensor="ij",
        index_irreps=(("i", "1e"), ("j", "1e")),
        quantity="nmr_shielding",
        magnetic=True,
    ),
    "hubbard_u": Target("node", "eV", "on-site Hubbard U", irreps="0e"),
    "hubbard_v": Target("edge", "eV", "inter-site Hubbard V", irreps="0e"),
}

#: response quantity -> (level, Cartesian type: a formula, or {"formula", "index_irreps"}): what its head returns.
RESPONSE_QUANTITIES: dict[str, tuple[str, str | dict]] = {
    t.quantity: (t.level, t.tensor_spec())
    for name, t in TARGETS.items()
    if t.quantity is not None and name == t.quantity
}
#: the response quantities that are derivatives with respect to the electric field.
FIELD_QUANTITIES: frozenset[str] = frozenset(t.quantity for t in TARGETS.values() if t.field)
#: the response quantities that are derivatives with respect to the magnetic inputs (B, mu).
MAGNETIC_QUANTITIES: frozenset[str] = frozenset(t.quantity for t in TARGETS.values() if t.magnetic)


def target(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise KeyError(f"unknown target {name!r}; known: {sorted(TARGETS)}") from None


def target_spec(name: str) -> dict[str, Any]:
    """``{"level", "tensor" | "irreps", "unit"}`` of a registered target (a fresh dict)."""
    return target(name).spec()


def target_specs(*names: str) -> dict[str, dict[str, Any]]:
    """``{name: target_spec(name)}`` in the given order."""
    return {name: target_spec(name) for name in names}


def head_spec(name: str) -> dict[str, Any]:
    """``{"level", "tensor" | "irreps"}``: the direct model head of a registered target (a fresh dict)."""
    return target(name).head()
