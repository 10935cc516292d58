"""The vmap clipped-gradient backend against a per-example Python loop, and its DP invariants."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpjax.privacy import AutomaticClip, FlatClip, PerLayerClip, check_finite, clipped_grad
from tests import tiny_models

PROBLEMS = {"mlp": tiny_models.mlp_problem, "transformer": tiny_models.transformer_problem}
RULES = {
  "flat": FlatClip(0.5),
  "per_layer": PerLayerClip(0.5, group_by="layer"),
  "automatic": AutomaticClip(0.01),
}


def loop_reference(loss_fn, params, batch, rule, mask):
  """Clip-then-sum, one example at a time with jax.grad: the definition of DP-SGD."""
  total = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  size = len(mask)
  grad = jax.jit(jax.grad(loss_fn))  # one example's gradient, compiled once for the loop
  for i in range(size):
    if not mask[i]:
      continue
    example = jax.tree_util.tree_map(lambda x: x[i], batch)
    grads = grad(params, example)
    sq = jax.tree_util.tree_map(lambda g: jnp.sum(g.astype(jnp.float32) ** 2)[None], grads)
    factors = rule.factors(sq).per_leaf
    total = jax.tree_util.tree_map(lambda t, g, f: t + f[0] * g, total, grads, factors)
  return total


def assert_trees_close(a, b, atol=1e-6, rtol=1e-5):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=rtol)
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)


# Every rule and every microbatching on each problem (not the whole product: each case compiles).
@pytest.mark.parametrize(
  "problem, rule_name, microbatch",
  [
    ("mlp", "flat", None),
    ("mlp", "per_layer", 2),
    ("mlp", "automatic", 4),
    ("transformer", "flat", 4),
    ("transformer", "per_layer", 2),
    ("transformer", "automatic", None),
  ],
)
def test_vmap_equals_python_loop(problem, rule_name, microbatch):
  loss_fn, params, batch = PROBLEMS[problem](batch=8)
  rule = RULES[rule_name]
  mask = np.array([1, 1, 0, 1, 1, 1, 0, 1], bool)
  fn = jax.jit(clipped_grad(loss_fn, rule, microbatch_size=microbatch))
  got, aux = fn(params, batch, mask)
  want = loop_reference(loss_fn, params, batch, rule, mask)
  assert_trees_close(got, want)
  assert int(aux.num_examples) == mask.sum()
  assert aux.sensitivity == rule.sensitivity
  # Norms of the padding rows are reported as 0, real rows are positive.
  assert np.all(np.asarray(aux.norms)[~mask] == 0) and np.all(np.asarray(aux.norms)[mask] > 0)


@pytest.mark.parametrize("rule_name", sorted(RULES))
def test_removing_any_example_moves_sum_by_at_most_sensitivity(rule_name):
  loss_fn, params, batch = tiny_models.transformer_problem(batch=8, seed=3)
  # Large gradients so that most examples are clipped (the bound must be tight, not vacuous).
  rule = {
    "flat": FlatClip(1e-3),
    "per_layer": PerLayerClip(1e-3),
    "automatic": AutomaticClip(1e-3),
  }[rule_name]
  fn = jax.jit(clipped_grad(loss_fn, rule))
  full, _ = fn(params, batch, np.ones(8, bool))
  changes = []
  for i in range(8):
    mask = np.ones(8, bool)
    mask[i] = False
    without, _ = fn(params, batch, mask)
    changes.append(tiny_models.tree_norm(tiny_models.tree_sub(full, without)))
  assert max(changes) <= rule.sensitivity * (1 + 1e-5)
  # Clipping at this bound is active: each change is (nearly) the full Δ.
  assert min(changes) >= 0.9 * rule.sensitivity


def test_padding_rows_change_nothing_and_all_padding_is_exactly_zero():
  loss_fn, params, batch = tiny_models.mlp_problem(batch=8)
  fn = jax.jit(clipped_grad(loss_fn, 1.0, microbatch_size=4))
  mask = np.array([1, 1, 1, 0, 0, 1, 0, 0], bool)
  masked, _ = fn(params, batch, mask)
  # The same real rows, with garbage (including NaN inputs) in the padded slots.
  garbage = jax.tree_util.tree_map(lambda x: x, batch)
  garbage["x"] = jnp.where(jnp.asarray(mask)[:, None], batch["x"], jnp.nan)
  garbage_sum, aux = fn(params, garbage, mask)
  assert_trees_close(masked, garbage_sum, atol=0, rtol=0)
  assert int(aux.nonfinite_count) == 0  # Padding is not "non-finite": it does not count.
  zero, aux = fn(params, batch, np.zeros(8, bool))
  for leaf in jax.tree_util.tree_leaves(zero):
    assert np.all(np.asarray(leaf) == 0.0)
  assert int(aux.num_examples) == 0 and float(aux.clipped_fraction) == 0.0


def test_per_layer_groups_each_respect_their_bound():
  loss_fn, params, batch = tiny_models.transformer_problem(batch=1, seed=1)
  rule = PerLayerClip(
    bounds={"^embed": 1e-3, "^pos": 2e-3, "^attn": 1e-3, "^ln": 1e-3, "^mlp": 1e-3, "^head": 3e-3},
    group_by=("^embed", "^pos", "^attn", "^ln", "^mlp", "^head"),
  )
  got, _ = clipped_grad(loss_fn, rule)(params, batch)
  bounds = dict(rule.bounds)
  for name, sub in got.items():
    group = rule.group_of(name + "/x")
    norm = tiny_models.tree_norm(sub)
    assert norm <= bounds[group] * (1 + 1e-5), (name, norm)
  assert rule.sensitivity == pytest.approx(np.sqrt(sum(b * b for b in bounds.values())))


def test_nonfinite_loss_raises_eagerly_and_is_dropped_and_counted_under_jit():
  loss_fn, params, batch = tiny_models.mlp_problem(batch=4)
  bad = dict(batch)
  bad["x"] = batch["x"].at[2, 0].set(jnp.inf)
  fn = clipped_grad(loss_fn, 1.0)
  with pytest.raises(FloatingPointError, match="1 example"):
    fn(params, bad)
  got, aux = jax.jit(fn)(params, bad)
  assert int(aux.nonfinite_count) == 1
  with pytest.raises(FloatingPointError, match="at step 7"):
    check_finite(aux, step=7)
  want, _ = jax.jit(fn)(params, batch, np.array([1, 1, 0, 1], bool))
  assert_trees_close(got, want, atol=0, rtol=0)


def test_has_aux_returns_per_example_outputs():
  loss_fn, params, batch = tiny_models.mlp_problem(batch=4)
  with_aux = lambda p, ex: (loss_fn(p, ex), {"twice": 2 * loss_fn(p, ex)})
  _, aux = clipped_grad(with_aux, 1.0, microbatch_size=2, has_aux=True)(params, batch)
  np.testing.assert_allclose(aux.loss_aux["twice"], 2 * aux.losses, rtol=1e-6)
  assert aux.losses.shape == (4,)
  assert float(aux.mean_loss) == pytest.approx(float(np.mean(aux.losses)), rel=1e-6)


def test_microbatches_of_padding_only_are_skipped_but_counted_correctly():
  loss_fn, params, batch = tiny_models.mlp_problem(batch=8)
  mask = np.array([1, 1, 0, 0, 0, 0, 0, 0], bool)
  got, aux = jax.jit(clipped_grad(loss_fn, 1.0, microbatch_size=2))(params, batch, mask)
  want, _ = clipped_grad(loss_fn, 1.0)(params, batch, mask)
  assert_trees_close(got, want)
  assert int(aux.num_examples) == 2


@pytest.mark.parametrize(
  "kwargs, message",
  [
    ({"clip": 0.0}, "clip_norm must be a finite number > 0"),
    ({"clip": -1.0}, "clip_norm must be a finite number > 0"),
    ({"clip": "1"}, "clip must be a positive float or a ClipRule"),
    ({"clip": 1.0, "backend": "magic"}, "backend must be one of"),
    ({"clip": 1.0, "microbatch_size": 0}, "microbatch_size must be a positive integer"),
  ],
)
def test_bad_arguments_raise_one_line_errors(kwargs, message):
  loss_fn, _, _ = tiny_models.mlp_problem()
  with pytest.raises(ValueError, match=message):
    clipped_grad(loss_fn, **kwargs)


def test_microbatch_not_dividing_batch_is_rejected():
  loss_fn, params, batch = tiny_models.mlp_problem(batch=8)
  with pytest.raises(
    ValueError,
    match=r"microbatch_size must divide the batch size 8 \(got "
    r"microbatch_size=3\)",
  ):
    clipped_grad(loss_fn, 1.0, microbatch_size=3)(params, batch)
