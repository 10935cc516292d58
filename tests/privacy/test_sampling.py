"""Poisson sampler: inclusion rate q, Binomial batch sizes, reproducible, truncation."""

import numpy as np
import pytest
from scipy import stats

from dpjax.privacy import PoissonSampler
from dpjax.privacy.secret import RunSecret

KEYS = [RunSecret.insecure_fixed(i).sampling_key() for i in range(12)]


def test_inclusion_rate_and_batch_size_distribution():
  n, b, steps = 500, 25.0, 4000
  sampler = PoissonSampler(n, b, key=KEYS[11])
  q = b / n
  counts = np.zeros(n)
  sizes = []
  for step in range(steps):
    real = sampler.sample(step)
    assert real.dtype == np.int64 and np.all(np.diff(real) > 0)  # Sorted, no duplicates.
    counts[real] += 1
    sizes.append(len(real))
  sizes = np.asarray(sizes)
  # Overall inclusion rate: steps*n Bernoulli(q) trials, standard error ~0.0005.
  assert counts.sum() / (steps * n) == pytest.approx(q, abs=4 * np.sqrt(q * (1 - q) / (steps * n)))
  # Each example's count ~ Binomial(steps, q): chi-square over examples, and no example starved.
  expected = steps * q
  chi2 = np.sum((counts - expected) ** 2 / (expected * (1 - q)))
  assert stats.chi2(n - 1).sf(chi2) > 1e-4
  # Batch sizes ~ Binomial(n, q): mean, variance, and a goodness-of-fit test.
  binom = stats.binom(n, q)
  assert sizes.mean() == pytest.approx(binom.mean(), abs=4 * binom.std() / np.sqrt(steps))
  assert sizes.var() == pytest.approx(binom.var(), rel=0.1)
  edges = np.arange(binom.ppf(0.005), binom.ppf(0.995) + 1)
  observed = np.array([np.sum(sizes == k) for k in edges])
  assert (
    stats.chisquare(
      observed, binom.pmf(edges) * steps * observed.sum() / (binom.pmf(edges) * steps).sum()
    ).pvalue
    > 1e-4
  )


def test_deterministic_from_key_and_step():
  a, b = PoissonSampler(1000, 50, key=KEYS[5]), PoissonSampler(1000, 50, key=KEYS[5])
  for step in (0, 1, 99):
    np.testing.assert_array_equal(a.sample(step), b.sample(step))
  assert not np.array_equal(a.sample(1), a.sample(2))
  c = PoissonSampler(1000, 50, key=KEYS[6])
  assert not np.array_equal(a.sample(0), c.sample(0))


def test_truncation_caps_the_batch_and_is_accounted_as_truncated():
  sampler = PoissonSampler(1000, 100, key=KEYS[1], max_batch_size=90)
  sizes = [len(sampler.sample(s)) for s in range(200)]
  assert max(sizes) == 90 and min(sizes) < 90
  segment = sampler.segment(noise_multiplier=1.0, steps=3)
  assert segment.max_batch_size == 90 and segment.dataset_size == 1000
  assert segment.sampling_prob == pytest.approx(0.1)


@pytest.mark.parametrize(
  "kwargs, message",
  [
    ({"dataset_size": 0, "expected_batch_size": 1}, r"dataset_size must be an integer in \[1\]"),
    (
      {"dataset_size": 10, "expected_batch_size": 11},
      r"expected_batch_size must be in \(0, dataset_size=10\]",
    ),
    ({"dataset_size": 10, "expected_batch_size": 0}, "expected_batch_size must be a finite"),
    (
      {"dataset_size": 10, "expected_batch_size": 2, "max_batch_size": 11},
      r"max_batch_size must be an integer in \[1, 10\]",
    ),
  ],
)
def test_bad_arguments(kwargs, message):
  with pytest.raises(ValueError, match=message):
    PoissonSampler(key=KEYS[0], **kwargs)


def test_short_or_integer_keys_are_refused():
  for key in (0, 12345, b"short", "a string of text!"):
    with pytest.raises(ValueError, match="key must be a secret"):
      PoissonSampler(100, 10, key=key)
