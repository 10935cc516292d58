"""Poisson sampling of logical batches.

Each step includes every example independently with probability q = B / N
(B the expected batch size). The realized size n ~ Binomial(N, q) varies;
:meth:`PoissonSampler.sample` returns the sampled indices only, and
:class:`dpjax.data.batching.StaticBatches` pads them into a few static shapes
(one padding policy for every loop).

Sampling is a pure function of (key, step), where the key is secret (derived
from the run's secret, :mod:`dpjax.privacy.secret`): a resumed run, or every
host of a multi-host run, draws the same batch for the same step, and nobody
without the key can tell which examples a step used. Step t's generator is
seeded with HMAC-SHA256(key, t) (256 bits), so steps are independent streams
and knowing one step's sample reveals nothing about another's.

Two regimes, and how each is accounted (see :mod:`dpjax.privacy.accounting`):

* ``max_batch_size=None`` (default): nothing is ever dropped. The mechanism is
  exactly the Poisson-subsampled Gaussian and is accounted as such.
* ``max_batch_size=M``: a hard cap for memory. A larger sample is cut to a
  uniformly random subset of M examples, which is exactly the mechanism of
  dp_accounting's ``TruncatedSubsampledGaussianDpEvent``, and the ledger
  accounts it with that event (PLD only).
"""

from __future__ import annotations

import hashlib
import hmac
import math

import numpy as np

from dpjax import _validation
from dpjax.privacy import accounting


class PoissonSampler:
  """Poisson sampling with rate q = expected_batch_size / dataset_size.

  Args:
    dataset_size: N, the number of examples (or of users, for user-level DP).
    expected_batch_size: B in (0, N]; q = B / N.
    key: the secret sampling key (>= 16 bytes, e.g. ``RunSecret.sampling_key()``);
      sample(step) depends only on (key, step).
    max_batch_size: optional hard cap M: larger samples are truncated to M
      random examples, and accounted with the truncated-Poisson event.
  """

  def __init__(
    self,
    dataset_size: int,
    expected_batch_size: float,
    key: bytes,
    *,
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
    if max_batch_size is not None:
      _validation.require_int_in("max_batch_size", max_batch_size, 1, dataset_size)
    self.max_batch_size = max_batch_size

  def sample(self, step: int) -> np.ndarray:
    """The sample of ``step``: the sorted int64 indices of the included examples."""
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
    return indices.astype(np.int64)

  def segment(self, noise_multiplier: float, steps: int = 1) -> accounting.Segment:
    """The accounting segment of ``steps`` steps of this sampler with noise σ."""
    return accounting.Segment(
      sampling_prob=self.sampling_prob,
      noise_multiplier=noise_multiplier,
      steps=steps,
      dataset_size=self.dataset_size,
      max_batch_size=self.max_batch_size,
    )

  def __repr__(self) -> str:
    cap = "" if self.max_batch_size is None else f", max_batch_size={self.max_batch_size}"
    return f"PoissonSampler(N={self.dataset_size}, q={self.sampling_prob:.6g}{cap})"


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
