"""The ML layer must stay importable without AiiDA (docs/architecture.md)."""

import subprocess
import sys


def test_importing_ml_does_not_import_aiida():
    code = (
        "import sys\n"
        "import aiida_eqml.ml, aiida_eqml.ml.graph, aiida_eqml.ml.tensors, aiida_eqml.ml.layers, "
        "aiida_eqml.ml.models, aiida_eqml.ml.response\n"
        "bad = sorted(m for m in sys.modules if m == 'aiida' or m.startswith('aiida.'))\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"aiida_eqml.ml imported AiiDA modules: {result.stdout.strip()}"
