"""Poisson sampling of logical batches into a few static shapes.

Each step includes every example independently with probability q = B / N
(B the expected batch size). The realized size n ~ Binomial(N, q) varies, so
the sampled indices are padded, with a boolean mask, to the smallest of a few
allowed sizes (``shapes``) that holds them: jitted steps compile once per shape.

Sampling is a pure function of (key, step), where the key is secret (derived
from the run's secret, :mod:`dpjax.privacy.secret`): a resumed run, or every
host of a multi-host run, draws the same batch for the same step, and nobody
without the key can tell which examples a step used. Step t's generator is
seeded with HMAC-SHA256(key, t) (256 bits), so steps are independent streams
and knowing one step's sample reveals nothing about another's.

Two regimes, and how each is accounted (see :mod:`dpjax.privacy.accounting`):

* ``max_batch_size=None`` (default): nothing is ever dropped. A sample larger
  than the biggest shape (probability ``overflow_probability`` per step, below
  1e-9 by default) gets one more shape, a multiple of
  ``batch_size_multiple``, at the cost of one extra compilation. The mechanism
  is exactly the Poisson-subsampled Gaussian and is accounted as such.
* ``max_batch_size=M``: a hard cap for memory. A larger sample is cut to a
  uniformly random subset of M examples, which is exactly the mechanism of
  dp_accounting's ``TruncatedSubsampledGaussianDpEvent``, and the ledger
  accounts it with that event (PLD only).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import math

import numpy as np
from scipy import stats

from dpjax import _validation
from dpjax.privacy import accounting

# Quantiles of the batch size distribution that define the default shapes.
_DEFAULT_SHAPE_QUANTILES = (0.5, 0.9, 0.99, 1 - 1e-9)


@dataclasses.dataclass(frozen=True)
class SampledBatch:
  """One step's sample.

  Attributes:
    indices: int64 [S] dataset indices; padding slots hold index 0.
    mask: bool [S], True for the real examples (the first ``size`` slots).
    size: number of real examples.
  """

  indices: np.ndarray
  mask: np.ndarray
  size: int


def round_up(value: int, multiple: int) -> int:
  """The smallest multiple of ``multiple`` that is >= value (and >= multiple)."""
  return max(multiple, -(-value // multiple) * multiple)


def binomial_capacity(count: int, prob: float, multiple: int = 1, level: float = 1 - 1e-9) -> int:
  """A padded size that holds a Poisson sample of ``count`` items with probability ``level``.

  The ``level`` quantile of Binomial(count, prob), rounded up to ``multiple``.
  Used for every static shape: the sampler's default shapes and the capacity of
  each token-length group (:mod:`dpjax.train.batching`).
  """
  return round_up(int(stats.binom(count, prob).ppf(level)), multiple)


class PoissonSampler:
  """Poisson sampling with rate q = expected_batch_size / dataset_size.

  Args:
    dataset_size: N, the number of examples (or of users, for user-level DP).
    expected_batch_size: B in (0, N]; q = B / N.
    key: the secret sampling key (>= 16 bytes, e.g. ``RunSecret.sampling_key()``);
      sample(step) depends only on (key, step).
    batch_size_multiple: every shape is a multiple of this (the microbatch size
      times the number of data-parallel devices).
    shapes: the allowed padded sizes; by default the quantiles 0.5, 0.9, 0.99
      and 1 - 1e-9 of Binomial(N, q), rounded up to ``batch_size_multiple``;
      ``"single"`` keeps only the largest of these (one compilation; pair it
      with a step that skips all-padding microbatches).
    max_batch_size: optional hard cap M: larger samples are truncated to M
      random examples, and accounted with the truncated-Poisson event.
  """

  def __init__(
    self,
    dataset_size: int,
    expected_batch_size: float,
    key: bytes,
    *,
    batch_size_multiple: int = 1,
    shapes: tuple[int, ...] | str | None = None,
    max_batch_size: int | None = None,
  ):
    self.dataset_size = _validation.require_int_in("dataset_size", dataset_size, 1)
    b = _validation.require_positive("expected_batch_size", expected_batch_size)
    if b > dataset_size:
      raise ValueError(
        f"expected_batch_size must be in (0, dataset_size={dataset_size}] "
        f"(got {expected_batch_size!r})"
      )
    self.expected_batch_size = b
    self.sampling_prob = b / dataset_size
    if not isinstance(key, bytes) or len(key) < 16:
      raise ValueError("key must be a secret of at least 16 bytes (see dpjax.privacy.secret)")
    self._key = key
    self.batch_size_multiple = _validation.require_int_in(
      "batch_size_multiple", batch_size_multiple, 1
    )
    if max_batch_size is not None:
      _validation.require_int_in("max_batch_size", max_batch_size, 1, dataset_size)
      if max_batch_size % batch_size_multiple:
        raise ValueError(
          f"max_batch_size must be a multiple of batch_size_multiple="
          f"{batch_size_multiple} (got {max_batch_size})"
        )
    self.max_batch_size = max_batch_size
    binom = stats.binom(dataset_size, self.sampling_prob)
    single = shapes == "single"
    if single or shapes is None:
      shapes = tuple(
        binomial_capacity(dataset_size, self.sampling_prob, batch_size_multiple, level=p)
        for p in _DEFAULT_SHAPE_QUANTILES
      )
      if max_batch_size is not None:
        shapes = tuple(min(s, max_batch_size) for s in shapes) + (max_batch_size,)
      if single:
        shapes = (max(shapes),)
    else:
      shapes = tuple(shapes)
      if not shapes:
        raise ValueError("shapes must hold at least one size")
      for s in shapes:
        _validation.require_int_in("shapes[i]", s, 1)
        if s % batch_size_multiple:
          raise ValueError(
            f"shapes must be multiples of batch_size_multiple={batch_size_multiple} (got {s})"
          )
      if max_batch_size is not None and max(shapes) < max_batch_size:
        raise ValueError(
          f"shapes must include a size >= max_batch_size={max_batch_size} (got {shapes})"
        )
    self.shapes = tuple(sorted(set(shapes)))
    top = self.max_batch_size or self.shapes[-1]
    #: P(sample larger than the biggest shape) per step: an extra shape (no cap) or a
    #: truncation (with a cap, accounted exactly).
    self.overflow_probability = float(binom.sf(top))

  def sample(self, step: int) -> SampledBatch:
    """The sample of ``step``: indices padded to a static shape, and a mask."""
    _validation.require_int_in("step", int(step), 0)
    seed = hmac.new(self._key, b"step:%d" % int(step), hashlib.sha256).digest()
    rng = np.random.default_rng(np.random.SeedSequence(int.from_bytes(seed, "little")))
    # Binomial size, then a uniform subset of that size: the same distribution as
    # including each example independently with probability q, in O(n) time.
    size = int(rng.binomial(self.dataset_size, self.sampling_prob))
    indices = np.sort(rng.choice(self.dataset_size, size, replace=False))
    if self.max_batch_size is not None and size > self.max_batch_size:
      indices = np.sort(rng.choice(indices, self.max_batch_size, replace=False))
      size = self.max_batch_size
    shape = next((s for s in self.shapes if s >= size), None)
    if shape is None:
      shape = round_up(size, self.batch_size_multiple)
    padded = np.zeros([shape], np.int64)
    padded[:size] = indices
    mask = np.zeros([shape], bool)
    mask[:size] = True
    return SampledBatch(padded, mask, size)

  def segment(self, noise_multiplier: float, steps: int = 1) -> accounting.Segment:
    """The accounting segment of ``steps`` steps of this sampler with noise σ."""
    return accounting.Segment(
      sampling_prob=self.sampling_prob,
      noise_multiplier=noise_multiplier,
      steps=steps,
      dataset_size=self.dataset_size,
      max_batch_size=self.max_batch_size,
    )

  def expected_padding_fraction(self) -> float:
    """E[(shape - n) / shape]: the share of computed rows that are padding."""
    binom = stats.binom(self.dataset_size, self.sampling_prob)
    low, total = 0, 0.0
    for s in self.shapes:
      n = np.arange(low, s + 1)
      total += float(np.sum(binom.pmf(n) * (s - n) / s))
      low = s + 1
    return total

  def __repr__(self) -> str:
    cap = "" if self.max_batch_size is None else f", max_batch_size={self.max_batch_size}"
    return (
      f"PoissonSampler(N={self.dataset_size}, q={self.sampling_prob:.6g}, "
      f"shapes={self.shapes}{cap})"
    )


def steps_for_epochs(epochs: float, dataset_size: int, expected_batch_size: float) -> int:
  """The steps of ``epochs`` passes: floor(epochs·N/B + 1/2), at least 1.

  Poisson sampling sees each example ``epochs`` times in expectation. Halves
  round up (2.5 -> 3), unlike Python's ``round``.
  """
  _validation.require_non_negative("epochs", epochs)
  _validation.require_int_in("dataset_size", dataset_size, 1)
  _validation.require_positive("batch_size", expected_batch_size)
  return max(1, int(math.floor(epochs * dataset_size / expected_batch_size + 0.5)))


def steps_per_epoch(dataset_size: int, expected_batch_size: float) -> int:
  """The steps of one pass (:func:`steps_for_epochs` with one epoch)."""
  return steps_for_epochs(1.0, dataset_size, expected_batch_size)
