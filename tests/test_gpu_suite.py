"""The GPU suite's machinery without a model: grid order, the budget, ratios, targets, table."""

from __future__ import annotations

import pytest

from experiments.benchmarks import common, gpu_suite
from experiments.benchmarks.gpu_suite import Row

MODELS = ["gpt2-small", "roberta-base", "bert-base", "roberta-large", "gpt2-medium"]
PEERS = ["pytorch/nonprivate", "opacus/ghost", "jax_privacy/microbatch=MB"]


def grid(**kwargs):
  args = dict(
    models=MODELS,
    seqs=[256, 128],
    dtypes=["fp32", "bf16"],
    modes=["bookkeeping", "nonprivate", "vmap"],
    peer_rows=PEERS,
    batch=32,
  )
  return gpu_suite.build_grid(**{**args, **kwargs})


def test_grid_runs_the_target_rows_first_then_dp_rows_then_vmap_then_peers():
  rows = grid(batch_overrides={("roberta-large", None): 16, ("gpt2-medium", 128): 8})
  # 5 models x 2 T x 2 dtypes x 3 modes, and 3 BERT-type models x 4 groups x 3 peers.
  assert len(rows) == 60 + 36
  assert len(set(rows)) == len(rows)
  assert [(r.model, r.dtype, r.mode) for r in rows[:8]] == [
    ("gpt2-small", "fp32", "nonprivate"),
    ("gpt2-small", "fp32", "bookkeeping"),
    ("roberta-base", "fp32", "nonprivate"),
    ("roberta-base", "fp32", "bookkeeping"),
    ("gpt2-small", "bf16", "nonprivate"),
    ("gpt2-small", "bf16", "bookkeeping"),
    ("roberta-base", "bf16", "nonprivate"),
    ("roberta-base", "bf16", "bookkeeping"),
  ]
  assert all(r.seq == 256 and r.batch == 32 and r.tier == 0 for r in rows[:8])
  kinds = [r.kind for r in rows]
  assert kinds[:40].count("vmap") == 0 and set(kinds[40:60]) == {"vmap"}
  assert set(kinds[60:]) == {"peer"}
  # Every T=256 group before any T=128 one in the second tier; non-private first in a group.
  tier1 = rows[8:40]
  assert [r.seq for r in tier1] == sorted((r.seq for r in tier1), reverse=True)
  for i, r in enumerate(rows):
    if r.mode == "bookkeeping":
      assert rows[i - 1].group == r.group and rows[i - 1].mode == "nonprivate"
  assert {r.mode for r in rows if r.kind == "vmap"} == {"vmap:8"}
  assert {r.model for r in rows if r.system != "dpjax"} == {
    "bert-base",
    "roberta-base",
    "roberta-large",
  }
  assert {r.mode for r in rows if r.system == "jax_privacy"} == {"microbatch=8"}
  assert {r.batch for r in rows if r.model == "roberta-large"} == {16}
  assert {(r.seq, r.batch) for r in rows if r.model == "gpt2-medium"} == {(256, 32), (128, 8)}
  assert {r.layers for r in rows if r.model == "gpt2-medium"} == {24}
  # The worker's mode strings: the dtype suffix, and SYSTEM/MODE for a peer.
  assert rows[5].worker_mode == "bookkeeping@bf16"
  assert rows[-1].worker_mode == "jax_privacy/microbatch=8@bf16"


def test_grid_rejects_unknown_names():
  with pytest.raises(ValueError, match="dtype"):
    grid(dtypes=["fp16"])
  with pytest.raises(ValueError, match="peer"):
    grid(peer_rows=["opacus/fast"])
  with pytest.raises(ValueError, match="MODEL=B"):
    gpu_suite.parse_batch_overrides(["gpt3=4"])
  assert gpu_suite.parse_batch_overrides(["roberta-large:256=16", "gpt2-medium=8"]) == {
    ("roberta-large", 256): 16,
    ("gpt2-medium", None): 8,
  }


