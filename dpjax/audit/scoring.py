"""Per-example statistics of a trained classifier: loss, true-label probability, gradient norm."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dpjax.privacy import clipping, per_example
from dpjax.train import splits

PyTree = Any


def example_stats(params: PyTree, model, split: splits.Split, batch_size: int = 64) -> dict:
  """``loss``, ``label_probability`` and ``correct`` of every example of ``split``, in order."""

  @jax.jit
  def stats(params, batch):
    logits = model.apply({"params": params}, batch).astype(jnp.float32)
    log_probs = jax.nn.log_softmax(logits)
    label_log_prob = jnp.take_along_axis(log_probs, batch["label"][:, None], axis=1)[:, 0]
    return -label_log_prob, jnp.argmax(logits, -1) == batch["label"]

  n = len(split)
  losses, correct = np.zeros(n), np.zeros(n, bool)
  for positions, padded, _ in split.padded_batches(batch_size):
    loss, right = jax.device_get(stats(params, split.batch(padded)))
    losses[positions] = loss[: len(positions)]
    correct[positions] = right[: len(positions)]
  return {"loss": losses, "label_probability": np.exp(-losses), "correct": correct}


def gradient_norms(
  trainable: PyTree, loss_fn, split: splits.Split, batch_size: int = 64
) -> np.ndarray:
  """Each example's gradient norm (w.r.t. the trained parameters) at ``trainable``.

  Computed by the same per-example backend as training (book-keeping when the
  model allows it), without clipping.
  """
  grad_fn = per_example.clipped_grad(loss_fn, clipping.FlatClip(1.0), has_aux=True)
  run = jax.jit(grad_fn)
  norms = np.zeros(len(split))
  for positions, padded, mask in split.padded_batches(batch_size):
    _, aux = run(trainable, split.batch(padded), mask)
    norms[positions] = np.asarray(aux.norms)[: len(positions)]
  return norms
