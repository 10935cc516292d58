"""PNG figures of the audit reports: ROC curves on log axes, per-group bars with intervals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dpjax.privacy import accounting


def _pyplot():
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  return plt


def roc_plot(report: dict[str, Any], ledger: accounting.PrivacyLedger, path: Path) -> Path:
  """Each attack's ROC and the ledger's bound on any attack, log-log."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(5, 4.2), dpi=120)
  grid = np.logspace(-4, 0, 200)
  for attack in report["attacks"]:
    fpr, tpr = np.asarray(attack["roc"]["fpr"]), np.asarray(attack["roc"]["tpr"])
    keep = fpr > 0
    ax.plot(fpr[keep], tpr[keep], label=f"{attack['attack']} (AUROC {attack['auroc']:.3f})")
  ax.plot(grid, ledger.tpr_bound(grid), "k--", label="bound from the ledger")
  ax.plot(grid, grid, ":", color="gray", label="chance")
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlim(1e-4, 1)
  ax.set_ylim(1e-4, 1.05)
  ax.set_xlabel("false positive rate")
  ax.set_ylabel("true positive rate")
  eps = report["epsilon"]
  eps_text = f"ε = {eps:.2f}" if isinstance(eps, float) else "no privacy"
  ax.set_title(f"membership inference ({eps_text})", fontsize=10)
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=7, loc="lower right")
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path


def group_plot(report: dict[str, Any], path: Path) -> Path:
  """Accuracy per group (DP and reference) with 95% bootstrap intervals."""
  plt = _pyplot()
  rows = report["groups"]
  models = ["dp"] + (["reference"] if report.get("reference") else [])
  fig, ax = plt.subplots(figsize=(max(4, 1.3 * len(rows) + 1), 3.6), dpi=120)
  width = 0.8 / len(models)
  x = np.arange(len(rows))
  for k, model in enumerate(models):
    acc = np.array([r[f"{model}_accuracy"] for r in rows])
    low = acc - np.array([r[f"{model}_interval"][0] for r in rows])
    high = np.array([r[f"{model}_interval"][1] for r in rows]) - acc
    label = "DP model" if model == "dp" else "non-private reference"
    ax.bar(
      x + (k - (len(models) - 1) / 2) * width, acc, width, yerr=[low, high], capsize=3, label=label
    )
  ax.set_xticks(x, [f"{r['group']}\n(n={r['count']})" for r in rows], fontsize=8)
  ax.set_ylabel("accuracy")
  ax.set_ylim(0, 1)
  ax.set_title(f"accuracy per group ({report['group_by']}), eval split", fontsize=10)
  ax.legend(fontsize=8, loc="best", framealpha=0.9)
  ax.grid(alpha=0.3, axis="y")
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path
