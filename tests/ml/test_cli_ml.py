"""``aiida-eqml train`` then ``aiida-eqml predict`` from the command line, on a small real dataset, without AiiDA."""

import json
import os
import subprocess
import sys
from pathlib import Path

import ase.io
import numpy as np
import pytest
from click.testing import CliRunner
from test_training import MODEL, tiny_dataset

from aiida_eqml.cli.main import cli
from aiida_eqml.ml.predict import load_predictor

AIIDA_EQML = Path(sys.executable).parent / "aiida-eqml"
ENV = dict(os.environ, JAX_PLATFORMS="cpu")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_ml")
    tiny_dataset(4).save(root / "d.npz")
    config = {"model": MODEL, "epochs": 2, "batch_size": 2, "seed": 1, "progress": False,
              "split": {"val_fraction": 0.25, "test_fraction": 0.25}}
    (root / "c.json").write_text(json.dumps(config))
    proc = subprocess.run(
        [str(AIIDA_EQML), "train", root / "d.npz", root / "c.json", "--out", root / "run", "--no-progress"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "model.eqml: 2 epoch(s)" in proc.stdout
    assert json.loads((root / "run" / "metrics.json").read_text())["status"] == "completed"
    return root


def test_train_then_predict_from_the_command_line(trained):
    root = trained
    frames = [s.to_ase() for s in tiny_dataset(3, seed=7).samples]
    ase.io.write(root / "s.extxyz", frames[:2], format="extxyz")
    ase.io.write(root / "s.vasp", frames[2], format="vasp")  # any format ASE reads
    # in a fresh process, through the click group, and check that no aiida module was imported
    code = (
        "import sys\nfrom aiida_eqml.cli.main import cli\n"
        f"cli.main(['predict', {str(root / 'run')!r}, {str(root / 's.extxyz')!r}, {str(root / 's.vasp')!r}, "
        f"'-o', {str(root / 'out.extxyz')!r}], standalone_mode=False)\n"
        "print('AIIDA_MODULES', sorted(m for m in sys.modules if m == 'aiida' or m.startswith('aiida.')))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "AIIDA_MODULES []" in proc.stdout
    assert "predicting" in proc.stderr  # the tqdm bar
    written = ase.io.read(root / "out.extxyz", index=":")
    assert len(written) == 3
    # same numbers as the Predictor in this process, to float32 rounding
    predictor = load_predictor(root / "run" / "model.eqml")
    for atoms, frame in zip(written, frames):
        np.testing.assert_allclose(atoms.positions, frame.positions, atol=1e-6)
        ref = predictor.predict(frame)
        np.testing.assert_allclose(
            atoms.arrays["born_charges"].reshape(-1, 3, 3), ref["born_charges"], rtol=1e-5, atol=1e-6
        )
        np.testing.assert_allclose(
            np.reshape(atoms.info["dielectric"], (3, 3)), ref["dielectric"], rtol=1e-5, atol=1e-6
        )
        assert np.abs(ref["born_charges"]).max() > 0.1


def test_command_line_errors_are_clear(trained, tmp_path):
    runner = CliRunner()
    result = runner.invoke(
        cli, ["train", str(tmp_path / "missing.npz"), str(trained / "c.json"), "--out", str(tmp_path / "bad")]
    )
    assert result.exit_code == 2  # invalid input, as python -m aiida_eqml.ml.train_cli
    assert json.loads((tmp_path / "bad" / "metrics.json").read_text())["status"] == "invalid_input"

    foreign = ase.Atoms("BaO", positions=[[0, 0, 0], [1.6, 1.6, 1.6]], cell=3.2 * np.eye(3), pbc=True)
    ase.io.write(tmp_path / "bao.extxyz", foreign)
    result = runner.invoke(
        cli,
        [
            "predict",
            str(trained / "run" / "model.eqml"),
            str(tmp_path / "bao.extxyz"),
            "-o",
            str(tmp_path / "o.extxyz"),
            "--no-progress",
        ],
    )
    assert result.exit_code == 1
    assert "element(s) ['Ba'] not in the model's species ['O', 'Ti']" in result.output
    assert not (tmp_path / "o.extxyz").exists()

    # A file that is not a model: named once, with the reason; a structure file ASE cannot read: named, with the reason
    (tmp_path / "junk.eqml").write_bytes(b"PK\x03\x04junk")
    result = runner.invoke(cli, ["predict", str(tmp_path / "junk.eqml"), str(tmp_path / "bao.extxyz"),
                                 "-o", str(tmp_path / "o2.extxyz"), "--no-progress"])
    assert result.exit_code == 1
    assert result.output.count(str(tmp_path / "junk.eqml")) == 1 and "bad magic header" in result.output
    (tmp_path / "bad.cif").write_text("garbage\n")
    result = runner.invoke(cli, ["predict", str(trained / "run" / "model.eqml"), str(tmp_path / "bad.cif"),
                                 "-o", str(tmp_path / "o3.extxyz"), "--no-progress"])
    assert result.exit_code == 1
    assert f"{tmp_path / 'bad.cif'}: not a structure file ASE can read (AssertionError)" in result.output, result.output
    assert not (tmp_path / "o2.extxyz").exists() and not (tmp_path / "o3.extxyz").exists()
