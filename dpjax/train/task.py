"""The task of a run (classification or causal LM): model, parameters, loss and evaluation.

The training loop reaches the model only through this module: :func:`build`
gives the task model, its (trainable, frozen) parameters and the tokenizer;
:func:`loss` the per-example loss the mechanism clips; :func:`evaluate` the
public metrics on a held-out split.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tokenizers

from dpjax.models import bert, gpt2, heads, lora, pretrained
from dpjax.train import splits
from dpjax.train.config import ConfigError, lora_config

PyTree = Any


TINY_GPT2_POSITIONS = 256


def _tiny_config(c: ml_collections.ConfigDict, vocab_size: int):
  """The random-init ``model.name = tiny`` config of the task (GPT-2 or BERT shaped)."""
  hidden = c.model.tiny_hidden
  if c.model.task == "causal_lm":
    return gpt2.GPT2Config(
      vocab_size=vocab_size,
      n_positions=max(TINY_GPT2_POSITIONS, c.data.max_length),
      n_embd=hidden,
      n_layer=c.model.tiny_layers,
      n_head=max(1, hidden // 16),
    )
  return bert.BertConfig(
    hidden_size=hidden,
    num_hidden_layers=c.model.tiny_layers,
    num_attention_heads=max(1, hidden // 16),
    intermediate_size=4 * hidden,
  )


def _checked(c: ml_collections.ConfigDict, config):
  """``config`` if its family fits the task (GPT-2 for causal_lm, else BERT)."""
  if c.model.task == "causal_lm" and not isinstance(config, gpt2.GPT2Config):
    raise ConfigError(
      f"config.model.name={c.model.name!r} is a {config.model_type} model; "
      "model.task=causal_lm needs a GPT-2 directory (model_type gpt2)"
    )
  if c.model.task != "causal_lm" and not isinstance(config, bert.BertConfig):
    raise ConfigError(
      f"config.model.name={c.model.name!r} is a {config.model_type} model; "
      "the classification tasks need a BERT-family encoder"
    )
  return config


def _causal_model(c: ml_collections.ConfigDict):
  """(GPT-2 model, pretrained params or None, tokenizer) for ``model.task = causal_lm``."""
  lora_cfg = lora_config(c, "gpt2")
  if c.model.name == "tiny":
    _, _, tokenizer = pretrained.load("minilm")
    config = _tiny_config(c, tokenizer.get_vocab_size())
    params = None
  else:
    path = pretrained.resolve(c.model.name)
    config = _checked(c, pretrained.read_config(path))
    _, params, tokenizer = pretrained.load(path, lora=lora_cfg)
  return _causal(c, config), params, tokenizer


def _causal(c: ml_collections.ConfigDict, config: gpt2.GPT2Config) -> gpt2.GPT2LMHeadModel:
  if c.data.max_length > config.n_positions:
    raise ConfigError(
      f"config.data.max_length must be <= the model's n_positions={config.n_positions} "
      f"(got {c.data.max_length})"
    )
  config = dataclasses.replace(config, dtype=c.model.dtype)
  if c.model.dropout:
    config = dataclasses.replace(config, dropout=float(c.model.dropout))
  return gpt2.GPT2LMHeadModel(config, lora_config(c, "gpt2"))


def backbone_for(c: ml_collections.ConfigDict):
  """(backbone config, pretrained backbone params or None, head params, tokenizer)."""
  if c.model.name == "tiny":
    _, _, tokenizer = pretrained.load("minilm")
    return _tiny_config(c, tokenizer.get_vocab_size()), None, {}, tokenizer
  path = pretrained.resolve(c.model.name)
  model, params, tokenizer = pretrained.load(path)
  return _checked(c, model.config), params, pretrained.load_head_params(path), tokenizer


def abstract_params(c: ml_collections.ConfigDict) -> tuple[PyTree, tokenizers.Tokenizer]:
  """(the task model's parameter shapes, its tokenizer), no weight read and nothing compiled.

  The leaves are ``jax.ShapeDtypeStruct``: the shapes :func:`build` gives, from
  the model's config file (or the tiny config) and ``jax.eval_shape`` of ``init``.
  """
  path = pretrained.resolve("minilm" if c.model.name == "tiny" else c.model.name)
  tokenizer = pretrained.read_tokenizer(path)
  if c.model.name == "tiny":
    config = _tiny_config(c, tokenizer.get_vocab_size())
  else:
    config = _checked(c, pretrained.read_config(path))
  if c.model.task == "causal_lm":
    model = _causal(c, config)
    ids = jnp.zeros((1, 2), jnp.int32)
    init = lambda rng: model.init(rng, ids, jnp.ones_like(ids))["params"]
  else:
    model = task_model(c, config, label_word_ids(c, tokenizer))
    batch = {k: jnp.asarray(v) for k, v in example_batch(c).items()}
    init = lambda rng: model.init(rng, batch)["params"]
  return jax.eval_shape(init, jax.random.PRNGKey(c.seed)), tokenizer


def task_model(
  c: ml_collections.ConfigDict, backbone: bert.BertConfig, label_word_ids: tuple[int, ...] | None
):
  backbone = dataclasses.replace(backbone, dtype=c.model.dtype)
  if c.model.dropout:
    backbone = dataclasses.replace(
      backbone,
      hidden_dropout_prob=float(c.model.dropout),
      attention_probs_dropout_prob=float(c.model.dropout),
    )
  lora_cfg = lora_config(c, backbone.model_type)
  if c.model.task == "label_words":
    return heads.LabelWordClassifier(backbone, tuple(label_word_ids), lora=lora_cfg)
  return heads.SequenceClassifier(backbone, c.data.num_labels, c.model.pooling, lora=lora_cfg)


def init_params(
  c: ml_collections.ConfigDict, model, example_batch, backbone_params, head_params
) -> tuple[PyTree, PyTree]:
  """(trainable, frozen) parameters: pretrained where available, else seeded random."""
  rng = jax.random.PRNGKey(c.seed)
  batch = {k: jnp.asarray(v) for k, v in example_batch.items()}
  if isinstance(model, gpt2.GPT2LMHeadModel):
    if backbone_params is None:
      ids, mask = batch["input_ids"], batch["attention_mask"]
      params = jax.jit(lambda r: model.init(r, ids, mask)["params"])(rng)
    else:
      params = backbone_params
  elif backbone_params is None:
    params = jax.jit(lambda r: model.init(r, batch)["params"])(rng)
  else:
    params = heads.init_with_backbone(model, rng, batch, backbone_params, head_params)
  if c.model.train == "lora" and not lora.has_adapters(params):
    raise ConfigError(
      f"config.model.lora_targets must match at least one Dense module path, "
      f"e.g. 'attention/self/query' or 'attn/c_attn' (got {tuple(c.model.lora_targets)!r})"
    )
  return split_trainable(c, params)


def split_trainable(c: ml_collections.ConfigDict, params: PyTree) -> tuple[PyTree, PyTree]:
  """(trainable, frozen) by ``model.train`` (arrays or shapes alike).

  Raises:
    ConfigError: a ``model.train`` pattern that selects no parameter.
  """
  try:
    mask = lora.trainable_mask(params, c.model.train)
  except ValueError as err:  # a pattern that selects nothing
    raise ConfigError(f"config.model.{err}; see the parameter paths of the model") from None
  return lora.partition(params, mask)


def label_word_ids(
  c: ml_collections.ConfigDict, tokenizer: tokenizers.Tokenizer
) -> tuple[int, ...] | None:
  """The token id of each label word (as the data layer computes it); None for ``classify``."""
  template = splits.template_for(c)
  if template is None:
    return None
  try:
    return template.label_word_ids(tokenizer)
  except ValueError as err:
    raise ConfigError(f"config.data.label_words: {err}") from None


def example_batch(c: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """A one-row batch with every input the task model reads (for ``init``: shapes only)."""
  ids = np.zeros((1, 2), np.int32)
  batch = {
    "input_ids": ids,
    "attention_mask": np.ones_like(ids),
    "token_type_ids": np.zeros_like(ids),
  }
  if c.model.task == "label_words":
    batch["mask_position"] = np.zeros((1,), np.int32)
  return batch


@dataclasses.dataclass(frozen=True)
class Task:
  """A task: the model, its parameters and tokenizer, its loss and metrics.

  Attributes:
    model: the Flax task model (``SequenceClassifier``, ``LabelWordClassifier`` or, for
      causal_lm, ``GPT2LMHeadModel``).
    trainable: the parameters that are trained (clipped and noised under DP).
    frozen: the parameters that are not (pretrained weights under LoRA or head-only).
    tokenizer: the pretrained model's tokenizer (public: it never sees private data).
    fresh_heads: pretrained heads the task needs but the checkpoint lacks, initialised
      at random instead (``"lm_head"`` for label words on a model without an MLM head).
  """

  model: nn.Module
  trainable: PyTree
  frozen: PyTree
  tokenizer: tokenizers.Tokenizer
  fresh_heads: tuple[str, ...] = ()

  @property
  def causal(self) -> bool:
    return isinstance(self.model, gpt2.GPT2LMHeadModel)

  def loss(self, frozen: PyTree | None = None) -> heads.TaskLoss:
    """The loss of ONE example: cross-entropy and ``{"correct": 0/1}`` (classifiers), or the
    mean next-token cross-entropy over the completion and ``{"tokens": count}`` (causal LM)."""
    frozen = self.frozen if frozen is None else frozen
    if self.causal:
      return heads.lm_loss(self.model, frozen)
    return heads.classification_loss(self.model, frozen)

  def evaluate(self, params: PyTree, split: splits.Split, batch_size: int) -> dict[str, Any]:
    """Metrics of the full ``params`` over ``split`` (see :func:`evaluate_model`)."""
    return evaluate_model(params, self.model, split, batch_size)


def build(c: ml_collections.ConfigDict) -> Task:
  """The task model of the config with pretrained (or seeded random) parameters.

  Raises:
    ConfigError: the model cannot be loaded or does not fit the task.
  """
  if c.model.task == "causal_lm":
    model, params, tokenizer = _causal_model(c)
    trainable, frozen = init_params(c, model, example_batch(c), params, None)
    return Task(model, trainable, frozen, tokenizer)
  backbone, backbone_params, head_params, tokenizer = backbone_for(c)
  model = task_model(c, backbone, label_word_ids(c, tokenizer))
  trainable, frozen = init_params(c, model, example_batch(c), backbone_params, head_params)
  fresh = ()
  if c.model.task == "label_words" and backbone_params is not None and "lm_head" not in head_params:
    fresh = ("lm_head",)
  return Task(model, trainable, frozen, tokenizer, fresh)


def check_fresh_heads(c: ml_collections.ConfigDict, task: Task) -> None:
  """Refuses to train label words with a masked-LM head the checkpoint does not have.

  Raises:
    ConfigError: unless ``model.allow_fresh_mlm_head`` accepts a fresh head.
  """
  if "lm_head" in task.fresh_heads and not c.model.allow_fresh_mlm_head:
    raise ConfigError(
      f"config.model.task=label_words needs a pretrained masked-LM head and "
      f"config.model.name={c.model.name!r} has none (a fresh head knows no label word): use "
      "model.task=classify, a checkpoint with an MLM head, or "
      "--config.model.allow_fresh_mlm_head=True to train a new one"
    )


def evaluate_model(
  params: PyTree, model, split: splits.Split, batch_size: int, per_class: bool = False
) -> dict[str, Any]:
  """:func:`evaluate_lm` for a GPT-2 language model, :func:`evaluate` for a classifier."""
  if isinstance(model, gpt2.GPT2LMHeadModel):
    return evaluate_lm(params, model, split, batch_size)
  return evaluate(params, model, split, batch_size, per_class)


def eval_step(
  params: PyTree, batch: dict[str, jax.Array], mask: jax.Array, *, model: Any
) -> dict[str, jax.Array]:
  """Sums of loss and correct predictions over the real rows of an eval batch, and their
  confusion matrix (``[true label, predicted label]`` counts)."""
  logits = model.apply({"params": params}, batch).astype(jnp.float32)
  predicted = jnp.argmax(logits, -1)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
  correct = (predicted == batch["label"]).astype(jnp.float32)
  classes = logits.shape[-1]
  confusion = jnp.zeros((classes, classes), jnp.float32)
  return {
    "loss_sum": jnp.sum(jnp.where(mask, losses, 0.0)),
    "correct": jnp.sum(jnp.where(mask, correct, 0.0)),
    "count": jnp.sum(mask).astype(jnp.float32),
    "confusion": confusion.at[batch["label"], predicted].add(mask.astype(jnp.float32)),
  }


def evaluate(
  params: PyTree, model, split: splits.Split, batch_size: int, per_class: bool = False
) -> dict[str, Any]:
  """Accuracy and mean loss over a split, in fixed-size padded batches.

  Examples are visited shortest first, so each batch is padded to the bucket of
  its own longest example rather than of the split's (the sums do not depend on
  the order). ``per_class``: also ``confusion_matrix``, a list of rows, entry
  [i][j] the number of examples of label i predicted as j.
  """
  if len(split) == 0:
    return {"accuracy": float("nan"), "loss": float("nan"), "count": 0}
  fn = jax.jit(functools.partial(eval_step, model=model))
  totals = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
  confusion = 0
  for _, padded, mask in split.padded_batches(batch_size):
    out = fn(params, split.batch(padded), mask)
    for key in totals:
      totals[key] += float(out[key])
    confusion = confusion + np.asarray(out["confusion"], np.int64)
  result = {
    "accuracy": totals["correct"] / totals["count"],
    "loss": totals["loss_sum"] / totals["count"],
    "count": int(totals["count"]),
  }
  if per_class:
    result["confusion_matrix"] = confusion.tolist()
  return result


def predict_logits(
  params: PyTree, model, split: splits.Split, batch_size: int, **apply_kwargs: Any
) -> np.ndarray:
  """float32 [len(split), num_labels]: the classifier's logits of each example, in split
  order (batched as :func:`evaluate` batches them; labels are not needed).

  ``apply_kwargs`` go to the model (e.g. ``features_only=True``: its features instead).
  """
  fn = jax.jit(lambda p, batch: model.apply({"params": p}, batch, **apply_kwargs))
  out = None
  for positions, padded, _ in split.padded_batches(batch_size):
    logits = np.asarray(fn(params, split.batch(padded)), np.float32)
    if out is None:
      out = np.zeros((len(split), logits.shape[-1]), np.float32)
    out[positions] = logits[: len(positions)]
  return np.zeros((0, 0), np.float32) if out is None else out


def lm_eval_step(
  params: PyTree, batch: dict[str, jax.Array], mask: jax.Array, *, model: Any
) -> dict[str, jax.Array]:
  """Sums of next-token loss, correct next tokens and target tokens over the real rows."""
  logits = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"])
  logits = logits.astype(jnp.float32)
  targets = batch["input_ids"][:, 1:]
  weights = (batch["loss_mask"][:, 1:] * mask[:, None]).astype(jnp.float32)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], targets)
  correct = (jnp.argmax(logits[:, :-1], -1) == targets).astype(jnp.float32)
  return {
    "loss_sum": jnp.sum(losses * weights),
    "correct": jnp.sum(correct * weights),
    "tokens": jnp.sum(weights),
    "count": jnp.sum(mask).astype(jnp.float32),
  }


def evaluate_lm(params: PyTree, model, split: splits.Split, batch_size: int) -> dict[str, float]:
  """Token-level metrics of a causal LM over a split (completion tokens and eos only).

  ``loss`` = mean next-token cross-entropy over all target tokens of the split (nats),
  ``perplexity`` = exp(loss), ``token_accuracy`` = the fraction of target tokens that
  are the argmax prediction.
  """
  if len(split) == 0:
    nan = float("nan")
    return {"loss": nan, "perplexity": nan, "token_accuracy": nan, "tokens": 0, "count": 0}
  fn = jax.jit(functools.partial(lm_eval_step, model=model))
  totals = {"loss_sum": 0.0, "correct": 0.0, "tokens": 0.0, "count": 0.0}
  for _, padded, mask in split.padded_batches(batch_size):
    out = fn(params, split.batch(padded), mask)
    for key in totals:
      totals[key] += float(out[key])
  loss = totals["loss_sum"] / max(totals["tokens"], 1.0)
  return {
    "loss": loss,
    "perplexity": float(np.exp(min(loss, 700.0))),
    "token_accuracy": totals["correct"] / max(totals["tokens"], 1.0),
    "tokens": int(totals["tokens"]),
    "count": int(totals["count"]),
  }
