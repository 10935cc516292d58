"""Fixed-shape batches: a Poisson sample split into one padded group per token-length bucket."""

from __future__ import annotations

import numpy as np

from dpjax import parallel, privacy
from dpjax.privacy import sampling
from dpjax.train.splits import Split


class GroupedBatches:
  """Splits each Poisson sample into one padded group per token-length bucket.

  Short examples are then padded to a short length instead of to the longest
  example of the batch (SST-2 train rows average 13 tokens but a batch of 500
  nearly always holds one of 40+). Each group has a fixed capacity: the
  1 - 1e-9 quantile of its Binomial count, rounded up to a multiple of
  ``microbatch_size * num_shards`` (one compilation per group; the scan skips
  microbatches of pure padding). A larger group gets a larger shape, never a
  truncation. The groups' clipped sums add up to the clipped sum of the whole
  sample, which is noised once.

  With ``num_shards`` devices, each group's rows are laid out so every device's
  block holds the same number of real examples (±1), padding last
  (:func:`dpjax.parallel.balanced_order`).
  """

  def __init__(self, split: Split, sampling_prob: float, microbatch_size: int, num_shards: int = 1):
    self.split = split
    self.multiple = microbatch_size * num_shards
    self.num_shards = num_shards
    lengths = split.encoded.lengths[split.indices]
    self.bucket_lengths = split.encoded.buckets
    self.group_of = np.searchsorted(self.bucket_lengths, lengths)
    counts = np.bincount(self.group_of, minlength=len(self.bucket_lengths))
    self.groups = [g for g in range(len(self.bucket_lengths)) if counts[g]]
    self.capacity = {
      g: sampling.binomial_capacity(int(counts[g]), sampling_prob, self.multiple)
      for g in self.groups
    }
    # A real example of the group fills its padding rows (any example fits its own bucket).
    self.filler = {g: int(np.flatnonzero(self.group_of == g)[0]) for g in self.groups}

  def plan(self, sample: privacy.SampledBatch) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """(positions into the split, mask, token length) of each group, without loading rows."""
    positions = sample.indices[sample.mask]
    groups = []
    for g in self.groups:
      chosen = positions[self.group_of[positions] == g]
      size = max(self.capacity[g], sampling.round_up(len(chosen), self.multiple))
      padded = np.full(size, self.filler[g], np.int64)
      padded[: len(chosen)] = chosen
      mask = np.zeros(size, bool)
      mask[: len(chosen)] = True
      if self.num_shards > 1:
        order = parallel.balanced_order(size, self.num_shards)
        padded, mask = padded[order], mask[order]
      groups.append((padded, mask, int(self.bucket_lengths[g])))
    return groups

  def load(self, positions: np.ndarray, length: int) -> dict[str, np.ndarray]:
    """The arrays of the examples at ``positions``, padded to ``length`` tokens."""
    return self.split.encoded.batch(self.split.indices[positions], length=length)
