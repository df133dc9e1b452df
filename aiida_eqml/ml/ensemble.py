"""Ensembles of independently seeded models, for any heads: mean prediction and spread.

N members are trained by :func:`aiida_eqml.ml.training.train` with the same data and split but
seeds ``seed_0 .. seed_0 + N - 1`` (different initial weights and shuffling). The ensemble mean is
the prediction; the standard deviation over members is a cheap uncertainty (large where the members
extrapolate differently, e.g. outside the training strains). Predictions go through one
:class:`~aiida_eqml.ml.predict.Predictor` of the members (one compiled apply, mean and ``<head>_std`` per head).

On disk: one directory with one model file per member (:mod:`aiida_eqml.ml.modelfile`, msgpack, no
pickle) and ``ensemble.json`` listing them with their sha256, so a member can be used alone and a
swapped or corrupted member is detected on load (:func:`aiida_eqml.ml.predict.load_predictor` reads the
same directory).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from aiida_eqml.ml.dataset import Dataset
from aiida_eqml.ml.modelfile import file_sha256, load_model, save_model
from aiida_eqml.ml.training import TrainResult, train

__all__ = ["ENSEMBLE_FORMAT", "ENSEMBLE_MANIFEST", "Ensemble", "train_ensemble"]

ENSEMBLE_FORMAT = "aiida-eqml-ensemble"
#: The manifest of an ensemble directory (members, their sha256, metadata); also read by
#: :func:`aiida_eqml.ml.predict.load_predictor` and :mod:`aiida_eqml.ml.hubbard.reference`.
ENSEMBLE_MANIFEST = "ensemble.json"


class Ensemble:
    """Members ``(model, params)`` sharing species, cutoff, attributes and heads."""

    def __init__(self, members: Sequence[tuple[Any, Any]], metadata: Sequence[Mapping[str, Any]] | None = None):
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = list(members)
        self.metadata = [dict(m) for m in (metadata or [{} for _ in members])]
        first = self.members[0][0].config
        for k, (model, _) in enumerate(self.members[1:], start=1):
            for key in ("species", "cutoff", "node_attrs", "edge_attrs", "heads"):
                if model.config[key] != first[key]:
                    raise ValueError(
                        f"ensemble member {k} differs from member 0 in {key!r}: {model.config[key]} vs {first[key]}"
                    )

    def __len__(self) -> int:
        return len(self.members)

    @property
    def config(self) -> dict:
        return self.members[0][0].config

    @property
    def predictor(self):
        """The :class:`aiida_eqml.ml.predict.Predictor` of the members (built once: one compiled apply)."""
        if getattr(self, "_predictor", None) is None:
            from aiida_eqml.ml.predict import Predictor

            self._predictor = Predictor([(m, p, meta) for (m, p), meta in zip(self.members, self.metadata)])
        return self._predictor

    def predict_atoms(self, atoms, node_attrs=None, edge_attrs=None, *, members: bool = False):
        """Every head for one ``ase.Atoms`` or a list: mean and ``<head>_std`` (:meth:`Predictor.predict`)."""
        return self.predictor.predict(atoms, node_attrs, edge_attrs, members=members)

    def predict_dataset(self, dataset: Dataset, *, members: bool = False) -> list[dict]:
        """Every head for each sample of a dataset (attributes from the samples): mean and ``<head>_std``."""
        return self.predictor.predict_dataset(dataset, members=members)

    def predict(self, inputs, *, members: bool = False):
        """A :class:`~aiida_eqml.ml.dataset.Dataset` (per sample) or ``ase.Atoms`` / a list of them: every head,
        the mean over the members and ``<head>_std`` (population std; ``members=True``: per member)."""
        if isinstance(inputs, Dataset):
            return self.predict_dataset(inputs, members=members)
        return self.predict_atoms(inputs, members=members)

    # ------------------------------------------------------------------ files
    def save(self, directory: str | os.PathLike, metadata: Mapping[str, Any] | None = None) -> str:
        """One ``member_XX.eqml`` per member plus ``ensemble.json``; returns the manifest path."""
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        entries = []
        for k, ((model, params), meta) in enumerate(zip(self.members, self.metadata)):
            name = f"member_{k:02d}.eqml"
            path = os.path.join(directory, name)
            sha = save_model(path, model.config, params, meta)
            entries.append({"file": name, "sha256": sha, **{key: meta[key] for key in ("seed",) if key in meta}})
        manifest = {
            "format": ENSEMBLE_FORMAT,
            "format_version": 1,
            "members": entries,
            "metadata": dict(metadata or {}),
        }
        manifest_path = os.path.join(directory, ENSEMBLE_MANIFEST)
        with open(manifest_path, "w") as handle:
            json.dump(manifest, handle, indent=1, sort_keys=True)
        return manifest_path

    @classmethod
    def load(cls, directory: str | os.PathLike):
        """Read ``ensemble.json`` and every member; ValueError if a member file is missing or changed."""
        directory = os.fspath(directory)
        manifest_path = os.path.join(directory, ENSEMBLE_MANIFEST)
        try:
            with open(manifest_path) as handle:
                manifest = json.load(handle)
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{manifest_path}: not a readable ensemble manifest ({exc})") from exc
        if manifest.get("format") != ENSEMBLE_FORMAT:
            raise ValueError(f"{manifest_path}: format {manifest.get('format')!r}, expected {ENSEMBLE_FORMAT!r}")
        members, metadata = [], []
        for entry in manifest["members"]:
            path = os.path.join(directory, entry["file"])
            if not os.path.exists(path):
                raise ValueError(f"{manifest_path}: member file {entry['file']} is missing")
            if file_sha256(path) != entry["sha256"]:
                raise ValueError(
                    f"{path}: sha256 differs from the one in {ENSEMBLE_MANIFEST} (file replaced or corrupted)"
                )
            model, params, meta = load_model(path)
            members.append((model, params))
            metadata.append(meta)
        return cls(members, metadata)


def train_ensemble(
    dataset: Dataset,
    training_config: Mapping[str, Any],
    num_members: int = 4,
    out_dir: str | os.PathLike | None = None,
    log: Callable[[str], None] | None = None,
    ensemble_class: type = Ensemble,
) -> tuple[Ensemble, list[TrainResult]]:
    """Train ``num_members`` models with seeds ``config["seed"] + k``; returns the ensemble (an ``ensemble_class``)
    and the runs.

    The split is fixed across members: give an explicit ``split`` (``{"train", "val", "test"}``
    index lists) or it is drawn once with the base seed, so every member sees the same training set.
    """
    from aiida_eqml.ml.training import split_indices
    from aiida_eqml.ml.training import training_config as full_training_config

    if num_members < 1:
        raise ValueError(f"num_members must be >= 1, got {num_members}")
    base = full_training_config(training_config)
    seed0 = int(base["seed"])
    split = split_indices(len(dataset), base["split"], seed0)
    members, metadata, runs = [], [], []
    for k in range(num_members):
        config = copy.deepcopy(dict(training_config))
        config["seed"] = seed0 + k
        config["split"] = split
        member_dir = None if out_dir is None else os.path.join(os.fspath(out_dir), f"run_{k:02d}")
        result = train(dataset, config, member_dir, log=log)
        runs.append(result)
        members.append((result.model, result.params))
        metadata.append({"seed": seed0 + k, "best_epoch": result.best_epoch, "metrics": result.metrics, "split": split})
    return ensemble_class(members, metadata), runs
