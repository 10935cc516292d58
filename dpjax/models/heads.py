"""Task models on a pretrained backbone, and their per-example losses.

Task models take a batch dict (``input_ids``, ``attention_mask``, optional
``token_type_ids`` and ``mask_position``) and return logits. Every task has a
loss of ONE example, ``loss(params, example) -> (scalar, aux)``, which is the
contract of :func:`dpjax.privacy.clipped_grad`.

* :class:`SequenceClassifier`: a linear head on the [CLS] state, the masked mean
  of the states, or BERT's pooler.
* :class:`LabelWordClassifier`: the prompt objective of Li et al. 2022 — the
  pretrained MLM head predicts a label word at the [MASK] of a template, and the
  logits are restricted to the label words.
* GPT-2 language modelling: :func:`lm_loss` on :class:`~dpjax.models.gpt2.GPT2LMHeadModel`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from dpjax.models import bert, gpt2, layers, lora
from dpjax.privacy import taps

PyTree = Any
POOLINGS = ("cls", "mean", "pooler")


class SequenceClassifier(nn.Module):
  """Backbone -> pooled state -> ``head`` Dense -> logits [B, num_labels].

  ``features_only=True`` stops before the first trained-in-``head``-mode module and
  returns the frozen backbone's features (:func:`sequence_features`), which
  :class:`PooledHead` maps to the same logits.

  Frozen bottom layers can be computed once: ``stop_layer=k`` returns the input
  of layer k [B, T, H], and the model with ``cached_layers=k`` takes it as
  ``batch["hidden"]`` (with ``attention_mask``) and runs layers k.. and the head:
  the same logits as the whole model on the tokens.
  """

  backbone: bert.BertConfig
  num_labels: int
  pooling: str = "cls"
  lora: layers.LoraConfig | None = None
  cached_layers: int = 0

  @nn.compact
  def __call__(
    self,
    batch: Mapping[str, jax.Array],
    deterministic: bool = True,
    features_only: bool = False,
    stop_layer: int | None = None,
  ) -> jax.Array:
    if self.pooling not in POOLINGS:
      raise ValueError(f"pooling must be one of {POOLINGS} (got {self.pooling!r})")
    mask = batch["attention_mask"]
    backbone = bert.BertModel(self.backbone, self.lora, name="backbone")
    if self.cached_layers:
      hidden = backbone.from_layer(batch["hidden"], mask, self.cached_layers, deterministic)
    else:
      hidden = backbone(
        batch["input_ids"], mask, batch.get("token_type_ids"), deterministic, stop_layer
      )
      if stop_layer is not None:
        return hidden
    features = sequence_features(self.pooling, hidden, mask)
    if features_only:
      return features
    return _pooled_logits(self.backbone, self.num_labels, self.pooling, features)


def sequence_features(pooling: str, hidden: jax.Array, mask: jax.Array) -> jax.Array:
  """[B, H]: what the backbone hands to the head: the [CLS] state (``cls``, and
  ``pooler``, whose dense layer belongs to the head) or the masked mean (``mean``)."""
  if pooling == "mean":
    weights = mask[..., None].astype(hidden.dtype)
    return jnp.sum(hidden * weights, 1) / jnp.maximum(jnp.sum(weights, 1), 1.0)
  return hidden[:, 0]


def _pooled_logits(
  backbone: bert.BertConfig, num_labels: int, pooling: str, features: jax.Array
) -> jax.Array:
  """The head of :class:`SequenceClassifier` on its features (called inside a compact
  ``__call__``: its ``pooler`` and ``head`` modules belong to the caller)."""
  if pooling == "pooler":
    features = bert.BertPooler(backbone, name="pooler")(features[:, None])
  return layers.Dense(num_labels, name="head")(features)


class PooledHead(nn.Module):
  """The head of :class:`SequenceClassifier` alone, on ``batch["features"]`` [B, H].

  Its parameters (``head``, and ``pooler`` with ``pooling="pooler"``) are the ones
  ``model.train=head`` trains, under the same names: with features cached from the
  frozen backbone, ``PooledHead(features)`` equals ``SequenceClassifier(batch)``.
  """

  backbone: bert.BertConfig
  num_labels: int
  pooling: str = "cls"

  @nn.compact
  def __call__(self, batch: Mapping[str, jax.Array], deterministic: bool = True) -> jax.Array:
    del deterministic  # the head has no dropout
    features = batch["features"].astype(self.backbone.dtype)  # as the backbone computed them
    return _pooled_logits(self.backbone, self.num_labels, self.pooling, features)


class LabelWordClassifier(nn.Module):
  """Logits over ``label_word_ids`` from the MLM head at ``batch["mask_position"]``."""

  backbone: bert.BertConfig
  label_word_ids: tuple[int, ...]
  lora: layers.LoraConfig | None = None

  @nn.compact
  def __call__(self, batch: Mapping[str, jax.Array], deterministic: bool = True) -> jax.Array:
    encoder = bert.BertModel(self.backbone, self.lora, name="backbone")
    hidden = encoder(
      batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"), deterministic
    )
    position = batch["mask_position"].astype(jnp.int32)
    at_mask = jnp.take_along_axis(hidden, position[:, None, None], axis=1)[:, 0]
    return bert.BertMaskedLMHead(self.backbone, name="lm_head")(
      at_mask, encoder.word_logits, jnp.asarray(self.label_word_ids, jnp.int32)
    )


def _add_batch_axis(example: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  return {k: jnp.asarray(v)[None] for k, v in example.items() if k != "dropout_key"}


def _rngs(example: Mapping[str, Any]) -> tuple[dict[str, jax.Array], bool]:
  """Per-example dropout: the example carries its own key (vmap-safe)."""
  if "dropout_key" in example:
    return {"dropout": example["dropout_key"]}, False
  return {}, True


class TaskLoss:
  """The loss of a Flax task model, for both clipped-gradient backends.

  * ``loss(trainable, example) -> (loss, aux)`` for ONE example (vmap backend);
  * ``loss.batched(trainable, batch, perturbations)`` runs the model once on a
    batch with output perturbations and returns (losses [B], aux, taps, full
    params) (book-keeping backend, :class:`dpjax.privacy.bookkeeping.TappedLoss`).

  Frozen parameters are closed over, so they are never differentiated,
  clipped or noised.

  Args:
    model: the task model.
    frozen: parameters that are not trained (see :func:`dpjax.models.lora.partition`).
    inputs: ``batch -> (args, kwargs)`` of ``model.__call__`` (without ``deterministic``).
    row_loss: ``(outputs of one example, example) -> (loss, aux)``.
  """

  def __init__(
    self,
    model: nn.Module,
    frozen: PyTree | None,
    inputs: Callable[[Mapping[str, jax.Array]], tuple[tuple, dict]],
    row_loss: Callable[[jax.Array, Mapping[str, jax.Array]], tuple[jax.Array, dict]],
  ):
    self.model = model
    self.frozen = frozen
    self.inputs = inputs
    self.row_loss = row_loss

  def full_params(self, params: PyTree) -> PyTree:
    return params if self.frozen is None else lora.combine(params, self.frozen)

  def __call__(self, params: PyTree, example: Mapping[str, jax.Array]):
    rngs, deterministic = _rngs(example)
    args, kwargs = self.inputs(_add_batch_axis(example))
    outputs = self.model.apply(
      {"params": self.full_params(params)}, *args, deterministic=deterministic, rngs=rngs, **kwargs
    )[0]
    return self.row_loss(outputs, example)

  def batched(self, params: PyTree, batch: Mapping[str, jax.Array], perturbations: PyTree):
    """One forward pass over ``batch``; dropout (if keys are given) uses the first row's key."""
    full = self.full_params(params)
    keys = batch.get("dropout_key")
    rngs = {} if keys is None else {"dropout": keys[0]}
    args, kwargs = self.inputs({k: v for k, v in batch.items() if k != "dropout_key"})
    outputs, state = self.model.apply(
      {"params": full, taps.PERTURBATIONS: perturbations},
      *args,
      deterministic=keys is None,
      rngs=rngs,
      mutable=[taps.TAPS],
      **kwargs,
    )
    losses, aux = jax.vmap(self.row_loss)(outputs, batch)
    return losses, aux, state.get(taps.TAPS, {}), full

  def perturbation_shapes(self, params: PyTree, batch: Mapping[str, jax.Array]) -> PyTree:
    args, kwargs = self.inputs({k: v for k, v in batch.items() if k != "dropout_key"})
    shapes = jax.eval_shape(
      lambda: self.model.init(jax.random.PRNGKey(0), *args, deterministic=True, **kwargs)
    )
    return shapes.get(taps.PERTURBATIONS, {})


