"""Shared layers: every trainable matrix of every model goes through these modules.

``Dense``, ``Embed`` and ``LayerNorm`` are the only places where trainable
weights meet activations, so a gradient backend that needs each layer's inputs
and output gradients (per-example norms without per-example gradients, see
:mod:`dpjax.privacy.bookkeeping`) can observe all of them in one place:

* what the weight gradient needs from the forward pass is sown into the
  ``TAPS`` collection (``sow`` is a no-op unless that collection is mutable)
  under the names of the tap schema, :mod:`dpjax.privacy.taps` (``Dense``: its
  input and the LoRA scale; ``Embed``: looked-up ids and, as a tied output
  layer, its input and rows; ``LayerNorm``: the normalized input);
* the layer output goes through :func:`perturb_output`, whose gradient is ∂L/∂y
  (a no-op unless a ``"perturbations"`` collection holding that entry is
  passed, so a backend can ask for the output gradients of trained layers only
  and backpropagation stops below them).

``Dense`` also carries optional LoRA adapters (Hu et al. 2021):
y = x W + b + (α / r) · x A B, with A [d_in, r], B [r, d_out] and B = 0 at init.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpjax.models.lora import LoraConfig
from dpjax.privacy import taps
from dpjax.privacy.taps import PERTURBATIONS, TAPS


def perturb_output(module: nn.Module, name: str, value: jax.Array) -> jax.Array:
  """``value + perturbations[name]`` when that entry is given, else ``value``.

  Unlike ``nn.Module.perturb`` a perturbation collection may hold entries for
  some layers only; the others are untouched. At ``init`` a zero entry is
  created, so ``model.init(...)[PERTURBATIONS]`` lists every tapped output.
  """
  if module.is_mutable_collection(PERTURBATIONS) and not module.has_variable(PERTURBATIONS, name):
    module.put_variable(PERTURBATIONS, name, jnp.zeros_like(value))
  if module.has_variable(PERTURBATIONS, name):
    value = value + module.get_variable(PERTURBATIONS, name).astype(value.dtype)
  return value


class Dense(nn.Module):
  """y = x W + b (+ LoRA), with W stored [d_in, d_out] as ``kernel``."""

  features: int
  use_bias: bool = True
  lora: LoraConfig | None = None
  kernel_init: nn.initializers.Initializer = nn.initializers.normal(0.02)
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    self.sow(TAPS, taps.DENSE_INPUT, x)
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32)
    dtype = self.dtype or x.dtype
    y = jnp.dot(x.astype(dtype), kernel.astype(dtype))
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(dtype)
    if self.lora is not None and self.lora.applies_to(self.scope.path):
      a = self.param(
        "lora_a", nn.initializers.he_uniform(), (x.shape[-1], self.lora.rank), jnp.float32
      )
      b = self.param("lora_b", nn.initializers.zeros, (self.lora.rank, self.features), jnp.float32)
      self.sow(TAPS, taps.LORA_SCALE, jnp.float32(self.lora.alpha / self.lora.rank))
      y = y + (self.lora.alpha / self.lora.rank) * jnp.dot(
        jnp.dot(x.astype(dtype), a.astype(dtype)), b.astype(dtype)
      )
    return perturb_output(self, taps.OUTPUT, y)


class Embed(nn.Module):
  """A lookup table [num_embeddings, features] stored as ``embedding``."""

  num_embeddings: int
  features: int
  embedding_init: nn.initializers.Initializer = nn.initializers.normal(0.02)

  def setup(self):
    self.embedding = self.param(
      "embedding", self.embedding_init, (self.num_embeddings, self.features), jnp.float32
    )

  def __call__(self, ids: jax.Array) -> jax.Array:
    self.sow(TAPS, taps.EMBED_IDS, ids)
    return perturb_output(self, taps.OUTPUT, jnp.take(self.embedding, ids, axis=0))

  def attend(self, x: jax.Array, rows: jax.Array | None = None) -> jax.Array:
    """x · Eᵀ: logits over the vocabulary (a tied output layer).

    Args:
      x: [..., features].
      rows: optional [k] row ids; the logits are then over those rows only,
        x · E[rows]ᵀ (e.g. the label words of a prompt), at O(k·features).
    """
    self.sow(TAPS, taps.ATTEND_INPUT, x)
    table = self.embedding
    if rows is not None:
      self.sow(TAPS, taps.ATTEND_ROWS, rows)
      table = jnp.take(table, rows, axis=0)
    return perturb_output(self, taps.ATTEND_OUTPUT, jnp.dot(x, table.T.astype(x.dtype)))


class LayerNorm(nn.Module):
  """y = (x - mean) / sqrt(var + eps) * scale + bias over the last axis.

  Parameters ``scale`` and ``bias``.

  Taps the normalized input x̂, so the per-example gradients Σ_t ∂L/∂y_t ⊙ x̂_t
  (scale) and Σ_t ∂L/∂y_t (bias) need no per-example backward pass. Statistics
  are computed in float32.
  """

  epsilon: float = 1e-6

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, -1, keepdims=True)
    centered = x32 - mean
    var = jnp.mean(jnp.square(centered), -1, keepdims=True)
    normalized = (centered * jax.lax.rsqrt(var + self.epsilon)).astype(x.dtype)
    self.sow(TAPS, taps.NORMALIZED, normalized)
    y = normalized * scale.astype(x.dtype) + bias.astype(x.dtype)
    return perturb_output(self, taps.OUTPUT, y)


def additive_attention_bias(attention_mask: jax.Array, dtype=jnp.float32) -> jax.Array:
  """[B, T] 0/1 key mask -> [B, 1, 1, T] bias: 0 on kept keys, the dtype's min elsewhere."""
  return jnp.where(attention_mask[:, None, None, :] > 0, 0.0, jnp.finfo(dtype).min).astype(dtype)


def dot_product_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  bias: jax.Array,
  dropout: nn.Dropout | None = None,
  deterministic: bool = True,
) -> jax.Array:
  """Softmax attention over [B, T, heads, head_dim] inputs.

  The bias is additive, of shape [B, 1|heads, T, T].
  """
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
  probs = jax.nn.softmax((scores + bias).astype(jnp.float32), axis=-1).astype(q.dtype)
  if dropout is not None:
    probs = dropout(probs, deterministic=deterministic)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v)
