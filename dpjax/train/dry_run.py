"""What a config's run would do, without running it: ``python -m dpjax.main --dry_run``.

    python -m dpjax.main --config=experiments/sst2.py:quick --dry_run [--config.KEY=...]

Reads the config, the tokenizer and the training data (to count N, as the run
does), calibrates σ exactly as the run would, and sizes the model from its
shapes alone (``jax.eval_shape``: no pretrained weight is read, nothing is
compiled). Nothing is written, no workdir is needed, no secret is drawn: the
plan below is a function of the config and N, which are public.

Printed:

* data: N (and the users of a user-level run), the source;
* sampling: expected batch B, q = B/N, steps, epochs;
* privacy: σ, δ, the ε budget, and ε(δ) of the whole planned run (releases
  included) from the run's accountant;
* model: parameters (all / trainable) and the memory of the weights and the
  optimizer state in float32 (activations come on top and grow with the
  microbatch size and sequence length).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from dpjax.privacy import mechanism as mechanism_lib
from dpjax.train import config as config_lib
from dpjax.train import loop, optimizer, splits
from dpjax.train import task as task_lib


@dataclasses.dataclass(frozen=True)
class DryRun:
  """The plan of a run (see the module docstring); every field is public."""

  mechanism: mechanism_lib.Mechanism
  source: str
  planned_epsilon: float
  parameters: int
  trainable: int
  weight_bytes: int
  optimizer_bytes: int


def _bytes(tree: Any) -> int:
  return sum(
    math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
    for leaf in jax.tree_util.tree_leaves(tree)
  )


def plan(c: ml_collections.ConfigDict) -> DryRun:
  """The dry run of config ``c``.

  Raises:
    ConfigError, DataError, PretrainedError: as the run itself would, before training.
  """
  config_lib.validate(c)
  params, tokenizer = task_lib.abstract_params(c)
  cache = Path(c.data.cache_dir) if c.data.cache_dir else None
  train, canaries = splits.training_split(c, tokenizer, cache)
  num_users = splits.count_users(train) if c.dp.unit == "user" else None
  mechanism = loop.plan_mechanism(c, len(train), num_users)  # the run's own calibration
  trainable, _ = task_lib.split_trainable(c, params)
  tx = optimizer.transform(mechanism_lib.privatizer_template(mechanism.spec), c, 1)
  source = str(c.data.train)
  if c.data.train_fraction < 1:
    source += f" (data.train_fraction={c.data.train_fraction:g})"
  if canaries:
    source += f" + {canaries} audit canaries"
  return DryRun(
    mechanism=mechanism,
    source=source,
    planned_epsilon=mechanism.planned_epsilon() if mechanism.private else math.inf,
    parameters=sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(params)),
    trainable=sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(trainable)),
    weight_bytes=_bytes(params),
    optimizer_bytes=_bytes(jax.eval_shape(tx.init, trainable)),
  )


def _size(num_bytes: int) -> str:
  for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if num_bytes >= scale:
      return f"{num_bytes / scale:,.1f} {unit}"
  return f"{num_bytes} B"


def describe(run: DryRun) -> str:
  """The lines ``--dry_run`` prints."""
  m = run.mechanism
  units = f"{m.population:,} users ({m.dataset_size:,} rows)" if m.spec.samples_users else None
  lines = [
    "dry run: nothing is trained or written",
    f"data:     N={m.dataset_size:,} from {run.source}"
    + (
      f"; {m.num_users:,} users, at most {m.spec.max_examples_per_user} rows each"
      if m.user_level
      else ""
    ),
    f"sampling: Poisson, expected batch B={m.expected_batch_size:g} "
    f"{'users' if m.spec.samples_users else 'examples'}, q={m.sampling_prob:.5f}, "
    f"steps={m.steps:,} "
    f"(epochs={m.steps * m.sampling_prob:.2f} over {units or f'{m.dataset_size:,} rows'})",
  ]
  if m.private:
    budget = "none" if m.epsilon_budget is None else f"{m.epsilon_budget:g}"
    lines.append(
      f"privacy:  sigma={m.noise_multiplier:.4f} delta={m.delta:.3g} epsilon budget={budget}; "
      f"the planned run spends epsilon={run.planned_epsilon:.3f} ({m.spec.accountant}"
      + (f"; with {len(m.releases)} one-off release(s) in the ledger" if m.releases else "")
      + ")"
    )
  else:
    lines.append("privacy:  none (dp.enabled=False): epsilon=inf")
  lines.append(
    f"model:    {run.parameters:,} parameters, {run.trainable:,} trainable; weights "
    f"{_size(run.weight_bytes)} + optimizer state {_size(run.optimizer_bytes)} "
    "(activations on top: they grow with dp.microbatch_size and data.max_length)"
  )
  return "\n".join(lines)
