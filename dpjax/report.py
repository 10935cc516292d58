"""Plots of a run: eval accuracy (or perplexity) and ε spent against the step, and (operator) loss.

    python -m dpjax.report --workdir=DIR        # writes DIR/plots/{eval_accuracy,epsilon}.png

It also lists the audit reports of ``python -m dpjax.audit`` (``DIR/audit/``), one line each.

The default plots are public: evaluation on the held-out split and the ledger's
ε. A run with ``train.private_metrics`` also gets ``private_loss.png``, the loss
on the private batches, titled as not covered by (ε, δ).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from absl import app, flags

from dpjax import _cli
from dpjax.train import metrics as metrics_lib

_WORKDIR = flags.DEFINE_string("workdir", None, "A dpjax.main workdir.")


def write_plots(workdir: str | Path) -> list[Path]:
  """Writes the PNG plots of ``workdir/metrics.jsonl``; returns their paths."""
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  public, private = metrics_lib.read(workdir), metrics_lib.read(workdir, private=True)
  out_dir = Path(workdir) / "plots"
  series = [
    ("eval_accuracy", public, "eval", "accuracy", "eval accuracy (held-out split)"),
    ("eval_perplexity", public, "eval", "perplexity", "eval perplexity (causal LM, held-out)"),
    ("epsilon", public, "privacy", "epsilon", "ε spent (privacy ledger)"),
    (
      "private_loss",
      private,
      "train",
      "loss",
      "training loss on the private batches\nOPERATOR ONLY: not covered by (ε, δ)",
    ),
  ]
  written = []
  for name, rows, split, key, title in series:
    points = [
      (r["step"], r[key])
      for r in rows
      if r.get("split") == split and isinstance(r.get(key), (int, float))
    ]
    if not points:
      continue
    out_dir.mkdir(exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    ax.plot(*zip(*points), marker="o", markersize=3)
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out_dir / f"{name}.png"
    fig.savefig(path)
    plt.close(fig)
    written.append(path)
  return written


def main(argv):
  if len(argv) > 1 or not _WORKDIR.value:
    print("error: usage: python -m dpjax.report --workdir=DIR", file=sys.stderr)
    sys.exit(2)
  if not (Path(_WORKDIR.value) / "metrics.jsonl").is_file():
    print(f"error: {_WORKDIR.value}/metrics.jsonl not found", file=sys.stderr)
    sys.exit(2)
  try:
    written = write_plots(_WORKDIR.value)
  except ValueError as err:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)
  if not written:
    print(f"error: {_WORKDIR.value}/metrics.jsonl holds no rows to plot yet", file=sys.stderr)
    sys.exit(2)
  for path in written:
    print(path)
  for line in audit_lines(_WORKDIR.value):
    print(line)


def audit_lines(workdir: str | Path) -> list[str]:
  """A summary line and the figures of each report in ``workdir/audit`` (none: [])."""
  from dpjax.audit import reports  # pylint: disable=import-outside-toplevel

  lines = []
  for path in sorted((Path(workdir) / "audit").glob("*.json")):
    try:
      lines.append(reports.summary_line(json.loads(path.read_text())))
    except (OSError, ValueError, KeyError, TypeError):
      continue
    lines += [str(p) for p in sorted(path.parent.glob(f"{path.stem}*.png"))]
  return lines


if __name__ == "__main__":
  app.run(main, flags_parser=_cli.parse_flags)
