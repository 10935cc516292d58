"""The pure train step: groups add up to one logical batch, noise once, dropout keys per example."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpjax import privacy
from dpjax.models import bert, heads
from dpjax.privacy import per_example
from dpjax.privacy.secret import RunSecret
from dpjax.train import step as step_lib
from tests import tiny_models

CONFIG = bert.BertConfig(**tiny_models.TINY_BERT_SHAPE)


batch = tiny_models.bert_rows


def setup(dropout=0.0, sigma=0.0):
  cfg = bert.BertConfig(**{**CONFIG.__dict__, "hidden_dropout_prob": dropout})
  model = heads.SequenceClassifier(cfg, 2, "mean")
  params = model.init(jax.random.PRNGKey(0), batch(1, 4, 0))["params"]
  grad_fn = privacy.clipped_grad(
    heads.classification_loss(model), 0.5, microbatch_size=2, has_aux=True
  )
  tx = optax.chain(
    privacy.gaussian_privatizer(
      sigma, grad_fn.sensitivity, 8.0, key=RunSecret.insecure_fixed(3).noise_key()
    ),
    optax.sgd(1.0),
  )
  state = step_lib.TrainState(jnp.zeros([], jnp.int32), params, tx.init(params))
  return state, grad_fn, tx


def test_groups_of_different_lengths_sum_to_one_logical_batch_and_noise_once():
  state, grad_fn, tx = setup(sigma=1.0)
  short, long = batch(4, 4, 1), batch(2, 8, 2)
  masks = (np.array([1, 1, 1, 0], bool), np.array([1, 1], bool))
  step = jax.jit(functools.partial(step_lib.train_step, grad_fn=grad_fn, tx=tx))
  new_state, metrics = step(state, (short, long), masks)
  assert int(metrics["examples"]) == 5 and int(new_state.step) == 1
  # Reference: the two clipped sums added by hand, then ONE privatizer call (same key, step 0).
  g1, _ = jax.jit(grad_fn)(state.params, short, masks[0])
  g2, _ = jax.jit(grad_fn)(state.params, long, masks[1])
  total = jax.tree_util.tree_map(jnp.add, g1, g2)
  updates, _ = jax.jit(tx.update)(total, state.opt_state, state.params)
  want = optax.apply_updates(state.params, updates)
  for a, b in zip(jax.tree_util.tree_leaves(new_state.params), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(a, b, atol=1e-5)
  assert int(new_state.opt_state[0].step) == 1  # The privatizer ran once for both groups.


def test_dropout_keys_are_per_example_and_reproducible():
  state, grad_fn, tx = setup(dropout=0.3)
  data = (batch(4, 6, 1),)
  masks = (np.ones(4, bool),)
  compiled = {
    seed: jax.jit(functools.partial(step_lib.train_step, grad_fn=grad_fn, tx=tx, dropout_seed=seed))
    for seed in (5, 6)
  }
  leaves = lambda p: np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(p)])
  run = lambda seed: leaves(compiled[seed](state, data, masks)[0].params)
  seed5 = run(5)
  np.testing.assert_array_equal(seed5, run(5))  # the same keys: the same masks
  assert not np.allclose(seed5, run(6))  # other keys, other masks: dropout is on


def test_nonprivate_gradient_is_the_plain_sum_over_real_examples():
  state, _, _ = setup()
  model = heads.SequenceClassifier(CONFIG, 2, "mean")
  loss_fn = heads.classification_loss(model)
  data = batch(6, 4, 3)
  mask = np.array([1, 1, 1, 0, 0, 0], bool)  # The last microbatch is all padding (skipped).
  got, aux = jax.jit(per_example.summed_grad(loss_fn, microbatch_size=2, has_aux=True))(
    state.params, data, mask
  )
  total = lambda p: sum(
    loss_fn(p, jax.tree_util.tree_map(lambda x: x[i], data))[0] for i in range(3)
  )
  want = jax.grad(total)(state.params)
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)
  assert int(aux.num_examples) == 3
