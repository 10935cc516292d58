"""Adaptive quantile clipping (Andrew et al. 2021): tracking, sensitivity, noise, accounting."""

from __future__ import annotations

import math

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dp_accounting.pld import pld_privacy_accountant
from scipy import stats

from dpjax import privacy
from dpjax.models import bert, heads
from dpjax.privacy import clipping, noise, quantile
from dpjax.privacy.secret import RunSecret
from dpjax.train import config as config_lib
from dpjax.train import loop
from tests.models.test_models import text_batch

KEY = RunSecret.insecure_fixed(11).noise_key(0)


def rule(**fields) -> quantile.QuantileClip:
  return quantile.QuantileClip(
    **{"target_quantile": 0.5, "learning_rate": 0.2, "count_noise": 5.0, **fields}
  )


@pytest.mark.parametrize("gamma", [0.5, 0.9])
def test_the_bound_tracks_the_target_quantile_of_lognormal_norms(gamma):
  """Poisson batches (B = 100) of log-normal norms, count noise σ_b = B/20, from C_0 far off."""
  b, steps, s = 100, 300, 0.8  # norms: exp(N(0, s²)), so the γ-quantile is exp(s·Φ^-1(γ))
  r = rule(target_quantile=gamma, count_noise=b / 20, initial_clip_norm=0.05)
  tx = quantile.quantile_privatizer(0.8, r, float(b), KEY)
  rng = np.random.default_rng(0)
  width = 160
  sizes = rng.poisson(b, steps)
  norms = np.exp(s * rng.standard_normal((steps, width))).astype(np.float32)
  masks = np.arange(width)[None] < sizes[:, None]
  params = {"w": jnp.zeros([2])}

  def step(state, xs):
    row_norms, mask = xs
    safe = clipping.safe_clip_factors(
      {"w": jnp.square(row_norms)}, r.with_clip_norm(state.clip_norm), mask
    )
    kept = jnp.sum(safe.kept)
    _, state = tx.update(
      params, state, num_examples=kept, unclipped_examples=kept - jnp.sum(safe.clipped)
    )
    return state, state.clip_norm

  _, bounds = jax.jit(lambda st: jax.lax.scan(step, st, (norms, masks)))(tx.init(params))
  bounds = np.asarray(bounds)
  fraction_below = stats.norm.cdf(np.log(bounds) / s)  # F(C_t) under the true distribution
  true_quantile = math.exp(s * stats.norm.ppf(gamma))
  assert bounds[0] < 0.1 and abs(np.log(bounds[-1] / true_quantile)) < 0.25
  assert abs(fraction_below[-100:].mean() - gamma) < 0.04
  assert np.all(np.abs(fraction_below[-100:] - gamma) < 0.15)


def test_one_example_moves_the_clipped_sum_by_at_most_the_bound_and_the_count_by_one():
  rng = np.random.default_rng(1)
  grads = {"a": rng.standard_normal((9, 3, 4)) * rng.uniform(0.1, 3.0, (9, 1, 1))}
  grads["b"] = rng.standard_normal((9, 5))
  grads = jax.tree_util.tree_map(lambda g: jnp.asarray(g, jnp.float32), grads)
  grads["b"] = grads["b"].at[7].set(jnp.nan)  # a non-finite row
  mask = np.array([1, 1, 1, 1, 1, 1, 1, 1, 0], bool)  # the last row is padding
  r = rule()

  @jax.jit
  def release(mask, bound):
    out = clipping.clip_and_sum(grads, r.with_clip_norm(bound), mask)
    n = jnp.sum(out.kept)
    return out.grads, n - jnp.sum(out.clipped), n

  for bound in (0.5, 1.7, 4.0):
    bound = jnp.float32(bound)
    total, unclipped, kept = release(mask, bound)
    assert int(kept) == 7  # neither the NaN row nor the padding row counts
    norms = np.sqrt(sum(jax.tree_util.tree_leaves(clipping.per_example_sq_norms(grads))))
    assert int(unclipped) == int(np.sum(norms[:7] <= float(bound)))
    for i in range(7):
      without = mask.copy()
      without[i] = False
      other, other_unclipped, other_kept = release(without, bound)
      diff = math.sqrt(
        sum(
          float(jnp.sum(jnp.square(x - y)))
          for x, y in zip(jax.tree_util.tree_leaves(total), jax.tree_util.tree_leaves(other))
        )
      )
      assert diff <= float(bound) * (1 + 1e-5)
      assert int(unclipped) - int(other_unclipped) in (0, 1) and int(kept - other_kept) == 1
      # The released (centered) count u - n/2 moves by exactly 1/2.
      centered = lambda u, n: float(u) - float(n) / 2
      assert abs(centered(unclipped, kept) - centered(other_unclipped, other_kept)) == 0.5