class FakeClock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def row(model="gpt2-small", mode="nonprivate", system="dpjax", dtype="fp32", seq=256, batch=32):
  return Row(model, seq, dtype, batch, system, mode, common.num_layers(model))


def test_budget_skips_rows_that_would_not_fit_and_runs_cheaper_later_ones():
  clock = FakeClock()
  seconds = {"gpt2-small": 20.0, "gpt2-medium": 50.0}
  calls = []

  def run_row(r, timeout):
    calls.append((r.model, r.mode, timeout))
    clock.now += seconds[r.model]
    return {"system": r.system, "mode": r.mode, "median_step_seconds": 1.0, "peak_memory_mb": 1.0}

  rows = [
    row(),  # 20 s: 80 left
    row("gpt2-medium"),  # no estimate for this model: scaled by layers (24/12 x 20 = 40): runs
    row("gpt2-medium", "bookkeeping"),  # ~65 s (50 x 1.3) > 30 left: skipped
    row(mode="bookkeeping"),  # ~26 s (20 x 1.3) fits in 30: runs (then 10 left)
    row(dtype="bf16"),  # 20 s > 10: skipped
    row(seq=128),  # likewise
  ]
  results = gpu_suite.run_grid(rows, 100.0, run_row, clock=clock)
  assert [r["status"] for r in results] == ["ok", "ok", "skipped", "ok", "skipped", "skipped"]
  assert calls == [
    ("gpt2-small", "nonprivate", 100.0),
    ("gpt2-medium", "nonprivate", 80.0),
    ("gpt2-small", "bookkeeping", 30.0),
  ]
  assert results[2]["reason"] == "budget: needs ~65 s, 30 s left"
  assert results[4]["reason"] == "budget: needs ~20 s, 10 s left"
  assert results[1]["wall_seconds"] == 50.0 and results[1]["layers"] == 24


def test_estimates_scale_by_kind_and_layers():
  done = [(row(), 10.0), (row(mode="bookkeeping"), 13.0)]
  assert gpu_suite.estimate_seconds(row(), []) is None
  assert gpu_suite.estimate_seconds(row(seq=128), done) == 10.0
  assert gpu_suite.estimate_seconds(row(mode="vmap:8"), done) == pytest.approx(16.0)
  assert gpu_suite.estimate_seconds(row("roberta-large"), done) == pytest.approx(20.0)


def test_failures_are_rows_and_a_missing_peer_skips_its_other_rows():
  clock = FakeClock()

  def run_row(r, timeout):
    clock.now += 1.0
    if r.system == "opacus":
      return {"system": "opacus", "mode": r.mode, "error": "opacus is not installed: pip ..."}
    if r.mode == "vmap:8":
      return "jax.errors.JaxRuntimeError: RESOURCE_EXHAUSTED: Out of memory allocating 9 GiB"
    if r.mode == "bookkeeping":
      return "timeout: killed after 12 s"
    return "ValueError: something else"

  rows = [
    row(mode="vmap:8"),
    row(mode="bookkeeping"),
    row(),
    row("bert-base", "ghost", "opacus"),
    row("bert-base", "ghost", "opacus", dtype="bf16"),
    row("bert-base", "microbatch=8", "jax_privacy"),
  ]
  results = gpu_suite.run_grid(
    rows, 100.0, run_row, unavailable={"jax_privacy": "jax_privacy is not installed"}, clock=clock
  )
  assert [r["status"] for r in results] == [
    "oom",
    "timeout",
    "error",
    "error",
    "skipped",
    "skipped",
  ]
  assert results[4]["reason"] == "opacus is not installed: pip ..."
  assert results[5]["reason"] == "jax_privacy is not installed"
  assert clock.now == 4.0