def _batch_dict(batch: Mapping[str, jax.Array]) -> tuple[tuple, dict]:
  return (dict(batch),), {}


def _classification_row(logits: jax.Array, example: Mapping[str, jax.Array]):
  label = example["label"]
  logits = logits.astype(jnp.float32)  # the loss in float32 under bfloat16 compute
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, label)
  return loss, {"correct": (jnp.argmax(logits) == label).astype(jnp.float32)}


def classification_loss(model: nn.Module, frozen: PyTree | None = None) -> TaskLoss:
  """``loss(trainable, example) -> (cross-entropy, {"correct": 0/1})`` for ONE example.

  Args:
    model: a task model taking a batch dict (SequenceClassifier, LabelWordClassifier).
    frozen: parameters not trained (see :func:`dpjax.models.lora.partition`); the
      loss closes over them, so they are never differentiated, clipped or noised.
  """
  return TaskLoss(model, frozen, _batch_dict, _classification_row)


def _lm_inputs(batch: Mapping[str, jax.Array]) -> tuple[tuple, dict]:
  return (batch["input_ids"], batch["attention_mask"]), {}


def _lm_row(logits: jax.Array, example: Mapping[str, jax.Array]):
  loss_mask = example.get("loss_mask", example["attention_mask"]) * example["attention_mask"]
  loss = gpt2.causal_lm_loss(logits, example["input_ids"], loss_mask)
  return loss, {"tokens": jnp.sum(loss_mask[1:]).astype(jnp.float32)}


