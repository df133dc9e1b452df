"""Production-scale benchmark: writes ``docs/benchmarks/scale.json``.

Runs the ``production`` test group (``tests/production``) with ``EQML_SCALE_JSON`` set, so that the numbers in the
JSON are exactly those the tests asserted on: the services (PostgreSQL, RabbitMQ, a one-node Slurm with a GPU gres)
started from the Debian packages in a temporary folder, ``aiida-eqml local setup --production`` (and its idempotent
rerun), ``eqml.train`` through Slurm (GPU options, Slurm TIMEOUT -> 120 -> resumed from the checkpoint), a
``scancel``'d pw.x recovered by the restart handler, the load run of ``--loops`` concurrent ML self-consistent loops
through one 2-worker daemon with RabbitMQ restarted at a quarter and the daemon SIGKILLed at half, and the read-only
repository.

    python benchmarks/scale.py                 # 50 loops -> docs/benchmarks/scale.json
    python benchmarks/scale.py --loops 100 --out /tmp/scale.json

Needs root and apt (the packages are installed if missing), like the test group.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--loops', type=int, default=50, help='concurrent ML loops of the load run (default 50)')
    parser.add_argument('--out', default=str(ROOT / 'docs' / 'benchmarks' / 'scale.json'))
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out).resolve()
    command = 'python benchmarks/scale.py' + (f' --loops {args.loops}' if args.loops != 50 else '')
    env = dict(os.environ, EQML_SCALE_JSON=str(out), EQML_PRODUCTION_LOOPS=str(args.loops),
               EQML_SCALE_COMMAND=command, PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ['PATH']]))
    proc = subprocess.run([sys.executable, '-m', 'pytest', 'tests/production', '-m', 'production', '-ra', '-s',
                           '-p', 'no:cacheprovider'], cwd=ROOT, env=env)
    if out.exists():
        document = json.loads(out.read_text())
        print(json.dumps({key: document.get(key) for key in ('load', 'faults', 'group_wall_s')}, indent=1))
    return proc.returncode


if __name__ == '__main__':
    sys.exit(main())
