"""Head-only training on cached features: the frozen backbone runs once per row, not per step.

With ``model.train=head`` a classifier's backbone is frozen, so every step would
recompute the same function of the same rows. When the features are a fixed
function of a row (no dropout), they are computed once before the first step and
the steps run the head alone (:class:`dpjax.models.heads.PooledHead`) on them:

    features_i = backbone_frozen(x_i)          (once per training row)
    loss_i(θ)  = CE(head_θ(features_i), y_i)   (every step: the same loss as uncached)

The head's parameters, per-example gradients, clipping, noise, sampling and ledger
are those of the uncached run: only floating-point summation order differs. The
features stay in memory (they are a function of the private rows, like the token
arrays, and are never written). Evaluation still runs the whole model.

Applies when ``model.cache_features`` (default True), ``model.task=classify``,
``model.train=head`` and ``model.dropout=0`` (dropout makes a row's features random
per step; the uncached path then runs).

The same holds for any frozen bottom of the encoder. When the embeddings and the
first k layers have no trained parameter (LoRA or a ``model.train`` pattern on the
top layers), the input of layer k is computed once per row (:func:`prefix_layers`,
:class:`CachedHidden`) and each step runs layers k.. and the head on it
(``SequenceClassifier(cached_layers=k)``): every epoch after the first saves the
bottom k layers' forward pass. The states are kept at each row's token bucket, in
float32: about N · (mean bucket length) · H · 4 bytes (0.5 GB for 20k SST-2 rows
with MiniLM).
"""

from __future__ import annotations

import os
import re
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import traverse_util

from dpjax.models import heads
from dpjax.train import splits, task

PyTree = Any


def applies(c: ml_collections.ConfigDict) -> bool:
  """Whether the run trains its head on cached features (see the module docstring)."""
  return bool(
    c.model.cache_features
    and c.model.task == "classify"
    and c.model.train == "head"
    and not c.model.dropout
  )


class CachedRows:
  """The training rows as (features, label): the batches of a head-only step.

  Args:
    features: float32 [len(split), H], row p of the split at position p.
    labels: int32 [len(split)].
  """

  def __init__(self, features: np.ndarray, labels: np.ndarray):
    self.features, self.labels = features, labels

  def batch(self, positions: np.ndarray, length: int | None = None) -> dict[str, np.ndarray]:
    """``features`` and ``label`` of the rows at ``positions`` (``length`` is unused)."""
    del length
    return {"features": self.features[positions], "label": self.labels[positions]}


def compute(
  model: heads.SequenceClassifier, params: PyTree, split: splits.Split, batch_size: int
) -> CachedRows:
  """The frozen backbone's features of every row of ``split`` (``params``: the full tree).

  Rows are batched shortest first (:meth:`splits.Split.padded_batches`), so each
  batch is padded only to its own bucket; padding tokens do not change a row's
  features (attention and mean pooling are masked).
  """
  if len(split) == 0:
    raise ValueError("no training rows to compute features of")
  features = task.predict_logits(params, model, split, batch_size, features_only=True)
  labels = np.asarray(split.encoded.labels, np.int32)[split.indices]
  return CachedRows(features, labels)


def head_loss(model: heads.SequenceClassifier) -> heads.TaskLoss:
  """The per-example loss of the head on cached features (trainable = the head's tree)."""
  head = heads.PooledHead(model.backbone, model.num_labels, model.pooling)
  return heads.classification_loss(head)


