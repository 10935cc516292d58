"""python -m dpjax.main --dry_run: the run's plan without its weights, compile or workdir."""

from __future__ import annotations

import subprocess
import sys

import jax
import pytest

from dpjax.models import lora
from dpjax.train import dry_run, task
from tests.train.runs import ROOT, SHARED_RUN, tiny


def test_the_dry_run_plans_what_the_run_did(trained, token_cache):
  workdir, summary = trained
  c = tiny(token_cache, **SHARED_RUN)
  planned = dry_run.plan(c)
  m = planned.mechanism
  assert m.dataset_size == summary["dataset_size"]
  assert m.steps == summary["planned_steps"] == summary["steps"]
  assert m.sampling_prob == pytest.approx(summary["sampling_prob"], rel=1e-12)
  assert m.noise_multiplier == summary["noise_multiplier"]  # the same calibration
  assert m.delta == summary["delta"]
  assert planned.planned_epsilon == pytest.approx(summary["epsilon"], rel=1e-9)
  # Shapes only, yet the parameters the run built, split the same way.
  built = task.build(c)
  assert planned.trainable == lora.count(built.trainable)
  assert planned.parameters == lora.count(built.trainable) + lora.count(built.frozen)
  leaves = jax.tree_util.tree_leaves(built.trainable)
  assert planned.weight_bytes == 4 * planned.parameters and all(
    x.dtype == "float32" for x in leaves
  )
  assert planned.optimizer_bytes >= 2 * 4 * planned.trainable  # Adam's two moments at least


def test_the_command_prints_the_plan_and_refuses_bad_values(tmp_path):
  command = [sys.executable, "-m", "dpjax.main", "--config=experiments/sst2.py:tiny", "--dry_run"]
  run = lambda *extra: subprocess.run(
    [*command, *extra], cwd=tmp_path, capture_output=True, text=True, timeout=120
  )
  cache = f"--config.data.cache_dir={tmp_path / 'cache'}"
  command[3] = f"--config={ROOT / 'experiments/sst2.py'}:tiny"
  result = run(cache)
  assert result.returncode == 0, result.stderr[-2000:]
  lines = result.stdout.splitlines()
  assert lines[0] == "dry run: nothing is trained or written"
  assert [line.split(":")[0] for line in lines[1:]] == ["data", "sampling", "privacy", "model"]
  assert "sigma=" in lines[3] and "the planned run spends epsilon=" in lines[3]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # no workdir, no files
  bad = run(cache, "--config.train.batch_size=-3")
  assert bad.returncode == 2 and "Traceback" not in bad.stderr
  assert bad.stderr.startswith("error: ") and "train.batch_size" in bad.stderr
  assert len(bad.stderr.strip().splitlines()) == 1
