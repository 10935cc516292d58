"""python -m dpjax.plan: calibrated, certified rows; flags; configs; one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dpjax import plan as plan_lib
from dpjax.privacy import accounting, sampling

ROOT = Path(__file__).resolve().parents[1]
N = 20_000


@pytest.fixture(scope="module", autouse=True)
def config_cli(tmp_path_factory):
  """The command line planning a config: started first, it runs while the other tests do."""
  png = tmp_path_factory.mktemp("plan") / "plan.png"
  flags = ("--from_config=experiments/sst2.py:quick", "--epsilon=3", "--batch=500", "--epochs=1")
  run = _cli(*flags, f"--plot={png}")
  yield run, png
  if run.poll() is None:
    run.kill()
    run.communicate()


@pytest.fixture(scope="module")
def rows():
  return plan_lib.plan(N, 1.0, batch_sizes=[500, 2000], epochs=[1, 3])


def _cli(*flags: str) -> subprocess.Popen:
  return subprocess.Popen(
    [sys.executable, "-m", "dpjax.plan", *flags],
    cwd=ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


def test_every_sigma_is_certified_by_the_ledger_just_below_the_target(rows):
  delta = accounting.default_delta(N)
  assert [(r.batch_size, r.epochs) for r in rows] == [(500, 1), (500, 3), (2000, 1), (2000, 3)]
  for r in rows:
    assert r.steps == sampling.steps_for_epochs(r.epochs, N, r.batch_size)
    assert r.sampling_prob == r.batch_size / N
    assert r.noise_multiplier == float(f"{r.noise_multiplier:.4g}")  # shown exactly
    certified = accounting.compute_epsilon(
      r.noise_multiplier, r.sampling_prob, r.steps, delta, dataset_size=N
    )
    assert r.epsilon == certified
    assert 0.985 * 1.0 <= certified <= 1.0
    assert r.noise_to_signal == pytest.approx(r.noise_multiplier / r.batch_size)
    assert r.examples == r.steps * r.batch_size


def test_more_epochs_need_more_noise_and_larger_batches_less_noise_per_example(rows):
  by = {(r.batch_size, r.epochs): r for r in rows}
  for b in (500, 2000):
    assert by[(b, 1)].noise_multiplier < by[(b, 3)].noise_multiplier
  for e in (1, 3):
    assert by[(2000, e)].noise_to_signal < by[(500, e)].noise_to_signal


def test_recommends_the_least_noise_among_rows_without_a_flag(rows):
  # T = 40, 120, 10, 30: only (500, 3) has >= 100 steps.
  assert [r.flags for r in rows] == [("T<100",), (), ("T<100",), ("T<100",)]
  assert [r.recommended for r in rows] == [False, True, False, False]
  # Within a compute budget of one epoch nothing qualifies (the calibrations are memoized).
  capped = plan_lib.plan(N, 1.0, batch_sizes=[500, 2000], epochs=[1, 3], max_epochs=1)
  assert [r.noise_multiplier for r in capped] == [r.noise_multiplier for r in rows]
  assert not any(r.recommended for r in capped)
  table = plan_lib.format_table(rows)
  assert "\n*" in table and "T<100: too few steps" in table


def test_flags(monkeypatch):
  rows = plan_lib.plan(
    1000, 20.0, batch_sizes=[10, 600], epochs=[1], accountant="rdp", runs=[(10, 3000)]
  )
  assert [(r.batch_size, r.epochs, r.extra) for r in rows] == [
    (10, 1, False),
    (10, 30, True),
    (600, 1, False),
  ]
  assert [r.flags for r in rows] == [("σ<0.5", "noisy"), ("noisy",), ("B>N/2", "T<100", "σ<0.5")]
  for r in rows:
    eps = accounting.compute_epsilon(
      r.noise_multiplier, r.sampling_prob, r.steps, accounting.default_delta(1000), "rdp"
    )
    assert eps == r.epsilon <= 20.0
  # ε = 100 needs a σ below what dpjax.main accepts.
  (refused,) = plan_lib.plan(100_000, 100.0, batch_sizes=[1000], epochs=[1])
  assert refused.flags == ("refused",) and refused.noise_multiplier is None
  assert 0.2 < refused.sigma_floor < 0.25
  # A target no σ up to the limit reaches (the limit lowered to keep the PLDs small).
  monkeypatch.setattr(plan_lib, "MAX_SIGMA", 2.0)
  (unreachable,) = plan_lib.plan(1000, 0.5, batch_sizes=[600], epochs=[100])
  assert unreachable.flags == ("unreachable", "B>N/2") and unreachable.epsilon is None
  assert "<0.214" in plan_lib.format_table([refused])


def test_bad_arguments_name_themselves():
  for kwargs, name in [
    ({"dataset_size": 1}, "dataset_size"),
    ({"epsilon": 0.0}, "epsilon"),
    ({"epsilon": 101.0}, "epsilon"),
    ({"delta": 1e-3}, "delta"),
    ({"batch_sizes": [N + 1]}, "batch_sizes"),
    ({"epochs": []}, "epochs"),
    ({"accountant": "moments"}, "accountant"),
  ]:
    args = {"dataset_size": N, "epsilon": 3.0, **kwargs}
    with pytest.raises(ValueError, match=f"^{name} must"):
      plan_lib.plan(**args)


def test_default_grid_ends_at_the_largest_batch_with_enough_steps():
  # 10 epochs of 67,349 examples in >= 100 steps: B <= 6,734.
  assert plan_lib.default_batch_sizes(67_349) == (512, 1024, 2048, 4096)
  assert plan_lib.default_batch_sizes(512) == (4, 8, 16, 32)


def test_cli_plans_a_config_and_plots(config_cli):
  run, png = config_cli
  out, err = run.communicate(timeout=300)
  assert run.returncode == 0, err[-2000:]
  lines = out.splitlines()
  # N as the run counts it (experiments/sst2.py: N = 20,208), and the config's row.
  assert lines[0].startswith("N=20,208 (sst2:train, data.train_fraction=0.3)  target ε=3")
  config_rows = [line for line in lines if line.startswith(">  ")]
  assert len(config_rows) == 1 and config_rows[0].split()[1:4] == ["500", "1", "40"]
  assert lines[-1] == f"plot: {png} (ε vs steps for 1 row)"
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


def test_cli_user_mistakes_are_one_line_and_exit_2():
  cases = {
    ("--dataset_size=0", "--epsilon=3"): "--dataset_size must be an integer >= 2",
    ("--dataset_size=1000", "--epsilon=-1"): "--epsilon must be in (0, 100]",
    ("--dataset_size=1000", "--epsilon=3", "--batch=abc"): "--batch must be",
    ("--dataset_size=1000", "--epsilon=3", "--batch=64,2000"): "in [1, N=1000]",
    ("--dataset_size=1000", "--epsilon=3", "--delta=0.001"): "--delta must be in (0, 1/N)",
    ("--from_config=experiments/nope.py",): "--from_config cannot be loaded",
  }
  runs = {flags: _cli(*flags) for flags in cases}  # concurrently: each imports JAX
  for flags, expected in cases.items():
    out, err = runs[flags].communicate(timeout=120)
    assert runs[flags].returncode == 2, (flags, err)
    assert out == "" and "Traceback" not in err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert expected in err, err


def test_a_user_sampling_config_is_planned_over_its_users():
  from experiments import sst2_users

  run = plan_lib.config_run(sst2_users.get_config("quick_uls"))
  # 4,709 users (each capped at 4 rows), B = 139 users per step: 2 epochs over users.
  assert (run.dataset_size, run.batch_size, run.steps) == (4709, 139, 68)
  assert run.source.startswith("users of ") and any("count users" in n for n in run.notes)
  with pytest.raises(plan_lib.PlanError, match="config.dp.user_sampling must be uls"):
    plan_lib.config_run(sst2_users.get_config("quick"))
