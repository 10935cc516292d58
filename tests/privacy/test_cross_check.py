"""The accountants checked against each other: PLD, PRV and RDP bracket the same ε.

Every method here is a rigorous bound (up to its stated numerical error), so
their intervals must overlap, and calibration must never hand out a σ whose
certified ε exceeds the target, from δ = 1e-18 to 1e-2 and up to 10^6 steps.
"""

import math

import numpy as np
import prv_accountant
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import optimize

from dpjax.privacy import accounting
from dpjax.privacy.accounting import PrivacyLedger, Segment

N = 67349
SST2 = (1024 / N, 0.646, 197, N**-1.1)  # q, σ, T, δ of Li et al.'s SST-2 recipe


def ledger(q, sigma, steps, accountant="pld"):
  return PrivacyLedger(accountant=accountant).record(Segment(q, sigma, steps))


@pytest.mark.parametrize(
  "q, sigma, steps, delta",
  [
    SST2,
    (0.01, 1.1, 2000, 1e-5),
    (0.5, 2.0, 50, 1e-6),
    (1.0, 5.0, 10, 1e-5),
    (0.001, 0.8, 1000, 1e-9),
  ],
)
def test_pld_lies_in_the_prv_band_and_below_rdp(q, sigma, steps, delta):
  interval = ledger(q, sigma, steps).epsilon_interval(delta)
  (pld_low, pld_high), (prv_low, prv_high) = interval.pld, interval.prv
  assert pld_low <= pld_high and prv_low <= prv_high
  assert prv_high - prv_low == pytest.approx(2 * accounting.PRV_EPS_ERROR, abs=1e-3)
  # Both are bounds on the same true ε: the pessimistic PLD lies in PRV's certified band.
  assert prv_low - 1e-6 <= pld_high <= prv_high + 1e-6
  assert pld_low <= prv_high
  assert interval.lower <= interval.upper == pytest.approx(min(pld_high, prv_high))
  assert pld_high < interval.rdp  # PLD is the tighter rigorous accountant here
  assert not interval.unavailable


def test_the_prv_accountant_is_the_package_composed_directly():
  q, sigma, steps, delta = SST2
  two = PrivacyLedger(accountant="prv").record(Segment(q, sigma, 120)).record(Segment(q, 0.9, 77))
  direct = prv_accountant.PRVAccountant(
    prvs=[
      prv_accountant.PoissonSubsampledGaussianMechanism(q, sigma),
      prv_accountant.PoissonSubsampledGaussianMechanism(q, 0.9),
    ],
    max_self_compositions=[120, 77],
    eps_error=accounting.PRV_EPS_ERROR,
    delta_error=delta / 1000,
  ).compute_epsilon(delta, [120, 77])
  assert two.epsilon(delta) == pytest.approx(direct[2], rel=1e-12)  # the certified upper end


def test_calibration_with_prv_meets_the_target():
  q, _, _, delta = SST2
  sigma = accounting.calibrate_noise(8.0, delta, q, 40, "prv", dataset_size=N)
  epsilon = accounting.compute_epsilon(sigma, q, 40, delta, "prv", dataset_size=N)
  assert 0.99 * 8.0 <= epsilon <= 8.0


def test_prv_refuses_a_truncated_batch_with_one_line():
  with pytest.raises(ValueError, match="accountant='prv' cannot account a truncated batch"):
    PrivacyLedger(accountant="prv").record(Segment(0.1, 1.0, 5, 100, 20)).epsilon(1e-3)


def _exact_gaussian_epsilon(mu, delta):
  """ε(δ) of μ-GDP, which T unsampled Gaussian steps of noise σ are exactly (μ = √T/σ)."""
  return optimize.brentq(lambda e: accounting.gdp_delta(mu, np.array([e]))[0] - delta, 0, 200)


@pytest.mark.parametrize(
  "sigma, steps, delta", [(1.0, 1, 1e-5), (4.0, 30, 1e-6), (20.0, 100, 1e-3)]
)
def test_the_interval_brackets_the_exact_epsilon_of_unsampled_gaussians(sigma, steps, delta):
  exact = _exact_gaussian_epsilon(math.sqrt(steps) / sigma, delta)
  interval = ledger(1.0, sigma, steps).epsilon_interval(delta)
  assert interval.lower <= exact <= interval.upper
  assert interval.upper - interval.lower < 0.05


@pytest.mark.parametrize("delta", [1e-18, 1e-15, 1e-12, 1e-11, 1e-6, 1e-2])
def test_epsilon_is_finite_and_rigorous_for_tiny_and_large_delta(delta):
  q, sigma, steps = 0.02, 0.7, 300
  pld, rdp = ledger(q, sigma, steps), ledger(q, sigma, steps, "rdp")
  epsilon = pld.epsilon(delta)
  assert 0 <= epsilon < 60 and math.isfinite(epsilon)
  assert epsilon <= rdp.epsilon(delta) + 1e-12  # never looser than RDP (the floor below 1e-11)
  interval = pld.epsilon_interval(delta)
  if delta < accounting.PLD_MIN_DELTA:
    # Below 1e-11 the PLD's FFT error exceeds δ: the ledger answers by RDP and says why.
    assert epsilon == rdp.epsilon(delta) and interval.pld is None and "pld" in interval.unavailable
  else:
    assert interval.pld[1] == epsilon
  if interval.prv is None:  # PRV's own floating point refuses δ ~ 1e-18: stated, not raised
    assert "PRV" in interval.unavailable["prv"]
  else:
    assert interval.prv[0] <= epsilon <= interval.rdp


def test_a_million_steps_are_accounted():
  epsilon = ledger(1e-3, 1.0, 10**6).epsilon(1e-9)
  assert 8 < epsilon < 9  # PRV: [8.38, 8.40]; PLD's pessimistic grid error adds < 0.02


@settings(max_examples=6, deadline=None, derandomize=True)
@given(
  log_q=st.floats(-4, 0),
  log_steps=st.floats(0, 4),
  log_delta=st.floats(-18, -2),
  target=st.floats(0.1, 60),
)
def test_calibrated_sigma_never_exceeds_the_target(log_q, log_steps, log_delta, target):
  q, steps, delta = 10**log_q, max(1, int(10**log_steps)), 10**log_delta
  try:
    sigma = accounting.calibrate_noise(target, delta, q, steps)
  except ValueError as err:  # only a target no σ <= 1e4 reaches may be refused
    assert "unreachable" in str(err)
    return
  assert sigma > 0
  assert accounting.compute_epsilon(sigma, q, steps, delta) <= target