def test_the_gradient_noise_multiplier_pays_for_the_count_and_refuses_too_little_count_noise():
  z, sigma_b = 0.9, 3.2
  z_grad = quantile.gradient_noise_multiplier(z, sigma_b)
  assert z_grad == pytest.approx((z**-2 - (2 * sigma_b) ** -2) ** -0.5, rel=1e-12)
  assert z_grad > z and z_grad**-2 + (2 * sigma_b) ** -2 == pytest.approx(z**-2, rel=1e-12)
  assert quantile.gradient_noise_multiplier(0.0, sigma_b) == 0.0
  for bad in (2 * sigma_b, 10.0):
    with pytest.raises(ValueError, match=r"^count_noise must be > noise_multiplier / 2"):
      quantile.gradient_noise_multiplier(bad, sigma_b)
  spec = privacy.MechanismSpec(clip=rule(count_noise=0.4), noise_multiplier=1.0)
  with pytest.raises(ValueError, match="count_noise must be > noise_multiplier / 2 = 0.5"):
    privacy.make_mechanism(spec, dataset_size=5000, expected_batch_size=100, steps=10)
  # The config layer names the key, in one line.
  c = config_lib.default_config()
  c.dp.clip, c.dp.noise_multiplier, c.dp.clip_count_noise = "quantile", 1.0, 0.4
  with pytest.raises(config_lib.ConfigError) as err:
    loop.plan_mechanism(c, 5000)
  assert str(err.value).startswith("config.dp.clip_count_noise must be > noise_multiplier / 2")
  assert "\n" not in str(err.value)


@pytest.mark.parametrize(
  "key, value, message",
  [
    ("dp.clip", "adaptive", "config.dp.clip must be one of"),
    ("dp.clip_quantile", 1.0, "config.dp.clip_quantile must be in (0, 1) (got 1.0)"),
    ("dp.clip_quantile", 0.0, "config.dp.clip_quantile must be in (0, 1) (got 0.0)"),
    ("dp.clip_quantile_lr", 0.0, "config.dp.clip_quantile_lr must be a number > 0"),
    ("dp.clip_count_noise", -1.0, "config.dp.clip_count_noise must be a number > 0, or None"),
  ],
)
def test_bad_quantile_keys_are_one_line_errors_that_name_the_key(key, value, message):
  c = config_lib.default_config()
  c.dp.clip = "quantile"
  section, leaf = key.split(".")
  c[section][leaf] = value
  with pytest.raises(config_lib.ConfigError) as err:
    config_lib.validate(c)
  assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_the_config_builds_the_rule_with_the_papers_count_noise_by_default():
  c = config_lib.default_config()
  c.dp.clip, c.dp.clip_norm, c.train.batch_size = "quantile", 0.3, 400
  config_lib.validate(c)
  assert config_lib.mechanism_spec(c).clip == quantile.QuantileClip(0.5, 0.2, 20.0, 0.3)
  c.dp.clip_quantile, c.dp.clip_quantile_lr, c.dp.clip_count_noise = 0.7, 0.1, 8.0
  assert config_lib.clip_rule(c) == quantile.QuantileClip(0.7, 0.1, 8.0, 0.3)


def test_the_ledger_is_the_poisson_gaussian_of_the_accounting_multiplier():
  n, b, steps = 5000, 100, 50
  spec = privacy.MechanismSpec(clip=rule(count_noise=b / 20), target_epsilon=3.0)
  m = privacy.make_mechanism(spec, dataset_size=n, expected_batch_size=b, steps=steps)
  z = m.noise_multiplier
  assert m.adaptive_clipping and 2.9 < m.planned_epsilon() <= 3.0
  ledger = m.record(m.empty_ledger(), steps)
  acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
  acc.compose(
    dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(b / n, dp_accounting.GaussianDpEvent(z)), steps
    )
  )
  assert m.epsilon(ledger) == pytest.approx(acc.get_epsilon(m.delta), rel=1e-3)
  assert all(s.noise_multiplier == z for s in ledger.segments)
  facts = m.public_facts()["adaptive_clipping"]
  assert facts["gradient_noise_multiplier"] == quantile.gradient_noise_multiplier(z, b / 20) > z
  assert facts["count_noise"] == 5.0 and facts["target_quantile"] == 0.5
  assert facts["learning_rate"] == 0.2 and facts["initial_clip_norm"] == 1.0


