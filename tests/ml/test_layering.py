"""The ML layer must stay importable without AiiDA (docs/architecture.md): every module of ``aiida_eqml.ml``."""

import pkgutil
import subprocess
import sys
from pathlib import Path

import aiida_eqml.ml


def _ml_modules() -> list[str]:
    # Walk the source tree without importing it (importing here would hide an aiida import in this process).
    root = Path(aiida_eqml.ml.__file__).parent
    names = ["aiida_eqml.ml"]
    for info in pkgutil.walk_packages([str(root)], prefix="aiida_eqml.ml."):
        names.append(info.name)
    return sorted(names)


def test_every_ml_module_is_listed():
    modules = _ml_modules()
    for expected in ("aiida_eqml.ml.allegro", "aiida_eqml.ml.training", "aiida_eqml.ml.hubbard.records"):
        assert expected in modules
    assert len(modules) > 30


def test_importing_ml_does_not_import_aiida():
    code = (
        "import importlib, sys\n"
        f"for name in {_ml_modules()!r}:\n"
        "    importlib.import_module(name)\n"
        "bad = sorted(m for m in sys.modules if m == 'aiida' or m.startswith('aiida.'))\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"aiida_eqml.ml imported AiiDA modules: {result.stdout.strip()}"
