"""The book-keeping backend equals the vmap reference on every model, and keeps the DP bounds."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from dpjax import privacy
from dpjax.models import gpt2, heads, layers, lora
from dpjax.privacy import bookkeeping, taps
from tests.models.test_models import TINY_BERT, TINY_GPT2, task, text_batch

RULES = {
  "flat": privacy.FlatClip(0.1),
  "per_layer": privacy.PerLayerClip(0.1, group_by="layer"),
  "automatic": privacy.AutomaticClip(0.01),
}
MASK = np.array([1, 1, 0, 1], bool)


def both_backends(loss_fn, params, batch, rule, mask=MASK, microbatch=None):
  out = {}
  for backend in ("vmap", "bookkeeping"):
    fn = privacy.clipped_grad(
      loss_fn, rule, backend=backend, microbatch_size=microbatch, has_aux=True
    )
    out[backend] = jax.jit(fn)(params, batch, mask)
  return out["vmap"], out["bookkeeping"]


def assert_same(reference, fast, atol=2e-6, rtol=2e-4):
  (g_ref, aux_ref), (g_fast, aux_fast) = reference, fast
  assert jax.tree_util.tree_structure(g_ref) == jax.tree_util.tree_structure(g_fast)
  for (path, a), b in zip(
    jax.tree_util.tree_flatten_with_path(g_ref)[0], jax.tree_util.tree_leaves(g_fast)
  ):
    assert b.dtype == jnp.float32
    np.testing.assert_allclose(
      np.asarray(b), np.asarray(a), atol=atol, rtol=rtol, err_msg=jax.tree_util.keystr(path)
    )
  np.testing.assert_allclose(aux_fast.norms, aux_ref.norms, rtol=max(rtol, 1e-4), atol=atol)
  np.testing.assert_array_equal(aux_fast.clipped, aux_ref.clipped)
  np.testing.assert_allclose(aux_fast.losses, aux_ref.losses, rtol=max(rtol, 1e-5), atol=atol)
  assert int(aux_fast.num_examples) == int(aux_ref.num_examples)
  assert aux_fast.sensitivity == aux_ref.sensitivity


KINDS = ["bert_cls", "bert_pooler", "roberta_cls", "bert_label_words", "gpt2_lm"]


# Flat clipping on every model; per-layer on the two with shared (tied or restricted) tables.
@pytest.mark.parametrize(
  "kind, rule",
  [(kind, "flat") for kind in KINDS]
  + [("bert_label_words", "per_layer"), ("gpt2_lm", "per_layer")],
)
def test_full_fine_tuning_equals_vmap(kind, rule):
  model, params, batch, make_loss = task(kind)
  reference, fast = both_backends(make_loss(model), params, batch, RULES[rule])
  assert_same(reference, fast)
  # Most examples are clipped at 0.1, so the factors matter, not just the raw gradients.
  assert np.asarray(fast[1].clipped)[MASK].all()


@pytest.mark.parametrize("kind", ["bert_cls", "gpt2_lm"])
def test_microbatches_and_automatic_clipping_equal_vmap(kind):
  model, params, batch, make_loss = task(kind)
  reference, fast = both_backends(make_loss(model), params, batch, RULES["automatic"], microbatch=2)
  assert_same(reference, fast)


@pytest.mark.parametrize("family", ["bert", "gpt2"])
@pytest.mark.parametrize("train", ["lora", "head_or_top"])
def test_lora_and_partial_training_equal_vmap(family, train):
  cfg = lora.LoraConfig(rank=2, alpha=4.0, targets=lora.LORA_TARGETS[family])
  batch = text_batch()
  if family == "bert":
    model = heads.SequenceClassifier(TINY_BERT, 2, "cls", lora=cfg)
    params = model.init(jax.random.PRNGKey(0), batch)["params"]
    make_loss = heads.classification_loss
  else:
    model = gpt2.GPT2LMHeadModel(TINY_GPT2, cfg)
    batch = {k: batch[k] for k in ("input_ids", "attention_mask")}
    params = model.init(jax.random.PRNGKey(0), batch["input_ids"], batch["attention_mask"])[
      "params"
    ]
    make_loss = heads.lm_loss
  # LoRA B starts at 0, where the A gradient vanishes; move off it so both adapters count.
  params = jax.tree_util.tree_map_with_path(
    lambda p, x: x + 0.1 if jax.tree_util.keystr(p).endswith("['lora_b']") else x, params
  )
  pattern = "lora" if train == "lora" else ("^head/" if family == "bert" else "h_1/")
  trainable, frozen = lora.partition(params, lora.trainable_mask(params, pattern))
  reference, fast = both_backends(make_loss(model, frozen), trainable, batch, RULES["per_layer"])
  assert_same(reference, fast)


def test_repeated_tokens_and_tied_embeddings_add_up_before_the_norm():
  # GPT-2 ties wte to the output layer; every row repeats tokens, so the merged-row norm
  # (and the cross term between the lookup and the output use) is exercised.
  model = gpt2.GPT2LMHeadModel(TINY_GPT2)
  ids = np.array([[5, 5, 7, 5, 9, 7, 5, 5], [3, 4, 3, 4, 3, 4, 3, 4]], np.int32)
  batch = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
  params = model.init(jax.random.PRNGKey(2), ids, batch["attention_mask"])["params"]
  reference, fast = both_backends(
    heads.lm_loss(model), params, batch, privacy.FlatClip(1e3), mask=np.ones(2, bool)
  )
  assert_same(reference, fast)


def test_ghost_and_direct_norms_agree():
  rng = np.random.default_rng(0)
  p = jnp.asarray(rng.normal(size=(3, 5, 4)), jnp.float32)
  q = jnp.asarray(rng.normal(size=(3, 5, 6)), jnp.float32)
  want = np.einsum("btm,btn->bmn", p, q)
  grad = bookkeeping.LinearGrad(p, q)
  c = jnp.asarray([0.5, 0.0, 2.0])
  kept = jnp.asarray([True, False, True])
  results = []
  for ghost in (True, False):
    grad.ghost = ghost
    results.append((grad.sq_norm(), grad.weighted_sum(c, kept)))
    np.testing.assert_allclose(results[-1][0], np.sum(want**2, (1, 2)), rtol=1e-5)
    np.testing.assert_allclose(
      results[-1][1], np.einsum("b,bmn->mn", c, want), rtol=1e-5, atol=1e-6
    )
  assert bookkeeping.ghost_is_cheaper(64, 384, 1536) and not bookkeeping.ghost_is_cheaper(
    512, 64, 64
  )


@pytest.mark.parametrize("tied", [True, False])
def test_table_blocks_concatenate_to_the_whole_weighted_sum(tied):
  # Per-layer FSDP reduce-scatters a table block by block (rows or columns, whichever
  # axis the table is split on); the blocks must be exactly the whole sum's, including
  # rows looked up twice, rows of other blocks and dropped (not kept) examples.
  rng = np.random.default_rng(1)
  batch, tokens, vocab, hidden = 3, 5, 12, 8
  rows = jnp.asarray(rng.integers(0, vocab, size=(batch, tokens)), jnp.int32).at[0, 1].set(3)
  rows = rows.at[0, 2].set(3)
  values = jnp.asarray(rng.normal(size=(batch, tokens, hidden)), jnp.float32)
  dense = None
  if tied:
    p = jnp.asarray(rng.normal(size=(batch, tokens, vocab)), jnp.float32)
    q = jnp.asarray(rng.normal(size=(batch, tokens, hidden)), jnp.float32)
    dense = bookkeeping.LinearGrad(p, q)
  table = bookkeeping.TableGrad(rows, values, dense, vocab)
  c = jnp.asarray([0.5, 3.0, 2.0])
  kept = jnp.asarray([True, False, True])
  whole = np.asarray(table.weighted_sum(c, kept))
  want = np.zeros((vocab, hidden))
  for b in (0, 2):
    for t in range(tokens):
      want[int(rows[b, t])] += float(c[b]) * np.asarray(values[b, t])
    if tied:
      want += float(c[b]) * np.asarray(p[b]).T @ np.asarray(q[b])
  np.testing.assert_allclose(whole, want, rtol=1e-5, atol=1e-5)
  for dim, count in ((0, 4), (1, 2), (1, 4)):
    blocks = [table.weighted_sum_block(c, kept, dim, jnp.int32(i), count) for i in range(count)]
    np.testing.assert_allclose(np.concatenate(blocks, axis=dim), whole, rtol=1e-5, atol=1e-5)


def test_each_example_contributes_at_most_the_clip_norm():
  model, params, batch, make_loss = task("bert_label_words")
  fn = jax.jit(privacy.clipped_grad(make_loss(model), 0.05, backend="bookkeeping", has_aux=True))
  for i in range(4):
    only = np.arange(4) == i
    grads, _ = fn(params, batch, only)
    norm = float(jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree_util.tree_leaves(grads))))
    assert 0.05 * 0.999 < norm <= 0.05 * (1 + 1e-5)


def test_padding_rows_contribute_exactly_zero():
  model, params, batch, make_loss = task("bert_cls")
  fn = jax.jit(privacy.clipped_grad(make_loss(model), 0.1, backend="bookkeeping", has_aux=True))
  garbage = {k: v.copy() for k, v in batch.items()}
  garbage["input_ids"][2] = 42
  garbage["label"][2] = 1 - garbage["label"][2]
  a, aux = fn(params, batch, MASK)
  b, _ = fn(params, garbage, MASK)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(x, y)
  assert float(aux.norms[2]) == 0.0 and float(aux.losses[2]) == 0.0


def test_norms_are_float32_under_bfloat16_compute():
  class Bf16Classifier(nn.Module):
    @nn.compact
    def __call__(self, batch, deterministic=True):
      x = layers.Embed(50, 16, name="embed")(batch["input_ids"]).astype(jnp.bfloat16)
      x = layers.LayerNorm(name="norm")(x)
      x = jnp.tanh(layers.Dense(16, dtype=jnp.bfloat16, name="hidden")(x))
      return layers.Dense(2, dtype=jnp.bfloat16, name="head")(x[:, 0]).astype(jnp.float32)

  model = Bf16Classifier()
  batch = text_batch()
  params = model.init(jax.random.PRNGKey(0), batch)["params"]
  reference, fast = both_backends(
    heads.classification_loss(model), params, batch, privacy.FlatClip(0.1)
  )
  assert fast[1].norms.dtype == jnp.float32
  # bf16 activations: both backends agree to bf16 precision, not float32's.
  assert_same(reference, fast, atol=2e-3, rtol=3e-2)


def test_auto_falls_back_to_vmap_and_bookkeeping_explains_what_it_cannot_run():
  class Untapped(nn.Module):
    @nn.compact
    def __call__(self, batch, deterministic=True):
      x = layers.Embed(50, 8, name="embed")(batch["input_ids"])
      return nn.Dense(2, name="flax_dense")(x[:, 0])  # Not a dpjax layer: no taps.

  class TwiceUsed(nn.Module):
    @nn.compact
    def __call__(self, batch, deterministic=True):
      x = layers.Embed(50, 8, name="embed")(batch["input_ids"])[:, 0]
      dense = layers.Dense(8, name="shared")
      return dense(dense(x))[:, :2]

  batch = text_batch()
  cases = (
    (Untapped(), "flax_dense/(kernel|bias)' is not used through a tapped layer"),
    (TwiceUsed(), "'shared' is applied 2 times"),
  )
  for model, message in cases:
    params = model.init(jax.random.PRNGKey(0), batch)["params"]
    loss_fn = heads.classification_loss(model)
    auto = privacy.clipped_grad(loss_fn, 1.0, has_aux=True)
    assert auto.resolved_backend(params, batch) == "vmap"
    reference = privacy.clipped_grad(loss_fn, 1.0, backend="vmap", has_aux=True)
    assert_same(reference(params, batch, MASK), auto(params, batch, MASK))
    with pytest.raises(ValueError, match=message):
      privacy.clipped_grad(loss_fn, 1.0, backend="bookkeeping", has_aux=True)(params, batch)
  # A plain function is not a TappedLoss either.
  plain = privacy.clipped_grad(lambda p, ex: jnp.sum(p["w"] * ex["x"]), 1.0)
  assert plain.resolved_backend({"w": jnp.ones(3)}, {"x": jnp.ones((2, 3))}) == "vmap"
  model, params, batch, make_loss = task("bert_cls")
  assert privacy.clipped_grad(make_loss(model), 1.0).resolved_backend(params, batch) == (
    "bookkeeping"
  )


def _schema_names() -> set[str]:
  return {
    value
    for name, value in vars(taps).items()
    if name.isupper() and name not in ("TAPS", "PERTURBATIONS") and isinstance(value, str)
  }


@pytest.mark.parametrize("kind", KINDS)
def test_models_write_only_names_of_the_tap_schema_and_every_kind_is_registered(kind):
  """The protocol between models and the backend is the schema module, nothing implicit."""
  model, params, batch, make_loss = task(kind)
  loss = make_loss(model)
  shapes = loss.perturbation_shapes(params, batch)
  _, _, sown, _ = loss.batched(params, batch, bookkeeping.trained_perturbations(shapes, params))
  written = {path[-1] for path in traverse_util.flatten_dict(sown)}
  written |= {path[-1] for path in traverse_util.flatten_dict(shapes)}
  assert written and written <= _schema_names()
  # Every layer that owns a parameter is claimed by exactly the registry (no name left over).
  markers = {m for k in bookkeeping.LAYER_KINDS for m in k.markers}
  by_layer = {}
  for path in list(traverse_util.flatten_dict(sown)) + list(traverse_util.flatten_dict(shapes)):
    by_layer.setdefault(path[:-1], set()).add(path[-1])
  assert all(names & markers for names in by_layer.values()), by_layer
