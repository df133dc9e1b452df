"""Model file: bit-identical round trip, integrity checks, hashes."""

import hashlib
import json

import jax
import numpy as np
import pytest
from flax import serialization
from test_training import MODEL, tiny_dataset

from aiida_eqml.ml.dataset import make_batches
from aiida_eqml.ml.modelfile import (
    MODEL_FORMAT_VERSION,
    ModelFileError,
    content_sha256,
    file_sha256,
    load_model,
    read_model_file,
    save_model,
)
from aiida_eqml.ml.models import build_model
from aiida_eqml.ml.training import compute_normalization


@pytest.fixture(scope="module")
def trained_like():
    ds = tiny_dataset(2)
    config = {**MODEL, "species": ["O", "Ti"]}
    config["normalization"] = compute_normalization(ds, config)
    model = build_model(config)
    batch = make_batches(ds, model.config, batch_size=2)[0]
    params = model.init(jax.random.PRNGKey(7), batch.graph)
    return model, params, batch


def test_round_trip_predictions_bit_identical(trained_like, tmp_path):
    model, params, batch = trained_like
    path = tmp_path / "m.eqml"
    digest = save_model(
        path, model.config, params, {"metrics": {"val": {"born_charges": {"mae": 0.1}}}, "target_specs": {"x": 1}}
    )
    assert digest == file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    loaded, loaded_params, meta = load_model(path)
    before = model.apply(params, batch.graph)
    after = loaded.apply(loaded_params, batch.graph)
    for name in before:
        assert np.array_equal(np.asarray(before[name].array), np.asarray(after[name].array)), name
        assert before[name].irreps == after[name].irreps
    # Self-describing: config incl. normalisation, heads' irreps, metrics, versions, hashes.
    assert meta["config"]["normalization"] == json.loads(json.dumps(model.config["normalization"]))
    assert meta["heads"]["born_charges"] == {"level": "node", "irreps": "1x0e+1x1e+1x2e"}
    assert meta["metrics"]["val"]["born_charges"]["mae"] == 0.1
    assert meta["package_version_saved"]
    assert meta["content_sha256"] == content_sha256(model.config, params)
    # Weights keep their dtype exactly.
    assert all(
        a.dtype == b.dtype for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(loaded_params))
    )


def test_content_hash_tracks_weights_not_metadata(trained_like, tmp_path):
    model, params, _ = trained_like
    h = content_sha256(model.config, params)
    assert h == content_sha256(json.loads(json.dumps(model.config)), params)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    changed = jax.tree_util.tree_unflatten(treedef, [leaves[0] + 1e-3] + leaves[1:])
    assert content_sha256(model.config, changed) != h


def test_corrupt_truncated_and_wrong_version_rejected(trained_like, tmp_path):
    model, params, _ = trained_like
    path = tmp_path / "m.eqml"
    save_model(path, model.config, params)
    data = path.read_bytes()

    (tmp_path / "trunc.eqml").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="corrupt or truncated"):
        load_model(tmp_path / "trunc.eqml")

    # Flip one byte inside the weights (the params blob precedes its 64-character digest at
    # the end of the file): the file still parses, the sha256 of the weights catches it.
    read_model_file(path)
    flipped = bytearray(data)
    flipped[len(data) - 200] ^= 0x01
    (tmp_path / "flip.eqml").write_bytes(bytes(flipped))
    with pytest.raises(ModelFileError, match="fail their sha256 check"):
        load_model(tmp_path / "flip.eqml")

    (tmp_path / "junk.eqml").write_bytes(b"PK\x03\x04 something else")
    with pytest.raises(ModelFileError, match="bad magic header"):
        load_model(tmp_path / "junk.eqml")

    payload = serialization.msgpack_restore(data[len(b"AIIDA-EQML-MODEL\n") :])
    payload["format_version"] = MODEL_FORMAT_VERSION + 1
    (tmp_path / "future.eqml").write_bytes(b"AIIDA-EQML-MODEL\n" + serialization.msgpack_serialize(payload))
    with pytest.raises(ModelFileError, match=f"format version {MODEL_FORMAT_VERSION + 1}"):
        load_model(tmp_path / "future.eqml")


def test_unserialisable_config_rejected(trained_like, tmp_path):
    model, params, _ = trained_like
    with pytest.raises(TypeError, match="metadata is not JSON-serialisable"):
        save_model(tmp_path / "m.eqml", model.config, params, {"bad": object()})
    assert not (tmp_path / "m.eqml").exists()
