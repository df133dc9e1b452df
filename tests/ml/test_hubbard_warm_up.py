"""The ML Hubbard loop compiles its model while the first scf runs: ``shape_record`` + ``warm_up_in_background``.

On the shipped reference ensemble and a real campaign record (LiCoO2 R-3m, U+V): a placeholder record built only from
what is known before the scf (atoms, the l of each Hubbard manifold, some V couples) compiles the padding bucket of
the real prediction, so the real prediction after it traces nothing; a ``cached_predictor`` call during the warm-up
waits for it and gets the warmed Predictor; a warm-up that fails only logs.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from aiida_eqml.ml import predict, predictor
from aiida_eqml.ml.dataset import Dataset
from aiida_eqml.ml.hubbard.models import shape_record
from aiida_eqml.ml.hubbard.reference import reference_member_files

RECORD = Path(__file__).resolve().parents[2] / "benchmarks" / "data" / "hubbard_campaign" / "LiCoO2_layered_s100.npz"


@pytest.fixture()
def fresh_compilation(monkeypatch):
    """No compiled function or cached Predictor from other tests: trace counts start at 0."""
    monkeypatch.setattr(predictor, "_COMPILED", {})  # the compiled functions live with the Predictor
    monkeypatch.setattr(predict, "_PREDICTORS", predict.collections.OrderedDict())
    monkeypatch.setattr(predict, "_WARMING", {})


def _real_record():
    record = Dataset.load(RECORD)
    return Dataset([record.samples[0]], record.target_specs)


def _what_the_loop_knows(sample):
    hubbard_l = {int(a): int(l) for a, l in enumerate(sample.node_attrs["hubbard_l"]) if l >= 0}
    keys = np.asarray(sample.edge_attrs["intersite_occupations"].keys).tolist()
    return sample.to_ase(), hubbard_l, keys[:1]  # the loop's structure seeds one V couple per kind, hp.x gives more


def test_the_placeholder_compiles_the_real_prediction(fresh_compilation):
    record = _real_record()
    atoms, hubbard_l, couples = _what_the_loop_knows(record.samples[0])
    placeholder = shape_record(atoms, hubbard_l, couples)
    assert placeholder.samples[0].node_attrs["occupations"].shape == record.samples[0].node_attrs["occupations"].shape

    files = [str(f) for f in reference_member_files("hubbard-tmo")]
    key = ["warm-up-test", *files]
    assert not predict.is_cached(key)
    thread = predict.warm_up_in_background(key, lambda: predict.load_predictor(files),
                                           lambda p: p.predict_hubbard(placeholder))
    warmed = predict.cached_predictor(key, lambda: pytest.fail("the warm-up's Predictor was not reused"))
    assert not thread.is_alive()  # cached_predictor waited for the warm-up
    assert predict.is_cached(key)  # a second loop of these models reads no model file (warm_up_hubbard)
    traces = warmed.trace_count
    assert traces >= 1  # the warm-up compiled (fresh_compilation: nothing was compiled before)

    real = warmed.predict_hubbard(record)[0]
    assert warmed.trace_count == traces  # the scf's real occupations hit the bucket the placeholder compiled
    assert np.isfinite(real["hubbard_u"][np.asarray(record.samples[0].node_attrs["hubbard_l"]) >= 0]).all()
    assert np.isfinite(real["hubbard_v"]).all() and len(real["hubbard_v"]) > len(couples)


def test_a_failed_warm_up_only_logs(fresh_compilation, caplog):
    def broken():
        raise OSError("model file unreadable")

    with caplog.at_level(logging.WARNING, logger="aiida_eqml.ml.predict"):
        predict.warm_up_in_background(["broken"], broken, lambda p: None).join()
    assert "prediction warm-up failed" in caplog.text and "model file unreadable" in caplog.text
    assert ("broken",) not in predict._WARMING and ("broken",) not in predict._PREDICTORS
