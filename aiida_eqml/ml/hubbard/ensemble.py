"""The Hubbard view of an :class:`aiida_eqml.ml.ensemble.Ensemble`: U / V with their committee spread.

Members, checks, files (``ensemble.json`` + ``member_XX.eqml``) and training are those of the generic ensemble;
this subclass only gives its predictions in the layout the Hubbard code reads, per sample
``{"hubbard_u": (mean [n], std [n]), "hubbard_v": (keys, mean [M], std [M])}``, from a Hubbard record (raw
occupations) or its descriptor dataset (:meth:`aiida_eqml.ml.predict.Predictor.predict_hubbard`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from aiida_eqml.ml import ensemble as _generic
from aiida_eqml.ml.dataset import Dataset, build_graphs

__all__ = ["ENSEMBLE_FORMAT", "Ensemble", "train_ensemble"]

ENSEMBLE_FORMAT = _generic.ENSEMBLE_FORMAT


class Ensemble(_generic.Ensemble):
    """Members ``(model, params)`` with U and/or V heads (see the module docstring)."""

    def member_predictions(self, dataset: Dataset, predict: Callable | None = None) -> list[list[dict]]:
        """Per member, per sample ``{"hubbard_u": [n], "hubbard_v": (keys, [M])}``; with ``predict``:
        ``predict(model, params, dataset, graphs=...)`` of every member instead (graphs built once)."""
        if predict is not None:
            graphs = build_graphs(dataset, self.config)
            return [predict(model, params, dataset, graphs=graphs) for model, params in self.members]
        per_sample = self.predictor.predict_hubbard(dataset, members=True)
        out = []
        for m in range(len(self)):
            member = []
            for entry in per_sample:
                item: dict[str, Any] = {}
                if "hubbard_u" in entry:
                    item["hubbard_u"] = entry["hubbard_u"][m]
                if "hubbard_v" in entry:
                    item["hubbard_v"] = (entry["hubbard_v_keys"], entry["hubbard_v"][m])
                member.append(item)
            out.append(member)
        return out

    def predict(self, dataset: Dataset) -> list[dict[str, Any]]:
        """Per sample ``{"hubbard_u": (mean [n], std [n]), "hubbard_v": (keys, mean [M], std [M])}``.

        ``std`` is the population standard deviation over the members (0 for one member).
        """
        out = []
        for entry in self.predictor.predict_hubbard(dataset):
            result: dict[str, Any] = {}
            if "hubbard_u" in entry:
                result["hubbard_u"] = (entry["hubbard_u"], entry["hubbard_u_std"])
            if "hubbard_v" in entry:
                result["hubbard_v"] = (entry["hubbard_v_keys"], entry["hubbard_v"], entry["hubbard_v_std"])
            out.append(result)
        return out


def train_ensemble(dataset: Dataset, training_config: Mapping[str, Any], num_members: int = 4, out_dir=None, log=None):
    """:func:`aiida_eqml.ml.ensemble.train_ensemble` returning the Hubbard view."""
    return _generic.train_ensemble(dataset, training_config, num_members, out_dir, log, ensemble_class=Ensemble)
