"""The Gaussian mechanism as an optax transform: secret noise once, divide by the expected batch.

``gaussian_privatizer`` receives the clipped SUM of a logical batch and returns

    snap_Λ(sum + N(0, (σ·Δ)² I)) / B_expected

where Δ is the L2 sensitivity of the sum (the clip rule's), σ the noise
multiplier, B_expected = q·N the expected batch size of Poisson sampling and
snap_Λ rounds to a power-of-two grid Λ ≈ 2^-10·σΔ (see below).

* **Secret.** Noise bits are the ChaCha20 keystream (RFC 8439) under a 256-bit
  key derived from the run's secret (:mod:`dpjax.privacy.secret`). The key is
  a runtime array in the optimizer state, never a compile-time constant, so it
  reaches neither the compilation cache nor logs. Nonce = (step, 0, 0),
  block counter = the coordinate's position in the stream: step t's noise is a pure function of
  (key, t), so a resumed run draws what the uninterrupted run would have.
* **Faithful tails.** Each draw uses 96 keystream bits: one sign bit and 95 bits
  of p ∈ [2^-97, 1/2], the lower-tail probability; |z| = Φ^-1(1 - p). Float32
  represents tiny p with full relative precision, so the inverse is accurate
  (relative error ≤ 1e-6, see tests) over the whole range: the largest |z| the
  generator can return is Φ^-1(1 - 2^-97) = 11.30. Its truncation is accounted
  for by :func:`tail_probability`: a neighbour's output falls outside g ± 11.30σΔ
  in some coordinate with probability at most 2·Φ̄(11.30 - 1/σ) per step (the
  worst case puts the whole sensitivity into one coordinate). For σ = 0.5 and
  10^6 steps that is 1.4e-14 in total, whatever the number of coordinates; an
  8σ truncation would instead put 2Φ̄(6) = 2e-9 per step on that event.
* **No floating-point holes** (Mironov 2012). A float32 sum ``g + z`` can land
  on values that are impossible for a neighbour ``g'`` when z takes few values
  (a 23-bit inverse CDF has 2^23 atoms). Here z's values are at most 2^-19·σΔ
  apart anywhere in its range, and the noised sum is rounded to the grid
  Λ = 2^(⌈log2 σΔ⌉ - 10) (exact power-of-two arithmetic; larger |sum| are
  already on a grid coarser than Λ): every grid point within ±11.30σΔ of g has
  positive probability under every g, each with the Gaussian mass of its cell
  up to the sampler's relative error. The rounding is post-processing of the
  noised sum and adds a uniform error of variance Λ²/12 ≤ 8e-8·(σΔ)². This
  closes the known attacks on floating-point Gaussian noise; it is not a
  machine-checked proof for floating-point arithmetic (which a discrete
  Gaussian on an integer-scaled sum would give).
* **Fixed denominator.** The denominator is the constant B_expected, never the
  realized batch size: dividing by the realized count leaks it.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy import stats

from dpjax import _validation

PyTree = Any

#: ChaCha double rounds x 2 (RFC 8439's ChaCha20).
CHACHA_ROUNDS = 20
#: Keystream words per Gaussian draw (one ChaCha block per draw).
_WORDS_PER_DRAW = 3
#: The largest |z| the generator returns: Φ^-1(1 - 2^-97).
MAX_ABS_NORMAL = float(-stats.norm.ppf(2.0**-97))
#: The grid of the noised sum is 2^(ceil(log2(σΔ)) - SNAP_BITS).
SNAP_BITS = 10
_CHACHA_CONSTANTS = (0x61707865, 0x3320646E, 0x79622D32, 0x6B206574)  # "expand 32-byte k"

# |z| = Φ^-1(1 - p) for p < _TAIL_P as a polynomial in t = s·scale - shift, s = sqrt(-ln p),
# one piece per interval of s (least-squares fit of the relative error against scipy's
# ndtri, degree 6; tests/privacy/test_noise.py checks the accuracy of the float32 result).
_TAIL_P = 0.02
_TAIL_EDGES = (1.977883466088977, 2.6, 3.6, 5.5, 8.241870157608323)
_TAIL_COEFFS = (
  (
    2.5553395748138428,
    0.4956062436103821,
    -0.005364976357668638,
    0.0005528160254471004,
    -5.927943857386708e-05,
    6.686713277304079e-06,
    -7.675228061998496e-07,
  ),
  (
    3.81878662109375,
    0.7648363709449768,
    -0.006869279779493809,
    0.0008689306559972465,
    -0.00011376518523320556,
    1.5745661585242487e-05,
    -2.193535465266905e-06,
  ),
  (
    5.9944329261779785,
    1.4049946069717407,
    -0.00987991038709879,
    0.001676804618909955,
    -0.00029326791991479695,
    5.545824387809262e-05,
    -1.0380887033534236e-05,
  ),
  (
    9.385162353515625,
    1.9852858781814575,
    -0.007401841226965189,
    0.001238355995155871,
    -0.00021289908909238875,
    3.9379254303639755e-05,
    -7.191718850663165e-06,
  ),
)


class PrivatizerState(NamedTuple):
  """State of :func:`gaussian_privatizer`.

  Attributes:
    step: number of updates privatized so far (int32 scalar).
    key: the 256-bit ChaCha20 noise key, uint32[8] (secret).
  """

  step: jax.Array
  key: jax.Array


def as_key(key: Any) -> np.ndarray:
  """A 256-bit noise key as uint32[8] (from 32 bytes or an array of 8 uint32 words)."""
  if isinstance(key, (bytes, bytearray)):
    if len(key) != 32:
      raise ValueError(f"key must be 32 bytes (got {len(key)})")
    return np.frombuffer(bytes(key), dtype="<u4").astype(np.uint32)
  if isinstance(key, int):
    raise ValueError(
      "key must be a 256-bit key (uint32[8] or 32 bytes), not an int seed; "
      "derive it from a dpjax.privacy.secret.RunSecret"
    )
  array = np.asarray(key)
  if array.dtype != np.uint32 or array.shape != (8,):
    raise ValueError(f"key must be uint32[8] (got dtype {array.dtype}, shape {array.shape})")
  return array


def _rotate_left(x: jax.Array, d: int) -> jax.Array:
  return (x << np.uint32(d)) | (x >> np.uint32(32 - d))


def chacha_block(
  key: jax.Array, counter: jax.Array, nonce: tuple[Any, Any, Any], rounds: int = CHACHA_ROUNDS
) -> list[jax.Array]:
  """The 16 output words of the ChaCha block function (RFC 8439, section 2.3).

  Written as plain elementwise uint32 operations (no loop, no 64-bit type), so
  it runs on CPU, GPU and TPU and fuses into whatever consumes its words.

  Args:
    key: uint32[8], the 256-bit key.
    counter: uint32 array of block counters (one block per element).
    nonce: three uint32 scalars (or arrays broadcastable with ``counter``).
    rounds: 20 for ChaCha20.

  Returns:
    16 uint32 arrays shaped like ``counter``.
  """
  counter = jnp.asarray(counter, jnp.uint32)
  words = [jnp.full_like(counter, np.uint32(c)) for c in _CHACHA_CONSTANTS]
  words += [jnp.broadcast_to(jnp.asarray(key[i], jnp.uint32), counter.shape) for i in range(8)]
  words += [counter] + [jnp.broadcast_to(jnp.asarray(n, jnp.uint32), counter.shape) for n in nonce]
  x = list(words)

  def quarter(a, b, c, d):
    x[a] = x[a] + x[b]
    x[d] = _rotate_left(x[d] ^ x[a], 16)
    x[c] = x[c] + x[d]
    x[b] = _rotate_left(x[b] ^ x[c], 12)
    x[a] = x[a] + x[b]
    x[d] = _rotate_left(x[d] ^ x[a], 8)
    x[c] = x[c] + x[d]
    x[b] = _rotate_left(x[b] ^ x[c], 7)

  for _ in range(rounds // 2):
    quarter(0, 4, 8, 12)
    quarter(1, 5, 9, 13)
    quarter(2, 6, 10, 14)
    quarter(3, 7, 11, 15)
    quarter(0, 5, 10, 15)
    quarter(1, 6, 11, 12)
    quarter(2, 7, 8, 13)
    quarter(3, 4, 9, 14)
  return [a + b for a, b in zip(x, words)]


def _tail_inverse(s: jax.Array) -> jax.Array:
  """Φ^-1(1 - p) from s = sqrt(-ln p), for p < _TAIL_P (piecewise polynomial)."""
  piece = sum((s >= np.float32(edge)).astype(jnp.int32) for edge in _TAIL_EDGES[1:-1])
  scales = [2.0 / (b - a) for a, b in zip(_TAIL_EDGES[:-1], _TAIL_EDGES[1:])]
  shifts = [(a + b) / (b - a) for a, b in zip(_TAIL_EDGES[:-1], _TAIL_EDGES[1:])]

  def pick(values):
    out = jnp.full_like(s, np.float32(values[0]))
    for k in range(1, len(values)):
      out = jnp.where(piece == k, np.float32(values[k]), out)
    return out

  t = s * pick(scales) - pick(shifts)
  degree = len(_TAIL_COEFFS[0]) - 1
  acc = pick([c[degree] for c in _TAIL_COEFFS])
  for j in range(degree - 1, -1, -1):
    acc = acc * t + pick([c[j] for c in _TAIL_COEFFS])
  return acc


def standard_normal_from_words(w0: jax.Array, w1: jax.Array, w2: jax.Array) -> jax.Array:
  """Three uint32 words (96 uniform bits) -> one float32 N(0, 1) draw.

  u = (w0·2^64 + w1·2^32 + w2 + 1/2)·2^-96 and z = Φ^-1(u), computed from the
  smaller of u and 1 - u (1 - u is the same formula on the complemented words,
  so the two halves are exact mirror images). |z| ≤ MAX_ABS_NORMAL.
  """
  upper = w0 >= np.uint32(2**31)
  a, b, c = (jnp.where(upper, ~w, w) for w in (w0, w1, w2))
  f = lambda w: w.astype(jnp.float32)
  p = (
    (f(c) + np.float32(0.5)) * np.float32(2.0**-96)
    + f(b) * np.float32(2.0**-64)
    + f(a) * np.float32(2.0**-32)
  )
  central = np.float32(math.sqrt(2.0)) * jax.lax.erf_inv(np.float32(1.0) - np.float32(2.0) * p)
  tail = _tail_inverse(jnp.sqrt(-jnp.log(p)))
  magnitude = jnp.where(p >= np.float32(_TAIL_P), central, tail)
  return jnp.where(upper, magnitude, -magnitude)


#: Draws per loop iteration of :func:`standard_normals` (the values do not depend on it).
_CHUNK = 1 << 16


def standard_normals(key: jax.Array, step: jax.Array, size: int, stream: int = 0) -> jax.Array:
  """float32 [size]: N(0, 1) draws 0..size-1 of step ``step``'s stream under ``key``.

  Draw i comes from words 0, 1, 2 of ChaCha20 block i under nonce (step, stream, 0):
  the gradient noise is stream 0; other draws of a step (the noisy count of
  adaptive clipping) use another stream, so they share no keystream block with it
  and are independent of it. The stream is a pure function of (key, step), and
  every draw is computed from its own counter alone (elementwise from an iota), so
  it is the same however the output is sharded. The block's other 13 words are
  not used: interleaving several draws of one block makes XLA recompute the
  cipher per output element on CPU, which costs far more than the unused words.
  """
  if size >= 2**32:
    raise ValueError(f"{size} coordinates exceed the 2^32 ChaCha blocks of one nonce")
  step = jnp.asarray(step).astype(jnp.uint32)
  nonce = (step, np.uint32(stream), np.uint32(0))

  def draws(first: jax.Array, count: int) -> jax.Array:
    counters = first.astype(jnp.uint32) + jax.lax.iota(jnp.uint32, count)
    return standard_normal_from_words(*chacha_block(key, counters, nonce)[:_WORDS_PER_DRAW])

  # Chunks in a loop (at least two, so XLA keeps the loop): its body holds the only copy of
  # the cipher. A flat elementwise stream would let XLA fuse (copy) the whole cipher into
  # every consumer of a slice of it, once per parameter leaf: compiling a small transformer's
  # step would take tens of seconds instead of about one.
  chunks = max(2, -(-size // _CHUNK))
  chunk = -(-size // chunks)
  fill = lambda i, out: jax.lax.dynamic_update_slice(out, draws(i * chunk, chunk), (i * chunk,))
  out = jax.lax.fori_loop(0, chunks, fill, jnp.zeros(chunks * chunk, jnp.float32))
  return out[:size]


def noise_for_step(key: jax.Array, step: jax.Array, template: PyTree, stddev: float) -> PyTree:
  """Float32 N(0, stddev²) noise shaped like ``template``, a function of (key, step) only.

  The leaves, in tree order and each in row-major order, are consecutive
  slices of one stream (:func:`standard_normals`): one copy of the cipher in
  the compiled step whatever the number of leaves (a copy per leaf would make
  compilation slow), and the same numbers however the leaves are sharded.
  """
  leaves, treedef = jax.tree_util.tree_flatten(template)
  if stddev == 0:  # σ = 0 (no noise): skip the cipher; the values would be 0·z = 0 anyway.
    return jax.tree_util.tree_unflatten(
      treedef, [jnp.zeros(jnp.shape(leaf), jnp.float32) for leaf in leaves]
    )
  sizes = [int(np.prod(jnp.shape(leaf))) for leaf in leaves]
  stream = standard_normals(key, step, max(1, sum(sizes)))
  noise, offset = [], 0
  for leaf, size in zip(leaves, sizes):
    z = jax.lax.slice(stream, (offset,), (offset + size,)).reshape(jnp.shape(leaf))
    noise.append(np.float32(stddev) * z)
    offset += size
  return jax.tree_util.tree_unflatten(treedef, noise)


def snap_grid(stddev: float) -> float:
  """Λ = 2^(⌈log2 stddev⌉ - SNAP_BITS): the grid of the noised sum (0 when stddev is 0)."""
  if stddev <= 0:
    return 0.0
  return 2.0 ** (math.ceil(math.log2(stddev)) - SNAP_BITS)


def snap_grid_in_graph(stddev: jax.Array) -> jax.Array:
  """:func:`snap_grid` of a traced float32 stddev > 0 (e.g. σ_Δ·C_t of adaptive clipping).

  Exact: ``frexp`` splits stddev = m·2^e with m in [0.5, 1) without rounding, so
  ⌈log2 stddev⌉ is e, or e - 1 when m = 0.5 (stddev a power of two), and
  ``ldexp`` builds the power of two 2^(⌈log2 stddev⌉ - SNAP_BITS) without rounding.
  The grid is therefore the one :func:`snap_grid` gives for the same float32 value,
  a power of two in [2^-SNAP_BITS·stddev, 2^(1-SNAP_BITS)·stddev), and the
  no-floating-point-holes argument of the module docstring holds with σΔ = stddev.
  """
  stddev = jnp.asarray(stddev, jnp.float32)
  mantissa, exponent = jnp.frexp(stddev)
  ceil_log2 = exponent - (mantissa == np.float32(0.5)).astype(exponent.dtype)
  return jnp.ldexp(np.float32(1.0), ceil_log2 - SNAP_BITS)


def snap(x: jax.Array, grid: float | jax.Array) -> jax.Array:
  """x rounded to the nearest multiple of the power of two ``grid`` (exact in float).

  ``grid`` is a Python float (0: no rounding) or a traced power of two > 0 from
  :func:`snap_grid_in_graph`; 1/grid is then exact too.
  """
  if isinstance(grid, (int, float)):
    if grid <= 0:
      return x
    inverse, grid = np.float32(1.0 / grid), np.float32(grid)
  else:
    grid = jnp.asarray(grid, jnp.float32)
    inverse = np.float32(1.0) / grid
  rounded = jnp.round(x * inverse) * grid
  # Beyond grid·2^23 a float32 is already a multiple of the grid.
  return jnp.where(jnp.abs(x) < grid * np.float32(2.0**23), rounded, x)


def tail_probability(noise_multiplier: float, steps: int) -> float:
  """Upper bound on P(an output is impossible for a neighbour) over ``steps`` steps.

  The generator never returns |z| > MAX_ABS_NORMAL = z_max. A neighbour's sum
  differs by d with ||d||₂ ≤ Δ; coordinate j then leaves g ± z_max·σΔ with
  probability ≤ Φ̄(z_max - |d_j|/(σΔ)) per side, and Σ_j Φ̄(z_max - x_j) over
  Σ x_j² ≤ 1/σ² is largest with everything in one coordinate:
  2·Φ̄(z_max - 1/σ) per step, by the union bound over steps times ``steps``.
  This is added to δ by the plan (it is < 1e-12 for σ ≥ 0.4 at 10^6 steps).
  """
  if noise_multiplier <= 0:
    return 1.0
  per_step = 2.0 * float(stats.norm.sf(MAX_ABS_NORMAL - 1.0 / noise_multiplier))
  return min(1.0, per_step * steps)


def gaussian_privatizer(
  noise_multiplier: float, sensitivity: float, expected_batch_size: float, key: Any
) -> optax.GradientTransformation:
  """Adds N(0, (σ·Δ)²) to a clipped sum once, snaps it, then divides by the expected batch size.

  Args:
    noise_multiplier: σ >= 0 (0 gives the non-private clipped mean, for baselines).
    sensitivity: Δ > 0, the L2 sensitivity of the incoming sum; take it from the
      clipped-gradient function (``grad_fn.sensitivity``) or the clip rule.
    expected_batch_size: B = q·N > 0, the denominator (constant for the run).
    key: the run's 256-bit noise key (uint32[8] or 32 bytes), from
      :meth:`dpjax.privacy.secret.RunSecret.noise_key`. It must stay secret.

  Returns:
    An optax transform; chain it before any optimizer. Its output dtype is
    float32 (or wider when the input is).
  """
  sigma = _validation.require_non_negative("noise_multiplier", noise_multiplier)
  sensitivity = _validation.require_positive("sensitivity", sensitivity)
  denom = _validation.require_positive("expected_batch_size", expected_batch_size)
  noise_key = as_key(key)
  stddev = sigma * sensitivity
  grid = snap_grid(stddev)

  def init_fn(params):
    del params
    return PrivatizerState(jnp.zeros([], jnp.int32), jnp.asarray(noise_key))

  def update_fn(updates, state, params=None):
    del params
    noise = noise_for_step(state.key, state.step, updates, stddev)

    def privatize(g, z):
      dtype = jnp.promote_types(g.dtype, jnp.float32)
      return snap(g.astype(dtype) + z.astype(dtype), grid) / jnp.asarray(denom, dtype)

    return (
      jax.tree_util.tree_map(privatize, updates, noise),
      PrivatizerState(state.step + 1, state.key),
    )

  return optax.GradientTransformation(init_fn, update_fn)
