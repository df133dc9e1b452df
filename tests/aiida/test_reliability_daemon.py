"""Through a real daemon: the structure that killed the worker with SIGFPE now ends its process; the worker lives on."""
from __future__ import annotations

import json
import os
import subprocess
import sys

SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
import reliability_daemon
print('RESULT' + json.dumps(reliability_daemon.predict_scenario({root!r})))
"""


def test_crashing_structure_through_the_daemon(tmp_path, reliability):
    root = os.fspath(tmp_path)
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get('PATH', '')])
    env = dict(os.environ, AIIDA_PATH=root, JAX_PLATFORMS='cpu', PATH=path)
    script = SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__)), root=root)
    proc = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and 'RESULT' in proc.stdout, (proc.returncode, proc.stdout[-3000:], proc.stderr[-5000:])
    result = json.loads(proc.stdout.split('RESULT')[-1])
    # The bad structure's process ended (not left 'running', not requeued forever) with an error ...
    assert result['first_state'] in ('excepted', 'finished'), result
    assert result['first_state'] == 'excepted' or result['first_exit_status'] != 0, result
    assert 'non-periodic' in (result['first_exit_message'] or '') + result['first_exception'], result
    # ... and the same worker ran the next task.
    assert result['second_ok'], result
    assert result['workers_after'] == result['workers_before'] and result['workers_before'], result
    observed = (
        f"process {result['first_state']} (exit {result['first_exit_status']}): "
        f"{result['first_exit_message'] or result['first_exception'].splitlines()[-1]}; "
        "the same worker then ran the next prediction"
    )
    reliability.record(
        'predict_tensors through the daemon', 'two atoms 4e5 A apart, no pbc (killed the worker before)', observed
    )
