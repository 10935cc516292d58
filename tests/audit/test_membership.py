"""Membership-inference metrics (the ledger's TPR bound is tested in tests/privacy)."""

import numpy as np
import pytest
from scipy import stats

from dpjax.audit import membership


def test_metrics_of_scores_with_a_known_roc():
  rng = np.random.default_rng(0)
  mu = 1.5
  result = membership.evaluate_attack(
    "synthetic", rng.normal(mu, 1, 20_000), rng.normal(0, 1, 20_000), bootstrap_samples=100
  )
  true_auroc = stats.norm.cdf(mu / np.sqrt(2))
  assert result.auroc_interval[0] < true_auroc < result.auroc_interval[1]
  for fpr in membership.REPORT_FPRS:
    true_tpr = stats.norm.sf(stats.norm.isf(fpr) - mu)
    low, high = result.tpr_intervals[fpr]
    assert low <= true_tpr <= high, (fpr, low, true_tpr, high)
  assert result.max_tpr_at_fpr is None
  assert result.to_dict()["tpr_at_fpr"].keys() == {"0.001", "0.01"}
  assert result.interval_method == "BCa bootstrap, 100 resamples"
  assert result.tpr_at_fpr_note == {} and result.auroc_note is None
  assert result.auroc <= result.auroc_hull  # the hull's area is the optimistic one


def test_a_small_audit_says_its_low_fpr_tprs_are_not_measured():
  rng = np.random.default_rng(5)
  result = membership.evaluate_attack("small", rng.normal(0.2, 1, 150), rng.normal(0, 1, 150))
  out = result.to_dict()
  assert out["interval_method"] == "BCa bootstrap, 2000 resamples"
  assert out["auroc_interval"][0] <= out["auroc"] <= out["auroc_interval"][1]
  assert out["tpr_at_fpr_note"].keys() == {"0.001", "0.01"}
  assert "fewer than 1/FPR = 1000" in out["tpr_at_fpr_note"]["0.001"]
  for fpr in ("0.001", "0.01"):
    low, high = out["tpr_intervals"][fpr]
    assert low == 0 <= out["tpr_at_fpr"][fpr] <= high
  # Uninformative scores: the hull's area is above 0.5, the reported AUROC is not biased.
  null = [
    membership.evaluate_attack(
      "null", rng.normal(0, 1, 100), rng.normal(0, 1, 100), bootstrap_samples=1
    )
    for _ in range(40)
  ]
  assert abs(np.mean([r.auroc for r in null]) - 0.5) < 0.015
  assert np.mean([r.auroc_hull for r in null]) > 0.53


def test_loss_and_lira_scores():
  np.testing.assert_array_equal(membership.loss_scores([0.5, 2.0]), [-0.5, -2.0])
  phi = membership.logit_confidence([0.5, 0.9, 1.0])
  np.testing.assert_allclose(phi[:2], [0.0, np.log(9)])
  assert np.isfinite(phi[2])
  rng = np.random.default_rng(1)
  out_means = rng.normal(0, 3, 400)  # per-example difficulty
  shadows = out_means + rng.normal(0, 1, (8, 400))
  members = out_means[:200] + 1.0 + rng.normal(0, 1, 200)  # trained on: φ up by 1
  non_members = out_means[200:] + rng.normal(0, 1, 200)
  target = np.concatenate([members, non_members])
  lira = membership.lira_offline_scores(target, shadows)
  loss_like = target  # the same φ without the per-example calibration
  lira_auc = membership.evaluate_attack("lira", lira[:200], lira[200:], bootstrap_samples=10).auroc
  raw_auc = membership.evaluate_attack(
    "raw", loss_like[:200], loss_like[200:], bootstrap_samples=10
  )
  assert lira_auc > raw_auc.auroc + 0.1  # calibration per example is what LiRA adds
  with pytest.raises(ValueError, match="shadow_out_phi must be"):
    membership.lira_offline_scores(target, shadows[:, :10])
