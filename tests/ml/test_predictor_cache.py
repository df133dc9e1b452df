"""The Predictor turns on JAX's persistent compilation cache by default (``enable_compilation_cache``): at
``$AIIDA_EQML_XLA_CACHE`` or ``~/.cache/aiida-eqml/xla``, leaving an explicitly set cache (the test suite's
``JAX_COMPILATION_CACHE_DIR``) alone, off with ``AIIDA_EQML_XLA_CACHE=off``; a fresh process fills it."""

import json
import os
import subprocess
import sys
from pathlib import Path

from aiida_eqml.ml import predict


def test_default_directory_and_switch(monkeypatch, tmp_path):
    monkeypatch.delenv("AIIDA_EQML_XLA_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert predict.default_compilation_cache_dir() == os.path.join(str(tmp_path), "aiida-eqml", "xla")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert predict.default_compilation_cache_dir() == os.path.join(
        os.path.expanduser("~"), ".cache", "aiida-eqml", "xla"
    )
    monkeypatch.setenv("AIIDA_EQML_XLA_CACHE", str(tmp_path / "mine"))
    assert predict.default_compilation_cache_dir() == str(tmp_path / "mine")
    for off in ("off", "0", "none", ""):
        monkeypatch.setenv("AIIDA_EQML_XLA_CACHE", off)
        assert predict.default_compilation_cache_dir() is None


def test_an_explicit_cache_is_left_alone(monkeypatch, tmp_path):
    import jax

    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("AIIDA_EQML_XLA_CACHE", str(tmp_path / "ignored"))
    before = jax.config.jax_compilation_cache_dir
    assert predict.enable_compilation_cache() == str(tmp_path / "explicit")
    assert jax.config.jax_compilation_cache_dir == before
    assert not (tmp_path / "ignored").exists()


CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[2])
import jax
from test_predictor import MODEL, model_file, tio
from aiida_eqml.ml.predict import load_predictor
config = dict(MODEL, heads={"born_charges": {"level": "node", "tensor": "ij"}})
jax.numpy.zeros(3) + 1  # something compiles before the Predictor: the cache must still start
predictor = load_predictor(model_file(sys.argv[1], config, 0))
predictor.predict(tio())
print(json.dumps({"dir": jax.config.jax_compilation_cache_dir, "in_use": predictor.compilation_cache_dir}))
"""


def test_a_new_process_uses_the_default_cache(tmp_path):
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("JAX_COMPILATION_CACHE") and k != "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"
    }
    env.update(AIIDA_EQML_XLA_CACHE=str(tmp_path / "xla"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path / "m.eqml"), str(Path(__file__).parent)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"dir": str(tmp_path / "xla"), "in_use": str(tmp_path / "xla")}
    assert any(p.is_file() for p in (tmp_path / "xla").rglob("*")), "no executable written to the cache"
