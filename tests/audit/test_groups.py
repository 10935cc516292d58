"""The per-group report on a toy dataset with known per-group accuracy."""

import numpy as np
import pytest

from dpjax.audit import groups


def toy(n_major=900, n_minor=100, acc_major=0.9, acc_minor=0.6, seed=0):
  rng = np.random.default_rng(seed)
  labels = ["major"] * n_major + ["minor"] * n_minor
  correct = np.concatenate([rng.random(n_major) < acc_major, rng.random(n_minor) < acc_minor])
  return labels, correct


def test_known_per_group_accuracy_gap_and_worst_group():
  labels, dp = toy()
  _, reference = toy(acc_major=0.92, acc_minor=0.85, seed=1)
  norms = np.where(np.asarray(labels) == "minor", 3.0, 0.5)
  report = groups.group_report(labels, dp, reference, norms, clip_norm=1.0, bootstrap_samples=300)
  rows = {row["group"]: row for row in report["groups"]}
  assert rows["major"]["count"] == 900 and rows["minor"]["count"] == 100
  for name, model, true in [
    ("major", "dp", 0.9),
    ("minor", "dp", 0.6),
    ("minor", "reference", 0.85),
  ]:
    low, high = rows[name][f"{model}_interval"]
    assert low <= true <= high, (name, model, low, high)
    assert rows[name][f"{model}_accuracy"] == pytest.approx(
      np.mean(np.asarray(dp if model == "dp" else reference)[np.asarray(labels) == name])
    )
  assert report["dp"]["worst_group"] == "minor"
  assert report["dp"]["gap"] == pytest.approx(
    rows["major"]["dp_accuracy"] - rows["minor"]["dp_accuracy"]
  )
  assert report["dp"]["gap_interval"][0] > report["reference"]["gap_interval"][1]  # DP widens it
  assert rows["minor"]["accuracy_drop"] > rows["major"]["accuracy_drop"]
  assert rows["minor"]["clipped_fraction"] == 1.0 and rows["major"]["clipped_fraction"] == 0.0
  assert report["dp"]["macro_accuracy"] == pytest.approx(
    (rows["major"]["dp_accuracy"] + rows["minor"]["dp_accuracy"]) / 2
  )


def test_length_bins_cover_every_example_without_overlap():
  lengths = np.arange(1, 101)
  labels = groups.length_bins(lengths)
  assert len(set(labels)) == 4 and len(labels) == 100
  for length, label in zip(lengths, labels):  # each label names a range holding its length
    low, high = map(int, label.removeprefix("len ").split("-"))
    assert low <= length <= high
  assert labels[0].startswith("len 1-") and labels[-1].endswith("-100")
  report = groups.group_report(labels[::-1], np.ones(100, bool), bootstrap_samples=5)
  assert [r["group"] for r in report["groups"]] == sorted(
    set(labels), key=lambda g: int(g[4:].split("-")[0])
  )
  assert groups.length_bins([7, 7, 7]) == ["len 7-7"] * 3


def test_mismatched_inputs_are_refused():
  with pytest.raises(ValueError, match="equal-length"):
    groups.group_report(["a", "b"], [True])
