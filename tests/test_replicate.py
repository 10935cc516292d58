"""The replication grid: cells, resume status, the table and the plot from summaries."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from experiments import replicate

ROOT_DIR = __import__("pathlib").Path(__file__).resolve().parents[1]


def _write(workdir, accuracy, epsilon, dp=True, steps=40, planned=40, preempted=False):
  workdir.mkdir(parents=True, exist_ok=True)
  summary = {
    "dp": dp,
    "epsilon": epsilon if dp else None,
    "steps": steps,
    "planned_steps": planned,
    "preempted": preempted,
    "stopped_by_budget": False,
    "eval": {"accuracy": accuracy},
  }
  (workdir / "summary.json").write_text(json.dumps(summary))


def test_cells_cover_the_grid_seed_major_and_share_non_private_runs(tmp_path):
  recipes = replicate.GRIDS["cpu"][:2]  # lora_flat and lora_automatic
  cells = replicate.cells(recipes, [8.0, math.inf], 2)
  assert len(cells) == 2 * 2 * 2 and [c.seed for c in cells[:4]] == [0] * 4
  flat, auto = (c for c in cells[:4] if c.epsilon == math.inf)
  assert flat.workdir(tmp_path) == auto.workdir(tmp_path)  # one non-private run for both
  assert flat.command(tmp_path, None) == auto.command(tmp_path, None)
  command = " ".join(auto.command(tmp_path, None))
  assert "--config.dp.enabled=False" in command and "dp.clip" not in command
  private = next(c for c in cells if c.recipe.name == "lora_automatic" and c.epsilon == 8)
  command = " ".join(private.command(tmp_path, "/ckpt"))
  assert "--config.dp.clip=automatic" in command and "--config.dp.epsilon=8" in command
  assert "--config.model.name=/ckpt" in command and "seed_0" in command


def test_status_is_done_only_for_a_run_that_ended(tmp_path):
  cell = replicate.cells(replicate.GRIDS["cpu"][:1], [8.0], 1)[0]
  assert replicate.status(cell, tmp_path) == "missing"
  _write(cell.workdir(tmp_path), 0.8, 7.99, steps=20)
  assert replicate.status(cell, tmp_path) == "partial"
  _write(cell.workdir(tmp_path), 0.8, 7.99, preempted=True)
  assert replicate.status(cell, tmp_path) == "partial"
  _write(cell.workdir(tmp_path), 0.8, 7.99)
  assert replicate.status(cell, tmp_path) == "done"


def test_the_table_gives_mean_std_gaps_and_missing_cells(tmp_path):
  recipes = replicate.GRIDS["cpu"][:2]
  epsilons = [3.0, 8.0, math.inf]
  values = {8.0: (0.80, 0.82, 0.84), math.inf: (0.85, 0.86, 0.87)}
  for cell in replicate.cells(recipes[:1], epsilons, 3):
    if cell.epsilon in values:
      dp = math.isfinite(cell.epsilon)
      _write(cell.workdir(tmp_path), values[cell.epsilon][cell.seed], 7.9 + cell.seed / 100, dp)
  written = replicate.write_outputs(tmp_path, recipes, epsilons, 3)
  assert [p.name for p in written] == [replicate.TABLE, replicate.PLOT]
  text = (tmp_path / replicate.TABLE).read_text()
  row = next(line for line in text.splitlines() if line.startswith("| `lora_flat`"))
  assert "| not run |" in row  # ε = 3
  assert "82.0 ± 2.0 [ε 7.92]" in row and "86.0 ± 1.0 |" in row
  auto = next(line for line in text.splitlines() if line.startswith("| `lora_automatic`"))
  assert auto.count("not run") == 2 and "86.0 ± 1.0" in auto  # shares the non-private runs
  assert "ε = 8: best `lora_flat` 82.0%, 4.0 points below" in text
  assert "best non-private recipe (more than 2 points)" in text
  assert (tmp_path / replicate.PLOT).stat().st_size > 10_000


def test_a_partly_done_cell_says_how_many_seeds(tmp_path):
  recipes = replicate.GRIDS["cpu"][:1]
  cell = replicate.cells(recipes, [1.0], 3)[0]
  _write(cell.workdir(tmp_path), 0.7, 0.99)
  replicate.write_outputs(tmp_path, recipes, [1.0], 3)
  assert "70.0 (1 of 3 seeds) [ε 0.99]" in (tmp_path / replicate.TABLE).read_text()


@pytest.mark.parametrize(
  "args, field",
  [
    (["--epsilons=8,x"], "--epsilons"),
    (["--epsilons=0"], "--epsilons"),
    (["--seeds=0"], "--seeds"),
    (["--recipes=nope"], "--recipes"),
    ([], "--root"),
  ],
)
def test_bad_flags_are_one_line_and_exit_2(tmp_path, args, field):
  root = [] if field == "--root" else [f"--root={tmp_path / 'g'}"]
  done = subprocess.run(
    [sys.executable, "-m", "experiments.replicate", "--plan", *root, *args],
    capture_output=True,
    text=True,
    cwd=ROOT_DIR,
    timeout=120,
  )
  assert done.returncode == 2, done.stderr
  lines = done.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and field in lines[0]
  assert not (tmp_path / "g").exists()
