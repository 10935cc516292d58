"""The optimizer of a run, chained after the mechanism's privatizer, and the train state's shape."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from dpjax.privacy import mechanism as mechanism_lib
from dpjax.train import step as step_lib

PyTree = Any


def optimizer(c: ml_collections.ConfigDict, steps: int) -> optax.GradientTransformation:
  """AdamW or SGD with linear warmup, then linear decay to 0 (or constant)."""
  lr, warmup = c.train.learning_rate, c.train.warmup_steps
  if c.train.schedule == "linear":
    decay = optax.linear_schedule(lr, 0.0, max(1, steps - warmup))
  else:
    decay = optax.constant_schedule(lr)
  schedule = (
    optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])
    if warmup
    else decay
  )
  if c.train.optimizer == "sgd":
    return optax.sgd(schedule, momentum=c.train.momentum or None)
  return optax.adamw(schedule, weight_decay=c.train.weight_decay)


def transform(
  privatizer: optax.GradientTransformation, c: ml_collections.ConfigDict, steps: int
) -> optax.GradientTransformationExtraArgs:
  """The mechanism's privatizer (gradient sum -> direction), then the optimizer."""
  return optax.chain(privatizer, optimizer(c, steps))


def abstract_state(spec: mechanism_lib.MechanismSpec, c: ml_collections.ConfigDict, trainable):
  """A TrainState with the structure of the run's (what a checkpoint restores into)."""
  tx = transform(mechanism_lib.privatizer_template(spec), c, 1)
  state = step_lib.TrainState(jnp.zeros([], jnp.int32), trainable, tx.init(trainable))
  return jax.tree_util.tree_map(np.asarray, state)
