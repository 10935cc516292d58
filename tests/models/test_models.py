"""Task models: the DP core runs on each, LoRA trains only what it should, GPT-2 is causal."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dpjax import privacy
from dpjax.models import bert, gpt2, heads, lora
from dpjax.privacy.secret import RunSecret

TINY_BERT = bert.BertConfig(
  vocab_size=50,
  hidden_size=16,
  num_hidden_layers=2,
  num_attention_heads=2,
  intermediate_size=32,
  max_position_embeddings=16,
)
TINY_ROBERTA = bert.BertConfig(
  vocab_size=50,
  hidden_size=16,
  num_hidden_layers=1,
  num_attention_heads=2,
  intermediate_size=32,
  max_position_embeddings=20,
  type_vocab_size=1,
  pad_token_id=1,
  position_offset=2,
  model_type="roberta",
)
TINY_GPT2 = gpt2.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2)


def text_batch(n=4, length=8, seed=0, pad_id=0):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(3, length + 1, n)
  mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
  ids = np.where(mask == 1, rng.integers(3, 50, (n, length)), pad_id).astype(np.int32)
  return {
    "input_ids": ids,
    "attention_mask": mask,
    "label": rng.integers(0, 2, n).astype(np.int32),
    "mask_position": (lengths - 2).astype(np.int32),
  }


def task(kind):
  """(model, params, batch, loss_fn factory) for each task model."""
  batch = text_batch(pad_id=1 if kind == "roberta_cls" else 0)
  if kind == "gpt2_lm":
    model = gpt2.GPT2LMHeadModel(TINY_GPT2)
    params = model.init(jax.random.PRNGKey(0), batch["input_ids"], batch["attention_mask"])[
      "params"
    ]
    return model, params, {k: batch[k] for k in ("input_ids", "attention_mask")}, heads.lm_loss
  model = {
    "bert_cls": heads.SequenceClassifier(TINY_BERT, 2, "cls"),
    "bert_pooler": heads.SequenceClassifier(TINY_BERT, 2, "pooler"),
    "roberta_cls": heads.SequenceClassifier(TINY_ROBERTA, 2, "mean"),
    "bert_label_words": heads.LabelWordClassifier(TINY_BERT, (7, 9)),
  }[kind]
  params = model.init(jax.random.PRNGKey(0), batch)["params"]
  return model, params, batch, heads.classification_loss


KINDS = ["bert_cls", "bert_pooler", "roberta_cls", "bert_label_words", "gpt2_lm"]


@pytest.mark.parametrize("kind", KINDS)
def test_vmap_clipped_sum_runs_and_matches_per_example_grads(kind):
  model, params, batch, make_loss = task(kind)
  loss_fn = make_loss(model)
  grad_fn = privacy.clipped_grad(loss_fn, 0.1, microbatch_size=2, has_aux=True)
  mask = np.array([1, 1, 1, 0], bool)
  clipped, aux = jax.jit(grad_fn)(params, batch, mask)
  # Reference: jax.grad of example 0 alone, clipped by hand.
  example = jax.tree_util.tree_map(lambda x: x[0], batch)
  g0 = jax.jit(jax.grad(lambda p: loss_fn(p, example)[0]))(params)
  norm0 = float(jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree_util.tree_leaves(g0))))
  np.testing.assert_allclose(float(aux.norms[0]), norm0, rtol=1e-4)
  only0, _ = jax.jit(grad_fn)(params, batch, np.array([1, 0, 0, 0], bool))
  want = jax.tree_util.tree_map(lambda g: g * min(1.0, 0.1 / norm0), g0)
  for a, b in zip(jax.tree_util.tree_leaves(only0), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)
  assert np.isfinite(float(aux.mean_loss)) and int(aux.num_examples) == 3


def test_lora_trains_only_adapters_and_head_and_frozen_params_never_change():
  cfg = lora.LoraConfig(rank=2, alpha=4.0, targets=lora.LORA_TARGETS["bert"])
  model = heads.SequenceClassifier(TINY_BERT, 2, "cls", lora=cfg)
  batch = text_batch()
  params = model.init(jax.random.PRNGKey(0), batch)["params"]
  mask = lora.trainable_mask(params, "lora")
  trainable, frozen = lora.partition(params, mask)
  flat = jax.tree_util.tree_flatten_with_path(trainable)[0]
  names = {"/".join(str(k.key) for k in path) for path, _ in flat}
  assert names and all(n.endswith(("lora_a", "lora_b")) or n.startswith("head/") for n in names)
  assert any("query/lora_a" in n for n in names) and not any("key/lora" in n for n in names)
  assert lora.count(trainable) < 0.2 * lora.count(params)
  # LoRA starts as the pretrained function: B = 0.
  assert all(
    np.all(np.asarray(x) == 0)
    for p, x in jax.tree_util.tree_flatten_with_path(trainable)[0]
    if str(p[-1].key) == "lora_b"
  )

  loss_fn = heads.classification_loss(model, frozen)
  grad_fn = privacy.clipped_grad(loss_fn, 1.0, has_aux=True)
  tx = optax.chain(
    privacy.gaussian_privatizer(
      1.0, grad_fn.sensitivity, 4.0, key=RunSecret.insecure_fixed(0).noise_key()
    ),
    optax.adam(1e-2),
  )
  opt_state = tx.init(trainable)

  @jax.jit
  def step(trainable, opt_state):
    grads, _ = grad_fn(trainable, batch, np.ones(4, bool))
    # The clipped (and so the noised) set is exactly the trainable tree.
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state

  new_trainable, _ = step(trainable, opt_state)
  new_params = lora.combine(new_trainable, frozen)
  for path, before in jax.tree_util.tree_flatten_with_path(frozen)[0]:
    after = new_params
    for key in path:
      after = after[key.key]
    np.testing.assert_array_equal(before, after)
  changed = [
    not np.array_equal(a, b)
    for a, b in zip(jax.tree_util.tree_leaves(trainable), jax.tree_util.tree_leaves(new_trainable))
  ]
  assert all(changed)


def test_trainable_mask_modes_and_errors():
  model, params, _, _ = task("bert_cls")
  head_only, _ = lora.partition(params, lora.trainable_mask(params, "head"))
  assert set(head_only) == {"head"}
  everything, frozen = lora.partition(params, lora.trainable_mask(params, "all"))
  assert frozen == {} and lora.count(everything) == lora.count(params)
  with pytest.raises(ValueError, match="no LoRA adapters"):
    lora.trainable_mask(params, "lora")
  with pytest.raises(ValueError, match="selects no parameter"):
    lora.trainable_mask(params, "^nothing$")
  with pytest.raises(ValueError, match="lora rank must be an integer >= 1"):
    lora.LoraConfig(rank=0)


def test_gpt2_is_causal_and_padding_does_not_leak():
  model, params, batch, _ = task("gpt2_lm")
  ids = batch["input_ids"][:1]
  mask = np.ones_like(ids)
  logits = model.apply({"params": params}, ids, mask)
  changed = ids.copy()
  changed[0, 5:] = 3
  logits2 = model.apply({"params": params}, changed, mask)
  np.testing.assert_allclose(logits[0, :5], logits2[0, :5], atol=1e-5)
  assert not np.allclose(logits[0, 5:], logits2[0, 5:])


def test_encoder_padding_tokens_do_not_change_real_positions():
  model = bert.BertModel(TINY_BERT)
  batch = text_batch(n=1, length=8)
  ids, mask = batch["input_ids"], batch["attention_mask"]
  params = model.init(jax.random.PRNGKey(1), ids, mask)["params"]
  real = int(mask.sum())
  garbage = ids.copy()
  garbage[0, real:] = 17
  a = model.apply({"params": params}, ids, mask)
  b = model.apply({"params": params}, garbage, mask)
  np.testing.assert_allclose(a[0, :real], b[0, :real], atol=1e-5)


def test_dropout_uses_the_per_example_key():
  cfg = bert.BertConfig(**{**TINY_BERT.__dict__, "hidden_dropout_prob": 0.5})
  model = heads.SequenceClassifier(cfg, 2)
  batch = text_batch()
  params = model.init(jax.random.PRNGKey(0), batch)["params"]
  loss_fn = heads.classification_loss(model)
  example = jax.tree_util.tree_map(lambda x: x[0], batch)
  det = loss_fn(params, example)[0]
  k1 = loss_fn(params, {**example, "dropout_key": jax.random.PRNGKey(1)})[0]
  k1_again = loss_fn(params, {**example, "dropout_key": jax.random.PRNGKey(1)})[0]
  k2 = loss_fn(params, {**example, "dropout_key": jax.random.PRNGKey(2)})[0]
  assert float(k1) == float(k1_again) and float(k1) != float(k2) and float(k1) != float(det)
