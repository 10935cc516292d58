"""Static shapes for Poisson samples: sizes, masks, groups, shard balance, no truncation."""

import numpy as np
import pytest

from dpjax import batching
from dpjax.privacy import PoissonSampler
from dpjax.privacy.secret import RunSecret

KEY = RunSecret.insecure_fixed(0).sampling_key()


def test_one_group_has_a_few_sizes_that_are_multiples_of_the_microbatch():
  n, b = 10_000, 64
  sampler = PoissonSampler(n, b, key=KEY)
  static = batching.StaticBatches(n, b / n, microbatch_size=8)
  (sizes,) = static.shapes.values()
  assert all(s % 8 == 0 for s in sizes) and 2 <= len(sizes) <= 4
  assert static.overflow_probability < 1e-9
  seen = set()
  for step in range(300):
    sample = sampler.sample(step)
    (group,) = static.pad(sample)
    assert len(group.indices) in sizes and group.indices.shape == group.mask.shape
    np.testing.assert_array_equal(group.indices[group.mask], sample)
    assert group.size == len(sample) and group.mask[: len(sample)].all()
    assert np.all(group.indices[~group.mask] == 0)  # The group's first member fills padding.
    seen.add(len(group.indices))
  assert len(seen) >= 2
  assert 0 < static.expected_padding_fraction() < 0.2


def test_groups_partition_the_sample_and_pad_with_their_own_members():
  n = 2000
  groups = np.random.default_rng(0).integers(0, 3, n)
  groups[groups == 1] = 4  # An empty group (1..3) gets no shape.
  sampler = PoissonSampler(n, 200, key=KEY)
  static = batching.StaticBatches(n, 0.1, groups=groups, microbatch_size=4)
  assert sorted(static.shapes) == [0, 2, 4]
  for step in range(20):
    sample = sampler.sample(step)
    padded = static.pad(sample)
    real = np.concatenate([g.indices[g.mask] for g in padded])
    np.testing.assert_array_equal(np.sort(real), sample)
    for g in padded:
      assert np.all(groups[g.indices] == g.group)  # Padding rows are valid rows of the group.
      assert len(g.indices) % 4 == 0


