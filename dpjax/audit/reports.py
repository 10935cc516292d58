"""The audit reports of a trained run: membership inference, disparate impact, white-box step.

Each report is a JSON-able dict that states what it was computed from:

* ``membership``: the released parameters, the pretrained (initial) parameters,
  training rows (members) and held-out rows of the same file (non-members).
  It measures leakage for the data owner; it reads private rows, so the report
  itself is not a release covered by (ε, δ).
* ``groups``: released parameters (of the run and of a non-private reference
  run) and the public evaluation split only.
* ``whitebox``: no data at all: canary gradients through the run's mechanism
  (its clip rule and σ) with a fresh secret.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np

from dpjax import privacy
from dpjax.audit import groups as groups_lib
from dpjax.audit import membership as membership_lib
from dpjax.audit import scoring, whitebox
from dpjax.models import lora
from dpjax.privacy.secret import RunSecret
from dpjax.train import config as config_lib
from dpjax.train import splits
from dpjax.train import task as task_lib
from dpjax.train.config import ConfigError
from dpjax.trained import Trained, load_trained

GROUP_BY = ("label", "length")


def _cache_dir(workdir: Path, trained: Trained) -> Path | None:
  if trained.config.data.cache_dir:
    return Path(trained.config.data.cache_dir)
  default = workdir / "token_cache"
  return default if default.is_dir() else None


def _subsample(split: splits.Split, limit: int | None, rng: np.random.Generator) -> splits.Split:
  if limit is None or len(split) <= limit:
    return split
  return splits.Split(split.encoded, np.sort(rng.choice(split.indices, limit, replace=False)))


def _privacy(trained: Trained) -> tuple[privacy.PrivacyLedger, float, float]:
  ledger = privacy.PrivacyLedger.from_dict(trained.ledger)
  delta = trained.mechanism.get("delta")
  if delta is None:
    raise ConfigError("the run's checkpoint does not state its privacy plan (delta)")
  return ledger, ledger.epsilon(delta), delta


def _json_number(x: float) -> float | str:
  return x if math.isfinite(x) else str(x)


def membership(
  workdir: str | Path,
  *,
  max_rows: int = 2000,
  bootstrap_samples: int = 200,
  seed: int = 0,
  batch_size: int = 64,
) -> dict[str, Any]:
  """Loss-threshold and pretrained-calibrated loss attacks on members vs non-members.

  Members are training rows; non-members are the rows of the training file
  that ``data.train_fraction`` left out (same distribution), or the eval split
  when the run trained on the whole file (a different distribution can make
  the attack look stronger than it is; the report says which).
  """
  workdir = Path(workdir)
  trained = load_trained(workdir)
  c = trained.config
  rng = np.random.default_rng(seed)
  cache = _cache_dir(workdir, trained)
  train = splits.load_split(
    c.data.train, trained.tokenizer, c, cache, fraction=c.data.train_fraction, seed=c.seed
  )
  left_out = np.setdiff1d(np.arange(len(train.encoded)), train.indices)
  if len(left_out) >= 2:
    outside = splits.Split(train.encoded, left_out)
    source = f"rows of {c.data.train} outside the training subset (data.train_fraction)"
  else:
    outside = splits.load_split(c.data.eval, trained.tokenizer, c, cache, seed=c.seed + 1)
    source = f"{c.data.eval} (another split: the attack may look stronger than it is)"
  members, non_members = _subsample(train, max_rows, rng), _subsample(outside, max_rows, rng)
  task = task_lib.build(c)
  initial = lora.combine(task.trainable, task.frozen)
  scores = {}
  for name, split in (("members", members), ("non_members", non_members)):
    final = scoring.example_stats(trained.params, trained.model, split, batch_size)
    start = scoring.example_stats(initial, trained.model, split, batch_size)
    scores[name] = {
      "loss": membership_lib.loss_scores(final["loss"]),
      "loss_vs_pretrained": start["loss"] - final["loss"],
    }
  ledger, epsilon, delta = _privacy(trained)
  attacks = [
    membership_lib.evaluate_attack(
      attack,
      scores["members"][attack],
      scores["non_members"][attack],
      ledger,
      bootstrap_samples=bootstrap_samples,
      seed=seed,
    ).to_dict()
    for attack in ("loss", "loss_vs_pretrained")
  ]
  return {
    "report": "membership",
    "workdir": str(workdir),
    "step": trained.step,
    "epsilon": _json_number(epsilon),
    "delta": delta,
    "ledger": trained.ledger,
    "members": f"{len(members)} rows of the training subset",
    "non_members": f"{len(non_members)} {source}",
    "computed_from": (
      "released and pretrained parameters, training rows and held-out rows: a leakage "
      "measurement for the data owner, not itself a release covered by (epsilon, delta)"
    ),
    "attacks": attacks,
  }


def groups(
  workdir: str | Path,
  *,
  reference: str | Path | None = None,
  group_by: str = "label",
  bootstrap_samples: int = 500,
  seed: int = 0,
  batch_size: int = 64,
) -> dict[str, Any]:
  """Per-group accuracy of the run (and of a non-private reference run) on the eval split."""
  if group_by not in GROUP_BY:
    raise ConfigError(f"--group_by must be one of {GROUP_BY} (got {group_by!r})")
  workdir = Path(workdir)
  trained = load_trained(workdir)
  c = trained.config
  evals = splits.load_split(
    c.data.eval,
    trained.tokenizer,
    c,
    _cache_dir(workdir, trained),
    limit=c.data.eval_limit,
    seed=c.seed + 1,
  )
  stats = scoring.example_stats(trained.params, trained.model, evals, batch_size)
  reference_correct = None
  if reference is not None:
    other = load_trained(reference)
    if (other.config.data.eval, other.config.data.eval_limit, other.config.seed) != (
      c.data.eval,
      c.data.eval_limit,
      c.seed,
    ) or other.config.data.max_length != c.data.max_length:
      raise ConfigError(
        f"--reference={reference} evaluates on other rows (data.eval, data.eval_limit, seed "
        "or data.max_length differ): it cannot be compared group by group"
      )
    reference_correct = scoring.example_stats(other.params, other.model, evals, batch_size)[
      "correct"
    ]
  task = task_lib.build(c)
  norms = scoring.gradient_norms(trained.trainable, task.loss(trained.frozen), evals, batch_size)
  if group_by == "label":
    labels = [f"label {y}" for y in evals.encoded.labels[evals.indices]]
  else:
    labels = groups_lib.length_bins(evals.encoded.lengths[evals.indices])
  report = groups_lib.group_report(
    labels,
    stats["correct"],
    reference_correct,
    norms,
    clip_norm=c.dp.clip_norm if c.dp.enabled else None,
    bootstrap_samples=bootstrap_samples,
    seed=seed,
  )
  _, epsilon, delta = _privacy(trained)
  return {
    "report": "groups",
    "workdir": str(workdir),
    "reference_workdir": None if reference is None else str(reference),
    "group_by": group_by,
    "eval": f"{len(evals)} rows of {c.data.eval}",
    "epsilon": _json_number(epsilon),
    "delta": delta,
    "epsilon_per_group": (
      "the same (epsilon, delta) for every example in every group; it does not bound what "
      "several examples of one group reveal together"
    ),
    "computed_from": "released parameters and the public evaluation split only",
    **report,
  }


def whitebox_report(
  workdir: str | Path, *, trials: int = 100_000, seed: int | None = None
) -> dict[str, Any]:
  """The white-box step audit of the run's mechanism: its clip rule and σ, a fresh secret."""
  workdir = Path(workdir)
  trained = load_trained(workdir)
  c = trained.config
  base = {
    "report": "whitebox",
    "workdir": str(workdir),
    "computed_from": "no data: canary gradients through the run's clip rule and noise",
  }
  sigma = trained.mechanism.get("noise_multiplier") or 0.0
  if not c.dp.enabled or sigma <= 0:
    return {**base, "applicable": False, "why": "the run claims no privacy (dp.enabled=False)"}
  spec = dataclasses.replace(
    config_lib.mechanism_spec(c),
    noise_multiplier=float(sigma),
    target_epsilon=None,
    epsilon_budget=None,
    backend="vmap",
    microbatch_size=8,
  )
  background = 31
  plan = privacy.make_mechanism(
    spec, dataset_size=max(trained.mechanism["dataset_size"], 64), expected_batch_size=32.0, steps=1
  ).keyed(RunSecret.fresh())
  result = whitebox.audit_step(plan, trials=trials, background=background, seed=seed)
  return {
    **base,
    "applicable": True,
    "noise_multiplier": sigma,
    "clip_rule": repr(spec.clip),
    "claim": "one step of the Gaussian mechanism, no subsampling: (1/sigma)-GDP",
    **result.to_dict(),
  }


def summary_line(report: dict[str, Any]) -> str:
  """One line that states a report's result (what ``python -m dpjax.audit`` prints)."""
  if report["report"] == "membership":
    parts = [
      f"{a['attack']}: AUROC {a['auroc']:.3f}, TPR@1%FPR {a['tpr_at_fpr']['0.01']:.4f} "
      f"(bound {a['max_tpr_at_fpr']['0.01']:.4f})"
      for a in report["attacks"]
    ]
    return f"membership (epsilon {report['epsilon']}): " + "; ".join(parts)
  if report["report"] == "groups":
    dp = report["dp"]
    text = f"groups by {report['group_by']}: DP gap {dp['gap']:.3f}, worst {dp['worst_group']}"
    if report["reference"]:
      text += f" (non-private reference gap {report['reference']['gap']:.3f})"
    return text
  if not report["applicable"]:
    return f"whitebox: not applicable ({report['why']})"
  verdict = "VIOLATED" if report["violated"] else "consistent"
  return (
    f"whitebox: claimed epsilon {report['claimed_epsilon']:.3f} per step at delta "
    f"{report['delta']:g}; lower bound {report['epsilon_lb']:.3f} (GDP fit "
    f"{report['epsilon_gdp']:.3f}): {verdict}"
  )
