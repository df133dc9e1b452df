"""The repository passes ``ruff check`` ([tool.ruff] in pyproject.toml), so that ``make test`` keeps it lint-clean.

ruff is in the ``tests`` extra; where it is not installed the test is skipped (and says so), not failed.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _ruff() -> list[str] | None:
    """The command that runs the ruff of this interpreter's environment, or None if there is none."""
    if importlib.util.find_spec("ruff") is not None:
        return [sys.executable, "-m", "ruff"]
    binary = Path(sys.executable).parent / ("ruff.exe" if os.name == "nt" else "ruff")
    return [str(binary)] if binary.is_file() else None


def test_ruff_check_passes():
    command = _ruff()
    if command is None:
        pytest.skip(f"ruff is not installed in {sys.prefix} (pip install -e '.[tests]' installs it)")
    # --no-cache: nothing written into the checkout; concise output: one line per finding.
    proc = subprocess.run(
        [*command, "check", "--no-cache", "--output-format", "concise", "."],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, (
        f"`ruff check .` found lint errors (exit {proc.returncode}); fix them (`ruff check --fix` applies the safe "
        f"fixes):\n{proc.stdout}{proc.stderr}"
    )
