"""Residual Hubbard targets (``config["hubbard"]["residual"]``): the model learns U - U_scf and V - V_scf.

On a real campaign record (LiCoO2 R-3m, hp.x U+V at the reference protocol): the targets shift by exactly the scf's
own U / V and back, ``train_cli`` stores the flag in the model file, and a Predictor of that file returns the
network's output plus U_scf / V_scf -- the same weights read without the flag give absolute values lower by exactly
the scf's parameters.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import train_hubbard_model

from aiida_eqml.ml.dataset import Dataset
from aiida_eqml.ml.hubbard.records import hubbard_training_dataset
from aiida_eqml.ml.hubbard.training import prepare_hubbard_training, residual_targets, scf_values

RECORD = Path(__file__).resolve().parents[2] / "benchmarks" / "data" / "hubbard_campaign" / "LiCoO2_layered_s100.npz"


@pytest.fixture(scope="module")
def record():
    return Dataset.load(RECORD)


def test_residual_targets_are_the_labels_minus_the_scf_parameters(record):
    shifted = residual_targets(record)
    for before, after in zip(record.samples, shifted.samples):
        u, du = before.node_targets["hubbard_u"], after.node_targets["hubbard_u"]
        ok = np.isfinite(u[:, 0])
        assert ok.any()
        np.testing.assert_allclose(du[ok, 0], u[ok, 0] - before.node_attrs["hubbard_u_scf"][ok])
        v, dv = before.edge_targets["hubbard_v"], after.edge_targets["hubbard_v"]
        np.testing.assert_array_equal(dv.keys, v.keys)
        # the first iteration ran with the seed V = 1 eV on these couples, later ones with hp.x's previous V
        np.testing.assert_allclose(dv.values + scf_values(before, "V", v.keys), v.values)
        assert np.all(scf_values(before, "V", v.keys) > 0)
    # the input record is left as it was
    assert not np.allclose(
        record.samples[0].node_targets["hubbard_u"][0], shifted.samples[0].node_targets["hubbard_u"][0]
    )


def test_unknown_hubbard_option_and_parent_mismatch_are_refused(record):
    with pytest.raises(ValueError, match=r"unknown hubbard training keys \['residul'\]"):
        prepare_hubbard_training(record, {"hubbard": {"residul": True}})
    from aiida_eqml.ml.hubbard.records import record_manifolds

    manifold_ls, pair_ls = record_manifolds(record)
    parent = {"hubbard": {"manifold_ls": list(manifold_ls), "pair_ls": [list(p) for p in pair_ls], "residual": True}}
    with pytest.raises(ValueError, match="parent model was trained with True"):
        prepare_hubbard_training(record, {"hubbard": {"residual": False}}, parent)


def test_train_cli_stores_the_flag_and_prediction_adds_the_scf_values(record, tmp_path):
    from aiida_eqml.ml.modelfile import load_model
    from aiida_eqml.ml.predict import Predictor, load_predictor
    path = train_hubbard_model(record, tmp_path, {"residual": True}, {"train": [0, 1], "val": [2], "test": []}, 2)
    _, params, metadata = load_model(path)
    assert metadata["hubbard"]["residual"] is True

    residual = load_predictor(path).predict_hubbard(record)
    model = Predictor([(load_model(path)[0], params, {"hubbard": {k: v for k, v in metadata["hubbard"].items()
                                                                  if k != "residual"}})])
    absolute = model.predict_hubbard(record)
    for s, r, a in zip(record.samples, residual, absolute):
        ok = np.isfinite(s.node_targets["hubbard_u"][:, 0])
        np.testing.assert_allclose(
            r["hubbard_u"][ok] - a["hubbard_u"][ok], s.node_attrs["hubbard_u_scf"][ok], atol=1e-5
        )
        np.testing.assert_array_equal(r["hubbard_v_keys"], s.edge_targets["hubbard_v"].keys)
        np.testing.assert_allclose(
            r["hubbard_v"] - a["hubbard_v"], scf_values(s, "V", r["hubbard_v_keys"])[:, 0], atol=1e-5
        )
    # the descriptors a residual model reads are the ordinary ones (only the targets moved)
    descriptors, _ = hubbard_training_dataset(record)
    again = load_predictor(path).predict_hubbard(descriptors)
    np.testing.assert_allclose(again[0]["hubbard_u"][:1], residual[0]["hubbard_u"][:1], rtol=1e-6)


def test_the_training_config_knows_the_hubbard_section():
    """The eqml.train CalcJob validates the config before submission: the residual option must pass, a typo not."""
    from aiida_eqml.ml.train_config import training_config

    assert training_config({"hubbard": {"residual": True}})["hubbard"] == {
        "residual": True, "v_sum_images": False, "u_sum_images": False, "spin_order": False,
        "scf_inputs": True}
    assert training_config({})["hubbard"] == {"residual": False, "v_sum_images": False, "u_sum_images": False,
                                              "spin_order": False, "scf_inputs": True}
    assert training_config({"hubbard": {"u_sum_images": True}})["hubbard"]["u_sum_images"] is True
    assert training_config({"hubbard": {"spin_order": True}})["hubbard"]["spin_order"] is True
    assert training_config({"hubbard": {"v_sum_images": True}})["hubbard"]["v_sum_images"] is True
    with pytest.raises(ValueError, match=r"unknown hubbard keys \['residul'\]"):
        training_config({"hubbard": {"residul": True}})
    with pytest.raises(ValueError, match="hubbard.residual must be true or false, got 'yes'"):
        training_config({"hubbard": {"residual": "yes"}})
    with pytest.raises(ValueError, match="hubbard.v_sum_images must be true or false, got 1"):
        training_config({"hubbard": {"v_sum_images": 1}})
    with pytest.raises(ValueError, match="hubbard.spin_order must be true or false, got 'on'"):
        training_config({"hubbard": {"spin_order": "on"}})
