"""The ledger against dp_accounting composed directly, and noise calibration."""

import dp_accounting
import numpy as np
import pytest
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from dpjax.privacy import PrivacyLedger, Segment, calibrate_noise, compute_epsilon, default_delta

N = 67349
Q = 1024 / N
DELTA = N**-1.1


def _direct(accountant, events, delta):
  acc = accountant()
  for event in events:
    acc.compose(event)
  return acc.get_epsilon(delta)


def _poisson(q, sigma, steps):
  return dp_accounting.SelfComposedDpEvent(
    dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
  )


@pytest.mark.parametrize(
  "name, accountant",
  [
    ("pld", pld_privacy_accountant.PLDAccountant),
    ("rdp", rdp_privacy_accountant.RdpAccountant),
  ],
)
def test_ledger_equals_dp_accounting_across_segments_and_resumes(name, accountant):
  ledger = PrivacyLedger(accountant=name)
  # 60 steps one by one (as a training loop records them), then a change of σ, then 40 more.
  for _ in range(60):
    ledger = ledger.record(Segment(Q, 0.8, 1, N))
  ledger = ledger.record(Segment(Q, 1.1, 40, N))
  assert len(ledger.segments) == 2 and ledger.steps == 100
  want = _direct(accountant, [_poisson(Q, 0.8, 60), _poisson(Q, 1.1, 40)], DELTA)
  assert ledger.epsilon(DELTA) == pytest.approx(want, rel=1e-12)
  # A checkpoint round trip keeps the ledger (and so ε) exactly.
  restored = PrivacyLedger.from_json(ledger.to_json())
  assert restored == ledger
  assert restored.epsilon(DELTA) == ledger.epsilon(DELTA)
  # More steps never lower ε.
  assert ledger.record(Segment(Q, 1.1, 1, N)).epsilon(DELTA) > ledger.epsilon(DELTA)


def test_truncated_batches_are_accounted_with_the_truncated_event():
  n, q, cap = 2000, 0.05, 110
  ledger = PrivacyLedger().record(Segment(q, 1.0, 20, n, max_batch_size=cap))
  event = dp_accounting.SelfComposedDpEvent(
    dp_accounting.TruncatedSubsampledGaussianDpEvent(n, q, cap, 1.0), 20
  )
  want = _direct(pld_privacy_accountant.PLDAccountant, [event], 1e-5)
  assert ledger.epsilon(1e-5) == pytest.approx(want, rel=1e-12)
  with pytest.raises(ValueError, match="accountant='rdp' cannot account a truncated batch"):
    PrivacyLedger(accountant="rdp").record(Segment(q, 1.0, 20, n, max_batch_size=cap)).epsilon(1e-5)


def test_pld_is_tighter_than_rdp_on_the_reference_setting():
  """The numbers quoted in the design notes: σ=0.6, 197 steps, q=1024/67349."""
  pld = compute_epsilon(0.6, Q, 197, DELTA, "pld")
  rdp = compute_epsilon(0.6, Q, 197, DELTA, "rdp")
  assert pld == pytest.approx(6.27, abs=0.01) and rdp == pytest.approx(7.49, abs=0.01)


@pytest.mark.parametrize("accountant, target", [("pld", 3.0), ("pld", 8.0), ("rdp", 3.0)])
def test_calibrated_sigma_meets_target_within_one_percent(accountant, target):
  sigma = calibrate_noise(target, DELTA, Q, 197, accountant, dataset_size=N)
  eps = compute_epsilon(sigma, Q, 197, DELTA, accountant)
  assert target * 0.99 <= eps <= target
  # Smallest: 2% less noise would exceed the target.
  assert compute_epsilon(sigma * 0.98, Q, 197, DELTA, accountant) > target


def test_non_private_and_empty_ledgers():
  assert PrivacyLedger().epsilon(1e-5) == 0.0
  assert PrivacyLedger().record(Segment(0.1, 0.0, 5)).epsilon(1e-5) == np.inf
  assert default_delta(N) == pytest.approx(N**-1.1) and default_delta(N) < 1 / N


@pytest.mark.parametrize(
  "call, message",
  [
    (lambda: calibrate_noise(0.0, 1e-6, 0.01, 10), "target_epsilon must be a finite number > 0"),
    (lambda: calibrate_noise(1e6, 1e-6, 0.01, 10), r"target_epsilon must be in \(0, 100\]"),
    (lambda: calibrate_noise(1.0, 0.0, 0.01, 10), r"delta must be in \(0, 1\)"),
    (lambda: calibrate_noise(1.0, 1.5, 0.01, 10), r"delta must be in \(0, 1\)"),
    (
      lambda: calibrate_noise(1.0, 1e-3, 0.01, 10, dataset_size=1000),
      "delta must be < 1/dataset_size = 0.001",
    ),
    (lambda: calibrate_noise(1.0, 1e-6, 1.5, 10), r"sampling_prob must be in \(0, 1\]"),
    (lambda: calibrate_noise(1.0, 1e-6, 0.0, 10), r"sampling_prob must be in \(0, 1\]"),
    (lambda: calibrate_noise(1.0, 1e-6, 0.01, 10, "moments"), "accountant must be one of"),
    (lambda: Segment(0.1, -1.0, 3), "noise_multiplier must be a finite number >= 0"),
    (
      lambda: PrivacyLedger().record(Segment(0.1, 1.0, 3, 100)).epsilon(0.02),
      "delta must be < 1/dataset_size",
    ),
    (lambda: PrivacyLedger.from_dict({"format": 99}), "unknown privacy ledger format"),
  ],
)
def test_bad_arguments(call, message):
  with pytest.raises(ValueError, match=message):
    call()


def test_memoized_pld_composition_is_dp_accountings_bit_for_bit_under_both_relations():
  """The ledger builds each single-step PLD once; its answers equal PLDAccountant's exactly."""
  segments = [Segment(Q, 0.8, 60, N), Segment(Q, 1.1, 40, N), Segment(2 * Q, 0.8, 7, N)]
  ledger = PrivacyLedger()
  for segment in segments:
    ledger = ledger.record(segment)
  events = [_poisson(s.sampling_prob, s.noise_multiplier, s.steps) for s in segments]
  add_remove = pld_privacy_accountant.PLDAccountant()
  replace_one = pld_privacy_accountant.PLDAccountant(dp_accounting.NeighboringRelation.REPLACE_ONE)
  for acc in (add_remove, replace_one):
    acc.compose(dp_accounting.ComposedDpEvent(events))
  assert ledger.epsilon(DELTA) == add_remove.get_epsilon(DELTA)
  assert ledger.epsilon_replace_one(DELTA) == replace_one.get_epsilon(DELTA)


def test_calibration_over_many_steps_is_within_one_percent_of_the_target():
  # 60 epochs at q = 256/60000: the coarse grid over-states ε by ~30% here, and the fine-grid
  # search must start from a σ that is infeasible on the fine grid too.
  sigma = calibrate_noise(3.0, 1e-5, 256 / 60000, 14062)
  assert 0.99 * 3.0 <= compute_epsilon(sigma, 256 / 60000, 14062, 1e-5) <= 3.0
