"""Canaries of the one-run audit: fair independent coins fixed before training, in the sampler."""

import json

import numpy as np
import pytest
from scipy import stats

from dpjax.audit import canaries, reports
from dpjax.data import encoded as encoded_lib
from dpjax.models import pretrained
from dpjax.privacy import PoissonSampler
from dpjax.train import config as config_lib
from dpjax.train import loop, splits
from dpjax.train.config import ConfigError
from tests.train.runs import tiny

WORDS = [f"word{chr(97 + i)}{chr(97 + j)}" for i in range(26) for j in range(26)]


def test_coins_are_fair_independent_and_fixed_by_the_seed():
  planted = canaries.make_canaries(4000, seed=7, num_labels=2, words=WORDS)
  again = canaries.make_canaries(4000, seed=7, num_labels=2, words=WORDS)
  other = canaries.make_canaries(4000, seed=8, num_labels=2, words=WORDS)
  np.testing.assert_array_equal(planted.included, again.included)
  assert planted.examples == again.examples
  assert np.mean(planted.included != other.included) > 0.4
  coins = planted.included.astype(float)
  assert stats.binomtest(int(coins.sum()), coins.size, 0.5).pvalue > 1e-3
  # Independent of each other (no serial correlation) and of the canary's label.
  assert abs(np.corrcoef(coins[:-1], coins[1:])[0, 1]) < 4 / np.sqrt(coins.size)
  labels = np.array([e.label for e in planted.examples])
  table = [[np.sum((coins == a) & (labels == b)) for b in (0, 1)] for a in (0, 1)]
  assert stats.chi2_contingency(table).pvalue > 1e-3
  assert all(len(e.text.split()) == canaries.CANARY_WORDS for e in planted.examples)
  with pytest.raises(ValueError, match="count must be an integer >= 1"):
    canaries.make_canaries(0, seed=0, num_labels=2, words=WORDS)


def test_too_few_canaries_are_refused_by_the_config():
  c = tiny("unused", **{"audit.canaries": 5})
  with pytest.raises(
    ConfigError, match=r"config.audit.canaries must be 0 \(none\) or an integer >= 10"
  ):
    config_lib.validate(c)


def test_concatenated_datasets_keep_every_row():
  _, _, tokenizer = pretrained.load("minilm")
  encode = lambda texts: splits.data_lib.encode(
    canaries.CanarySource([canaries.Example(t, 0) for t in texts]), tokenizer, 16
  )
  a, b = encode(["one two", "three"]), encode(["four five six"])
  joined = encoded_lib.concatenate(a, b)
  assert len(joined) == 3
  np.testing.assert_array_equal(joined.token_ids(2), b.token_ids(0))
  np.testing.assert_array_equal(joined.token_ids(1), a.token_ids(1))
  np.testing.assert_array_equal(joined.labels, [0, 0, 0])
  with pytest.raises(ValueError, match="different settings"):
    encoded_lib.concatenate(a, splits.data_lib.encode(canaries.CanarySource([]), tokenizer, 32))


@pytest.fixture(scope="module")
def canary_run(tmp_path_factory, token_cache):
  workdir = tmp_path_factory.mktemp("canary_run") / "run"
  c = tiny(token_cache, **{"audit.canaries": 64, "train.steps": 8})
  return c, workdir, loop.train_and_evaluate(c, workdir)


def test_in_canaries_are_training_rows_that_the_sampler_draws(canary_run):
  c, workdir, summary = canary_run
  _, _, tokenizer = pretrained.load("minilm")
  planted = splits.canaries_of(c, tokenizer)
  file_only = splits.load_split(
    c.data.train, tokenizer, c, c.data.cache_dir, fraction=c.data.train_fraction, seed=c.seed
  )
  train, count = splits.training_split(c, tokenizer, c.data.cache_dir)
  assert count == summary["audit_canaries"] == int(planted.included.sum()) > 0
  assert summary["dataset_size"] == len(file_only) + count == len(train)
  expected = splits.encode_canaries(c, tokenizer, planted.in_examples)
  for k in range(count):  # the in-canaries, in order, after the file's rows
    np.testing.assert_array_equal(
      train.encoded.token_ids(int(train.indices[len(file_only) + k])), expected.token_ids(k)
    )
  # They are ordinary rows for the Poisson sampler: drawn at rate q like the file's rows.
  sampler = PoissonSampler(len(train), summary["expected_batch_size"], key=b"k" * 32)
  draws = np.concatenate([sampler.sample(t) for t in range(400)])
  hits = np.sum(draws >= len(file_only))
  expected_hits = 400 * count * summary["sampling_prob"]
  assert abs(hits - expected_hits) < 5 * np.sqrt(expected_hits)


def test_the_canary_report_bounds_epsilon_below_the_ledger(canary_run):
  _, workdir, summary = canary_run
  report = reports.canaries(workdir)
  assert report["canaries"] == 64 and report["canaries_in"] == summary["audit_canaries"]
  assert 0 <= report["epsilon_one_run"] <= summary["epsilon"]
  assert 0 <= report["epsilon_one_run_fdp"] <= summary["epsilon"]
  assert "no training row" in report["computed_from"]
  assert json.loads(json.dumps(report)) == report


def test_the_one_run_audit_detects_a_run_that_memorizes_its_canaries(tmp_path, token_cache):
  # Without DP and with ~30 epochs, the tiny model memorizes its random-label canaries: the
  # f-DP one-run bound must see it (the Steinke bound cannot here: 2mδ = 0.32 at N = 658).
  c = tiny(
    token_cache,
    **{
      "audit.canaries": 200,
      "dp.enabled": False,
      "train.steps": 300,
      "train.log_every_steps": 100,
      "train.checkpoint_every_steps": 0,
    },
  )
  loop.train_and_evaluate(c, tmp_path / "run")
  report = reports.canaries(tmp_path / "run")
  assert max(a["auroc"] for a in report["attacks"]) > 0.9, report
  assert report["epsilon_one_run_fdp"] > 1.0, report
