"""Membership-inference metrics and the TPR bound implied by a privacy ledger."""

import numpy as np
import pytest
from scipy import stats

from dpjax.audit import membership
from dpjax.privacy import accounting


def gaussian_ledger(sigma: float, steps: int = 1, q: float = 1.0) -> accounting.PrivacyLedger:
  return accounting.PrivacyLedger().record(
    accounting.Segment(sampling_prob=q, noise_multiplier=sigma, steps=steps)
  )


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


def test_the_ledger_bound_is_the_gaussian_tradeoff_for_one_gaussian_step():
  # One unsampled Gaussian step is exactly (1/σ)-GDP: TPR_max(x) = Φ(Φ^-1(x) + 1/σ).
  sigma = 1.0
  ledger = gaussian_ledger(sigma)
  for fpr in (0.001, 0.01, 0.1):
    exact = stats.norm.sf(stats.norm.isf(fpr) - 1 / sigma)
    bound = membership.max_tpr(ledger, fpr)
    assert exact <= bound <= exact + 0.01, (fpr, exact, bound)


def test_the_bound_is_one_without_privacy_and_fpr_with_perfect_privacy():
  assert membership.max_tpr(gaussian_ledger(0.0), 0.01) == 1.0
  assert membership.max_tpr(accounting.PrivacyLedger(), 0.01) == pytest.approx(0.01)
  weak, strong = gaussian_ledger(0.8, 200, 0.05), gaussian_ledger(3.0, 200, 0.05)
  assert membership.max_tpr(strong, 0.01) < membership.max_tpr(weak, 0.01)


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
