"""Deliberately broken DP steps, each one defect away from the shipped one: the audit's own test.

    python -m dpjax.audit.planted        # prints the white-box audit of each, as a table

A white-box audit that passes the shipped mechanism proves little unless it
fails these. Each entry returns the ``audit_step`` overrides (``grad_fn`` or
``privatizer``) that plant its bug into a keyed mechanism:

* ``half_noise``: N(0, (σΔ/2)²) instead of N(0, (σΔ)²).
* ``no_clipping``: the unclipped sum (sensitivity unbounded).
* ``realized_divisor``: divides by the realized batch size instead of B (Opacus #571).
* ``reused_draw``: one noise draw reused at every step.
* ``public_key``: noise keyed by a public seed (``insecure_fixed(3)``).
* ``shared_noise``: one scalar draw added to every coordinate.
* ``ignored_mask``: padding and sampled-out rows counted (the audit ends ``inconclusive``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from dpjax.audit import whitebox
from dpjax.privacy import clipping, mechanism, noise, per_example
from dpjax.privacy.secret import RunSecret

#: The audited plan of the table (and of the tests): σ = 2, C = 0.5 (a bug that scales by
#: C twice must show), B = 32, microbatches of 8.
SIGMA, CLIP, BATCH, MICROBATCH = 2.0, 0.5, 32.0, 8


def shipped_mechanism() -> mechanism.Mechanism:
  """The shipped mechanism with the table's σ, C and B, keyed by a fresh secret."""
  spec = mechanism.MechanismSpec(
    noise_multiplier=SIGMA, clip=clipping.FlatClip(CLIP), microbatch_size=MICROBATCH, backend="vmap"
  )
  plan = mechanism.make_mechanism(spec, dataset_size=10_000, expected_batch_size=BATCH, steps=1)
  return plan.keyed(RunSecret.fresh())


def _gaussian(plan: mechanism.Mechanism, sigma: float | None = None, key=None):
  """The shipped Gaussian privatizer of ``plan`` (σ and key replaceable)."""
  return noise.gaussian_privatizer(
    plan.noise_multiplier if sigma is None else sigma,
    plan.sensitivity,
    plan.expected_batch_size,
    key=RunSecret.fresh().noise_key() if key is None else key,
  )


def half_noise(plan):
  return {"privatizer": optax.with_extra_args_support(_gaussian(plan, plan.noise_multiplier / 2))}


def no_clipping(plan):
  return {"grad_fn": per_example.summed_grad(whitebox._audit_loss, MICROBATCH, has_aux=False)}


def realized_divisor(plan):
  inner = _gaussian(plan)

  def update(updates, state, params=None, *, num_examples, **extra):
    noised, state = inner.update(updates, state)  # (sum + noise) / B
    realized = jnp.maximum(num_examples, 1).astype(jnp.float32)
    scale = plan.expected_batch_size / realized
    return jax.tree_util.tree_map(lambda u: u * scale, noised), state

  return {"privatizer": optax.GradientTransformationExtraArgs(inner.init, update)}


def reused_draw(plan):
  inner = _gaussian(plan)

  def update(updates, state, params=None, **extra):
    noised, _ = inner.update(updates, state._replace(step=jnp.zeros_like(state.step)))
    return noised, state

  return {"privatizer": optax.GradientTransformationExtraArgs(inner.init, update)}


def public_key(plan):
  key = RunSecret.insecure_fixed(3).noise_key(0)
  return {"privatizer": optax.with_extra_args_support(_gaussian(plan, key=key))}


def shared_noise(plan):
  inner = _gaussian(plan)
  stddev = plan.noise_multiplier * plan.sensitivity

  def update(updates, state, params=None, **extra):
    one = noise.noise_for_step(state.key, state.step, jnp.zeros(()), stddev)
    noised = jax.tree_util.tree_map(lambda g: (g + one) / plan.expected_batch_size, updates)
    return noised, state._replace(step=state.step + 1)

  return {"privatizer": optax.GradientTransformationExtraArgs(inner.init, update)}


def ignored_mask(plan):
  real = plan.grad_fn(whitebox._audit_loss, has_aux=False)
  return {"grad_fn": lambda params, batch, mask: real(params, batch, jnp.ones_like(mask))}


#: Every planted bug, by name.
BUGS: dict[str, Callable[[mechanism.Mechanism], dict[str, Any]]] = {
  "half_noise": half_noise,
  "no_clipping": no_clipping,
  "realized_divisor": realized_divisor,
  "reused_draw": reused_draw,
  "public_key": public_key,
  "shared_noise": shared_noise,
  "ignored_mask": ignored_mask,
}


def main() -> None:
  """Prints the white-box audit of the shipped step and of each planted bug."""
  plan = shipped_mechanism()
  print(f"sigma={SIGMA} C={CLIP} B={BATCH:g}; 100,000 trials; alpha=1e-3 for all four bounds")
  print(
    f"{'mechanism':18s} {'claimed eps':>11s} {'eps_lb':>7s} {'split':>7s} {'mu_lb':>6s} verdict"
  )
  for name, bug in [("shipped", lambda p: {}), *BUGS.items()]:
    r = whitebox.audit_step(plan, significance=1e-3, seed=0, **bug(plan))
    verdict = "passed" if r.passed else "VIOLATED" if r.violated else "INCONCLUSIVE"
    print(
      f"{name:18s} {r.claimed_epsilon:11.3f} {r.epsilon_lb:7.3f} {r.epsilon_lb_split:7.3f} "
      f"{r.mu_lb:6.3f} {verdict}",
      flush=True,
    )


if __name__ == "__main__":
  sys.exit(main())
