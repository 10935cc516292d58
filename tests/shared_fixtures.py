"""Expensive test fixtures built once per test run, shared by every pytest-xdist worker."""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest


def shared_once(
  tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]
) -> Path:
  """A directory that ``build(directory)`` fills once per test run, whatever the workers.

  With pytest-xdist every worker has its own temporary directory under one
  per-run parent; the first worker to ask builds the directory there (under a
  file lock) and the others wait for it and reuse it. Nothing outlives the run:
  the parent is pytest's temporary directory of this run. Tests must only read
  the directory (copy it to change it).
  """
  base = tmp_path_factory.getbasetemp()
  parent = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
  root = parent / f"shared-{name}"
  with open(parent / f"shared-{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      if not (root / ".built").exists():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir()
        build(root)
        (root / ".built").touch()
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)
  return root
