"""``hubbard.scf_inputs = False``: a model that reads the ground state only through its occupation matrices, not
through the U / V the scf ran with (which, from the second self-consistent iteration on, are the previous label)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from conftest import train_hubbard_model

from aiida_eqml.ml.dataset import Dataset, EdgeValues
from aiida_eqml.ml.hubbard.records import PAIR_ATTR, SITE_ATTR, hubbard_training_dataset

CAMPAIGN = Path(__file__).resolve().parents[2] / "benchmarks" / "data" / "hubbard_campaign"


def _with_scf_parameters(sample, u_shift: float, v_shift: float):
    """The sample with every U_scf / V_scf moved, the occupations unchanged."""
    u_scf = np.where(sample.node_attrs["hubbard_l"] >= 0, sample.node_attrs["hubbard_u_scf"] + u_shift, 0.0)
    v_scf = sample.edge_attrs["hubbard_v_scf"]
    edge_attrs = {**sample.edge_attrs, "hubbard_v_scf": EdgeValues(keys=v_scf.keys, values=v_scf.values + v_shift)}
    return dataclasses.replace(sample, node_attrs={**sample.node_attrs, "hubbard_u_scf": u_scf}, edge_attrs=edge_attrs)


def test_the_scf_parameter_slots_are_zero_and_nothing_else_moves():
    record = Dataset.load(CAMPAIGN / "SrTiO3_perovskite_s100.npz").subset([1])
    plain, attrs = hubbard_training_dataset(record)
    blind, attrs_blind = hubbard_training_dataset(record, scf_inputs=False)
    assert attrs_blind == attrs  # the same irreps: only the values of the U_scf / V_scf scalars change
    site, site_blind = plain.samples[0].node_attrs[SITE_ATTR], blind.samples[0].node_attrs[SITE_ATTR]
    titanium = record.samples[0].node_attrs["hubbard_l"] == 2
    assert np.all(site[titanium, -1] > 0.3)  # U_scf / 10 eV, about 4.1 eV in the second iteration
    np.testing.assert_array_equal(site_blind[:, -1], 0.0)
    np.testing.assert_array_equal(site_blind[:, :-1], site[:, :-1])
    pair, pair_blind = plain.samples[0].edge_attrs[PAIR_ATTR].values, blind.samples[0].edge_attrs[PAIR_ATTR].values
    assert np.all(np.abs(pair[:, -1]) > 0.05)
    np.testing.assert_array_equal(pair_blind[:, -1], 0.0)
    np.testing.assert_array_equal(pair_blind[:, :-1], pair[:, :-1])


def test_a_model_without_scf_inputs_ignores_the_parameters_the_scf_ran_with(tmp_path):
    """Trained through train_cli (the eqml.train CalcJob's run) on real SrTiO3 labels: the flag is in the model file,
    and a Predictor of it gives the same U and V when only U_scf / V_scf change; a default model's prediction
    moves with them (so the first assertion is not true of every model)."""
    from aiida_eqml.ml.modelfile import load_model
    from aiida_eqml.ml.predict import load_predictor

    record = Dataset.load(CAMPAIGN / "SrTiO3_perovskite_s100.npz")
    split = {"train": [0, 1], "val": [2], "test": []}
    (tmp_path / "blind").mkdir()
    (tmp_path / "plain").mkdir()
    blind_path = train_hubbard_model(record, tmp_path / "blind", {"scf_inputs": False}, split, 2)
    plain_path = train_hubbard_model(record, tmp_path / "plain", {}, split, 2)
    assert load_model(blind_path)[2]["hubbard"]["scf_inputs"] is False
    assert "scf_inputs" not in load_model(plain_path)[2]["hubbard"]  # absent means True: older files read the same
    sample = record.samples[2]
    moved = Dataset([sample, _with_scf_parameters(sample, 1.5, -0.4)], record.target_specs)
    for path, ignores in ((blind_path, True), (plain_path, False)):
        before, after = load_predictor(path).predict_hubbard(moved)
        same_u = np.allclose(before["hubbard_u"], after["hubbard_u"], rtol=1e-6, equal_nan=True)
        same_v = np.allclose(before["hubbard_v"][1], after["hubbard_v"][1], rtol=1e-6)
        assert (same_u and same_v) is ignores, path
