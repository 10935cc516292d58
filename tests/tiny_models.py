"""Small Flax models for tests of the DP core: an MLP and a one-block transformer."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax


class MLP(nn.Module):
  hidden: int = 8
  classes: int = 3

  @nn.compact
  def __call__(self, x):
    x = nn.tanh(nn.Dense(self.hidden, name="hidden")(x))
    return nn.Dense(self.classes, name="out")(x)


class TinyTransformer(nn.Module):
  """Token embedding + one pre-LN self-attention block + mean pooling + classifier."""

  vocab: int = 11
  dim: int = 8
  heads: int = 2
  classes: int = 2

  @nn.compact
  def __call__(self, tokens, mask):
    x = nn.Embed(self.vocab, self.dim, name="embed")(tokens)
    x = x + self.param("pos", nn.initializers.normal(0.02), (tokens.shape[-1], self.dim))
    attn_mask = nn.make_attention_mask(mask, mask)
    h = nn.LayerNorm(name="ln1")(x)
    x = x + nn.MultiHeadDotProductAttention(self.heads, name="attn")(h, h, mask=attn_mask)
    h = nn.LayerNorm(name="ln2")(x)
    x = x + nn.Dense(self.dim, name="mlp_out")(nn.gelu(nn.Dense(2 * self.dim, name="mlp_in")(h)))
    pooled = jnp.sum(x * mask[..., None], -2) / jnp.maximum(jnp.sum(mask, -1, keepdims=True), 1)
    return nn.Dense(self.classes, name="head")(pooled)


def mlp_problem(batch: int = 8, dim: int = 5, seed: int = 0):
  """(loss_fn, params, batch) for the MLP on random data; loss of ONE example."""
  model = MLP()
  rng = np.random.default_rng(seed)
  data = {
    "x": jnp.asarray(rng.normal(size=(batch, dim)), jnp.float32),
    "y": jnp.asarray(rng.integers(0, 3, size=batch), jnp.int32),
  }
  params = model.init(jax.random.PRNGKey(seed), data["x"][0])["params"]

  def loss_fn(params, example):
    logits = model.apply({"params": params}, example["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, example["y"])

  return loss_fn, params, data


def transformer_problem(batch: int = 8, length: int = 6, seed: int = 0):
  """(loss_fn, params, batch) for the tiny transformer on random token sequences."""
  model = TinyTransformer()
  rng = np.random.default_rng(seed)
  lengths = rng.integers(2, length + 1, size=batch)
  mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.float32)
  data = {
    "tokens": jnp.asarray(rng.integers(0, 11, size=(batch, length)) * mask, jnp.int32),
    "mask": jnp.asarray(mask),
    "y": jnp.asarray(rng.integers(0, 2, size=batch), jnp.int32),
  }
  params = model.init(jax.random.PRNGKey(seed), data["tokens"][0], data["mask"][0])["params"]

  def loss_fn(params, example):
    logits = model.apply({"params": params}, example["tokens"], example["mask"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, example["y"])

  return loss_fn, params, data


def tree_norm(tree) -> float:
  return float(
    jnp.sqrt(
      sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree_util.tree_leaves(tree))
    )
  )


def tree_sub(a, b):
  return jax.tree_util.tree_map(jnp.subtract, a, b)


# A one-layer BERT (the real dpjax.models.bert) small enough for multi-device tests.
TINY_BERT_SHAPE = dict(
  vocab_size=40,
  hidden_size=16,
  num_hidden_layers=1,
  num_attention_heads=2,
  intermediate_size=32,
  max_position_embeddings=16,
)


def bert_rows(n: int, length: int, seed: int) -> dict[str, np.ndarray]:
  """``n`` random rows of ``length`` real tokens for TINY_BERT_SHAPE, with binary labels."""
  rng = np.random.default_rng(seed)
  return {
    "input_ids": rng.integers(1, 40, (n, length)).astype(np.int32),
    "attention_mask": np.ones((n, length), np.int32),
    "token_type_ids": np.zeros((n, length), np.int32),
    "label": rng.integers(0, 2, n).astype(np.int32),
  }
