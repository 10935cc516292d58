"""dp.clip=quantile through the runner: the bound lives in the checkpoint and resumes exactly."""

import json

from dpjax import parallel
from dpjax.train import loop
from tests.train.runs import tiny

QUANTILE = {
  "dp.clip": "quantile",
  "dp.clip_quantile_lr": 0.5,  # the bound visibly moves in a few steps
  "dp.insecure_fixed_noise_seed": 5,  # the twin runs draw the same noise and samples
  "train.steps": 6,
  "train.log_every_steps": 2,
}


def test_an_interrupted_quantile_run_resumes_to_the_same_params_and_bound(
  tmp_path, token_cache, monkeypatch
):
  want = loop.train_and_evaluate(tiny(token_cache, **QUANTILE), tmp_path / "a")

  calls = []
  stop_after_third = lambda flag: calls.append(flag) or len(calls) == 3
  monkeypatch.setattr(parallel, "any_process", stop_after_third)  # as if SIGTERM at step 3
  first = loop.train_and_evaluate(tiny(token_cache, **QUANTILE), tmp_path / "b")
  monkeypatch.undo()
  assert first["preempted"] and first["steps"] == 3
  got = loop.train_and_evaluate(tiny(token_cache, **QUANTILE), tmp_path / "b")

  assert got["steps"] == want["steps"] == 6 and got["ledger_steps"] == 6
  assert got["params_sha256"] == want["params_sha256"]
  assert got["final_clip_norm"] == want["final_clip_norm"] != 1.0
  assert got["epsilon"] == want["epsilon"]
  facts = want["adaptive_clipping"]
  assert facts["count_noise"] == 64 / 20 and facts["initial_clip_norm"] == 1.0
  assert facts["gradient_noise_multiplier"] > want["noise_multiplier"]
  # The bound is published with ε (a function of the noisy counts), the same in both runs.
  rows = lambda run: [
    json.loads(line)
    for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
    if json.loads(line)["split"] == "privacy"
  ]
  bounds = [r["clip_norm"] for r in rows("a")]
  assert len(bounds) == 3 and bounds == [r["clip_norm"] for r in rows("b")]
