"""An ASE calculator over a :class:`~aiida_eqml.ml.predict.Predictor`: every head of the model(s) as ``results``.

>>> atoms.calc = EqmlCalculator("run/model.eqml")      # or a Predictor, [files], an ensemble directory
>>> atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
>>> atoms.calc.get_property("born_charges")             # [n, 3, 3] e; "dielectric" [3, 3], "raman" [n, 3, 3, 3] ...

ASE conventions where ASE has one: ``energy`` (and ``free_energy``) a float in eV from the model's energy head,
``forces`` ``[n, 3]`` eV/A, ``stress`` Voigt ``[6]`` (xx, yy, zz, yz, xz, xy) eV/A^3. Every other head keeps its
name and the Predictor's layout (Cartesian tensors; a one-component ``0e`` head such as ``hubbard_u`` is squeezed to
``[n]``; edge heads come with ``<name>_keys``). Ensembles add ``<name>_std`` for each of them (the population
standard deviation over the members, in the same layout).

Node / edge attributes a model reads (e.g. Hubbard descriptors) are taken from ``atoms.arrays`` or given to the
calculator as ``node_attrs`` / ``edge_attrs`` (the layout of :meth:`Predictor.predict`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from ase.calculators.calculator import Calculator, all_changes
from ase.stress import full_3x3_to_voigt_6_stress

from aiida_eqml.ml.predict import Predictor, load_predictor

__all__ = ["EqmlCalculator"]


class EqmlCalculator(Calculator):
    """ASE calculator for an aiida-eqml model or ensemble (see the module docstring)."""

    def __init__(
        self,
        predictor,
        node_attrs: Mapping[str, Any] | None = None,
        edge_attrs: Mapping[str, Any] | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.predictor = predictor if isinstance(predictor, Predictor) else load_predictor(predictor, cache=True)
        self.node_attrs = dict(node_attrs or {})
        self.edge_attrs = dict(edge_attrs or {})
        self._names = self._result_names()
        names = set(self._names.values())
        if self.predictor.energy_head in self.predictor.heads:
            names.add("free_energy")
        if len(self.predictor) > 1:
            names |= {f"{n}_std" for n in names if not n.endswith("_keys")}
        self.implemented_properties = sorted(names)

    def _result_names(self) -> dict[str, str]:
        """Predictor key -> ASE result name."""
        names = {}
        for name, head in self.predictor.heads.items():
            quantity = head.quantity or name
            if name == self.predictor.energy_head:
                names[name] = "energy"
            elif quantity in ("forces", "stress") and head.level == {"forces": "node", "stress": "graph"}[quantity]:
                names[name] = quantity
            else:
                names[name] = name
            if head.level == "edge":
                names[f"{name}_keys"] = f"{names[name]}_keys"
        return names

    def _convert(self, key: str, ase_name: str, value: np.ndarray):
        head = self.predictor.heads[key]
        value = np.asarray(value, np.float64)
        if ase_name == "energy":
            return float(value.reshape(-1)[0])
        if ase_name == "stress":
            return full_3x3_to_voigt_6_stress(value)
        if head.tensor is None and head.irreps.dim == 1:  # a scalar head: [n] / [E] / float
            value = value[..., 0]
            return float(value) if head.level == "graph" else value
        return value

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        self.results = self.to_results(
            self.predictor.predict(self.atoms, node_attrs=self.node_attrs, edge_attrs=self.edge_attrs)
        )

    def to_results(self, out: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """A :meth:`Predictor.predict` output in this calculator's names and layout (``aiida-eqml predict`` too)."""
        results = {}
        for key, ase_name in self._names.items():
            if key.endswith("_keys") and key not in self.predictor.heads:
                results[ase_name] = out[key]
                continue
            results[ase_name] = self._convert(key, ase_name, out[key])
            if f"{key}_std" in out:
                results[f"{ase_name}_std"] = self._convert(key, ase_name, out[f"{key}_std"])
        if "energy" in results:
            results["free_energy"] = results["energy"]
            if "energy_std" in results:
                results["free_energy_std"] = results["energy_std"]
        return results

    def per_atom(self, name: str) -> bool:
        """Whether result ``name`` has one row per atom (a node head or its ``_std``)."""
        key = next((k for k, v in self._names.items() if v == name.removesuffix("_std")), None)
        return key in self.predictor.heads and self.predictor.heads[key].level == "node"
