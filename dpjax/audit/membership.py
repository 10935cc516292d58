"""Membership inference against a released model, and the bound the privacy ledger puts on it.

Attacks (higher score = "member"):

* **Loss threshold** (Yeom et al. 2018): score = -loss of the example.
* **Offline LiRA** (Carlini et al. 2022, section VI-C): shadow models trained
  WITHOUT the target give its "out" distribution of the logit-scaled
  confidence φ = log(p_y / (1 - p_y)); score = (φ_target - mean_out) / std_out.
  With few shadows the per-example std is noisy; a global std (pooled over
  every target) is used unless ``per_example_std`` (Carlini et al.'s advice).

The report gives AUROC and TPR at FPR 0.1% and 1%, each with a 95% interval
(:mod:`dpjax.audit.statistics`): the AUROC of the empirical ROC (Mann–Whitney)
with a BCa bootstrap interval, and the TPR at a threshold set on the
non-members with a distribution-free interval that includes the threshold's
own uncertainty (flagged when there are too few non-members for the FPR),
next to the most any attack can achieve against the run: an (ε(δ), δ)-DP
mechanism has TPR <= e^ε·FPR + δ(ε) and
TPR <= 1 - e^-ε·(1 - δ(ε) - FPR) for every ε of its privacy profile δ(ε)
(Kairouz et al. 2015), so

    TPR_max(FPR) = min over ε of min(e^ε·FPR + δ(ε), 1 - e^-ε·(1 - δ(ε) - FPR), 1).

The bound is per example; an attack's average over many members and
non-members at one threshold obeys it too (the bound is concave in FPR).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from dpjax.audit import statistics
from dpjax.privacy import accounting

#: The false positive rates the reports quote TPR at.
REPORT_FPRS = (0.001, 0.01)


def loss_scores(losses: Sequence[float]) -> np.ndarray:
  """The loss-threshold attack's scores: -loss (low loss -> member)."""
  return -np.asarray(losses, np.float64)


def logit_confidence(label_probabilities: Sequence[float]) -> np.ndarray:
  """φ = log(p / (1 - p)) of the probability of the true label, computed stably."""
  p = np.clip(np.asarray(label_probabilities, np.float64), 1e-300, 1.0)
  return np.log(p) - np.log1p(-np.minimum(p, 1 - 1e-16))


def lira_offline_scores(
  target_phi: Sequence[float], shadow_out_phi: np.ndarray, per_example_std: bool = False
) -> np.ndarray:
  """Offline LiRA scores: how far above its OUT distribution each target's φ lies.

  Args:
    target_phi: [n] φ of each example under the attacked model.
    shadow_out_phi: [shadows, n] φ of each example under shadow models that did
      not train on it.
    per_example_std: use each example's own std over shadows (needs many
      shadows) instead of one pooled std.
  """
  target = np.asarray(target_phi, np.float64)
  shadows = np.asarray(shadow_out_phi, np.float64)
  if shadows.ndim != 2 or shadows.shape[1] != target.shape[0] or shadows.shape[0] < 1:
    raise ValueError(
      f"shadow_out_phi must be [shadows >= 1, {target.shape[0]}] (got {shadows.shape})"
    )
  mean = shadows.mean(axis=0)
  if per_example_std and shadows.shape[0] >= 2:
    std = shadows.std(axis=0, ddof=1)
  else:
    spread = shadows - mean if shadows.shape[0] >= 2 else target[None] - mean
    std = np.full_like(mean, np.sqrt(np.mean(spread**2)))
  return (target - mean) / np.maximum(std, 1e-6)


@dataclasses.dataclass(frozen=True)
class AttackResult:
  """One attack's metrics with 95% intervals, and the ledger's bound beside them.

  Attributes:
    attack: the attack's name.
    members: members scored.
    non_members: non-members scored.
    auroc: area under the empirical ROC curve (Mann–Whitney: P(member score >
      non-member score) + P(tie)/2); ``auroc_interval`` its BCa bootstrap interval,
      ``interval_method`` how it was computed, ``auroc_note`` a warning or None.
    auroc_hull: area under the ROC hull (randomized thresholds; biased upward,
      >= 0.5 even for uninformative scores).
    tpr_at_fpr: {fpr: TPR at a threshold set on the non-members}; ``tpr_intervals``
      {fpr: (low, high)}, ``tpr_interval_method`` how, ``tpr_at_fpr_note`` {fpr:
      warning} for the FPRs the non-members are too few for.
    max_tpr_at_fpr: {fpr: the ledger's bound}, or None without a ledger.
    roc: (FPR, TPR) points of the ROC hull.
  """

  attack: str
  members: int
  non_members: int
  auroc: float
  auroc_interval: tuple[float, float]
  interval_method: str
  auroc_note: str | None
  auroc_hull: float
  tpr_at_fpr: dict[float, float]
  tpr_intervals: dict[float, tuple[float, float]]
  tpr_interval_method: str
  tpr_at_fpr_note: dict[float, str]
  max_tpr_at_fpr: dict[float, float] | None
  roc: tuple[np.ndarray, np.ndarray] = dataclasses.field(repr=False)

  def to_dict(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    out["roc"] = {"fpr": self.roc[0].tolist(), "tpr": self.roc[1].tolist()}
    for key in ("tpr_at_fpr", "tpr_intervals", "tpr_at_fpr_note", "max_tpr_at_fpr"):
      if out[key] is not None:
        out[key] = {f"{fpr:g}": value for fpr, value in out[key].items()}
    return out


def evaluate_attack(
  attack: str,
  member_scores: Sequence[float],
  non_member_scores: Sequence[float],
  ledger: accounting.PrivacyLedger | None = None,
  fprs: Sequence[float] = REPORT_FPRS,
  bootstrap_samples: int = 2000,
  seed: int = 0,
) -> AttackResult:
  """The metrics of one attack's scores (members = positives), with 95% intervals.

  AUROC: BCa bootstrap over ``bootstrap_samples`` resamples (members and
  non-members resampled separately); TPR at each FPR: the distribution-free
  interval of :func:`statistics.tpr_at_fpr_interval` (no resampling).
  """
  audit = statistics.ScoreAudit(member_scores, non_member_scores)
  auroc = statistics.auroc_interval(
    audit.in_scores, audit.out_scores, bootstrap_samples, confidence=0.95, seed=seed
  )
  tpr, intervals, notes, tpr_method = {}, {}, {}, ""
  for fpr in fprs:
    estimate, interval = statistics.tpr_at_fpr_interval(
      audit.in_scores, audit.out_scores, fpr, confidence=0.95
    )
    tpr[fpr], intervals[fpr], tpr_method = estimate, (interval.low, interval.high), interval.method
    if interval.note:
      notes[fpr] = interval.note
  bound = None
  if ledger is not None:
    bound = {fpr: float(ledger.tpr_bound(fpr)) for fpr in fprs}
  return AttackResult(
    attack=attack,
    members=audit.num_in,
    non_members=audit.num_out,
    auroc=audit.empirical_auroc(),
    auroc_interval=(auroc.low, auroc.high),
    interval_method=auroc.method,
    auroc_note=auroc.note,
    auroc_hull=audit.auroc(),
    tpr_at_fpr=tpr,
    tpr_intervals=intervals,
    tpr_interval_method=tpr_method,
    tpr_at_fpr_note=notes,
    max_tpr_at_fpr=bound,
    roc=audit.roc(),
  )
