"""python -m dpjax.synthesize: DP synthetic text in the released label proportions."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from dpjax import privacy, synthesize
from dpjax.privacy import noise
from dpjax.train import loop
from dpjax.train.config import ConfigError
from experiments import synthetic_sst2
from tests.causal_runs import generator  # noqa: F401  (a fixture)
from tests.train.runs import ROOT, copy_run


def test_the_histogram_segment_is_in_the_ledger_and_epsilon_covers_it(generator):  # noqa: F811
  summary = json.loads((generator / "summary.json").read_text())
  ledger = privacy.PrivacyLedger.from_dict(summary["ledger"])
  first = ledger.segments[0]
  assert (first.sampling_prob, first.noise_multiplier, first.steps) == (1.0, 10.0, 1)
  assert summary["epsilon"] == pytest.approx(ledger.epsilon(summary["delta"]))
  assert summary["epsilon"] <= summary["target_epsilon"]
  steps_only = privacy.PrivacyLedger(segments=ledger.segments[1:])
  assert steps_only.epsilon(summary["delta"]) < summary["epsilon"]
  counts = summary["releases"]["label_histogram"]["counts"]
  assert sum(counts) == pytest.approx(summary["dataset_size"], abs=6 * 10 * np.sqrt(2))
  # Noised and snapped to σ's grid (1/64 for σ = 10). Exact counts would be integers summing
  # to N; noised ones look like that with probability ~(1/64)²·P(Σ noise = 0) < 1e-5.
  grid = noise.snap_grid(10.0)
  assert all(c / grid == round(c / grid) for c in counts)
  assert not (all(c == round(c) for c in counts) and sum(counts) == summary["dataset_size"])


def test_every_histogram_drawn_is_charged_once(generator, tmp_path):  # noqa: F811
  workdir = copy_run(generator, tmp_path / "run")
  before = json.loads((workdir / "summary.json").read_text())
  c = synthetic_sst2.get_config("tiny")
  c.data.cache_dir = str(generator.parent / "token_cache")
  c.model.train = "lora"  # as the shared run was trained
  c.train.steps = 8
  c.dp.noise_multiplier = 1.0  # σ given: no budget, so the run can go on past ε = 8
  c.resume = "allow_changes"
  # A resumed run keeps the release its checkpoints hold: drawn once, charged once.
  after = loop.train_and_evaluate(c, workdir)
  assert after["steps"] == 8 and after["releases"] == before["releases"]
  histograms = lambda summary: sum(  # histogram draws in the ledger (merged segments add up)
    s.steps
    for s in privacy.PrivacyLedger.from_dict(summary["ledger"]).segments
    if s.sampling_prob == 1
  )
  assert histograms(after) == 1
  # The checkpoints lost: the published histogram (draw 0) is still charged, and the new
  # one (draw 1) has noise of its own.
  shutil.rmtree(workdir / "checkpoints")
  c.train.steps = 1
  again = loop.train_and_evaluate(c, workdir)
  assert again["releases"]["label_histogram"]["draw"] == 1
  assert (
    again["releases"]["label_histogram"]["counts"]
    != before["releases"]["label_histogram"]["counts"]
  )
  assert histograms(again) == 2
  journal = [json.loads(line) for line in (workdir / "privacy_journal.jsonl").open()]
  assert [r["index"] for r in journal if "release" in r] == [0, 1]


def test_synthesize_writes_labelled_text_in_the_released_proportions(generator, tmp_path):  # noqa: F811
  out = tmp_path / "synthetic"
  summary = synthesize.synthesize(generator, out, 40, max_new_tokens=12, batch_size=8, seed=3)
  rows = [json.loads(line) for line in (out / synthesize.SYNTHETIC_FILE).read_text().splitlines()]
  assert len(rows) == 40 == summary["texts"]
  assert all(set(r) == {"sentence", "label"} and r["sentence"].strip() for r in rows)
  run = json.loads((generator / "summary.json").read_text())
  probs = privacy.histogram.proportions(run["releases"]["label_histogram"]["counts"])
  expected = synthesize.allocate(40, probs)
  assert summary["label_counts"] == list(expected)
  assert [sum(r["label"] == k for r in rows) for k in (0, 1)] == list(expected)
  assert summary["epsilon"] == pytest.approx(run["epsilon"])
  written = (out / synthesize.SUMMARY_FILE).read_text()
  assert "secret" not in written and "label_histogram" in written
  # The same seed draws the same texts.
  again = synthesize.synthesize(
    generator, tmp_path / "again", 40, max_new_tokens=12, batch_size=8, seed=3
  )
  assert again["label_counts"] == summary["label_counts"]
  assert (tmp_path / "again" / synthesize.SYNTHETIC_FILE).read_text() == (
    out / synthesize.SYNTHETIC_FILE
  ).read_text()
  with pytest.raises(ConfigError, match="exists and is not an empty directory"):
    synthesize.synthesize(generator, out, 4)
  with pytest.raises(ConfigError, match="--strategy must be 'sample'"):
    synthesize.synthesize(generator, tmp_path / "greedy", 4, strategy="greedy")
  assert not (tmp_path / "greedy").exists()


def test_downstream_classifier_and_distance(generator, tmp_path):  # noqa: F811
  out = tmp_path / "synthetic"
  synthesize.synthesize(generator, out, 80, max_new_tokens=10, batch_size=16, seed=0)
  classifier = synthetic_sst2.get_config("downstream_tiny")
  classifier.train.steps = 2
  classifier.data.cache_dir = str(tmp_path / "cache")
  report = synthesize.downstream(out, classifier, tmp_path / "classifier")
  assert report["eval"]["count"] == 128 and 0 <= report["eval"]["accuracy"] <= 1
  assert json.loads((tmp_path / "classifier" / "summary.json").read_text())["dataset_size"] == 80
  result = synthesize.distance(out, "sst2:validation", synthetic_sst2.get_config("tiny"), 80)
  assert result["frechet_synthetic_vs_real"] > result["frechet_real_half_vs_half"] > 0


def test_cli_bad_inputs_get_one_line(generator, tmp_path):  # noqa: F811
  def run(*flags):
    return subprocess.run(
      [sys.executable, "-m", "dpjax.synthesize", *flags],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=300,
    )

  cases = {
    ("--num=0",): "--num must be an integer >= 1",
    ("--top_p=1.5",): "config.generate.top_p must be in (0, 1]",
  }
  for flags, message in cases.items():
    result = run(f"--workdir={generator}", f"--out={tmp_path / 'o'}", *flags)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "o").exists()
