"""The train step: a pure function of (state, batch, mask), jitted once per batch shape.

    gradient sum (grad_fn) -> tx = privatizer + optimizer -> new params

Both pieces come from the run's :class:`dpjax.privacy.mechanism.Mechanism`: the
clipped sum and the Gaussian privatizer (noise once, / expected B) under DP; the
plain sum and the mean over the realized examples for the non-private baseline.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from dpjax.privacy import quantile

PyTree = Any


@flax.struct.dataclass
class TrainState:
  """What changes during training (frozen parameters live outside)."""

  step: jax.Array
  params: PyTree
  opt_state: PyTree


def train_step(
  state: TrainState,
  batches: tuple[dict[str, jax.Array], ...],
  masks: tuple[jax.Array, ...],
  *,
  grad_fn: Callable,
  tx: optax.GradientTransformation,
  dropout_seed: int | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One logical step over a batch given as groups (e.g. one per token-length bucket).

  The gradient sums of the groups add up to the sum over the whole logical
  batch; ``tx`` (privatizer + optimizer) then runs ONCE on it, so under DP the
  noise is drawn once per logical step whatever the number of groups.

  Args:
    state: the train state.
    batches: one batch dict per group; each has its own static shape.
    masks: one [n_g] bool mask per group (False on padding rows), or [units, k] when
      every k consecutive rows are one user (user-level sampling).
    grad_fn: ``(params, batch, mask) -> (gradient sum, ClippedGradAux)``.
    tx: the mechanism's privatizer chained with the optimizer. It receives the
      realized count as ``num_examples=`` (the non-private privatizer divides by
      it; the Gaussian privatizer divides by the expected batch size) and the
      count of kept rows within the clip bound as ``unclipped_examples=`` (the
      quantile privatizer's noisy count; the others ignore it). With adaptive
      clipping, ``grad_fn`` clips with the bound C_t held in ``opt_state``.
    dropout_seed: if set, every example gets its own dropout key, a function of
      (seed, step, group, row), so a resumed run draws the same masks.
  """
  if dropout_seed is not None:
    step_key = jax.random.fold_in(jax.random.PRNGKey(dropout_seed), state.step)
    batches = tuple(
      {**b, "dropout_key": jax.random.split(jax.random.fold_in(step_key, g), m.size)}
      for g, (b, m) in enumerate(zip(batches, masks))
    )
  # Adaptive clipping: clip with the bound C_t of the privatizer's state (a traced scalar).
  clip_norm = quantile.current_clip_norm(state.opt_state)
  if clip_norm is not None:
    grad_fn = grad_fn.with_clip_norm(clip_norm)
  results = [grad_fn(state.params, b, m) for b, m in zip(batches, masks)]
  grads = jax.tree_util.tree_map(lambda *g: sum(g), *[r[0] for r in results])
  auxes = [r[1] for r in results]
  count = sum(a.num_examples for a in auxes)
  unclipped = count - sum(jnp.sum(a.clipped) for a in auxes)  # kept rows with norm <= bound
  tx = optax.with_extra_args_support(tx)
  updates, opt_state = tx.update(
    grads, state.opt_state, state.params, num_examples=count, unclipped_examples=unclipped
  )
  params = optax.apply_updates(state.params, updates)
  over_real = lambda f: (
    sum(jnp.sum(jnp.where(a.mask, f(a), 0.0)) for a in auxes) / jnp.maximum(count, 1)
  )
  metrics = {
    "loss": over_real(lambda a: a.losses),
    **(
      {"accuracy": over_real(lambda a: a.loss_aux["correct"])}
      if "correct" in auxes[0].loss_aux
      else {"tokens": over_real(lambda a: a.loss_aux["tokens"])}  # mean targets per example
    ),
    "clipped_fraction": over_real(lambda a: a.clipped.astype(jnp.float32)),
    "examples": count,
    "nonfinite": sum(a.nonfinite_count for a in auxes),
    "update_norm": optax.tree.norm(updates),
    # The bound this step clipped with: a function of released noisy counts, so public.
    **({"clip_norm": clip_norm} if clip_norm is not None else {}),
  }
  return TrainState(state.step + 1, params, opt_state), metrics