def test_the_noise_is_z_grad_times_the_bound_and_the_count_noise_is_sigma_b():
  z, sigma_b, b, bound = 0.7, 2.0, 64.0, 2.5
  r = rule(count_noise=sigma_b, learning_rate=0.2, target_quantile=0.5)
  tx = quantile.quantile_privatizer(z, r, b, KEY)
  z_grad = quantile.gradient_noise_multiplier(z, sigma_b)
  zeros = {"w": jnp.zeros([100_000])}
  state = tx.init(zeros)._replace(clip_norm=jnp.float32(bound))
  update = jax.jit(
    lambda s: tx.update(zeros, s, num_examples=jnp.int32(40), unclipped_examples=jnp.int32(20))
  )
  out, new = update(state)
  applied = np.asarray(out["w"]) * b
  assert np.std(applied) == pytest.approx(z_grad * bound, rel=0.01)
  # Snapped to the in-graph grid of z_Δ·C: 2^(ceil(log2(z_Δ C)) - 10).
  grid = noise.snap_grid(float(np.float32(z_grad) * np.float32(bound)))
  assert np.all(np.mod(applied, grid) == 0)
  assert float(noise.snap_grid_in_graph(jnp.float32(z_grad * bound))) == grid
  # The count: centered 20 - 40/2 = 0, so b̃ = noise / B + 1/2 and log(C'/C) = -η(b̃ - γ).
  steps = jnp.arange(4000, dtype=jnp.int32)
  bounds = jax.jit(jax.vmap(lambda t: update(state._replace(step=t))[1].clip_norm))(steps)
  count_noise = -np.log(np.asarray(bounds, np.float64) / bound) / 0.2 * b
  assert np.std(count_noise) == pytest.approx(sigma_b, rel=0.05)
  assert abs(np.mean(count_noise)) < 0.1
  # Its draw is not the gradient noise's: another nonce of the same secret key.
  first = jax.vmap(lambda t: noise.standard_normals(jnp.asarray(KEY), t, 1)[0])(steps)
  assert abs(np.corrcoef(np.asarray(first), count_noise)[0, 1]) < 0.06
  assert float(new.step) == 1 and new.key.tolist() == KEY.tolist()


def test_both_backends_give_the_same_clipped_sum_and_count_for_a_traced_bound():
  config = bert.BertConfig(
    vocab_size=50,
    hidden_size=8,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=16,
    max_position_embeddings=8,
  )
  model, batch = heads.SequenceClassifier(config, 2, "cls"), text_batch(n=4, length=6)
  params = model.init(jax.random.PRNGKey(0), batch)["params"]
  loss_fn, mask = heads.classification_loss(model), np.array([1, 1, 0, 1], bool)

  def bounded(backend):
    fn = privacy.clipped_grad(loss_fn, rule(), backend, has_aux=True)
    return jax.jit(lambda p, x, m, c: fn.with_clip_norm(c)(p, x, m))

  runs = {backend: bounded(backend) for backend in ("vmap", "bookkeeping")}
  norms = np.asarray(runs["vmap"](params, batch, mask, jnp.float32(1.0))[1].norms)
  bound = float(np.median(norms[mask]))  # the same compiled step: the bound is an input
  flat = jax.jit(privacy.clipped_grad(loss_fn, bound, backend="vmap", has_aux=True))
  want = jax.tree_util.tree_leaves(flat(params, batch, mask)[0])
  for run in runs.values():
    grads, aux = run(params, batch, mask, jnp.float32(bound))
    unclipped = int(aux.num_examples) - int(np.sum(aux.clipped))
    assert unclipped == int(np.sum(norms[mask] <= bound)) and 0 < unclipped < 3
    assert int(aux.num_examples) == 3 and aux.sensitivity == 1.0
    for a, b in zip(jax.tree_util.tree_leaves(grads), want):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-6)


def test_the_template_state_has_the_structure_of_the_real_one():
  spec = privacy.MechanismSpec(clip=rule(), noise_multiplier=1.0)
  m = privacy.make_mechanism(spec, dataset_size=5000, expected_batch_size=100, steps=10)
  m = m.keyed(RunSecret.insecure_fixed(1))
  params = {"w": jnp.zeros([3])}
  real = m.privatizer().init(params)
  template = privacy.mechanism.privatizer_template(spec).init(params)
  assert jax.tree_util.tree_structure(real) == jax.tree_util.tree_structure(template)
  assert float(real.clip_norm) == 1.0 and float(quantile.current_clip_norm((real,))) == 1.0
  rekeyed = m.keyed(RunSecret.insecure_fixed(1), attempt=1).with_noise_key((template,))
  assert rekeyed[0].key.tolist() == RunSecret.insecure_fixed(1).noise_key(1).tolist()


def test_the_whitebox_audit_refuses_an_adaptive_bound():
  from dpjax.audit import whitebox

  spec = privacy.MechanismSpec(clip=rule(), noise_multiplier=1.0)
  m = privacy.make_mechanism(spec, dataset_size=5000, expected_batch_size=100, steps=10)
  with pytest.raises(ValueError, match="needs a fixed clip bound"):
    whitebox.audit_step(m.keyed(RunSecret.insecure_fixed(1)))
