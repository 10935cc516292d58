"""GPT-2 decoder with a tied LM head (pre-LN, learned absolute positions, causal attention).

Parameter names follow the Hugging Face checkpoints (``h_0/attn/c_attn/kernel``
<-> ``h.0.attn.c_attn.weight``; GPT-2 stores these matrices [d_in, d_out] already).

For autoregressive decoding the model also runs on a key/value cache
(:func:`init_cache`): a plain pytree passed to and returned by ``__call__``, so
a decode loop can carry it through ``jax.lax.while_loop``. Without a cache the
call is exactly the full-sequence forward pass used for training.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypedDict

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
  # Compute dtype ("float32" or "bfloat16"); parameters stay float32 (see BertConfig.dtype).
  dtype: str = "float32"

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


class LayerCache(TypedDict):
  """Keys and values of one layer for every cache slot, [B, T_max, n_head, head_dim]."""

  key: jax.Array
  value: jax.Array


class KVCache(TypedDict):
  """The decoding state of :class:`GPT2LMHeadModel`: a pytree of arrays.

  ``layers[i]`` holds layer ``h_i``'s keys and values; ``index`` (int32 scalar)
  is the slot the next call writes its first token to (the same for every row:
  batches are left-padded, so all rows advance together).
  """

  layers: tuple[LayerCache, ...]
  index: jax.Array


def init_cache(
  config: GPT2Config, batch: int, max_length: int, dtype: jnp.dtype = jnp.float32
) -> KVCache:
  """An empty cache with ``max_length`` key/value slots per row, write index 0.

  ``dtype`` should be the dtype of the model's activations (float32 unless the
  params were cast). Unwritten slots are zeros; they are never attended to
  because a query only sees slots up to its own.
  """
  shape = (batch, max_length, config.n_head, config.n_embd // config.n_head)
  return KVCache(
    layers=tuple(
      LayerCache(key=jnp.zeros(shape, dtype), value=jnp.zeros(shape, dtype))
      for _ in range(config.n_layer)
    ),
    index=jnp.zeros((), jnp.int32),
  )


class GPT2Attention(nn.Module):
  config: GPT2Config
  lora: layers.LoraConfig | None = None

  @nn.compact
  def __call__(self, x, bias, deterministic, cache: LayerCache | None = None, index=None):
    """Self-attention; with ``cache``, returns ``(out, new_cache)``.

    With a cache, the new keys/values of ``x`` ([B, S, ...]) are written at
    slots ``index .. index+S-1`` and the queries attend over all cache slots
    (``bias`` is then [B, 1, S, T_max]).
    """
    c = self.config
    qkv = layers.Dense(3 * c.n_embd, lora=self.lora, name="c_attn")(x)
    split = lambda t: t.reshape(t.shape[:-1] + (c.n_head, c.n_embd // c.n_head))
    q, k, v = (split(t) for t in jnp.split(qkv, 3, axis=-1))
    if cache is not None:
      start = (0, index, 0, 0)
      k = jax.lax.dynamic_update_slice(cache["key"], k.astype(cache["key"].dtype), start)
      v = jax.lax.dynamic_update_slice(cache["value"], v.astype(cache["value"].dtype), start)
      cache = LayerCache(key=k, value=v)
      k, v = k.astype(q.dtype), v.astype(q.dtype)
    out = layers.dot_product_attention(q, k, v, bias, nn.Dropout(c.dropout), deterministic)
    out = layers.Dense(c.n_embd, lora=self.lora, name="c_proj")(out.reshape(x.shape))
    out = nn.Dropout(c.dropout)(out, deterministic=deterministic)
    return out if cache is None else (out, cache)


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
  def __call__(self, x, bias, deterministic, cache: LayerCache | None = None, index=None):
    eps = self.config.layer_norm_epsilon
    attn = GPT2Attention(self.config, self.lora, name="attn")(
      layers.LayerNorm(eps, name="ln_1")(x), bias, deterministic, cache, index
    )
    if cache is not None:
      attn, cache = attn
    x = x + attn
    x = x + GPT2MLP(self.config, self.lora, name="mlp")(
      layers.LayerNorm(eps, name="ln_2")(x), deterministic
    )
    return x if cache is None else (x, cache)


class GPT2LMHeadModel(nn.Module):
  """``apply(params, input_ids, attention_mask, position_ids=None)`` -> logits [B, T, V].

  The output layer is tied to the token embedding ``wte``. Positions default to
  0..T-1 (right padding); pass ``position_ids`` for left-padded batches.
  ``return_hidden=True`` returns the final-LayerNorm hidden states instead.

  With ``cache`` (from :func:`init_cache`, T_max slots) the call processes
  ``input_ids`` [B, S] as the tokens at cache slots ``index .. index+S-1``
  and returns ``(logits, new_cache)`` (the index advanced by S). Then
  ``attention_mask`` is [B, T_max] over all cache slots, and a query at slot
  ``t`` attends to the slots ``s <= t`` whose mask is 1; ``position_ids``
  default to the slot numbers. The layers and parameters are the same as
  without a cache (LoRA included).
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
    cache: KVCache | None = None,
  ):
    c = self.config
    length = input_ids.shape[-1]
    # Slot of each query (and key) position: 0..T-1, or after the cached ones.
    start = 0 if cache is None else cache["index"]
    if position_ids is None:
      position_ids = jnp.broadcast_to(start + jnp.arange(length), input_ids.shape)
    wte = layers.Embed(c.vocab_size, c.n_embd, name="wte")
    x = wte(input_ids) + layers.Embed(c.n_positions, c.n_embd, name="wpe")(position_ids)
    x = x.astype(c.dtype)
    x = nn.Dropout(c.dropout)(x, deterministic=deterministic)
    if cache is None:
      causal = jnp.tril(jnp.ones((length, length), bool))
    else:
      key_slots = cache["layers"][0]["key"].shape[1]
      causal = jnp.arange(key_slots)[None, :] <= start + jnp.arange(length)[:, None]
    keep = causal[None, None] & (attention_mask[:, None, None, :] > 0)
    bias = jnp.where(keep, 0.0, jnp.finfo(x.dtype).min).astype(x.dtype)
    new_layers = []
    for i in range(c.n_layer):
      block = GPT2Block(c, self.lora, name=f"h_{i}")
      if cache is None:
        x = block(x, bias, deterministic)
      else:
        x, layer_cache = block(x, bias, deterministic, cache["layers"][i], start)
        new_layers.append(layer_cache)
    x = layers.LayerNorm(c.layer_norm_epsilon, name="ln_f")(x)
    out = x if return_hidden else wte.attend(x)
    if cache is None:
      return out
    return out, KVCache(layers=tuple(new_layers), index=start + length)


def causal_lm_loss(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy over positions t with loss_mask[t+1] = 1.

  ``loss_mask`` marks the tokens to be predicted (e.g. only the target text of a
  table-to-text example, not its source); shapes [..., T].
  """
  targets = input_ids[..., 1:]
  weights = loss_mask[..., 1:].astype(jnp.float32)
  logits = logits[..., :-1, :].astype(jnp.float32)  # float32 under bfloat16 compute
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)
