"""One tiny causal-LM generator run, trained by the command line, shared by the LM tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.shared_fixtures import shared_once
from tests.train.runs import ROOT


def _train(root: Path) -> None:
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "dpjax.main",
      "--config=experiments/synthetic_sst2.py:tiny",
      f"--workdir={root / 'run'}",
      f"--config.data.cache_dir={root / 'token_cache'}",
      "--config.model.train=lora",  # adapters on attn/c_attn: the export merges them
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  (root / "stdout.txt").write_text(result.stdout)


@pytest.fixture(scope="module")
def generator(tmp_path_factory) -> Path:
  """The workdir of ``synthetic_sst2.py:tiny`` with LoRA (6 DP steps, label histogram released)."""
  return shared_once(tmp_path_factory, "causal_generator_run", _train) / "run"
