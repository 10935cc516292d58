"""BERT-family encoders (BERT, MiniLM, RoBERTa): absolute positions, token types, post-LN.

Parameter names follow the Hugging Face checkpoints (``encoder/layer_3/attention/
self/query/kernel`` <-> ``encoder.layer.3.attention.self.query.weight``), so the
weight import is a mechanical rename (see :mod:`dpjax.models.pretrained`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpjax.models import layers
from dpjax.privacy import taps


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Architecture of a BERT-family encoder (names as in Hugging Face's config.json).

  ``position_offset`` is 0 for BERT (positions 0..T-1) and ``pad_token_id + 1``
  for RoBERTa, whose positions count only non-padding tokens, starting after the
  padding index.
  """

  vocab_size: int = 30522
  hidden_size: int = 384
  num_hidden_layers: int = 6
  num_attention_heads: int = 12
  intermediate_size: int = 1536
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_act: str = "gelu"
  pad_token_id: int = 0
  position_offset: int = 0
  hidden_dropout_prob: float = 0.0
  attention_probs_dropout_prob: float = 0.0
  model_type: str = "bert"
  # Compute dtype of the encoder's activations and matmuls ("float32" or "bfloat16"):
  # parameters stay float32 (cast where used), LayerNorm statistics and softmax run in
  # float32. Not read from config.json: a training choice (config.model.dtype).
  dtype: str = "float32"

  @classmethod
  def from_hf(cls, cfg: dict[str, Any]) -> BertConfig:
    """From a Hugging Face ``config.json`` dict (model_type bert or roberta).

    Dropout is taken as 0: DP training runs deterministic by default; set the
    dropout fields explicitly to train with dropout.
    """
    model_type = cfg.get("model_type", "bert")
    if model_type not in ("bert", "roberta"):
      raise ValueError(f"BertConfig cannot read model_type {model_type!r}")
    if cfg.get("position_embedding_type", "absolute") != "absolute":
      raise ValueError(
        f"only absolute position embeddings are supported (got {cfg['position_embedding_type']!r})"
      )
    pad = int(cfg.get("pad_token_id", 1 if model_type == "roberta" else 0))
    return cls(
      vocab_size=cfg["vocab_size"],
      hidden_size=cfg["hidden_size"],
      num_hidden_layers=cfg["num_hidden_layers"],
      num_attention_heads=cfg["num_attention_heads"],
      intermediate_size=cfg["intermediate_size"],
      max_position_embeddings=cfg["max_position_embeddings"],
      type_vocab_size=cfg.get("type_vocab_size", 2),
      layer_norm_eps=cfg.get("layer_norm_eps", 1e-12),
      hidden_act=cfg.get("hidden_act", "gelu"),
      pad_token_id=pad,
      position_offset=pad + 1 if model_type == "roberta" else 0,
      model_type=model_type,
    )


def activation(name: str):
  """Hugging Face activation names -> functions (exact erf GELU for ``"gelu"``)."""
  table = {
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "relu": nn.relu,
  }
  if name not in table:
    raise ValueError(f"hidden_act must be one of {sorted(table)} (got {name!r})")
  return table[name]


class BertEmbeddings(nn.Module):
  """Word + position + token-type embeddings -> LayerNorm -> dropout.

  Defined with ``setup`` so a tied output layer can reach ``word_embeddings``
  (see :meth:`BertModel.word_logits`).
  """

  config: BertConfig

  def setup(self):
    c = self.config
    self.word_embeddings = layers.Embed(c.vocab_size, c.hidden_size)
    self.position_embeddings = layers.Embed(c.max_position_embeddings, c.hidden_size)
    self.token_type_embeddings = layers.Embed(c.type_vocab_size, c.hidden_size)
    self.LayerNorm = layers.LayerNorm(c.layer_norm_eps)  # pylint: disable=invalid-name
    self.dropout = nn.Dropout(c.hidden_dropout_prob)

  def __call__(self, input_ids, token_type_ids, deterministic):
    c = self.config
    if c.position_offset:
      not_pad = (input_ids != c.pad_token_id).astype(jnp.int32)
      positions = jnp.cumsum(not_pad, axis=-1) * not_pad + c.pad_token_id
    else:
      positions = jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)
    x = self.word_embeddings(input_ids)
    x = x + self.position_embeddings(positions)
    x = x + self.token_type_embeddings(token_type_ids)
    return self.dropout(self.LayerNorm(x), deterministic=deterministic)


