"""``python -m aiida_eqml.ml.train_cli``: outputs, fine-tuning, resume and exit codes."""

import csv
import json
import os
import subprocess
import sys

import pytest
from test_training import MODEL, tiny_dataset

from aiida_eqml.ml.modelfile import file_sha256, load_model
from aiida_eqml.ml.train_cli import EXIT_CODES


def run_cli(*args, timeout=600):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-m", "aiida_eqml.ml.train_cli", *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tiny_dataset(4).save(root / "d.npz")
    return root


def write_config(path, **overrides):
    config = {
        "model": MODEL,
        "epochs": 2,
        "batch_size": 2,
        "seed": 1,
        "split": {"val_fraction": 0.25, "test_fraction": 0.25},
        "progress": False,
        **overrides,
    }
    path.write_text(json.dumps(config))
    return path


def test_cli_trains_writes_everything_and_fine_tunes(data):
    out = data / "run"
    proc = run_cli("--dataset", data / "d.npz", "--config", write_config(data / "c.json"), "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["epochs_run"] == 2
    assert set(metrics["metrics"]) == {"train", "val", "test"}
    assert metrics["metrics"]["test"]["born_charges"]["count"] == 4
    assert metrics["model_sha256"] == file_sha256(out / "model.eqml")
    rows = list(csv.DictReader((out / "log.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert (out / "checkpoint.msgpack").stat().st_size > 0
    model, params, meta = load_model(out / "model.eqml")
    assert meta["target_specs"]["born_charges"]["tensor"] == "ij"
    assert meta["dataset_sha256"] == file_sha256(data / "d.npz")
    assert meta["config"]["species"] == ["O", "Ti"] and "born_charges" in meta["config"]["normalization"]

    # Resuming the finished run is a no-op that still writes a model; fine-tuning starts from it.
    tuned = data / "tuned"
    proc = run_cli(
        "--dataset",
        data / "d.npz",
        "--config",
        write_config(data / "c1.json", epochs=1),
        "--out",
        tuned,
        "--parent-model",
        out / "model.eqml",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, _, tuned_meta = load_model(tuned / "model.eqml")
    assert tuned_meta["parent_model"]["sha256"] == file_sha256(out / "model.eqml")
    # The parent's normalisation is kept (its weights were trained with it).
    assert tuned_meta["config"]["normalization"] == meta["config"]["normalization"]


def test_cli_exit_codes(data):
    out = data / "bad"
    proc = run_cli("--dataset", data / "d.npz", "--config", write_config(data / "typo.json", epoch=3), "--out", out)
    assert proc.returncode == EXIT_CODES["invalid_input"] == 2
    status = json.loads((out / "metrics.json").read_text())
    assert status["status"] == "invalid_input" and "epoch" in status["message"]

    proc = run_cli("--dataset", data / "missing.npz", "--config", data / "typo.json", "--out", out)
    assert proc.returncode == 2

    nan_model = {**MODEL, "normalization": {"born_charges": {"scale": 0.0}}}
    proc = run_cli(
        "--dataset", data / "d.npz", "--config", write_config(data / "nan.json", model=nan_model), "--out", data / "nan"
    )
    assert proc.returncode == EXIT_CODES["nan_loss"] == 3, proc.stderr[-3000:]
    assert json.loads((data / "nan" / "metrics.json").read_text())["status"] == "nan_loss"
    assert EXIT_CODES["diverged"] == 4
