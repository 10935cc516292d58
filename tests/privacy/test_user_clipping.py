"""Per-user clipping (user-level DP by user sampling): one user moves the clipped sum by <= C.

Rows come in units of k consecutive rows (one user's examples, padded with
masked rows); the clipped quantity is the user's summed (or mean) gradient. The
book-keeping backend takes the norm over the union of the user's tokens and must
equal the vmap reference, which must equal a direct per-user computation.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpjax import privacy
from dpjax.privacy import bookkeeping
from tests.models.test_models import task, text_batch

K = 3
# Two users: the first has 3 real rows, the second 2 (its last row is padding).
MASK = np.array([1, 1, 1, 1, 1, 0], bool)


def users_task(kind):
  model, params, _, make_loss = task(kind)
  batch = text_batch(n=2 * K, seed=3, pad_id=1 if kind == "roberta_cls" else 0)
  if kind == "gpt2_lm":
    batch = {k: batch[k] for k in ("input_ids", "attention_mask")}
  return make_loss(model), params, batch


def run(loss_fn, params, batch, clip, backend, mask=MASK, contribution="sum", micro=None):
  fn = privacy.clipped_grad(
    loss_fn,
    clip,
    backend=backend,
    has_aux=True,
    unit_size=K,
    contribution=contribution,
    microbatch_size=micro,
  )
  return jax.jit(fn)(params, batch, mask)


def norm(tree) -> float:
  return float(jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree_util.tree_leaves(tree))))


def direct_per_user(loss_fn, params, batch, clip_norm, mask, contribution):
  """Σ_u min(1, C / ||g_u||) g_u with g_u the sum (or mean) of user u's real rows' gradients."""
  grad = jax.grad(lambda p, ex: loss_fn(p, ex)[0])
  total = jax.tree_util.tree_map(lambda p: np.zeros(p.shape, np.float64), params)
  for user in range(len(mask) // K):
    rows = [i for i in range(user * K, (user + 1) * K) if mask[i]]
    g = None
    for i in rows:
      gi = grad(params, jax.tree_util.tree_map(lambda x, i=i: x[i], batch))
      g = gi if g is None else jax.tree_util.tree_map(jnp.add, g, gi)
    if contribution == "mean":
      count = len(rows)
      g = jax.tree_util.tree_map(lambda x, n=count: x / n, g)
    factor = min(1.0, clip_norm / norm(g))
    total = jax.tree_util.tree_map(lambda t, x, f=factor: t + f * np.asarray(x), total, g)
  return total


@pytest.mark.parametrize("contribution", ["sum", "mean"])
def test_vmap_per_user_clipping_is_the_direct_computation(contribution):
  loss_fn, params, batch = users_task("bert_cls")
  got, aux = run(loss_fn, params, batch, 0.05, "vmap", contribution=contribution)
  want = direct_per_user(loss_fn, params, batch, 0.05, MASK, contribution)
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(np.asarray(a), b, rtol=2e-4, atol=1e-7)
  assert int(aux.num_examples) == 5  # real rows of kept users
  # A user's rows report that user's norm; padding reports 0.
  assert float(aux.norms[0]) == float(aux.norms[2]) > 0 and float(aux.norms[5]) == 0.0


@pytest.mark.parametrize(
  "kind, contribution",
  [("bert_label_words", "sum"), ("gpt2_lm", "sum"), ("roberta_cls", "mean")],
)
def test_bookkeeping_per_user_clipping_equals_vmap(kind, contribution):
  loss_fn, params, batch = users_task(kind)
  clip = privacy.FlatClip(0.05) if contribution == "sum" else privacy.PerLayerClip(0.05)
  ref, ref_aux = run(loss_fn, params, batch, clip, "vmap", contribution=contribution)
  fast, aux = run(loss_fn, params, batch, clip, "bookkeeping", contribution=contribution)
  for (path, a), b in zip(
    jax.tree_util.tree_flatten_with_path(ref)[0], jax.tree_util.tree_leaves(fast)
  ):
    np.testing.assert_allclose(
      np.asarray(b), np.asarray(a), rtol=2e-4, atol=2e-6, err_msg=jax.tree_util.keystr(path)
    )
  np.testing.assert_allclose(aux.norms, ref_aux.norms, rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(aux.clipped, ref_aux.clipped)
  assert np.asarray(aux.clipped)[MASK].all()  # the factors matter, not just the raw sums


def test_ghost_norm_over_a_users_tokens_equals_the_materialized_one():
  rng = np.random.default_rng(1)
  p = jnp.asarray(rng.normal(size=(6, 5, 4)), jnp.float32)
  q = jnp.asarray(rng.normal(size=(6, 5, 7)), jnp.float32)
  real = jnp.asarray([1, 1, 0, 1, 1, 1], bool)
  per_row = np.einsum("btm,btn->bmn", p, q) * np.asarray(real)[:, None, None]
  want = np.sum(per_row.reshape(2, 3, 4, 7).sum(1) ** 2, (1, 2))
  np.testing.assert_allclose(bookkeeping.LinearGrad(p, q).unit_sq_norm(3, real), want, rtol=1e-5)


@pytest.mark.parametrize("backend", ["vmap", "bookkeeping"])
def test_removing_all_of_one_users_rows_moves_the_sum_by_at_most_c(backend):
  loss_fn, params, batch = users_task("bert_label_words")
  clip = 0.05
  full, _ = run(loss_fn, params, batch, clip, backend)
  for user in range(2):
    without = MASK.copy()
    without[user * K : (user + 1) * K] = False
    rest, _ = run(loss_fn, params, batch, clip, backend, mask=without)
    moved = norm(jax.tree_util.tree_map(jnp.subtract, full, rest))
    # The user is clipped (its summed gradient is larger than C), so the bound is tight.
    assert clip * 0.999 < moved <= clip * (1 + 1e-5)
    # Removing only one of the user's rows is NOT a neighbour here; the bound is for users.


def test_padding_rows_inside_a_user_contribute_exactly_zero():
  backend = "bookkeeping"  # (the vmap path is checked against the direct computation above)
  loss_fn, params, batch = users_task("bert_cls")
  garbage = {k: v.copy() for k, v in batch.items()}
  garbage["input_ids"][5] = 42
  garbage["label"][5] = 1 - garbage["label"][5]
  a, aux = run(loss_fn, params, batch, 0.1, backend)
  b, _ = run(loss_fn, params, garbage, 0.1, backend)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(x, y)
  assert float(aux.losses[5]) == 0.0 and not bool(aux.clipped[5])


def test_units_of_one_row_are_example_level_clipping_and_microbatches_keep_users_whole():
  loss_fn, params, batch = users_task("bert_cls")
  example = jax.jit(privacy.clipped_grad(loss_fn, 0.05, backend="vmap", has_aux=True))
  one = jax.jit(privacy.clipped_grad(loss_fn, 0.05, backend="vmap", has_aux=True, unit_size=1))
  for x, y in zip(
    jax.tree_util.tree_leaves(example(params, batch, MASK)[0]),
    jax.tree_util.tree_leaves(one(params, batch, MASK)[0]),
  ):
    np.testing.assert_array_equal(x, y)
  # Microbatches count users; a 2-D [users, k] mask gives the unit size by its shape.
  whole, _ = run(loss_fn, params, batch, 0.05, "bookkeeping")
  micro, _ = run(loss_fn, params, batch, 0.05, "bookkeeping", micro=1)
  fn = privacy.clipped_grad(loss_fn, 0.05, backend="bookkeeping", has_aux=True)  # unit_size 1
  shaped, aux = jax.jit(fn)(params, batch, MASK.reshape(2, K))
  for x, y, z in zip(*(jax.tree_util.tree_leaves(t) for t in (whole, micro, shaped))):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(x, z, rtol=1e-5, atol=1e-8)
  assert aux.mask.shape == (2 * K,) and int(aux.num_examples) == 5
  with pytest.raises(ValueError, match=r"microbatch_size must divide the number of units \(of 3"):
    run(loss_fn, params, batch, 0.05, "vmap", micro=3)
  with pytest.raises(ValueError, match="contribution must be one of"):
    privacy.clipped_grad(loss_fn, 0.05, unit_size=K, contribution="median")
