"""The trainer's extension point: the first registered preparer that recognises a dataset prepares it."""

import pytest

from aiida_eqml.ml import preparation
from aiida_eqml.ml.preparation import Prepared, prepare_training, register_dataset_preparer


@pytest.fixture
def registry(monkeypatch):
    monkeypatch.setattr(preparation, "DATASET_PREPARERS", list(preparation.DATASET_PREPARERS))
    return preparation.DATASET_PREPARERS


def test_generic_dataset_passes_unchanged_and_hubbard_is_registered(registry, random_atoms):
    from aiida_eqml.ml.dataset import Dataset, Sample

    assert registry[0] == "aiida_eqml.ml.hubbard.preparer:prepare_hubbard_dataset"
    atoms = random_atoms(0, 2)
    sample = Sample(atoms.numbers, atoms.positions, atoms.cell.array, atoms.pbc, graph_targets={"energy": [1.0]})
    dataset = Dataset([sample], {"energy": {"level": "graph", "irreps": "0e", "unit": "eV"}})
    prepared = prepare_training(dataset, {"epochs": 1})
    assert prepared.dataset is dataset and prepared.config == {"epochs": 1} and prepared.metadata == {}


def test_first_answering_preparer_wins(registry):
    seen = []

    def declines(dataset, config, parent):
        seen.append("declines")
        return None

    def answers(dataset, config, parent):
        seen.append("answers")
        return Prepared(["prepared"], {**config, "model": {"heads": {}}}, {"domain": {"slots": [1]}})

    register_dataset_preparer(answers, first=True)
    register_dataset_preparer(declines, first=True)
    prepared = prepare_training(["raw"], {"epochs": 2}, None)
    assert seen == ["declines", "answers"]  # the Hubbard entry after them is never imported for this dataset
    assert prepared.dataset == ["prepared"] and prepared.metadata == {"domain": {"slots": [1]}}
