"""The white-box step audit passes the shipped mechanism and catches planted bugs.

Each broken mechanism differs from the shipped one by exactly one defect,
built here from the shipped pieces; each must give ε_lb > the claimed ε.
"""

import jax
import jax.numpy as jnp
import optax
import pytest

from dpjax.audit import whitebox
from dpjax.privacy import clipping, mechanism, noise, per_example
from dpjax.privacy.secret import RunSecret

# C = 0.5, not 1: a bug that scales by C twice (σ·C² instead of σ·C) must show.
SIGMA, CLIP, BATCH = 2.0, 0.5, 32.0
# α = 1e-3 for the four bounds together: the shipped mechanism is wrongly flagged with
# probability below 1e-3 (far below: the bounds are conservative); each planted bug shows.
SIGNIFICANCE = 1e-3


@pytest.fixture(scope="module")
def shipped():
  spec = mechanism.MechanismSpec(
    noise_multiplier=SIGMA, clip=clipping.FlatClip(CLIP), microbatch_size=8, backend="vmap"
  )
  plan = mechanism.make_mechanism(spec, dataset_size=10_000, expected_batch_size=BATCH, steps=1)
  return plan.keyed(RunSecret.fresh())


def audit(plan, **overrides):
  return whitebox.audit_step(plan, significance=SIGNIFICANCE, seed=0, **overrides)


def secret_gaussian(sigma=SIGMA, key=None):
  key = RunSecret.fresh().noise_key() if key is None else key
  return noise.gaussian_privatizer(sigma, CLIP, BATCH, key=key)


def test_the_shipped_mechanism_passes_and_the_audit_has_power(shipped):
  result = audit(shipped)
  assert result.passed, result
  assert result.epsilon_lb <= result.claimed_epsilon and not result.inconclusive
  # Power: the assumption-free bound reaches more than half the claim, the GDP fit ~all of it.
  assert result.epsilon_lb >= 0.5 * result.claimed_epsilon, result
  assert 0.8 * result.claimed_mu < result.mu_lb <= 1.05 * result.claimed_mu, result
  assert result.public_key_matches == 0
  assert result.trials_in + result.trials_out == 100_000


def test_half_the_noise_is_caught(shipped):
  result = audit(shipped, privatizer=optax.with_extra_args_support(secret_gaussian(SIGMA / 2)))
  assert result.violated, result


def test_clipping_switched_off_is_caught(shipped):
  unclipped = per_example.summed_grad(whitebox._audit_loss, 8, has_aux=False)
  result = audit(shipped, grad_fn=unclipped)
  assert result.violated, result


def test_dividing_by_the_realized_batch_size_is_caught(shipped):
  inner = secret_gaussian()

  def update(updates, state, params=None, *, num_examples, **extra):
    noised, state = inner.update(updates, state)  # (sum + noise) / B
    realized = jnp.maximum(num_examples, 1).astype(jnp.float32)
    return jax.tree_util.tree_map(lambda u: u * BATCH / realized, noised), state

  result = audit(shipped, privatizer=optax.GradientTransformationExtraArgs(inner.init, update))
  assert result.violated, result


def test_one_noise_draw_reused_at_every_step_is_caught(shipped):
  inner = secret_gaussian()

  def update(updates, state, params=None, **extra):
    noised, _ = inner.update(updates, state._replace(step=jnp.zeros_like(state.step)))
    return noised, state

  result = audit(shipped, privatizer=optax.GradientTransformationExtraArgs(inner.init, update))
  assert result.violated, result


def test_a_public_noise_key_is_caught(shipped):
  public = RunSecret.insecure_fixed(3).noise_key(0)
  result = audit(shipped, privatizer=optax.with_extra_args_support(secret_gaussian(key=public)))
  assert result.violated, result
  assert result.public_key_matches == result.trials_in + result.trials_out


def test_noise_shared_between_coordinates_is_caught(shipped):
  inner = secret_gaussian()

  def update(updates, state, params=None, **extra):
    one = noise.noise_for_step(state.key, state.step, jnp.zeros(()), SIGMA * CLIP)
    noised = jax.tree_util.tree_map(lambda g: (g + one) / BATCH, updates)
    return noised, state._replace(step=state.step + 1)

  result = audit(shipped, privatizer=optax.GradientTransformationExtraArgs(inner.init, update))
  assert result.violated, result
  assert result.attacks["difference"]["epsilon_lb"] > result.claimed_epsilon


def test_an_ignored_mask_makes_the_audit_fail_as_inconclusive(shipped):
  real = shipped.grad_fn(whitebox._audit_loss, has_aux=False)
  ignores_mask = lambda params, batch, mask: real(params, batch, jnp.ones_like(mask))
  result = audit(shipped, grad_fn=ignores_mask)
  assert result.inconclusive and not result.passed, result


def test_a_background_the_microbatches_cannot_hold_is_refused(shipped):
  with pytest.raises(ValueError, match="multiple of the mechanism's microbatch_size=8"):
    whitebox.audit_step(shipped, background=4)


def test_only_private_mechanisms_are_audited():
  spec = mechanism.MechanismSpec(private=False)
  plan = mechanism.make_mechanism(spec, dataset_size=100, expected_batch_size=10.0, steps=1)
  with pytest.raises(ValueError, match="needs a private mechanism"):
    whitebox.audit_step(plan)
