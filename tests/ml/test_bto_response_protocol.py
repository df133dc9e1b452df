"""benchmarks/bto_response.py end to end on the real bto400 data (skipped without it), tiny model, one epoch.

Checks the protocol of issue 11 in the JSON section the script writes: a validation set disjoint from every training
set and from the test set, several seeds with mean and spread, the command line and the git commit. Then
``--plot-only`` on that file plus an older-protocol section (rows with ``test_mae`` only) and one without any test
MAE (skipped with a message).
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_CORE

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "bto_response.py"
BTO400 = ROOT.parent / "shared" / "data" / "bto400"
TINY = {k: v for k, v in TINY_CORE.items() if k not in ("species", "avg_num_neighbors")}


def _run(args, cwd):
    # PYTHONPATH: the aiida_eqml of this checkout (a script's sys.path[0] is its own folder, not the repository)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
@pytest.mark.skipif(not BTO400.is_dir(), reason=f"bto400 data not at {BTO400}")
def test_bto_response_protocol_end_to_end(tmp_path):
    out = tmp_path / "bto.json"
    args = ["--data", str(BTO400), "--sizes", "2", "--epochs", "1", "--batch-size", "2", "--seeds", "0", "1",
            "--routes", "direct", "--targets", "born_charges", "--model", json.dumps(TINY),
            "--jit-cache", str(tmp_path / "jit"),  # the second seed reuses the first one's compiled steps
            "--section", "tiny", "--out-json", str(out), "--out-png", str(tmp_path / "bto.png")]
    stdout = _run(args, ROOT)
    data = json.loads(out.read_text())
    assert set(data) == {"tiny"}, "the partial section is dropped once the run is complete"
    section = data["tiny"]

    assert section["command"].startswith("python benchmarks/bto_response.py ")
    assert "--seeds 0 1" in section["command"] and "--sizes 2" in section["command"]
    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", section["commit"]), section["commit"]

    protocol = section["protocol"]
    validation, test = protocol["validation"], protocol["test_set"]
    assert protocol["seeds"] == [0, 1]
    assert len(validation) == 4 and len(test) == 8
    assert test == [f"structure_{i:05d}" for i in (41, 43, 44, 45, 46, 47, 48, 49)]  # the last 8 valid files
    assert not set(validation) & set(test)
    index = lambda name: int(name.split("_")[1])  # noqa: E731
    assert max(map(index, validation)) < min(map(index, test))
    # each target's sets: the shared split less its records without a valid label (Z*: none, so the same sets)
    born = protocol["per_target"]["born_charges"]
    assert (born["test_set"], born["validation"]) == (test, validation)
    assert born["dropped"] == {"pool": [], "validation": [], "test": []}
    assert born["train_sets"] == {"2": ["structure_00000", "structure_00001"]}
    for names in born["train_sets"].values():
        assert not set(names) & (set(validation) | set(test))
    assert protocol["train_pool"] == protocol["valid_records"] - 8 - 4

    (row,) = section["results"]
    assert (row["route"], row["target"], row["n_train"]) == ("direct", "born_charges", 2)
    for key in ("test_mae_mean", "test_mae_std", "val_mae_mean", "train_mae_mean"):
        assert isinstance(row[key], float) and row[key] > 0, key
    per_seed = row["per_seed"]
    assert [r["seed"] for r in per_seed] == [0, 1]
    maes = [r["test_mae"] for r in per_seed]
    assert maes[0] != maes[1], "seeds must change the model initialisation / batch order"
    assert row["test_mae_mean"] == pytest.approx(sum(maes) / 2)
    assert row["test_mae_std"] == pytest.approx(abs(maes[0] - maes[1]) / 2**0.5)
    assert all(r["best_epoch"] == 1 and r["epochs_run"] == 1 for r in per_seed)
    # compile and run time kept apart: one epoch has no later epoch to compare with
    assert all(r["first_epoch_s"] > 0 and r["later_epoch_s"] is None for r in per_seed)
    assert "validation set: the 4 valid files before them" in stdout

    # --plot-only: this section with error bars, an older-protocol section drawn, a section without test MAE skipped
    old = {"protocol": {"batch_size": 4}, "results": [{"route": "direct", "target": "born_charges", "n_train": 4,
                                                       "steps": 800, "test_mae": 0.04}]}
    broken = {"protocol": {}, "results": [{"route": "direct", "target": "born_charges", "n_train": 4}]}
    out.write_text(json.dumps({**data, "learning_curves": old, "broken": broken}))
    stdout = _run(["--plot-only", "--out-json", str(out), "--out-png", str(tmp_path / "all.png")], tmp_path)
    assert "section 'broken' has no test MAE in its results; skipped" in stdout
    assert "section 'learning_curves' is of the older protocol" in stdout
    assert (tmp_path / "all.png").stat().st_size > 0
