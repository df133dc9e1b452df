"""JAX's persistent compilation cache for prediction: :func:`enable_compilation_cache`, which every
:class:`~aiida_eqml.ml.predictor.Predictor` calls.

The cache lives at ``$AIIDA_EQML_XLA_CACHE`` or ``~/.cache/aiida-eqml/xla``, unless ``JAX_COMPILATION_CACHE_DIR`` (or
``jax_compilation_cache_dir``) is already set; ``AIIDA_EQML_XLA_CACHE=off`` turns it off. A new process then loads
the compiled executables instead of compiling again (``docs/benchmarks.md``, Predictor latency). The names are
re-exported by :mod:`aiida_eqml.ml.predict`.
"""

from __future__ import annotations

import os

__all__ = ["CACHE_ENV", "default_compilation_cache_dir", "enable_compilation_cache"]

#: Environment variable with the Predictor's compilation-cache directory (``off``, ``0`` or ``none``: no cache).
CACHE_ENV = "AIIDA_EQML_XLA_CACHE"


def default_compilation_cache_dir() -> str | None:
    """``$AIIDA_EQML_XLA_CACHE``, else ``$XDG_CACHE_HOME/aiida-eqml/xla`` (``~/.cache/aiida-eqml/xla``); ``None`` when
    the variable says ``off``."""
    value = os.environ.get(CACHE_ENV)
    if value is not None:
        return None if value.strip().lower() in ("", "0", "off", "none", "false", "no") else os.path.expanduser(value)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "aiida-eqml", "xla")


def enable_compilation_cache() -> str | None:
    """Turn on JAX's persistent compilation cache for the process (called by every :class:`Predictor`).

    An explicitly configured cache (``JAX_COMPILATION_CACHE_DIR`` / ``jax.config.jax_compilation_cache_dir``, as the
    test suite sets) is left as it is; otherwise :func:`default_compilation_cache_dir` is used, with a minimum
    compile time of 0.1 s unless ``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`` is set. Returns the directory in use
    (``None``: no cache). Cached executables are the ones XLA would compile again: results are unchanged.
    """
    import jax

    current = os.environ.get("JAX_COMPILATION_CACHE_DIR") or jax.config.jax_compilation_cache_dir
    if current:
        return current
    directory = default_compilation_cache_dir()
    if directory is None:
        return None
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError:  # read-only home: predict without the cache
        return None
    jax.config.update("jax_compilation_cache_dir", directory)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
    try:  # jax decides once per process whether the cache is used: redo it if something compiled before
        from jax._src import compilation_cache

        cc = compilation_cache
        checked_unused = getattr(cc, "_cache_checked", False) and not getattr(cc, "_cache_used", True)
        initialized_empty = getattr(cc, "_cache_initialized", False) and getattr(cc, "_cache", 1) is None
        if checked_unused or initialized_empty:
            compilation_cache.reset_cache()
    except Exception:  # noqa: BLE001 - private API; without it the cache starts with the next process
        pass
    return directory
