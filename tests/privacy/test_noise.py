"""The Gaussian privatizer: secret ChaCha20 noise, faithful tails, no lattice holes, / B."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special, stats

from dpjax.privacy import gaussian_privatizer, noise
from dpjax.privacy.secret import RunSecret

KEY = RunSecret.insecure_fixed(7).noise_key()


def _privatize(tx, grads, state):
  return jax.jit(tx.update)(grads, state)


def test_empirical_std_equals_sigma_times_sensitivity_over_expected_batch():
  sigma, sensitivity, batch = 1.3, 0.25, 40.0
  tx = gaussian_privatizer(sigma, sensitivity, batch, key=KEY)
  zeros = {"w": jnp.zeros((100, 10)), "b": jnp.zeros(7)}
  state = tx.init(zeros)

  def step(state, _):
    out, state = tx.update(zeros, state)
    return state, out

  _, outs = jax.lax.scan(step, state, None, length=200)
  samples = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(outs)])
  want = sigma * sensitivity / batch
  # 201,400 samples: the sample std is within ~0.16% (1 s.e.) of the truth.
  assert np.std(samples) == pytest.approx(want, rel=0.01)
  assert abs(np.mean(samples)) < 5 * want / np.sqrt(samples.size)
  assert stats.kstest(samples / want, "norm").pvalue > 1e-3


def test_same_key_and_step_same_noise_different_step_or_key_different_noise():
  zeros = {"w": jnp.zeros(50)}
  tx = gaussian_privatizer(1.0, 1.0, 1.0, key=KEY)
  s0 = tx.init(zeros)
  a, s1 = _privatize(tx, zeros, s0)
  b, _ = _privatize(tx, zeros, s0)  # Replay of step 0 (a resumed run).
  c, _ = _privatize(tx, zeros, s1)  # Step 1.
  other = RunSecret.insecure_fixed(8).noise_key()
  d, _ = _privatize(tx, zeros, s0._replace(key=jnp.asarray(other)))
  np.testing.assert_array_equal(a["w"], b["w"])
  assert not np.allclose(a["w"], c["w"])
  assert not np.allclose(a["w"], d["w"])
  assert int(s1.step) == 1
  # Step t's noise depends on (key, t) only: a step-1 state rebuilt from scratch draws the same.
  rebuilt = tx.init(zeros)._replace(step=jnp.asarray(1, jnp.int32))
  np.testing.assert_array_equal(_privatize(tx, zeros, rebuilt)[0]["w"], c["w"])


def test_noise_key_is_a_runtime_input_not_a_compiled_constant():
  """The key must not be baked into the compiled step (compilation caches are not secret)."""
  zeros = {"w": jnp.zeros(8)}
  tx = gaussian_privatizer(1.0, 1.0, 1.0, key=KEY)
  hlo = jax.jit(tx.update).lower(zeros, tx.init(zeros)).as_text()
  for word in KEY:
    assert str(int(word)) not in hlo and f"{int(word):x}" not in hlo.lower()


def test_divides_by_expected_not_realized_batch_and_is_float32():
  grads = {"w": jnp.full(4, 6.0, jnp.bfloat16)}
  tx = gaussian_privatizer(0.0, 1.0, expected_batch_size=3.0, key=KEY)
  out, _ = _privatize(tx, grads, tx.init(grads))
  assert out["w"].dtype == jnp.float32
  np.testing.assert_allclose(out["w"], 2.0)


def test_noise_is_drawn_in_float32_for_bfloat16_gradients():
  grads = {"w": jnp.zeros(20000, jnp.bfloat16)}
  tx = gaussian_privatizer(1.0, 1e-3, 1.0, key=KEY)
  out, _ = _privatize(tx, grads, tx.init(grads))
  values = np.asarray(out["w"])
  # bfloat16 has 8 significant bits; float32 noise snapped to σΔ/1024 has thousands of values.
  assert len(np.unique(values)) > 2000
  assert np.std(values) == pytest.approx(1e-3, rel=0.05)


@pytest.mark.parametrize(
  "args, message",
  [
    ((-0.1, 1.0, 10.0, KEY), "noise_multiplier must be a finite number >= 0"),
    ((1.0, 0.0, 10.0, KEY), "sensitivity must be a finite number > 0"),
    ((1.0, 1.0, 0.0, KEY), "expected_batch_size must be a finite number > 0"),
    ((1.0, 1.0, 10.0, 0), "not an int seed"),
    ((1.0, 1.0, 10.0, np.zeros(2, np.uint32)), "key must be uint32"),
    ((1.0, 1.0, 10.0, b"short"), "key must be 32 bytes"),
  ],
)
def test_bad_arguments(args, message):
  with pytest.raises(ValueError, match=message):
    gaussian_privatizer(*args)


def test_chacha20_block_matches_rfc8439_test_vector():
  """RFC 8439 section 2.3.2: key 00..1f, nonce 00:00:00:09:00:00:00:4a:00:00:00:00, counter 1."""
  key = np.frombuffer(bytes(range(32)), "<u4").astype(np.uint32)
  out = noise.chacha_block(
    jnp.asarray(key), jnp.asarray([1], jnp.uint32), (0x09000000, 0x4A000000, 0)
  )
  want = (
    "e4e7f110 15593bd1 1fdd0f50 c47120a3 c7f4d1c7 0368c033 9aaa2204 4e6cd4c3 "
    "466482d2 09aa9f07 05d7c214 a2028bd9 d19c12b5 b94e16de e883d0cb 4e3c50a2"
  ).split()
  assert [f"{int(w[0]):08x}" for w in out] == want


def _exact_normal(words: np.ndarray) -> np.ndarray:
  """Φ^-1 of u = (w0·2^64 + w1·2^32 + w2 + 1/2)·2^-96, in float64 from exact integers."""
  out = np.empty(words.shape[1])
  for i, (a, b, c) in enumerate(words.T.tolist()):
    top = (a << 64) + (b << 32) + c
    lower = min(2 * top + 1, 2**97 - 2 * top - 1) / 2.0**97  # min(u, 1 - u), exactly
    out[i] = special.ndtri(lower) if 2 * top + 1 < 2**96 else -special.ndtri(lower)
  return out


def test_normal_from_96_bits_is_accurate_over_the_whole_range_including_the_tails():
  rng = np.random.default_rng(0)
  # 96-bit integers with 0..95 leading zeros (lower tail of every depth), and their mirror
  # images (upper tail), and uniform ones (the bulk).
  values = [int.from_bytes(rng.bytes(12), "little") >> int(d) for d in rng.integers(0, 96, 3000)]
  values += [2**96 - 1 - v for v in values[:1500]]
  values += [int.from_bytes(rng.bytes(12), "little") for _ in range(1500)]
  words = np.array(
    [[(v >> 64) & 0xFFFFFFFF, (v >> 32) & 0xFFFFFFFF, v & 0xFFFFFFFF] for v in values], np.uint32
  ).T
  z = np.asarray(jax.jit(noise.standard_normal_from_words)(*map(jnp.asarray, words)))
  want = _exact_normal(words)
  assert np.abs(want).max() > 9  # the sample reaches deep into the tails
  np.testing.assert_allclose(z, want, rtol=1e-6, atol=3e-7)


def test_largest_normal_the_generator_can_return_is_beyond_eleven_sigma():
  ones, zeros = jnp.uint32([0xFFFFFFFF]), jnp.uint32([0])
  low = float(noise.standard_normal_from_words(zeros, zeros, zeros)[0])
  high = float(noise.standard_normal_from_words(ones, ones, ones)[0])
  assert low == -high
  assert high == pytest.approx(noise.MAX_ABS_NORMAL, rel=1e-6)
  assert noise.MAX_ABS_NORMAL > 11.3
  # The tail event a truncation at z_max opens is negligible at any realistic length.
  assert noise.tail_probability(0.5, 10**6) < 1e-12
  assert noise.tail_probability(0.5, 10**6) == pytest.approx(
    1e6 * 2 * stats.norm.sf(noise.MAX_ABS_NORMAL - 2.0)
  )
  assert noise.tail_probability(0.05, 10) == 1.0


def test_ten_million_draws_have_gaussian_moments_ks_and_tail_counts():
  draws = np.concatenate(
    [
      np.asarray(
        jax.jit(noise.standard_normals, static_argnums=2)(
          jnp.asarray(KEY), jnp.int32(step), 2_000_000
        )
      )
      for step in range(5)
    ]
  )
  n = draws.size
  assert abs(draws.mean()) < 5 / math.sqrt(n)
  assert draws.var() == pytest.approx(1.0, abs=5 * math.sqrt(2 / n))
  assert abs(stats.skew(draws)) < 5 * math.sqrt(6 / n)
  assert abs(stats.kurtosis(draws)) < 5 * math.sqrt(24 / n)
  assert stats.kstest(draws[:1_000_000], "norm").pvalue > 1e-4
  for level in (3.0, 4.0, 4.5):
    expected = n * 2 * stats.norm.sf(level)
    count = np.sum(np.abs(draws) > level)
    assert abs(count - expected) < 5 * math.sqrt(expected) + 1, (level, count, expected)


def test_snapped_outputs_have_no_holes_for_any_shift_of_the_sum():
  """Mironov's attack looks for outputs impossible under a neighbour; there must be none.

  For g and g + Λ/3 the counts of every grid cell near the mean match the Gaussian cell
  masses (chi-square): no cell is empty under one and populated under the other.
  """
  stddev = 3.0
  grid = noise.snap_grid(stddev)
  assert grid == 2.0 ** (2 - noise.SNAP_BITS)
  z = np.asarray(
    jax.jit(noise.standard_normals, static_argnums=2)(jnp.asarray(KEY), jnp.int32(0), 4_000_000)
  )
  for shift in (0.0, grid / 3, 0.1234567):
    y = np.asarray(noise.snap(jnp.asarray(shift + stddev * z, jnp.float32), grid))
    cells = np.round(y / grid)
    np.testing.assert_array_equal(cells * grid, y)  # on the grid
    ks = np.arange(-60, 61)
    observed = np.array([np.sum(cells == k) for k in ks])
    edges = (ks[:, None] + np.array([-0.5, 0.5])) * grid - shift
    masses = np.diff(stats.norm.cdf(edges / stddev), axis=1)[:, 0] * z.size
    assert observed.min() > 0
    chi2 = np.sum((observed - masses) ** 2 / masses)
    assert stats.chi2(len(ks)).sf(chi2) > 1e-4, (shift, chi2)


def test_leaves_are_consecutive_slices_of_one_stream_and_uncorrelated():
  key = jnp.asarray(KEY)
  tree = {"a": jnp.zeros((300, 70)), "b": jnp.zeros(20001)}
  out = noise.noise_for_step(key, jnp.int32(3), tree, 2.0)
  stream = noise.standard_normals(key, jnp.int32(3), 300 * 70 + 20001)
  np.testing.assert_array_equal(out["a"].reshape(-1), 2.0 * stream[:21000])
  np.testing.assert_array_equal(out["b"], 2.0 * stream[21000:])
  assert abs(np.corrcoef(out["a"].reshape(-1)[:20001], out["b"])[0, 1]) < 0.03
