"""Adaptive clipping to a quantile of the gradient norms (Andrew et al. 2021).

"Differentially private learning with adaptive clipping" (NeurIPS 2021): the
clip bound C_t is not tuned but learned, privately, so that a target fraction γ
of the examples is left unclipped. Per step t of Poisson sampling with expected
batch size B:

* every kept example is clipped to the current bound: c_i = min(1, C_t / ||g_i||);
* the gradient sum gets N(0, (z_Δ·C_t)²) per coordinate (then snap, / B as usual);
* the centered count of unclipped examples is released with N(0, σ_b²):
  S_t = Σ_i (1[||g_i|| <= C_t] - 1/2) + N(0, σ_b²), and b̃_t = S_t / B + 1/2
  estimates the unclipped fraction (E[b̃_t] = E[Σ_i 1[||g_i|| <= C_t]] / B);
* the bound moves geometrically: C_{t+1} = C_t · exp(-η (b̃_t - γ)).

**Privacy.** One example changes the clipped sum by at most C_t in L2 and the
centered count by exactly 1/2. Scaled by their noise, the two releases of a step
are ONE Gaussian mechanism on the same Poisson sample, with L2 sensitivity
sqrt((C_t / (z_Δ C_t))² + (1/2 / σ_b)²) = sqrt(z_Δ^-2 + (2σ_b)^-2) = 1/z for

    z_Δ = (z^-2 - (2σ_b)^-2)^(-1/2)   (> z; defined only for z < 2σ_b),

so a step is accounted exactly as a flat-clipping step with noise multiplier z
(``PoissonSampledDpEvent(q, GaussianDpEvent(z))``; replace-one: sensitivity 2/z
alike). C_t is a function of earlier released counts only (adaptive composition),
so it may be published, and it lives in the privatizer's state (a checkpoint
resumes it exactly). Centering matters: the plain count Σ_i 1[·] changes by 1,
which would need (σ_b)^-2 in place of (2σ_b)^-2; b̃_t is computed from the
released S_t and the public B, never from the realized batch size.

**Randomness.** Both draws of step t come from the run's secret ChaCha20 noise
key (:mod:`dpjax.privacy.noise`): the gradient noise from nonce (t, 0, 0), blocks
0..d-1; the count's N(0, 1) from nonce (t, 1, 0), block 0 (:data:`COUNT_STREAM`).
Different nonces give disjoint keystreams, so the two draws are independent, and
a resumed run draws both again exactly. The count is snapped to the static grid
of σ_b and the sum to the in-graph grid of z_Δ·C_t
(:func:`dpjax.privacy.noise.snap_grid_in_graph`), as for flat clipping.

Padding rows and examples with a non-finite loss or gradient count neither in
the sum nor in the count (they are not ``kept``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpjax import _validation
from dpjax.privacy import clipping, noise

PyTree = Any

#: The ChaCha20 nonce word that separates the count's draw from the gradient noise (stream 0).
COUNT_STREAM = 1
#: The bound is kept in [MIN_CLIP_NORM, MAX_CLIP_NORM] (post-processing of released counts):
#: the noise scale z_Δ·C_t and its snap grid then stay normal float32 numbers.
MIN_CLIP_NORM, MAX_CLIP_NORM = 1e-12, 1e12


@dataclasses.dataclass(frozen=True)
class QuantileClip(clipping.ClipRule):
  """Flat clipping to a bound that tracks the γ-quantile of the per-example norms.

  c_i = min(1, C / ||g_i||) with C = ``clip_norm`` (a float, or the traced
  current bound C_t inside a train step; see :meth:`with_clip_norm`). The update
  of C and the noise are the privatizer's (:func:`quantile_privatizer`).

  Attributes:
    target_quantile: γ in (0, 1), the fraction of examples to leave unclipped.
    learning_rate: η > 0 of the geometric update C <- C·exp(-η (b̃ - γ)).
    count_noise: σ_b > 0, the std of the noise on the unclipped count (the paper
      uses B/20); it must exceed z/2 for the run's noise multiplier z.
    initial_clip_norm: C_0 > 0.
    clip_norm: the bound to clip with now; None: ``initial_clip_norm``.
  """

  target_quantile: float = 0.5
  learning_rate: float = 0.2
  count_noise: float | None = None
  initial_clip_norm: float = 1.0
  clip_norm: Any = None

  def __post_init__(self):
    value = self.target_quantile
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
      raise ValueError(f"target_quantile must be in (0, 1) (got {value!r})")
    _validation.require_positive("learning_rate", self.learning_rate)
    _validation.require_positive("count_noise", self.count_noise)
    _validation.require_positive("initial_clip_norm", self.initial_clip_norm)
    if not MIN_CLIP_NORM <= self.initial_clip_norm <= MAX_CLIP_NORM:
      raise ValueError(
        f"initial_clip_norm must be in [{MIN_CLIP_NORM:g}, {MAX_CLIP_NORM:g}] "
        f"(got {self.initial_clip_norm!r})"
      )
    if isinstance(self.clip_norm, (int, float)):
      _validation.require_positive("clip_norm", self.clip_norm)

  @property
  def bound(self) -> Any:
    """The bound C this rule clips with (a float, or a traced scalar)."""
    return self.initial_clip_norm if self.clip_norm is None else self.clip_norm

  @property
  def sensitivity(self) -> float:
    """A static stand-in: the initial bound C_0 (Δ of step 0).

    Step t's sensitivity is its bound C_t, a traced value that the quantile
    privatizer scales its noise by (never this float).
    """
    return float(self.initial_clip_norm)

  def with_clip_norm(self, clip_norm: Any) -> QuantileClip:
    """This rule clipping with ``clip_norm`` (e.g. C_t read from the optimizer state)."""
    return dataclasses.replace(self, clip_norm=clip_norm)

  def factors(self, sq_norms: PyTree) -> clipping.ClipFactors:
    norms = clipping.total_norm(sq_norms)
    bound = jnp.asarray(self.bound, jnp.float32)
    factor = bound / jnp.maximum(norms, bound)
    # clipped = ||g|| > C, so the unclipped count is of ||g|| <= C (the paper's indicator).
    return clipping.ClipFactors(
      jax.tree_util.tree_map(lambda _: factor, sq_norms), norms, norms > bound
    )


def gradient_noise_multiplier(noise_multiplier: float, count_noise: float) -> float:
  """z_Δ = (z^-2 - (2σ_b)^-2)^(-1/2): the gradient's share of a step with multiplier z.

  0 for z = 0 (no privacy).

  Raises:
    ValueError: z >= 2σ_b (the count alone would spend more than the step may).
  """
  z = _validation.require_non_negative("noise_multiplier", noise_multiplier)
  sigma_b = _validation.require_positive("count_noise", count_noise)
  if z == 0:
    return 0.0
  if z >= 2.0 * sigma_b:
    raise ValueError(
      f"count_noise must be > noise_multiplier / 2 = {z / 2:.4g} (got {sigma_b:g}): with "
      f"1/z^2 = 1/z_grad^2 + 1/(2 count_noise)^2 the count's noise must leave room for the "
      "gradient's"
    )
  return 1.0 / math.sqrt(z**-2 - (2.0 * sigma_b) ** -2)


class QuantilePrivatizerState(NamedTuple):
  """State of :func:`quantile_privatizer`.

  Attributes:
    step: number of updates privatized so far (int32 scalar).
    key: the 256-bit ChaCha20 noise key, uint32[8] (secret).
    clip_norm: the current clip bound C_t (float32 scalar; public: a function of
      released noisy counts).
  """

  step: jax.Array
  key: jax.Array
  clip_norm: jax.Array


def current_clip_norm(opt_state: PyTree) -> jax.Array | None:
  """C_t of the quantile privatizer in ``opt_state``, or None when it has none."""
  is_state = lambda s: isinstance(s, QuantilePrivatizerState)
  found = [
    s.clip_norm for s in jax.tree_util.tree_leaves(opt_state, is_leaf=is_state) if is_state(s)
  ]
  if len(found) > 1:
    raise ValueError("the optimizer state holds more than one quantile privatizer")
  return found[0] if found else None


def count_normal(key: jax.Array, step: jax.Array) -> jax.Array:
  """Step ``step``'s N(0, 1) draw for the count: nonce (step, COUNT_STREAM, 0), block 0."""
  return noise.standard_normals(key, step, 1, stream=COUNT_STREAM)[0]