def prefix_layers(c: ml_collections.ConfigDict, model: Any, trainable: PyTree) -> int:
  """k > 0: the encoder's bottom k layers (and embeddings) are frozen and their output can
  be cached (see the module docstring); 0: they cannot, or nothing would be saved.

  Applies to example-level (or ELS) classifiers with ``model.cache_features``, no
  dropout, and a model other than ``model.train=head`` (which caches the features
  themselves, :func:`applies`).
  """
  if not (
    c.model.cache_features
    and c.model.task == "classify"
    and c.model.train != "head"
    and not c.model.dropout
    and isinstance(model, heads.SequenceClassifier)
    and not (c.dp.enabled and c.dp.unit == "user" and c.dp.user_sampling == "uls")
  ):
    return 0
  paths = ["/".join(map(str, key)) for key in traverse_util.flatten_dict(trainable)]
  layers = model.backbone.num_hidden_layers
  first = layers
  for path in paths:
    if not path.startswith("backbone/"):
      continue
    found = re.match(r"backbone/encoder/layer_(\d+)/", path)
    if found is None:  # embeddings (or anything below the first layer) are trained
      return 0
    first = min(first, int(found.group(1)))
  return first if 0 < first < layers else 0


def hidden_bytes(split: splits.Split, hidden_size: int) -> int:
  """Bytes :func:`compute_hidden` keeps: every row at its bucket length, float32."""
  buckets = np.asarray(split.encoded.buckets)[split.length_groups()]
  return int(buckets.sum()) * hidden_size * 4


def memory_bytes() -> int | None:
  """This machine's physical memory (None where the OS does not say)."""
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError, AttributeError):
    return None


def prefix_loss(model: heads.SequenceClassifier, layers: int, frozen: PyTree) -> heads.TaskLoss:
  """The per-example loss on cached inputs of layer ``layers`` (:class:`CachedHidden`)."""
  return heads.classification_loss(model.clone(cached_layers=layers), frozen)


class CachedHidden:
  """The training rows as the input of encoder layer k: the batches of a cached step.

  Each row's states are kept at the length of its token bucket; :meth:`batch` pads
  them to the batch's length (zeros under masked positions, which attention and
  pooling ignore) beside the rows' own ``attention_mask`` and ``label``.
  """

  def __init__(self, split: splits.Split, states: list[np.ndarray], slot: np.ndarray):
    self.split = split
    self.states = states  # per bucket: float32 [rows of the bucket, bucket length, H]
    self.slot = slot  # [len(split)]: the row's index inside its bucket's array
    self.group = split.length_groups()

  def batch(self, positions: np.ndarray, length: int | None = None) -> dict[str, np.ndarray]:
    """The rows at ``positions``: ``hidden`` [n, L, H], ``attention_mask``, ``label``, ..."""
    out = self.split.batch(positions, length)
    out.pop("input_ids", None)
    out.pop("token_type_ids", None)
    n, padded = out["attention_mask"].shape
    hidden = np.zeros((n, padded, self.states[0].shape[-1]), np.float32)
    groups = self.group[positions]
    for bucket in np.unique(groups):
      rows = np.nonzero(groups == bucket)[0]
      block = self.states[bucket][self.slot[positions[rows]]]
      hidden[rows, : block.shape[1]] = block[:, :padded]
    out["hidden"] = hidden
    return out


def compute_hidden(
  model: heads.SequenceClassifier,
  params: PyTree,
  split: splits.Split,
  layer: int,
  batch_size: int,
) -> CachedHidden:
  """The input of encoder layer ``layer`` for every row of ``split`` (``params``: the full
  tree), computed bucket by bucket in batches of ``batch_size`` rows."""
  if len(split) == 0:
    raise ValueError("no training rows to compute hidden states of")
  fn = jax.jit(lambda p, batch: model.apply({"params": p}, batch, stop_layer=layer))
  groups = split.length_groups()
  slot = np.zeros(len(split), np.int64)
  states = []
  for bucket, length in enumerate(split.encoded.buckets):
    rows = np.nonzero(groups == bucket)[0]
    slot[rows] = np.arange(len(rows))
    block = np.zeros((len(rows), length, model.backbone.hidden_size), np.float32)
    for start in range(0, len(rows), batch_size):
      chunk = rows[start : start + batch_size]
      padded = np.concatenate([chunk, np.full(batch_size - len(chunk), chunk[0])])
      out = np.asarray(fn(params, split.batch(padded, length)), np.float32)
      block[start : start + len(chunk)] = out[: len(chunk)]
    states.append(block)
  return CachedHidden(split, states, slot)
