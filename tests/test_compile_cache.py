"""The persistent compilation cache every program turns on (qlip_jax/compile_cache.py)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import jax

from qlip_jax import compile_cache

# A small jitted program run as its own process, with the flags every program has. It counts JAX's
# persistent-cache hit events; the compile-time threshold is lowered so that this tiny program is stored.
PROGRAM = """
import argparse, sys
import jax, jax.numpy as jnp
from jax import monitoring
from qlip_jax import compile_cache
hits = []
monitoring.register_event_listener(
    lambda event, **kw: hits.append(event) if event == "/jax/compilation_cache/cache_hits" else None)
p = argparse.ArgumentParser()
compile_cache.add_argument(p)
folder = compile_cache.from_args(p.parse_args(sys.argv[1:]))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum() * 3.0 + 1.0)
print(float(f(jnp.arange(12.0).reshape(3, 4) / 10)))
print(folder, len(hits))
"""


def _run(tmp_path, env_extra: dict, *flags: str) -> tuple[float, str, int]:
    env = {k: v for k, v in os.environ.items() if k not in ("QLIP_CACHE", "XDG_CACHE_HOME",
                                                            "JAX_COMPILATION_CACHE_DIR")}
    env.update(HOME=str(tmp_path / "home"), JAX_PLATFORMS="cpu", **env_extra)
    out = subprocess.run([sys.executable, "-c", PROGRAM, *flags], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    value, last = out.stdout.strip().splitlines()[-2:]
    folder, hits = last.rsplit(" ", 1)
    return float(value), folder, int(hits)


def _files(folder) -> list[str]:
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def test_second_process_loads_from_cache(tmp_path):
    """First process: a miss that writes an entry; a NEW process: the same program is a cache hit,
    same value. ``--no-cache`` writes nothing and hit nothing; without
    ``QLIP_CACHE`` the per-user folder under ``$HOME/.cache`` is used."""
    cache = str(tmp_path / "xla")
    v1, folder, hits = _run(tmp_path, {"QLIP_CACHE": cache})
    assert folder == cache and hits == 0
    entries = _files(cache)
    executables = [e for e in entries if e.endswith("-cache")]  # (and "-atime" files: LRU bookkeeping)
    assert any(e.startswith("jit__lambda") for e in executables), entries
    v2, _, hits = _run(tmp_path, {"QLIP_CACHE": cache})
    assert hits == len(executables) and v2 == v1  # every program the first process compiled
    assert _files(cache) == entries  # loaded, nothing new written

    off = str(tmp_path / "off")
    assert _run(tmp_path, {"QLIP_CACHE": off}, "--no-cache")[1:] == ("None", 0)
    assert _files(off) == [] and _files(tmp_path / "home") == []

    _, folder, _ = _run(tmp_path, {})
    assert folder == str(tmp_path / "home" / ".cache" / "qlip-jax" / "xla")
    assert any(e.startswith("jit_") for e in _files(folder))


def test_resolve(monkeypatch, tmp_path):
    monkeypatch.delenv("QLIP_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.resolve() == str(tmp_path / "xdg" / "qlip-jax" / "xla")
    monkeypatch.setenv("QLIP_CACHE", "rel/dir")
    assert compile_cache.resolve() == os.path.abspath("rel/dir")
    assert compile_cache.resolve(str(tmp_path / "x")) == str(tmp_path / "x")  # an explicit folder wins
    for off in ("off", "OFF", "0", "none", "false"):
        monkeypatch.setenv("QLIP_CACHE", off)
        assert compile_cache.resolve() is None


def test_keeps_the_session_cache(monkeypatch, tmp_path):
    """In-process programs (tests calling ``main``) keep the folder JAX already has (conftest's)."""
    session = jax.config.jax_compilation_cache_dir
    assert session and os.environ["QLIP_CACHE"] == session  # conftest: subprocesses use it too
    monkeypatch.setenv("QLIP_CACHE", str(tmp_path / "elsewhere"))
    p = argparse.ArgumentParser()
    compile_cache.add_argument(p)
    assert compile_cache.from_args(p.parse_args([])) == session
    assert compile_cache.from_args(p.parse_args(["--no-cache"])) is None
    assert jax.config.jax_compilation_cache_dir == session
    assert not (tmp_path / "elsewhere").exists()
