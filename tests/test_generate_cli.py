"""python -m dpjax.generate on a trained causal-LM workdir."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from dpjax import evaluate, generate
from dpjax.audit import reports
from dpjax.train.config import ConfigError
from tests.causal_runs import generator  # noqa: F401  (a fixture)
from tests.train.runs import ROOT


def _cli(*flags):
  return subprocess.run(
    [sys.executable, "-m", "dpjax.generate", *flags],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )


def test_generates_per_label_and_equals_the_library(generator):  # noqa: F811
  flags = ["--label=positive", "--num=3", "--strategy=sample", "--max_new_tokens=6", "--seed=4"]
  result = _cli(f"--workdir={generator}", *flags)
  assert result.returncode == 0, result.stderr[-2000:]
  rows = [json.loads(line) for line in result.stdout.splitlines()]
  assert len(rows) == 3 and {r["label"] for r in rows} == {"positive"}
  overrides = {"strategy": "sample", "max_new_tokens": 6}
  library = generate.generate_from_workdir(generator, [], ["positive"], 3, overrides, 4, None)
  assert rows == library
  # Greedy from each label's control code: one text per label, deterministic.
  greedy = generate.generate_from_workdir(generator, [], [], 1, {"max_new_tokens": 5}, 0, 4)
  assert [r["label"] for r in greedy] == ["negative", "positive"]
  assert greedy == generate.generate_from_workdir(generator, [], [], 1, {"max_new_tokens": 5}, 9, 4)


def test_evaluate_reports_perplexity_of_the_run(generator, tmp_path):  # noqa: F811
  # The training command's last line states the perplexity it measured.
  last = (generator.parent / "stdout.txt").read_text().strip().splitlines()[-1]
  assert last.startswith("done: epsilon=") and " dev perplexity=" in last
  rows = [("a gorgeous , witty , seductive movie .", 1), ("dull and lifeless .", 0)] * 6
  data = tmp_path / "dev.jsonl"
  data.write_text("".join(json.dumps({"sentence": t, "label": y}) + "\n" for t, y in rows))
  result = evaluate.evaluate_workdir(generator, str(data), batch_size=8)
  # Every completion token and eos is a target: 8 + eos and 4 + eos per pair of rows.
  assert result["count"] == 12 and result["tokens"] == 6 * (9 + 5)
  assert result["perplexity"] == pytest.approx(np.exp(result["loss"]))
  assert result["epsilon"] == json.loads((generator / "summary.json").read_text())["epsilon"]


def test_bad_requests_are_refused(generator, tmp_path):  # noqa: F811
  with pytest.raises(ConfigError, match="--label: label 'good' is not one of"):
    generate.generate_from_workdir(generator, [], ["good"], 1, {}, 0, None)
  with pytest.raises(ConfigError, match="takes no prompt text"):
    generate.generate_from_workdir(generator, ["a prompt"], [], 1, {}, 0, None)
  with pytest.raises(ConfigError, match=r"exceeds the model's n_positions \(256\)"):
    generate.generate_from_workdir(generator, [], [], 1, {"max_new_tokens": 1000}, 0, None)
  with pytest.raises(ConfigError, match="config.generate.top_p must be in"):
    generate.generate_from_workdir(generator, [], [], 1, {"top_p": 0.0}, 0, None)
  with pytest.raises(ConfigError, match="--reports=membership scores a classifier"):
    reports.membership(generator)
  result = _cli(f"--workdir={tmp_path}")
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2 and len(lines) == 1 and "config.json not found" in lines[0]