class BertSelfAttention(nn.Module):
  config: BertConfig
  lora: layers.LoraConfig | None = None

  @nn.compact
  def __call__(self, x, bias, deterministic):
    c = self.config
    heads = c.num_attention_heads
    split = lambda t: t.reshape(t.shape[:-1] + (heads, c.hidden_size // heads))
    q, k, v = (
      split(layers.Dense(c.hidden_size, lora=self.lora, name=n)(x))
      for n in ("query", "key", "value")
    )
    out = layers.dot_product_attention(
      q, k, v, bias, nn.Dropout(c.attention_probs_dropout_prob), deterministic
    )
    return out.reshape(x.shape[:-1] + (c.hidden_size,))


class BertResidualOutput(nn.Module):
  """dense -> dropout -> LayerNorm(x + residual): the post-LN sublayer output."""

  config: BertConfig
  lora: layers.LoraConfig | None = None

  @nn.compact
  def __call__(self, x, residual, deterministic):
    c = self.config
    x = layers.Dense(c.hidden_size, lora=self.lora, name="dense")(x)
    x = nn.Dropout(c.hidden_dropout_prob)(x, deterministic=deterministic)
    return layers.LayerNorm(c.layer_norm_eps, name="LayerNorm")(x + residual)


class BertAttention(nn.Module):
  config: BertConfig
  lora: layers.LoraConfig | None = None

  @nn.compact
  def __call__(self, x, bias, deterministic):
    attended = BertSelfAttention(self.config, self.lora, name="self")(x, bias, deterministic)
    return BertResidualOutput(self.config, self.lora, name="output")(attended, x, deterministic)


class BertIntermediate(nn.Module):
  config: BertConfig
  lora: layers.LoraConfig | None = None

  @nn.compact
  def __call__(self, x):
    c = self.config
    return activation(c.hidden_act)(
      layers.Dense(c.intermediate_size, lora=self.lora, name="dense")(x)
    )


class BertLayer(nn.Module):
  config: BertConfig
  lora: layers.LoraConfig | None = None

  @nn.compact
  def __call__(self, x, bias, deterministic):
    x = BertAttention(self.config, self.lora, name="attention")(x, bias, deterministic)
    h = BertIntermediate(self.config, self.lora, name="intermediate")(x)
    return BertResidualOutput(self.config, self.lora, name="output")(h, x, deterministic)


class BertModel(nn.Module):
  """The encoder: ``apply(params, input_ids, attention_mask, token_type_ids=None)`` -> [B, T, H].

  Attributes:
    config: the architecture.
    lora: optional LoRA adapters on matching Dense layers.
  """

  config: BertConfig
  lora: layers.LoraConfig | None = None

  def setup(self):
    self.embeddings = BertEmbeddings(self.config)
    self.encoder = BertEncoder(self.config, self.lora)

  def __call__(
    self,
    input_ids,
    attention_mask,
    token_type_ids=None,
    deterministic: bool = True,
    stop_layer: int | None = None,
  ):
    """[B, T, H]: the last layer's states (``stop_layer=k``: the input of layer k)."""
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    x = self.embeddings(input_ids, token_type_ids, deterministic).astype(self.config.dtype)
    bias = layers.additive_attention_bias(attention_mask, x.dtype)
    return self.encoder(x, bias, deterministic, stop=stop_layer)

  def from_layer(self, hidden, attention_mask, start_layer: int, deterministic: bool = True):
    """[B, T, H]: layers ``start_layer``.. on ``hidden``, the input of ``start_layer``.

    ``from_layer(__call__(..., stop_layer=k), mask, k)`` equals ``__call__(...)``.
    """
    x = hidden.astype(self.config.dtype)
    bias = layers.additive_attention_bias(attention_mask, x.dtype)
    return self.encoder(x, bias, deterministic, start=start_layer)

  def word_logits(self, x: jax.Array, rows: jax.Array | None = None) -> jax.Array:
    """x · Wᵀ with the word-embedding table W (all rows, or ``rows`` only): a tied decoder."""
    return self.embeddings.word_embeddings.attend(x, rows)


class BertEncoder(nn.Module):
  config: BertConfig
  lora: layers.LoraConfig | None = None

  @nn.compact
  def __call__(self, x, bias, deterministic, start: int = 0, stop: int | None = None):
    """Layers ``start`` .. ``stop - 1`` (default: all) on ``x``."""
    stop = self.config.num_hidden_layers if stop is None else stop
    for i in range(start, stop):
      x = BertLayer(self.config, self.lora, name=f"layer_{i}")(x, bias, deterministic)
    return x


class BertPooler(nn.Module):
  """tanh(dense(h_[CLS])): BERT's pooled output."""

  config: BertConfig

  @nn.compact
  def __call__(self, hidden):
    return jnp.tanh(layers.Dense(self.config.hidden_size, name="dense")(hidden[..., 0, :]))


class BertMaskedLMHead(nn.Module):
  """The MLM head: transform (dense, activation, LayerNorm) then the tied decoder + bias.

  ``vocab_ids`` restricts the output to a few tokens (the label words of a prompt),
  so the head costs O(k·H) instead of O(V·H). ``decoder(h, rows)`` is the tied
  output layer, :meth:`BertModel.word_logits` of the backbone.
  """

  config: BertConfig

  @nn.compact
  def __call__(self, hidden, decoder, vocab_ids=None):
    c = self.config
    h = activation(c.hidden_act)(layers.Dense(c.hidden_size, name="dense")(hidden))
    h = layers.LayerNorm(c.layer_norm_eps, name="LayerNorm")(h)
    bias = self.param("bias", nn.initializers.zeros, (c.vocab_size,), jnp.float32)
    if vocab_ids is not None:
      self.sow(taps.TAPS, taps.BIAS_ROWS, vocab_ids)
      bias = jnp.take(bias, vocab_ids)
    return layers.perturb_output(self, taps.LOGITS, decoder(h, vocab_ids) + bias.astype(h.dtype))
