"""The embedded local stack: an AiiDA profile without services, Quantum ESPRESSO 7.2 from PyPI, pseudopotentials.

Entry point: :func:`setup_local_stack` (``aiida-eqml local setup``) and :func:`stack_status`.
"""
from .pseudos import CUTOFFS_RY, HubbardManifoldError, check_hubbard_manifolds, pseudo_wavefunction_labels
from .qe import QEInstallation, QESetupError, default_qe_root, find_python, inspect_installation, install_qe
from .stack import (
    LocalStackError,
    StackConfig,
    ensure_code,
    ensure_computer,
    ensure_profile,
    load_stack_config,
    setup_local_stack,
    stack_status,
)

__all__ = (
    'CUTOFFS_RY',
    'HubbardManifoldError',
    'LocalStackError',
    'QEInstallation',
    'QESetupError',
    'StackConfig',
    'check_hubbard_manifolds',
    'default_qe_root',
    'ensure_code',
    'ensure_computer',
    'ensure_profile',
    'find_python',
    'inspect_installation',
    'install_qe',
    'load_stack_config',
    'pseudo_wavefunction_labels',
    'setup_local_stack',
    'stack_status',
)
