"""Helpers for tests that run the experiment runner on the tiny config."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from experiments import sst2
from tests.shared_fixtures import shared_once

ROOT = Path(__file__).resolve().parents[2]

# The tests that only read a finished run share one, trained once per test run.
SHARED_RUN = {"train.steps": 16}


def shared_run(tmp_path_factory) -> Path:
  """The workdir of one finished tiny run (``SHARED_RUN``), trained once per test run and
  shared by every test module and worker that asks (read it; copy it to change it)."""
  from dpjax.train import loop  # pylint: disable=import-outside-toplevel

  build = lambda root: loop.train_and_evaluate(
    tiny(str(root / "token_cache"), **SHARED_RUN), root / "run"
  )
  return shared_once(tmp_path_factory, "trained_tiny_run", build) / "run"


def tiny(token_cache, get_config=sst2.get_config, variant="tiny", **overrides):
  """A tiny variant (sst2.py:tiny by default) with its token cache in ``token_cache`` and
  ``overrides`` applied."""
  c = get_config(variant)
  c.data.cache_dir = token_cache
  c.data.eval_limit = 64
  for key, value in overrides.items():
    node = c
    *path, leaf = key.split(".")
    for part in path:
      node = node[part]
    node[leaf] = value
  return c


def copy_run(workdir: Path, destination: Path) -> Path:
  """A private copy of a finished workdir, for tests that change or damage it."""
  shutil.copytree(workdir, destination, ignore=shutil.ignore_patterns(".lock"))
  return destination


def run_main(workdir, *args, timeout=300):
  """``python -m dpjax.main --config=experiments/sst2.py:tiny --workdir=...`` plus ``args``."""
  return subprocess.run(
    [
      sys.executable,
      "-m",
      "dpjax.main",
      "--config=experiments/sst2.py:tiny",
      f"--workdir={workdir}",
      *args,
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=timeout,
  )
