"""Suite-wide setup: one XLA compilation cache per test run.

Many tests (in this process and in the `python -m dpjax.main` subprocesses they
start) compile the same tiny train step; JAX's persistent compilation cache lets
the second compile of an identical program load the first one's executable. It
changes nothing but compile time: the cache key is the program itself, the jax
version and the backend. The directory is fresh for each run (shared by the
pytest-xdist workers of that run), unless JAX_COMPILATION_CACHE_DIR is set.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import jax


def pytest_configure(config):  # pylint: disable=unused-argument
  if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    # Equal on all xdist workers of one run; without xdist, this process's id.
    run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID") or f"pid{os.getpid()}"
    path = Path(tempfile.gettempdir()) / f"dpjax-tests-xla-cache-{run_id}"
    path.mkdir(parents=True, exist_ok=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(path)  # inherited by subprocesses
  # Cache every compile, not only those over 1 s (JAX's default): the suite repeats many
  # sub-second ones (init, eval and noise programs of the tiny runs) across processes.
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
  jax.config.update(
    "jax_persistent_cache_min_compile_time_secs",
    float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]),
  )
