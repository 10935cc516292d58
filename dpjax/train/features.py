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
"""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np

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
