"""GPT-2 decoder with a tied LM head (pre-LN, learned absolute positions, causal attention).

Parameter names follow the Hugging Face checkpoints (``h_0/attn/c_attn/kernel``
<-> ``h.0.attn.c_attn.weight``; GPT-2 stores these matrices [d_in, d_out] already).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from dpjax.models import layers
from dpjax.models.bert import activation


@dataclasses.dataclass(frozen=True)
class GPT2Config:
  """Architecture of a GPT-2 decoder (names as in Hugging Face's config.json)."""

  vocab_size: int = 50257
  n_positions: int = 1024
  n_embd: int = 768
  n_layer: int = 12
  n_head: int = 12
  n_inner: int | None = None
  layer_norm_epsilon: float = 1e-5
  activation_function: str = "gelu_new"
  dropout: float = 0.0
  model_type: str = "gpt2"

  @classmethod
  def from_hf(cls, cfg: dict[str, Any]) -> GPT2Config:
    """From a Hugging Face ``config.json`` dict; dropout is 0 unless set explicitly."""
    if cfg.get("model_type", "gpt2") != "gpt2":
      raise ValueError(f"GPT2Config cannot read model_type {cfg.get('model_type')!r}")
    return cls(
      vocab_size=cfg["vocab_size"],
      n_positions=cfg["n_positions"],
      n_embd=cfg["n_embd"],
      n_layer=cfg["n_layer"],
      n_head=cfg["n_head"],
      n_inner=cfg.get("n_inner"),
      layer_norm_epsilon=cfg.get("layer_norm_epsilon", 1e-5),
      activation_function=cfg.get("activation_function", "gelu_new"),
    )


class GPT2Attention(nn.Module):
  config: GPT2Config
  lora: layers.LoraConfig | None = None

  @nn.compact
  def __call__(self, x, bias, deterministic):
    c = self.config
    qkv = layers.Dense(3 * c.n_embd, lora=self.lora, name="c_attn")(x)
    split = lambda t: t.reshape(t.shape[:-1] + (c.n_head, c.n_embd // c.n_head))
    q, k, v = (split(t) for t in jnp.split(qkv, 3, axis=-1))
    out = layers.dot_product_attention(q, k, v, bias, nn.Dropout(c.dropout), deterministic)
    out = layers.Dense(c.n_embd, lora=self.lora, name="c_proj")(out.reshape(x.shape))
    return nn.Dropout(c.dropout)(out, deterministic=deterministic)


class GPT2MLP(nn.Module):
  config: GPT2Config
  lora: layers.LoraConfig | None = None

  @nn.compact
  def __call__(self, x, deterministic):
    c = self.config
    h = activation(c.activation_function)(
      layers.Dense(c.n_inner or 4 * c.n_embd, lora=self.lora, name="c_fc")(x)
    )
    out = layers.Dense(c.n_embd, lora=self.lora, name="c_proj")(h)
    return nn.Dropout(c.dropout)(out, deterministic=deterministic)


class GPT2Block(nn.Module):
  config: GPT2Config
  lora: layers.LoraConfig | None = None

  @nn.compact
  def __call__(self, x, bias, deterministic):
    eps = self.config.layer_norm_epsilon
    x = x + GPT2Attention(self.config, self.lora, name="attn")(
      layers.LayerNorm(eps, name="ln_1")(x), bias, deterministic
    )
    return x + GPT2MLP(self.config, self.lora, name="mlp")(
      layers.LayerNorm(eps, name="ln_2")(x), deterministic
    )


class GPT2LMHeadModel(nn.Module):
  """``apply(params, input_ids, attention_mask, position_ids=None)`` -> logits [B, T, V].

  The output layer is tied to the token embedding ``wte``. Positions default to
  0..T-1 (right padding); pass ``position_ids`` for left-padded batches.
  ``return_hidden=True`` returns the final-LayerNorm hidden states instead.
  """

  config: GPT2Config
  lora: layers.LoraConfig | None = None

  @nn.compact
  def __call__(
    self,
    input_ids,
    attention_mask,
    position_ids=None,
    deterministic: bool = True,
    return_hidden: bool = False,
  ):
    c = self.config
    if position_ids is None:
      position_ids = jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)
    wte = layers.Embed(c.vocab_size, c.n_embd, name="wte")
    x = wte(input_ids) + layers.Embed(c.n_positions, c.n_embd, name="wpe")(position_ids)
    x = nn.Dropout(c.dropout)(x, deterministic=deterministic)
    length = input_ids.shape[-1]
    causal = jnp.tril(jnp.ones((length, length), bool))
    keep = causal[None, None] & (attention_mask[:, None, None, :] > 0)
    bias = jnp.where(keep, 0.0, jnp.finfo(x.dtype).min).astype(x.dtype)
    for i in range(c.n_layer):
      x = GPT2Block(c, self.lora, name=f"h_{i}")(x, bias, deterministic)
    x = layers.LayerNorm(c.layer_norm_epsilon, name="ln_f")(x)
    if return_hidden:
      return x
    return wte.attend(x)


def causal_lm_loss(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy over positions t with loss_mask[t+1] = 1.

  ``loss_mask`` marks the tokens to be predicted (e.g. only the target text of a
  table-to-text example, not its source); shapes [..., T].
  """
  targets = input_ids[..., 1:]
  weights = loss_mask[..., 1:].astype(jnp.float32)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits[..., :-1, :], targets)
  return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)