def result(mode, seconds, memory, model="gpt2-small", dtype="fp32", system="dpjax", status="ok"):
  out = {
    "model": model,
    "seq": 256,
    "dtype": dtype,
    "batch": 32,
    "system": system,
    "mode": mode,
    "status": status,
  }
  if status == "ok":
    out.update(median_step_seconds=seconds, examples_per_second=32 / seconds)
    out.update(peak_memory_mb=memory, xla_step_memory_mb=memory / 2)
  else:
    out["reason"] = "budget: 3 s left"
  return out


def test_ratios_targets_and_table():
  results = [
    result("nonprivate", 0.10, 1000.0),
    result("bookkeeping", 0.105, 1100.0),
    result("vmap:8", 0.30, 5000.0),
    result("nonprivate", 0.20, 2000.0, model="roberta-base"),
    result("bookkeeping", 0.25, 2100.0, model="roberta-base"),
    result("ghost", 0.5, 3000.0, model="roberta-base", system="opacus"),
    result("nonprivate", 0, 0, dtype="bf16", status="skipped"),
    result("bookkeeping", 0.06, 700.0, dtype="bf16"),
  ]
  gpu_suite.add_ratios(results)
  assert results[1]["time_ratio"] == pytest.approx(1.05)
  assert results[1]["memory_ratio"] == pytest.approx(1.10)
  assert results[2]["xla_memory_ratio"] == pytest.approx(5.0)
  assert results[5]["time_ratio"] == pytest.approx(2.5)  # a peer against dpjax's non-private
  assert "time_ratio" not in results[7]  # its non-private row did not run

  targets = gpu_suite.check_targets(results, "gpu")
  assert targets["verdict"] == "not met"  # roberta-base: 1.25x time
  assert [c["met"] for c in targets["rows"]] == [True, False, None]
  assert "gpt2-small fp32 B=32: 1.05x time, 1.10x memory" in targets["line"]
  assert "gpt2-small bf16 B=32: not measured" in targets["line"]
  assert gpu_suite.check_targets(results[:3], "gpu")["verdict"] == "met"
  assert gpu_suite.check_targets(results[:3] + results[6:], "gpu")["verdict"] == (
    "met where measured"
  )
  assert gpu_suite.check_targets(results[2:3], "gpu")["verdict"] == "not measured"
  cpu = gpu_suite.check_targets(results[:3], "cpu")
  assert cpu["verdict"] == "not evaluated" and "ran on cpu" in cpu["line"]

  table = gpu_suite.markdown_table(results).splitlines()
  assert len(table) == 2 + len(results)
  assert table[3] == (
    "| gpt2-small | 256 | fp32 | 32 | dpjax | bookkeeping | 0.1050 | 304.8 | 1100 | 550 "
    "|  | 1.05 | 1.10 |  |"
  )
  assert table[8].endswith("| skipped: budget: 3 s left |")
  report = {
    "settings": {"dry_run": True, "steps": 1, "warmup": 1, "budget_s": 60},
    "hardware": {"platform": "cpu", "device_kind": "cpu", "device_count": 1},
    "packages": {"jax": "0.10.2"},
    "wall_seconds": 55.0,
    "rows": results,
    "targets": cpu,
  }
  markdown = gpu_suite.render_markdown(report)
  assert markdown.startswith("# GPU suite (DRY RUN")
  assert "rows: 7 ok, 1 skipped." in markdown and cpu["line"] in markdown


def test_worker_timeout_and_out_of_memory_lines():
  # Any `python -m` module will do: timeit runs the statement it is given.
  slept = common.run_worker("timeit", "-n1", ["-r1", "import time; time.sleep(30)"], timeout=1)
  assert slept == "timeout: killed after 1 s"
  raised = common.run_worker(
    "timeit", "-n1", ["-r1", "raise MemoryError('RESOURCE_EXHAUSTED: Out of memory')"]
  )
  assert raised.endswith("MemoryError: RESOURCE_EXHAUSTED: Out of memory")
