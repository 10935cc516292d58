"""The train step: a pure function of (state, batch, mask), jitted once per batch shape.

DP:         clipped sum of per-example gradients -> privatizer (noise once, / B) -> optimizer.
Non-DP:     mean gradient over the real examples -> optimizer (the baseline).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from dpjax.privacy import per_example

PyTree = Any


@flax.struct.dataclass
class TrainState:
  """What changes during training (frozen parameters live outside)."""

  step: jax.Array
  params: PyTree
  opt_state: PyTree


def nonprivate_grad(loss_fn: Callable, microbatch_size: int | None = None):
  """``(params, batch, mask) -> (gradient SUM, aux)`` without clipping, for baselines.

  Returns the same aux fields as a clipped-gradient function (norms are zeros);
  the train step divides the sum by the realized number of examples.
  """

  def total_loss(params, batch, mask):
    losses, loss_aux = jax.vmap(lambda ex: loss_fn(params, ex))(batch)
    losses = jnp.where(mask, losses, 0.0)
    return jnp.sum(losses), (losses, loss_aux)

  grad_total = jax.grad(total_loss, has_aux=True)

  def fn(params, batch, mask):
    size = mask.shape[0]
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    total, (losses, loss_aux) = per_example.scan_microbatches(
      lambda b, m: grad_total(params, b, m), batch, mask, microbatch_size or size, zeros
    )
    nonfinite = jnp.sum(mask & ~jnp.isfinite(losses))
    aux = per_example.ClippedGradAux(
      losses=losses,
      norms=jnp.zeros([size]),
      clipped=jnp.zeros([size], bool),
      mask=mask,
      num_examples=jnp.sum(mask),
      clipped_fraction=jnp.zeros([]),
      nonfinite_count=nonfinite,
      loss_aux=loss_aux,
      sensitivity=0.0,
    )
    return total, aux

  return fn


def train_step(
  state: TrainState,
  batches: tuple[dict[str, jax.Array], ...],
  masks: tuple[jax.Array, ...],
  *,
  grad_fn: Callable,
  tx: optax.GradientTransformation,
  mean_of_sum: bool = False,
  dropout_seed: int | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One logical step over a batch given as groups (e.g. one per token-length bucket).

  The gradient sums of the groups add up to the sum over the whole logical
  batch; ``tx`` (privatizer + optimizer) then runs ONCE on it, so under DP the
  noise is drawn once per logical step whatever the number of groups.

  Args:
    state: the train state.
    batches: one batch dict per group; each has its own static shape.
    masks: one [n_g] bool mask per group (False on padding rows).
    grad_fn: ``(params, batch, mask) -> (gradient sum, ClippedGradAux)``.
    tx: the privatizer + optimizer chain (DP) or the optimizer.
    mean_of_sum: divide the summed gradient by the realized count (non-private
      baselines only; DP divides by the expected batch size inside ``tx``).
    dropout_seed: if set, every example gets its own dropout key, a function of
      (seed, step, group, row), so a resumed run draws the same masks.
  """
  if dropout_seed is not None:
    step_key = jax.random.fold_in(jax.random.PRNGKey(dropout_seed), state.step)
    batches = tuple(
      {**b, "dropout_key": jax.random.split(jax.random.fold_in(step_key, g), m.shape[0])}
      for g, (b, m) in enumerate(zip(batches, masks))
    )
  results = [grad_fn(state.params, b, m) for b, m in zip(batches, masks)]
  grads = jax.tree_util.tree_map(lambda *g: sum(g), *[r[0] for r in results])
  auxes = [r[1] for r in results]
  count = sum(a.num_examples for a in auxes)
  if mean_of_sum:
    grads = jax.tree_util.tree_map(lambda g: g / jnp.maximum(count, 1), grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  over_real = lambda f: (
    sum(jnp.sum(jnp.where(a.mask, f(a), 0.0)) for a in auxes) / jnp.maximum(count, 1)
  )
  metrics = {
    "loss": over_real(lambda a: a.losses),
    "accuracy": over_real(lambda a: a.loss_aux["correct"]),
    "clipped_fraction": over_real(lambda a: a.clipped.astype(jnp.float32)),
    "examples": count,
    "nonfinite": sum(a.nonfinite_count for a in auxes),
    "update_norm": optax.tree.norm(updates),
  }
  return TrainState(state.step + 1, params, opt_state), metrics


def eval_step(
  params: PyTree, batch: dict[str, jax.Array], mask: jax.Array, *, model: Any
) -> dict[str, jax.Array]:
  """Sums of loss and correct predictions over the real rows of an eval batch."""
  logits = model.apply({"params": params}, batch)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
  correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
  return {
    "loss_sum": jnp.sum(jnp.where(mask, losses, 0.0)),
    "correct": jnp.sum(jnp.where(mask, correct, 0.0)),
    "count": jnp.sum(mask).astype(jnp.float32),
  }
