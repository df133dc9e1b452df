"""What the production stack needs of the host: Debian packages, free ports and long-running daemon processes.

The generic helpers of :mod:`aiida_eqml.local.services` and :mod:`aiida_eqml.local.slurm`: the package check and
apt install (:func:`missing_packages`, :func:`ensure_packages`), :func:`port_in_use`, and starting, polling and
stopping daemons by pid. :class:`ProductionError` is the one error of the whole production stack.
"""
from __future__ import annotations

import os
import pathlib
import shutil
import signal
import socket
import subprocess
import time

__all__ = ('ProductionError', 'REQUIRED_PACKAGES', 'missing_packages', 'ensure_packages', 'port_in_use')

#: Debian package -> executables it provides (a missing one means the package is missing).
REQUIRED_PACKAGES = {
    'postgresql': ('initdb', 'pg_ctl'),
    'rabbitmq-server': ('/usr/lib/rabbitmq/bin/rabbitmq-server', '/usr/lib/rabbitmq/bin/rabbitmqctl'),
    'slurm-wlm': ('slurmctld', 'slurmd', 'sbatch', 'squeue', 'scancel', 'scontrol'),
    'munge': ('munged', 'mungekey'),
}


class ProductionError(RuntimeError):
    """The production stack cannot be set up or started as asked; the message says what to do."""


# ====================================================================== packages and ports
def _postgres_bindir() -> pathlib.Path | None:
    """Folder of ``initdb``/``pg_ctl`` (Debian keeps them out of the PATH, in /usr/lib/postgresql/<v>/bin)."""
    candidates = sorted(pathlib.Path('/usr/lib/postgresql').glob('*/bin/initdb'),
                        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    if candidates:
        return candidates[-1].parent
    found = shutil.which('initdb')
    return pathlib.Path(found).resolve().parent if found else None


def _which(executable: str) -> str | None:
    if executable in ('initdb', 'pg_ctl'):
        bindir = _postgres_bindir()
        return str(bindir / executable) if bindir and (bindir / executable).exists() else None
    if executable.startswith('/'):
        return executable if os.access(executable, os.X_OK) else None
    system = (pathlib.Path('/usr/sbin') / executable, pathlib.Path('/sbin') / executable)
    return shutil.which(executable) or next((str(p) for p in system if p.exists()), None)


def missing_packages() -> list[str]:
    """Debian packages of :data:`REQUIRED_PACKAGES` whose executables are not installed."""
    return [package for package, executables in REQUIRED_PACKAGES.items()
            if any(_which(executable) is None for executable in executables)]


def ensure_packages(install: bool = True, echo=print) -> list[str]:
    """Install the missing packages with apt (services are *not* started by the package scripts); return them.

    :raises ProductionError: if packages are missing and cannot be installed (not root, no apt, apt failed).
    """
    missing = missing_packages()
    if not missing:
        return []
    command = ['apt-get', 'install', '-y', '--no-install-recommends', *missing]
    if not install:
        raise ProductionError(f'Missing Debian packages {missing}: install them with `sudo {" ".join(command)}`.')
    if os.geteuid() != 0:
        raise ProductionError(f'Missing Debian packages {missing} and not running as root: run '
                              f'`sudo {" ".join(command)}` (or rerun this command with sudo).')
    if shutil.which('apt-get') is None:
        raise ProductionError(f'Missing packages {missing} and no apt-get on this machine: the production stack '
                              'needs a Debian/Ubuntu host (PostgreSQL, RabbitMQ, Slurm and munge from its packages).')
    echo(f'Installing the Debian packages {", ".join(missing)} (apt-get; their services are not started) ...')
    # policy-rc.d exit 101: the package scripts must not start system-wide instances on the default ports.
    policy = pathlib.Path('/usr/sbin/policy-rc.d')
    created_policy = False
    if not policy.exists():
        policy.write_text('#!/bin/sh\n# aiida-eqml: do not start services while installing packages\nexit 101\n')
        policy.chmod(0o755)
        created_policy = True
    env = dict(os.environ, DEBIAN_FRONTEND='noninteractive')
    try:
        proc = subprocess.run(command, env=env, capture_output=True, text=True)
        if proc.returncode != 0 and ('Unable to locate package' in proc.stderr or 'has no installation candidate'
                                     in proc.stderr or 'Failed to fetch' in proc.stderr):
            echo('apt-get install failed on the package lists: running apt-get update first ...')
            subprocess.run(['apt-get', 'update'], env=env, capture_output=True, text=True)
            proc = subprocess.run(command, env=env, capture_output=True, text=True)
    finally:
        if created_policy:
            policy.unlink()
    if proc.returncode != 0:
        raise ProductionError(f'`{" ".join(command)}` failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}')
    still = missing_packages()
    if still:
        raise ProductionError(f'apt-get installed {missing} but the executables of {still} are still missing')
    return missing


def port_in_use(port: int, host: str = '127.0.0.1') -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _wait(condition, timeout: float, what: str, poll: float = 0.25, log: pathlib.Path | None = None):
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            tail = ''
            if log is not None and log.exists():
                tail = '\n' + '\n'.join(log.read_text(errors='replace').splitlines()[-30:])
            raise ProductionError(f'timed out after {timeout:.0f} s waiting for {what}{tail}')
        time.sleep(poll)


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (our own child that exited) is not alive
        with open(f'/proc/{pid}/stat') as handle:
            return handle.read().split(')')[-1].split()[0] != 'Z'
    except OSError:
        return False


def _read_pid(path: pathlib.Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _terminate(pid: int | None, timeout: float = 30, sig=signal.SIGTERM) -> None:
    if not _pid_alive(pid):
        return
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return
    start = time.monotonic()
    while _pid_alive(pid) and time.monotonic() - start < timeout:
        time.sleep(0.1)
    if _pid_alive(pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _check_port(port: int, what: str) -> None:
    if port_in_use(port):
        raise ProductionError(f'Port {port} (for {what}) is in use by another program: choose other ports '
                              f'(`aiida-eqml local setup --production --base-port N`) or stop that program.')


def _popen_daemon(command, log: pathlib.Path, env=None, cwd=None) -> subprocess.Popen:
    """Start a long-running service in its own session (not killed with the caller's terminal)."""
    handle = open(log, 'ab')
    try:
        return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env, cwd=cwd)
    finally:
        handle.close()
