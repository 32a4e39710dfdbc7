"""Persistent XLA compilation cache, on by default for every program (``qlip``, train/, eval/, benchmarks/).

Compiling the sampling loop costs tens of seconds (the quantized one more), sampling itself about a
second; with this cache a second run of the same program on the same machine loads the executables
compiled by the first instead of compiling them again.

Where the cache lives, first match wins:

1. ``enable(path)`` with an explicit folder;
2. ``QLIP_CACHE=DIR`` in the environment; ``QLIP_CACHE=off`` (or ``0``, ``none``, ``false``) disables it;
3. ``$XDG_CACHE_HOME/qlip-jax/xla``, else ``~/.cache/qlip-jax/xla`` (per user).

A cache folder that JAX was already given before (``JAX_COMPILATION_CACHE_DIR``, or the per-session
cache of the test suite, tests/conftest.py) is left as it is: :func:`enable` never redirects it.

Every program calls :func:`add_argument` on its parser (``--no-cache``) and :func:`from_args` right
after parsing, before anything is compiled.

Executables are only stored when their compilation took at least :data:`MIN_COMPILE_SECS` (small
eager ops are not worth a file), and the folder is kept under :data:`MAX_BYTES` (least recently used
entries are deleted) when the ``filelock`` package is present. The cache is trusted code: keep it in a
folder only you can write to.
"""

from __future__ import annotations

import argparse
import os

import jax

#: Environment variable naming the cache folder, or ``off`` to disable it.
ENV = "QLIP_CACHE"
#: Values of ``QLIP_CACHE`` that disable the cache (case-insensitive).
OFF = ("off", "0", "none", "false", "no")
#: Compilations shorter than this are not written to the cache.
MIN_COMPILE_SECS = 0.5
#: Size bound of the cache folder (least recently used entries are evicted beyond it).
MAX_BYTES = 4 << 30

_ours: str | None = None  # the folder this module configured, if any


def default_dir() -> str:
    """``$XDG_CACHE_HOME/qlip-jax/xla`` or ``~/.cache/qlip-jax/xla``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "qlip-jax", "xla")


def resolve(path: str | None = None) -> str | None:
    """The cache folder to use (absolute), or None when the cache is disabled (``QLIP_CACHE=off``)."""
    if path is None:
        env = os.environ.get(ENV, "").strip()
        if env.lower() in OFF:
            return None
        path = env or default_dir()
    return os.path.abspath(os.path.expanduser(path))


def _reset() -> None:
    """Make JAX re-read the cache folder (it opens the cache once, at the first compilation)."""
    from jax.experimental.compilation_cache import compilation_cache

    compilation_cache.reset_cache()


def enable(path: str | None = None) -> str | None:
    """Turn the persistent compilation cache on; returns the folder in use, or None if disabled.

    ``path`` overrides ``QLIP_CACHE`` and the per-user default. A folder JAX already had before
    (not set by this module) is kept and returned. Call it before the first compilation of the program.
    Raises ``ValueError`` if the folder cannot be created.
    """
    global _ours
    current = jax.config.jax_compilation_cache_dir
    if current and current != _ours:
        return current  # configured by the user (JAX_COMPILATION_CACHE_DIR) or the test session
    folder = resolve(path)
    if folder is None:
        disable()
        return None
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create the compilation cache folder {folder} ({e}); set {ENV}=DIR to "
                         f"another folder or {ENV}=off (--no-cache) to run without it") from None
    if folder != current:
        jax.config.update("jax_compilation_cache_dir", folder)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECS)
        try:
            import filelock  # noqa: F401  (JAX's size-bounded cache needs it)
        except ImportError:
            pass
        else:
            jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
        _reset()
        _ours = folder
    return folder


def disable() -> None:
    """Turn off the cache this module enabled (a folder configured by someone else is left alone)."""
    global _ours
    if _ours is not None and jax.config.jax_compilation_cache_dir == _ours:
        jax.config.update("jax_compilation_cache_dir", None)
        _reset()
    _ours = None


def add_argument(parser: argparse.ArgumentParser) -> None:
    """``--no-cache`` on a program's parser."""
    parser.add_argument("--no-cache", action="store_true",
                        help=f"do not use the persistent XLA compilation cache (default folder {default_dir()}; "
                             f"{ENV}=DIR moves it, {ENV}=off disables it)")


def from_args(args: argparse.Namespace) -> str | None:
    """:func:`enable` unless ``args.no_cache``; returns the folder in use, or None."""
    if getattr(args, "no_cache", False):
        disable()
        return None
    return enable()
