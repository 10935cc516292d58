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


_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _rotate_left(x: jax.Array, d: int) -> jax.Array:
  return (x << np.uint32(d)) | (x >> np.uint32(32 - d))


def threefry2x32(key: jax.Array, x1: jax.Array, x2: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The Threefry-2x32 block cipher (20 rounds; Salmon et al. 2011), fully unrolled.

  Bit-identical to JAX's ``threefry2x32`` primitive, which on CPU is lowered as
  a 5-iteration loop whose state is materialized (two arrays the size of the
  output per iteration). Written out as plain elementwise operations it fuses
  into its consumer: noise is generated, transformed and added to the gradient
  in one pass, with no temporary array.

  Args:
    key: uint32[2] key.
    x1, x2: uint32 counter arrays of one shape.

  Returns:
    Two uint32 arrays shaped like the counters.
  """
  k1, k2 = key[0], key[1]
  ks = (k1, k2, k1 ^ k2 ^ np.uint32(0x1BD11BDA))
  x = [x1 + ks[0], x2 + ks[1]]
  for block in range(5):
    for r in _ROTATIONS[block % 2]:
      x[0] = x[0] + x[1]
      x[1] = x[0] ^ _rotate_left(x[1], r)
    x[0] = x[0] + ks[(block + 1) % 3]
    x[1] = x[1] + ks[(block + 2) % 3] + np.uint32(block + 1)
  return x[0], x[1]


def _standard_normal_from_bits(bits: jax.Array) -> jax.Array:
  """uint32 -> float32 N(0, 1) by the inverse CDF (as ``jax.random.normal``).

  The top 23 bits give u uniform on [0, 1) in steps of 2^-23, mapped to
  (-1, 1); z = √2 · erfinv(u).
  """
  mantissa = (bits >> np.uint32(9)) | np.uint32(0x3F800000)
  unit = jax.lax.bitcast_convert_type(mantissa, jnp.float32) - np.float32(1.0)
  lo = np.nextafter(np.float32(-1.0), np.float32(0.0))
  u = jnp.maximum(lo, unit * (np.float32(1.0) - lo) + lo)
  return np.float32(np.sqrt(2.0)) * jax.lax.erf_inv(u)


def noise_for_step(key: jax.Array, step: jax.Array, template: PyTree, stddev: float) -> PyTree:
  """Float32 N(0, stddev²) noise shaped like ``template``, determined by (key, step).

  Coordinates are numbered across the leaves in tree order (each leaf padded
  to an even count); leaf coordinates [o, o + 2m) are the counters of m
  Threefry-2x32 blocks under the key ``fold_in(key, step)``, laid out as
  ``jax.extend.random.threefry_2x32`` lays them out. The draw is thus one
  stream of independent blocks, but it is computed leaf by leaf from counters,
  so each leaf's noise fuses into the addition that consumes it.
  """
  leaves, treedef = jax.tree_util.tree_flatten(template)
  step_key = jax.random.fold_in(key, step)
  noise, offset = [], 0
  for leaf in leaves:
    shape = jnp.shape(leaf)
    size = int(np.prod(shape))
    half = (size + 1) // 2
    counters = jax.lax.iota(jnp.uint32, 2 * half) + np.uint32(offset)
    y1, y2 = threefry2x32(step_key, counters[:half], counters[half:])
    bits = jnp.concatenate([y1, y2])[:size]
    noise.append(np.float32(stddev) * _standard_normal_from_bits(bits).reshape(shape))
    offset += 2 * half
  if offset >= 2**32:
    raise ValueError(f"noise for {offset} coordinates exceeds the 2^32 counters of one key")
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
