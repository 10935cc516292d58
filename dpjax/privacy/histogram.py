"""A DP label histogram: the Gaussian mechanism on per-label counts.

Sampling synthetic text in the private label proportions (Yue et al. 2023) uses
the proportions of the private data; publishing them exactly is a release that
the fine-tuning ledger does not cover. Here they are released by the Gaussian
mechanism and recorded in the same ledger:

    released_k = count_k + σ·z_k,   z ~ N(0, I_K)   (then snapped, like the gradient sum)

Adding or removing one example changes one count by 1, so the L2 sensitivity is
1 and the release is one step of the Gaussian mechanism with noise multiplier σ
and no subsampling (``Segment(sampling_prob=1, noise_multiplier=σ, steps=1)``).
The noise comes from the run's secret (a key of its own purpose), drawn by the
same ChaCha20 / inverse-CDF generator as the training noise, so it is secret,
Gaussian in its tails, and free of floating-point leaks (snapped to a power-of-
two grid of σ). Proportions derived from it (negative counts set to 0) are
post-processing.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from dpjax.privacy import accounting, noise
from dpjax.privacy.secret import RunSecret

PURPOSE = "label_histogram"
MIN_NOISE_MULTIPLIER = 0.3  # below it the generator's tails matter (see noise.tail_probability)


def segment(noise_multiplier: float, dataset_size: int) -> accounting.Segment:
  """The ledger segment of one histogram release with noise multiplier σ (sensitivity 1)."""
  if not noise_multiplier >= MIN_NOISE_MULTIPLIER:
    raise ValueError(
      f"histogram noise_multiplier must be >= {MIN_NOISE_MULTIPLIER} (got {noise_multiplier!r})"
    )
  return accounting.Segment(1.0, float(noise_multiplier), 1, int(dataset_size))


def release(
  labels: np.ndarray, num_labels: int, noise_multiplier: float, secret: RunSecret, index: int = 0
) -> list[float]:
  """The noisy count of each label 0..K-1 (see the module docstring).

  ``index`` numbers the run's histogram draws: each one has a key of its own, so
  a second draw (its first was lost) never reuses the first one's noise.

  Raises:
    ValueError: a label outside [0, num_labels), or σ below the minimum.
  """
  labels = np.asarray(labels)
  if labels.size and (labels.min() < 0 or labels.max() >= num_labels):
    raise ValueError(f"labels must lie in [0, {num_labels})")
  segment(noise_multiplier, max(len(labels), 1))  # validates σ
  counts = np.bincount(labels, minlength=num_labels).astype(np.float32)
  key = noise.as_key(secret.derive(PURPOSE, index))
  z = noise.standard_normals(jnp.asarray(key), jnp.uint32(0), num_labels)
  stddev = float(noise_multiplier)
  noisy = noise.snap(jnp.asarray(counts) + np.float32(stddev) * z, noise.snap_grid(stddev))
  return [float(v) for v in np.asarray(noisy)]


def proportions(noisy_counts: list[float]) -> np.ndarray:
  """Label proportions from released counts (negatives clipped to 0; uniform if all are)."""
  counts = np.maximum(np.asarray(noisy_counts, np.float64), 0.0)
  total = counts.sum()
  if total <= 0:
    return np.full(len(counts), 1.0 / len(counts))
  return counts / total