def next_clip_norm(
  clip_norm: jax.Array, noisy_fraction: jax.Array, rule: QuantileClip
) -> jax.Array:
  """C_{t+1} = C_t · exp(-η (b̃_t - γ)), kept in [MIN_CLIP_NORM, MAX_CLIP_NORM]."""
  step = -np.float32(rule.learning_rate) * (noisy_fraction - np.float32(rule.target_quantile))
  new = jnp.asarray(clip_norm, jnp.float32) * jnp.exp(step)
  return jnp.clip(new, np.float32(MIN_CLIP_NORM), np.float32(MAX_CLIP_NORM))


def quantile_privatizer(
  noise_multiplier: float, rule: QuantileClip, expected_batch_size: float, key: Any
) -> optax.GradientTransformationExtraArgs:
  """The privatizer of adaptive clipping: noisy sum and noisy count, then the bound's update.

  ``update(sum, state, params, num_examples=n, unclipped_examples=u)`` takes the
  clipped sum (clipped with the state's C_t), the number n of kept examples and
  the number u of those with ||g_i|| <= C_t, and returns

      snap(sum + N(0, (z_Δ C_t)²)) / B

  with the new state holding C_{t+1} from b̃_t = snap(u - n/2 + N(0, σ_b²)) / B + 1/2.

  Args:
    noise_multiplier: z >= 0, the multiplier the accountant records for the step.
    rule: the :class:`QuantileClip` (γ, η, σ_b, C_0).
    expected_batch_size: B > 0.
    key: the run's 256-bit noise key (secret).

  Raises:
    ValueError: z >= 2σ_b (see :func:`gradient_noise_multiplier`).
  """
  if not isinstance(rule, QuantileClip):
    raise ValueError(f"rule must be a QuantileClip (got {type(rule).__name__})")
  z_grad = gradient_noise_multiplier(noise_multiplier, rule.count_noise)
  denom = _validation.require_positive("expected_batch_size", expected_batch_size)
  noise_key = noise.as_key(key)
  sigma_b = float(rule.count_noise)
  count_grid = noise.snap_grid(sigma_b)

  def init_fn(params):
    del params
    return QuantilePrivatizerState(
      jnp.zeros([], jnp.int32),
      jnp.asarray(noise_key),
      jnp.asarray(rule.initial_clip_norm, jnp.float32),
    )

  def update_fn(updates, state, params=None, *, num_examples=None, unclipped_examples=None, **_):
    del params
    if num_examples is None or unclipped_examples is None:
      raise ValueError(
        "the quantile privatizer needs num_examples= and unclipped_examples= (the kept "
        "examples and those with norm <= the clip bound)"
      )
    clip_norm = jnp.asarray(state.clip_norm, jnp.float32)
    if z_grad:
      stddev = np.float32(z_grad) * clip_norm
      grid = noise.snap_grid_in_graph(stddev)
      unit = noise.noise_for_step(state.key, state.step, updates, 1.0)
    else:
      stddev, grid = np.float32(0.0), 0.0
      unit = jax.tree_util.tree_map(lambda g: jnp.zeros(jnp.shape(g), jnp.float32), updates)

    def privatize(g, z):
      dtype = jnp.promote_types(g.dtype, jnp.float32)
      noised = g.astype(dtype) + (stddev * z).astype(dtype)
      return noise.snap(noised, grid) / jnp.asarray(denom, dtype)

    centered = jnp.asarray(unclipped_examples, jnp.float32) - np.float32(0.5) * jnp.asarray(
      num_examples, jnp.float32
    )
    noisy = noise.snap(
      centered + np.float32(sigma_b) * count_normal(state.key, state.step), count_grid
    )
    fraction = noisy / np.float32(denom) + np.float32(0.5)
    return (
      jax.tree_util.tree_map(privatize, updates, unit),
      QuantilePrivatizerState(state.step + 1, state.key, next_clip_norm(clip_norm, fraction, rule)),
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def tail_probability(noise_multiplier: float, count_noise: float, steps: int) -> float:
  """:func:`dpjax.privacy.noise.tail_probability` of both draws of a step, over ``steps``.

  The gradient's multiplier z_Δ and the count's σ_b / (1/2) = 2σ_b both exceed z,
  so this is at most twice the flat-clipping bound at z.
  """
  if noise_multiplier <= 0:
    return 1.0
  z_grad = gradient_noise_multiplier(noise_multiplier, count_noise)
  return min(
    1.0,
    noise.tail_probability(z_grad, steps) + noise.tail_probability(2.0 * count_noise, steps),
  )
