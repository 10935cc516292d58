"""The white-box step audit passes the shipped mechanism and fails every planted bug.

Each broken mechanism (``dpjax.audit.planted``) differs from the shipped one by
exactly one defect; each must fail the audit (ε_lb > the claimed ε, or an
inconclusive game for a mask that is ignored).
"""

import pytest

from dpjax.audit import planted, whitebox
from dpjax.privacy import mechanism

# α = 1e-3 for the four bounds together: the shipped mechanism is wrongly flagged with
# probability below 1e-3 (far below: the bounds are conservative); each planted bug shows.
SIGNIFICANCE = 1e-3


@pytest.fixture(scope="module")
def shipped():
  return planted.shipped_mechanism()


def audit(plan, **overrides):
  return whitebox.audit_step(plan, significance=SIGNIFICANCE, seed=0, **overrides)


def test_the_shipped_mechanism_passes_and_the_audit_has_power(shipped):
  result = audit(shipped)
  assert result.passed, result
  assert result.epsilon_lb <= result.claimed_epsilon and not result.inconclusive
  # Power: the assumption-free bound reaches more than half the claim, the GDP fit ~all of it.
  assert result.epsilon_lb >= 0.5 * result.claimed_epsilon, result
  assert 0.8 * result.claimed_mu < result.mu_lb <= 1.05 * result.claimed_mu, result
  assert result.public_key_matches == 0
  assert result.trials_in + result.trials_out == 100_000


@pytest.mark.parametrize("bug", [b for b in planted.BUGS if b != "ignored_mask"])
def test_a_planted_bug_violates_the_claim(shipped, bug):
  result = audit(shipped, **planted.BUGS[bug](shipped))
  assert result.violated and not result.passed, result
  if bug == "public_key":
    assert result.public_key_matches == result.trials_in + result.trials_out
  if bug == "shared_noise":  # invisible to the projection; the difference attack sees it
    assert result.attacks["difference"]["epsilon_lb"] > result.claimed_epsilon


def test_an_ignored_mask_makes_the_audit_fail_as_inconclusive(shipped):
  result = audit(shipped, **planted.ignored_mask(shipped))
  assert result.inconclusive and not result.passed, result


def test_a_background_the_microbatches_cannot_hold_is_refused(shipped):
  with pytest.raises(ValueError, match="multiple of the mechanism's microbatch_size=8"):
    whitebox.audit_step(shipped, background=4)


def test_only_private_mechanisms_are_audited():
  spec = mechanism.MechanismSpec(private=False)
  plan = mechanism.make_mechanism(spec, dataset_size=100, expected_batch_size=10.0, steps=1)
  with pytest.raises(ValueError, match="needs a private mechanism"):
    whitebox.audit_step(plan)
