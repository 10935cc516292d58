"""Disparate impact of DP per group: accuracy, its gap between groups, and clipping per group.

DP-SGD costs under-represented groups more accuracy than the majority
(Bagdasaryan et al. 2019, "the poor get poorer"): their gradients are larger
and rarer, so clipping cuts them more and noise drowns them first. The report
compares, group by group, the DP model with a non-private reference on the
same evaluation rows:

* accuracy per group with a 95% bootstrap interval (examples resampled within
  each group), for both models, and the drop DP causes;
* macro accuracy (the mean over groups), worst-group accuracy and the gap
  (best minus worst group), with intervals;
* per group, the fraction of evaluation examples whose gradient at the
  released model exceeds the clip norm, and their mean gradient norm.

Every number is computed from released parameters and evaluation data. The
(ε, δ) of the run is the same for every example, whatever its group; it does
not bound what a group of k examples reveals together (group privacy). The
empirical privacy cost per group, the membership attacks' AUROC within each
label, is in the membership report (it needs training rows).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np


def _interval(values: np.ndarray) -> list[float]:
  low, high = np.quantile(values, [0.025, 0.975])
  return [float(low), float(high)]


def _summaries(correct: np.ndarray, members: list[np.ndarray]) -> np.ndarray:
  """[per-group accuracy..., macro, worst, gap] of one model."""
  per_group = np.array([correct[m].mean() for m in members])
  return np.concatenate([per_group, [per_group.mean(), per_group.min(), np.ptp(per_group)]])


def group_report(
  groups: Sequence[Any],
  correct: Sequence[bool],
  reference_correct: Sequence[bool] | None = None,
  grad_norms: Sequence[float] | None = None,
  clip_norm: float | None = None,
  bootstrap_samples: int = 500,
  seed: int = 0,
) -> dict[str, Any]:
  """Per-group accuracy of a model (and of a reference), with bootstrap intervals.

  Args:
    groups: [n] each evaluation example's group (any hashable label).
    correct: [n] whether the DP model classified the example correctly.
    reference_correct: [n] the same for the non-private reference, or None.
    grad_norms: [n] each example's gradient norm at the DP model, or None.
    clip_norm: C, to report the fraction of examples with norm > C.
    bootstrap_samples: resamples for the intervals.
    seed: the resampling seed.

  Returns:
    ``{"groups": [row per group], "dp": {...}, "reference": {...} or None}``.
  """
  labels = np.asarray([str(g) for g in groups])
  correct = np.asarray(correct, bool)
  if labels.shape != correct.shape or labels.ndim != 1 or labels.size == 0:
    raise ValueError(
      f"groups and correct must be equal-length 1-d (got {labels.shape}, {correct.shape})"
    )
  names = sorted(set(labels.tolist()), key=_natural_key)
  members = [np.flatnonzero(labels == name) for name in names]
  models = {"dp": correct}
  if reference_correct is not None:
    reference = np.asarray(reference_correct, bool)
    if reference.shape != correct.shape:
      raise ValueError("reference_correct must have one entry per example")
    models["reference"] = reference
  rng = np.random.default_rng(seed)
  draws = {name: [] for name in models}
  # A resample keeps each group's size: group i occupies the same slice of every draw.
  edges = np.cumsum([0] + [m.size for m in members])
  resampled = [np.arange(edges[i], edges[i + 1]) for i in range(len(members))]
  for _ in range(bootstrap_samples):
    picks = np.concatenate([rng.choice(m, m.size) for m in members])
    for name, values in models.items():
      draws[name].append(_summaries(values[picks], resampled))
  out: dict[str, Any] = {"groups": [], "reference": None}
  for name, values in models.items():
    point = _summaries(values, members)
    boot = np.asarray(draws[name])
    k = len(names)
    out[name] = {
      "macro_accuracy": float(point[k]),
      "macro_interval": _interval(boot[:, k]),
      "worst_group_accuracy": float(point[k + 1]),
      "worst_group_interval": _interval(boot[:, k + 1]),
      "worst_group": names[int(np.argmin(point[:k]))],
      "gap": float(point[k + 2]),
      "gap_interval": _interval(boot[:, k + 2]),
      "accuracy": float(values.mean()),
    }
  norms = None if grad_norms is None else np.asarray(grad_norms, np.float64)
  for i, name in enumerate(names):
    row: dict[str, Any] = {"group": name, "count": int(members[i].size)}
    for model, values in models.items():
      row[f"{model}_accuracy"] = float(values[members[i]].mean())
      row[f"{model}_interval"] = _interval(np.asarray(draws[model])[:, i])
    if "reference" in models:
      row["accuracy_drop"] = row["reference_accuracy"] - row["dp_accuracy"]
    if norms is not None:
      row["mean_grad_norm"] = float(norms[members[i]].mean())
      if clip_norm is not None:
        row["clipped_fraction"] = float(np.mean(norms[members[i]] > clip_norm))
    out["groups"].append(row)
  return out


def length_bins(lengths: Sequence[int], bins: int = 4) -> list[str]:
  """Each example's token-length quartile (or ``bins``-tile) as a label like ``"len 9-14"``.

  The bins are [e_i, e_(i+1) - 1] between quantile edges e_i, the last one up to the
  longest example; the labels name the lengths each holds (both ends included).
  """
  lengths = np.asarray(lengths)
  edges = np.unique(np.quantile(lengths, np.linspace(0, 1, bins + 1)).round().astype(int))
  if len(edges) < 2:
    return [f"len {int(lengths.min())}-{int(lengths.max())}"] * len(lengths)
  starts = edges[:-1]
  index = np.clip(np.searchsorted(starts, lengths, side="right") - 1, 0, len(starts) - 1)
  ends = [*(edges[1:-1] - 1), int(lengths.max())]
  return [f"len {starts[i]}-{ends[i]}" for i in index]


def _natural_key(name: str) -> tuple:
  """Sort key that orders the numbers in names by value ("len 4-9" before "len 10-14")."""
  return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))
