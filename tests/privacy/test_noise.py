"""The Gaussian privatizer: noise std σΔ/B, noise once per step from fold_in(key, step)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from dpjax.privacy import gaussian_privatizer


def _privatize(tx, grads, state):
  return jax.jit(tx.update)(grads, state)


def test_empirical_std_equals_sigma_times_sensitivity_over_expected_batch():
  sigma, sensitivity, batch = 1.3, 0.25, 40.0
  tx = gaussian_privatizer(sigma, sensitivity, batch, key=7)
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
  tx = gaussian_privatizer(1.0, 1.0, 1.0, key=3)
  s0 = tx.init(zeros)
  a, s1 = _privatize(tx, zeros, s0)
  b, _ = _privatize(tx, zeros, s0)       # Replay of step 0 (a resumed run).
  c, _ = _privatize(tx, zeros, s1)       # Step 1.
  d, _ = _privatize(gaussian_privatizer(1.0, 1.0, 1.0, key=4), zeros, s0._replace(
      key=jax.random.PRNGKey(4)))
  np.testing.assert_array_equal(a["w"], b["w"])
  assert not np.allclose(a["w"], c["w"])
  assert not np.allclose(a["w"], d["w"])
  assert int(s1.step) == 1
  # The key is fold_in(key, step): a step-1 state rebuilt from scratch draws the same noise.
  rebuilt = tx.init(zeros)._replace(step=jnp.asarray(1, jnp.int32))
  np.testing.assert_array_equal(_privatize(tx, zeros, rebuilt)[0]["w"], c["w"])


def test_divides_by_expected_not_realized_batch_and_is_float32():
  grads = {"w": jnp.full(4, 6.0, jnp.bfloat16)}
  tx = gaussian_privatizer(0.0, 1.0, expected_batch_size=3.0, key=0)
  out, _ = _privatize(tx, grads, tx.init(grads))
  assert out["w"].dtype == jnp.float32
  np.testing.assert_allclose(out["w"], 2.0)


def test_noise_is_drawn_in_float32_for_bfloat16_gradients():
  grads = {"w": jnp.zeros(20000, jnp.bfloat16)}
  tx = gaussian_privatizer(1.0, 1e-3, 1.0, key=0)
  out, _ = _privatize(tx, grads, tx.init(grads))
  values = np.asarray(out["w"])
  # bfloat16 has 8 significant bits: float32 noise has (almost) no repeated values.
  assert len(np.unique(values)) > 19000
  assert np.std(values) == pytest.approx(1e-3, rel=0.05)


@pytest.mark.parametrize("args, message", [
    ((-0.1, 1.0, 10.0, 0), "noise_multiplier must be a finite number >= 0"),
    ((1.0, 0.0, 10.0, 0), "sensitivity must be a finite number > 0"),
    ((1.0, 1.0, 0.0, 0), "expected_batch_size must be a finite number > 0"),
    ((1.0, 1.0, 10.0, jnp.zeros(3)), "key must be an int seed or a PRNG key"),
])
def test_bad_arguments(args, message):
  with pytest.raises(ValueError, match=message):
    gaussian_privatizer(*args)


def test_unrolled_threefry_is_bit_identical_to_jax_and_leaves_are_independent():
  import jax.extend.random as jax_random  # pylint: disable=import-outside-toplevel

  from dpjax.privacy import noise  # pylint: disable=import-outside-toplevel
  key = jnp.array([2024, 11], jnp.uint32)
  counters = jnp.arange(4001 * 2, dtype=jnp.uint32) + 12345
  y1, y2 = noise.threefry2x32(key, counters[:4001], counters[4001:])
  np.testing.assert_array_equal(jnp.concatenate([y1, y2]), jax_random.threefry_2x32(key, counters))
  # Two leaves of the same shape get different (uncorrelated) noise: counters never repeat.
  out = noise.noise_for_step(key, jnp.int32(0), {"a": jnp.zeros(20001), "b": jnp.zeros(20001)},
                             1.0)
  assert abs(np.corrcoef(out["a"], out["b"])[0, 1]) < 0.03
  assert stats.kstest(np.asarray(out["a"]), "norm").pvalue > 1e-3