def lm_loss(model: gpt2.GPT2LMHeadModel, frozen: PyTree | None = None) -> TaskLoss:
  """``loss(trainable, example) -> (mean next-token CE, {"tokens": count})`` for ONE sequence.

  The example holds ``input_ids``, ``attention_mask`` and optionally ``loss_mask``
  (the tokens to predict; defaults to the attention mask).
  """
  return TaskLoss(model, frozen, _lm_inputs, _lm_row)


def init_with_backbone(
  model: nn.Module,
  rng: jax.Array,
  example_batch: Mapping[str, jax.Array],
  backbone_params: PyTree,
  head_params: Mapping[str, PyTree] | None = None,
) -> PyTree:
  """Initializes a task model and puts the pretrained weights in place.

  The backbone subtree comes from ``backbone_params`` (LoRA adapters, which no
  checkpoint holds, keep their fresh initialization); heads named in
  ``head_params`` (e.g. ``{"pooler": ..., "lm_head": ...}`` from
  :func:`dpjax.models.pretrained.load_head_params`) replace their random init.

  Raises:
    ValueError: when a pretrained tensor has no place in the model or a shape differs.
  """
  params = jax.jit(lambda r: model.init(r, dict(example_batch))["params"])(rng)
  params = dict(params)
  pieces = {"backbone": backbone_params, **(head_params or {})}
  for name, pretrained in pieces.items():
    if name not in params:
      continue  # A head the model does not use (e.g. the pooler for mean pooling).
    fresh = traverse_util.flatten_dict(params[name], sep="/")
    given = traverse_util.flatten_dict(pretrained, sep="/")
    unknown = sorted(given.keys() - fresh.keys())
    unset = sorted(
      k for k in fresh.keys() - given.keys() if k.rsplit("/", 1)[-1] not in ("lora_a", "lora_b")
    )
    shapes = sorted(k for k in given.keys() & fresh.keys() if given[k].shape != fresh[k].shape)
    if unknown or unset or shapes:
      raise ValueError(
        f"pretrained {name!r} weights do not fit the model: unknown {unknown[:5]}, "
        f"missing {unset[:5]}, wrong shape {shapes[:5]}"
      )
    fresh.update({k: jnp.asarray(v, jnp.float32) for k, v in given.items()})
    params[name] = traverse_util.unflatten_dict(fresh, sep="/")
  return params