def test_a_sample_beyond_the_largest_size_gets_a_bigger_shape_not_a_truncation():
  static = batching.StaticBatches(1000, 0.1, microbatch_size=32, quantiles=(0.5,))
  (sizes,) = static.shapes.values()
  sample = np.arange(0, 1000, 7)  # 143 examples: far beyond the median size.
  (group,) = static.pad(sample)
  assert len(sample) > sizes[-1] and len(group.indices) == -(-len(sample) // 32) * 32
  np.testing.assert_array_equal(group.indices[group.mask], sample)


def test_single_shape_and_the_cap_of_a_truncating_sampler():
  full = batching.StaticBatches(10_000, 0.0064, microbatch_size=8)
  single = batching.StaticBatches(
    10_000, 0.0064, microbatch_size=8, quantiles=batching.SINGLE_SHAPE
  )
  assert single.shapes[0] == (full.shapes[0][-1],)
  capped = batching.StaticBatches(1000, 0.1, microbatch_size=8, max_batch_size=90)
  assert max(capped.shapes[0]) == 96  # 90 rounded up to the microbatch, never more.


@pytest.mark.parametrize("real", [0, 1, 5, 13, 16])
def test_balanced_order_gives_every_device_its_share_of_real_rows_padding_last(real):
  size, shards = 16, 4
  mask = np.arange(size) < real
  order = batching.balanced_order(size, shards)
  assert sorted(order) == list(range(size))  # a permutation: no row lost or repeated
  blocks = mask[order].reshape(shards, size // shards)
  counts = blocks.sum(1)
  assert counts.max() - counts.min() <= 1 and counts.sum() == real
  for block, count in zip(blocks, counts):
    assert block[:count].all() and not block[count:].any()  # padding at the end of each block


def test_sharded_groups_balance_real_rows_over_devices():
  static = batching.StaticBatches(1000, 0.05, microbatch_size=2, num_shards=4)
  (group,) = static.pad(np.arange(0, 1000, 31))  # 33 examples.
  blocks = group.mask.reshape(4, -1)
  assert blocks.sum() == 33 and blocks.sum(1).max() - blocks.sum(1).min() <= 1


@pytest.mark.parametrize(
  "kwargs, message",
  [
    ({"dataset_size": 0, "sampling_prob": 0.1}, r"dataset_size must be an integer in \[1\]"),
    ({"dataset_size": 10, "sampling_prob": 1.5}, r"sampling_prob must be in \(0, 1\]"),
    ({"dataset_size": 10, "sampling_prob": 0.5, "microbatch_size": 0}, "microbatch_size"),
    ({"dataset_size": 10, "sampling_prob": 0.5, "quantiles": (1.0,)}, "quantiles must be"),
    ({"dataset_size": 3, "sampling_prob": 0.5, "groups": np.array([0, -1, 0])}, "groups must be"),
    ({"dataset_size": 3, "sampling_prob": 0.5, "groups": np.zeros(2, int)}, "groups must be 3"),
  ],
)
def test_bad_arguments(kwargs, message):
  with pytest.raises(ValueError, match=message):
    batching.StaticBatches(**kwargs)


def test_users_expand_to_whole_units_sampled_at_rate_q_and_padded_by_their_row_count():
  rng = np.random.default_rng(0)
  users = rng.choice(["ann", "bob", "cy", "dee", "eve", "fay"], size=15)
  users[:6] = ["ann", "bob", "cy", "dee", "eve", "fay"]  # everyone has a row
  counts = {u: int((users == u).sum()) for u in set(users)}
  k = max(counts.values())
  table = batching.user_table(users, k)
  assert table.shape == (6, k)
  for row, user in zip(table, sorted(counts)):  # users in sorted order, rows in file order
    real = row[row >= 0]
    assert real.tolist() == np.flatnonzero(users == user).tolist()
  row_groups = rng.integers(0, 3, 15)
  groups, sizes = batching.user_groups(table, row_groups)
  assert sizes == batching.rows_per_user_sizes(k)
  for u in range(6):  # the longest row's bucket, and the fewest rows that hold the user's
    bucket, per_user = batching.user_group_shape(groups[u], sizes)
    n = int((table[u] >= 0).sum())
    assert bucket == row_groups[table[u][table[u] >= 0]].max()
    assert per_user == min(s for s in sizes if s >= n)
  sampler = PoissonSampler(6, 2.0, key=b"k" * 32)
  static = batching.StaticBatches(6, 2 / 6, groups=groups, microbatch_size=2)
  seen = np.zeros(6)
  for step in range(3000):
    sample = sampler.sample(step)
    seen[sample] += 1
    rows_of_step = []
    for group in static.pad(sample):
      _, per_user = batching.user_group_shape(group.group, sizes)
      positions, mask = batching.expand_users(table, group, per_user)
      assert mask.shape == (len(group.indices), per_user) and len(positions) == mask.size
      units = positions.reshape(-1, per_user)
      for unit, unit_mask, user, real in zip(units, mask, group.indices, group.mask):
        # A sampled user brings exactly all of its rows; a padding user brings none.
        want = table[user][table[user] >= 0]
        assert sorted(unit[unit_mask].tolist()) == (sorted(want.tolist()) if real else [])
        assert set(unit.tolist()) <= set(want.tolist())  # padding repeats the user's rows
      rows_of_step += positions[mask.reshape(-1)].tolist()
    want = sorted(int(i) for u in sample for i in table[u] if i >= 0)
    assert sorted(rows_of_step) == want
  # Each user is included at rate q = 2/6 (3 standard errors of 3000 Bernoulli trials).
  np.testing.assert_allclose(seen / 3000, 1 / 3, atol=3 * np.sqrt(2 / 9 / 3000))
  with pytest.raises(ValueError, match="more than unit_size=1"):
    batching.user_table(users, 1)
  assert batching.rows_per_user_sizes(1) == (1,) and batching.rows_per_user_sizes(4) == (1, 2, 4)
  assert batching.rows_per_user_sizes(6) == (1, 2, 4, 6)
