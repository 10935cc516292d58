"""Static shapes for Poisson samples: the one padding policy of every training loop.

A Poisson sample has a random size n ~ Binomial(N, q), but a jitted step needs
static shapes. :class:`StaticBatches` pads the sampled indices (from
:meth:`dpjax.privacy.PoissonSampler.sample`) into a few fixed sizes, with a
boolean mask that is True on the real examples:

* Examples can be split into **groups** (e.g. token-length buckets), so short
  examples are padded to a short length instead of to the longest example of
  the batch. The groups' clipped sums add up to the clipped sum of the whole
  sample, which is noised once.
* Each group's allowed sizes are quantiles of its Binomial count (by default
  0.5, 0.9, 0.99 and 1 - 1e-9), rounded up to a multiple of
  ``microbatch_size * num_shards``: one compilation per size. A larger sample
  gets one more size, never a truncation (a hard cap is the sampler's
  ``max_batch_size``, which is accounted).
* Padding rows repeat a real example of their group (so they are valid inputs)
  and carry mask False: they contribute exactly zero to the clipped sum.
* With ``num_shards`` devices, every device's block holds the same number of
  real examples (±1), padding last (:func:`balanced_order`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from scipy import stats

from dpjax import _validation

#: Quantiles of a group's Binomial count that define its allowed sizes.
DEFAULT_QUANTILES = (0.5, 0.9, 0.99, 1 - 1e-9)
#: One size per group: enough for steps that skip microbatches of pure padding.
SINGLE_SHAPE = (1 - 1e-9,)


def round_up(value: int, multiple: int) -> int:
  """The smallest multiple of ``multiple`` that is >= value (and >= multiple)."""
  return max(multiple, -(-value // multiple) * multiple)


def binomial_capacity(count: int, prob: float, multiple: int = 1, level: float = 1 - 1e-9) -> int:
  """The ``level`` quantile of Binomial(count, prob), rounded up to ``multiple``."""
  return round_up(int(stats.binom(count, prob).ppf(level)), multiple)


def balanced_order(size: int, num_shards: int) -> np.ndarray:
  """Positions that spread the first rows of a batch evenly over ``num_shards`` blocks.

  A group of ``size`` rows has its real examples first and padding last. Row p
  goes to block ``p % num_shards`` (slot ``p // num_shards``): every device gets
  the same number of real examples (±1) with its padding at the end of its own
  block, where its microbatch scan skips it.

  Returns:
    ``order`` with ``new[order] = old`` semantics: ``new = old[inverse]`` where
    ``inverse`` is the returned array.
  """
  if size % num_shards:
    raise ValueError(f"group size {size} is not a multiple of the {num_shards} devices")
  per = size // num_shards
  new_position = (np.arange(size) % num_shards) * per + np.arange(size) // num_shards
  source = np.empty(size, np.int64)
  source[new_position] = np.arange(size)
  return source


@dataclasses.dataclass(frozen=True)
class PaddedGroup:
  """One group of a padded sample.

  Attributes:
    indices: int64 [S] dataset indices; padding rows repeat a real member of the group.
    mask: bool [S], True on the sampled examples.
    group: the group's number (e.g. the token-length bucket).
  """

  indices: np.ndarray
  mask: np.ndarray
  group: int

  @property
  def size(self) -> int:
    """The number of real examples."""
    return int(self.mask.sum())


class StaticBatches:
  """Pads Poisson samples of ``dataset_size`` examples into per-group static shapes.

  Args:
    dataset_size: N, the number of examples the sampler draws from.
    sampling_prob: q, each example's inclusion probability.
    groups: optional int [N], the group of each example (default: one group).
    microbatch_size: every size is a multiple of ``microbatch_size * num_shards``.
    num_shards: data-parallel devices; rows are ordered so each gets its share.
    quantiles: the quantiles of each group's Binomial count used as its sizes
      (``DEFAULT_QUANTILES``, or ``SINGLE_SHAPE`` for one size per group).
    max_batch_size: the sampler's hard cap, if any: no size exceeds it (rounded up).
  """

  def __init__(
    self,
    dataset_size: int,
    sampling_prob: float,
    *,
    groups: np.ndarray | None = None,
    microbatch_size: int = 1,
    num_shards: int = 1,
    quantiles: Sequence[float] = DEFAULT_QUANTILES,
    max_batch_size: int | None = None,
  ):
    self.dataset_size = _validation.require_int_in("dataset_size", dataset_size, 1)
    self.sampling_prob = _validation.require_probability("sampling_prob", sampling_prob)
    microbatch_size = _validation.require_int_in("microbatch_size", microbatch_size, 1)
    self.num_shards = _validation.require_int_in("num_shards", num_shards, 1)
    self.multiple = microbatch_size * self.num_shards
    if not quantiles or not all(0 < p < 1 for p in quantiles):
      raise ValueError(f"quantiles must be values in (0, 1) (got {tuple(quantiles)!r})")
    if groups is None:
      groups = np.zeros(dataset_size, np.int64)
    groups = np.asarray(groups)
    if groups.shape != (dataset_size,) or groups.dtype.kind not in "iu" or groups.min() < 0:
      raise ValueError(f"groups must be {dataset_size} non-negative integers, one per example")
    self.group_of = groups.astype(np.int64)
    counts = np.bincount(self.group_of)
    cap = None if max_batch_size is None else round_up(max_batch_size, self.multiple)
    #: The allowed sizes of each non-empty group, ascending.
    self.shapes: dict[int, tuple[int, ...]] = {}
    self._filler: dict[int, int] = {}
    for g in np.flatnonzero(counts):
      sizes = {
        binomial_capacity(int(counts[g]), sampling_prob, self.multiple, p) for p in quantiles
      }
      if cap is not None:
        sizes = {min(s, cap) for s in sizes}
      self.shapes[int(g)] = tuple(sorted(sizes))
      self._filler[int(g)] = int(np.flatnonzero(self.group_of == g)[0])
    self._counts = counts

  @property
  def overflow_probability(self) -> float:
    """At most this probability per step that some group needs a size beyond its largest."""
    return float(
      sum(
        stats.binom(int(self._counts[g]), self.sampling_prob).sf(sizes[-1])
        for g, sizes in self.shapes.items()
      )
    )

  def expected_padding_fraction(self) -> float:
    """E[padding rows] / E[rows]: the share of computed rows that are padding."""
    padding, rows = 0.0, 0.0
    for g, sizes in self.shapes.items():
      binom = stats.binom(int(self._counts[g]), self.sampling_prob)
      low = 0
      for s in sizes:
        n = np.arange(low, s + 1)
        pmf = binom.pmf(n)
        padding += float(np.sum(pmf * (s - n)))
        rows += float(np.sum(pmf * s))
        low = s + 1
    return padding / rows

  def pad(self, indices: np.ndarray) -> list[PaddedGroup]:
    """One :class:`PaddedGroup` per non-empty group, real examples first (before sharding)."""
    indices = np.asarray(indices, np.int64)
    out = []
    for g, sizes in self.shapes.items():
      chosen = indices[self.group_of[indices] == g]
      size = next((s for s in sizes if s >= len(chosen)), round_up(len(chosen), self.multiple))
      padded = np.full(size, self._filler[g], np.int64)
      padded[: len(chosen)] = chosen
      mask = np.zeros(size, bool)
      mask[: len(chosen)] = True
      if self.num_shards > 1:
        order = balanced_order(size, self.num_shards)
        padded, mask = padded[order], mask[order]
      out.append(PaddedGroup(padded, mask, g))
    return out

  def __repr__(self) -> str:
    return (
      f"StaticBatches(N={self.dataset_size}, q={self.sampling_prob:.5g}, "
      f"multiple={self.multiple}, shapes={self.shapes})"
    )


def user_table(user_ids: np.ndarray, unit_size: int) -> np.ndarray:
  """int64 [N_u, k]: the positions of each user's rows, -1 where a user has fewer than k.

  Users are numbered by their sorted ids (the units a user-level sampler draws);
  a user's rows keep their order. Every user must have at most ``unit_size`` rows.
  """
  user_ids = np.asarray(user_ids)
  _validation.require_int_in("unit_size", unit_size, 1)
  ids, user_of_row = np.unique(user_ids, return_inverse=True)
  counts = np.bincount(user_of_row, minlength=len(ids))
  if len(counts) and counts.max() > unit_size:
    raise ValueError(f"a user has {counts.max()} rows, more than unit_size={unit_size}")
  table = np.full((len(ids), unit_size), -1, np.int64)
  order = np.argsort(user_of_row, kind="stable")
  slot = np.arange(len(order)) - np.repeat(np.cumsum(counts) - counts, counts)
  table[user_of_row[order], slot] = order
  return table


def rows_per_user_sizes(k: int) -> tuple[int, ...]:
  """The unit sizes a user with 1..k rows is padded to: powers of two below k, and k.

  A user with n rows goes to the smallest size >= n, so at most half of a unit
  is padding (k = 4: sizes 1, 2, 4; k = 6: 1, 2, 4, 6).
  """
  _validation.require_int_in("k", k, 1)
  return tuple(sorted({min(k, 2**i) for i in range(max(k - 1, 0).bit_length() + 1)}))


def user_groups(table: np.ndarray, row_groups: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
  """(int [N_u] group of each user, the unit sizes) for :class:`StaticBatches` over users.

  A user's group combines its length bucket (its longest row's ``row_groups``
  entry) and its unit size (:func:`rows_per_user_sizes`, the fewest padded rows
  that hold all of its rows): group = bucket·len(sizes) + size index, decoded by
  :func:`user_group_shape`.
  """
  sizes = rows_per_user_sizes(table.shape[1])
  counts = (table >= 0).sum(1)
  lengths = np.where(table >= 0, np.asarray(row_groups)[np.maximum(table, 0)], -1).max(1)
  return lengths * len(sizes) + np.searchsorted(sizes, counts), sizes


def user_group_shape(group: int, sizes: tuple[int, ...]) -> tuple[int, int]:
  """(length bucket, rows per user) of a group id from :func:`user_groups`."""
  bucket, index = divmod(int(group), len(sizes))
  return bucket, sizes[index]


def expand_users(
  table: np.ndarray, group: PaddedGroup, rows_per_user: int
) -> tuple[np.ndarray, np.ndarray]:
  """A padded group of USERS -> (row positions [S·r], row mask [S, r]), r rows per user.

  Each user's r slots are consecutive (the clipping unit: the 2-D mask tells
  :func:`dpjax.privacy.clipped_grad` that every r rows are one user); empty
  slots and padding users repeat a real row of that user and are masked out, so
  they contribute zero. Every user of the group has at most r rows. Device blocks
  of users become device blocks of rows.
  """
  rows = table[group.indices, :rows_per_user]
  if (table[group.indices, rows_per_user:] >= 0).any():
    raise ValueError(f"a user of group {group.group} has more than {rows_per_user} rows")
  mask = (rows >= 0) & group.mask[:, None]
  rows = np.where(rows >= 0, rows, rows[:, :1])
  return rows.reshape(-1), mask
