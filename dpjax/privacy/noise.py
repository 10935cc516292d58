"""The Gaussian mechanism as an optax transform: noise once, divide by the expected batch.

``gaussian_privatizer`` receives the clipped SUM of a logical batch and returns

    (sum + N(0, (σ·Δ)² I)) / B_expected

where Δ is the L2 sensitivity of the sum (the clip rule's), σ the noise
multiplier and B_expected = q·N the expected batch size of Poisson sampling.

* Noise is drawn once per logical step, in float32 whatever the gradient dtype,
  from ``fold_in(key, step)``: a resumed run (whose state carries the step)
  draws exactly the noise the uninterrupted run would have.
* The denominator is the constant B_expected, never the realized batch size:
  dividing by the realized count leaks it (the count of a Poisson sample tells
  whether a given example was present) and voids the accounting.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpjax import _validation

PyTree = Any


class PrivatizerState(NamedTuple):
  """State of :func:`gaussian_privatizer`.

  Attributes:
    step: number of updates privatized so far (int32 scalar).
    key: the run's raw uint32 PRNG key; the step's noise key is fold_in(key, step).
  """
  step: jax.Array
  key: jax.Array


def as_raw_key(key: int | jax.Array) -> jax.Array:
  """An int seed, a raw uint32[2] key, or a typed key -> a raw uint32[2] key."""
  if isinstance(key, int) and not isinstance(key, bool):
    return jax.random.PRNGKey(key)
  key = jnp.asarray(key) if not hasattr(key, "dtype") else key
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(key)
  if key.dtype != jnp.uint32 or key.shape != (2,):
    raise ValueError(f"key must be an int seed or a PRNG key (got dtype {key.dtype}, "
                     f"shape {key.shape})")
  return key


def noise_for_step(key: jax.Array, step: jax.Array, template: PyTree, stddev: float) -> PyTree:
  """Float32 N(0, stddev²) noise shaped like ``template``, determined by (key, step).

  One draw of all coordinates at once (one RNG kernel, whatever the number of
  leaves), then split and reshaped per leaf.
  """
  leaves, treedef = jax.tree_util.tree_flatten(template)
  sizes = [int(np.prod(jnp.shape(x))) for x in leaves]
  flat = jax.random.normal(jax.random.fold_in(key, step), (sum(sizes),), jnp.float32)
  pieces = jnp.split(flat, np.cumsum(sizes)[:-1]) if leaves else []
  noise = [stddev * z.reshape(jnp.shape(x)) for z, x in zip(pieces, leaves)]
  return jax.tree_util.tree_unflatten(treedef, noise)


def gaussian_privatizer(noise_multiplier: float, sensitivity: float,
                        expected_batch_size: float, key: int | jax.Array
                        ) -> optax.GradientTransformation:
  """Adds N(0, (σ·Δ)²) to a clipped sum once, then divides by the expected batch size.

  Args:
    noise_multiplier: σ >= 0 (0 gives the non-private clipped mean, for baselines).
    sensitivity: Δ > 0, the L2 sensitivity of the incoming sum; take it from the
      clipped-gradient function (``grad_fn.sensitivity``) or the clip rule.
    expected_batch_size: B = q·N > 0, the denominator (constant for the run).
    key: the run's noise key (int seed or PRNG key).

  Returns:
    An optax transform; chain it before any optimizer. Its output dtype is
    float32 (or wider when the input is).
  """
  sigma = _validation.require_non_negative("noise_multiplier", noise_multiplier)
  delta_2 = _validation.require_positive("sensitivity", sensitivity)
  denom = _validation.require_positive("expected_batch_size", expected_batch_size)
  raw_key = as_raw_key(key)
  stddev = sigma * delta_2

  def init_fn(params):
    del params
    return PrivatizerState(jnp.zeros([], jnp.int32), raw_key)

  def update_fn(updates, state, params=None):
    del params
    noise = noise_for_step(state.key, state.step, updates, stddev)

    def privatize(g, z):
      dtype = jnp.promote_types(g.dtype, jnp.float32)
      return (g.astype(dtype) + z.astype(dtype)) / jnp.asarray(denom, dtype)

    return (jax.tree_util.tree_map(privatize, updates, noise),
            PrivatizerState(state.step + 1, state.key))

  return optax.GradientTransformation(init_fn, update_fn)
