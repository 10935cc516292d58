"""The guarantee as an attacker's power: the ledger's TPR bound and its μ-GDP summary."""

import math

import numpy as np
import pytest
from scipy import stats

from dpjax.privacy import accounting
from dpjax.privacy.accounting import PrivacyLedger, Segment


def gaussian_ledger(sigma: float, steps: int = 1, q: float = 1.0) -> PrivacyLedger:
  return PrivacyLedger().record(Segment(sampling_prob=q, noise_multiplier=sigma, steps=steps))


@pytest.mark.parametrize("sigma, steps", [(1.0, 1), (2.0, 4)])
def test_the_tpr_bound_is_the_gaussian_tradeoff_for_unsampled_gaussian_steps(sigma, steps):
  # T unsampled Gaussian steps are exactly μ-GDP, μ = √T/σ: TPR_max(x) = 1 - Φ(Φ^-1(1 - x) - μ).
  mu = math.sqrt(steps) / sigma
  ledger = gaussian_ledger(sigma, steps)
  for fpr in (0.001, 0.01, 0.1):
    exact = stats.norm.sf(stats.norm.isf(fpr) - mu)
    bound = float(ledger.tpr_bound(fpr))
    assert exact <= bound <= exact + 0.01, (fpr, exact, bound)


def test_the_bound_is_one_without_privacy_and_fpr_with_perfect_privacy():
  assert gaussian_ledger(0.0).tpr_bound(0.01) == 1.0
  assert PrivacyLedger().tpr_bound(0.01) == pytest.approx(0.01)
  weak, strong = gaussian_ledger(0.8, 200, 0.05), gaussian_ledger(3.0, 200, 0.05)
  assert strong.tpr_bound(0.01) < weak.tpr_bound(0.01)
  with pytest.raises(ValueError, match="fpr must be in"):
    strong.tpr_bound(1.5)


def test_the_bound_holds_against_a_simulated_optimal_attack():
  # The likelihood-ratio test on one subsampled Gaussian step (the optimal membership test):
  # its TPR at FPR α, computed exactly, never exceeds the ledger's bound.
  q, sigma = 0.3, 1.0
  ledger = gaussian_ledger(sigma, 1, q)
  threshold = np.linspace(-3, 8, 400)  # test "in" when the output x > t (LR increases in x)
  fpr = stats.norm.sf(threshold, 0, sigma)
  tpr = (1 - q) * stats.norm.sf(threshold, 0, sigma) + q * stats.norm.sf(threshold, 1, sigma)
  assert np.all(tpr <= ledger.tpr_bound(fpr) + 1e-9)
  # Nearly attained: the bound covers both neighbour directions (add and remove), this test
  # is the remove direction's.
  assert np.max(ledger.tpr_bound(fpr) - tpr) < 0.05


@pytest.mark.parametrize("sigma, steps", [(1.0, 1), (3.0, 25)])
def test_gdp_mu_of_unsampled_gaussians_is_exact(sigma, steps):
  mu = accounting.PrivacyLedger().record(Segment(1.0, sigma, steps)).gdp_mu(1e-10)
  # Conservative by the profile grid's step (0.02 in ε): a few percent at most.
  assert math.sqrt(steps) / sigma <= mu <= 1.03 * math.sqrt(steps) / sigma


def test_gdp_mu_of_a_subsampled_run_covers_its_profile_and_grows_as_the_floor_falls():
  n = 67349
  ledger = gaussian_ledger(0.646, 197, 1024 / n)
  delta = n**-1.1
  mu = ledger.gdp_mu(delta)
  # Every (ε, δ_μ(ε)) with δ_μ(ε) >= the floor is a guarantee of the run.
  eps = np.linspace(0, 20, 401)
  profile = ledger.deltas(eps)
  covered = accounting.gdp_delta(mu, eps) >= delta
  assert np.all(accounting.gdp_delta(mu, eps)[covered] >= profile[covered] - 1e-12)
  assert ledger.gdp_mu(1e-10) > mu > ledger.gdp_mu(1e-3)  # heavier tails than any one GDP
  # The CLT's μ (an estimate) is far below the μ that covers the run.
  clt = 1024 / n * math.sqrt(197 * (math.exp(0.646**-2) - 1))
  assert clt < 0.7 * mu
  assert gaussian_ledger(0.0).gdp_mu(delta) == math.inf and PrivacyLedger().gdp_mu(delta) == 0


def test_the_statement_is_what_the_ledger_says():
  ledger = gaussian_ledger(1.2, 16, 0.125)
  delta = 1e-3
  statement = ledger.statement(delta)
  interval = statement["epsilon_interval"]
  assert interval["pld_optimistic_pessimistic"][1] == ledger.epsilon(delta)
  assert interval["delta"] == delta and "unavailable" not in interval
  tpr = statement["attacker"]["max_tpr_at_fpr"]
  assert list(tpr) == ["0.001", "0.01", "0.1"]
  assert tpr["0.01"] == float(ledger.tpr_bound(0.01))
  assert statement["attacker"]["gdp_mu"] == ledger.gdp_mu(delta)


def test_the_vectorized_profile_is_dp_accountings_hockey_stick_bit_for_bit():
  """δ(ε) on the attacker view's grid equals the library's own loop exactly."""
  for segment in (
    accounting.Segment(64 / 512, 0.567, 16, dataset_size=512),
    accounting.Segment(0.05, 2.0, 40, dataset_size=2000),
  ):
    ledger = accounting.PrivacyLedger().record(segment)
    grid = np.concatenate([accounting._PROFILE_EPSILONS, [np.inf]])
    composed = accounting._composed_accountant(ledger.segments, "pld", ledger.pld_discretization)
    want = np.asarray(composed.pld.get_delta_for_epsilon(grid), np.float64)
    np.testing.assert_array_equal(ledger.deltas(grid), want)
