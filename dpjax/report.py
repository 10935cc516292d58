"""Plots of a run: training loss, eval accuracy and ε spent against the step.

    python -m dpjax.report --workdir=DIR        # writes DIR/plots/{loss,eval_accuracy,epsilon}.png
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import app, flags

from dpjax.train import metrics as metrics_lib

_WORKDIR = flags.DEFINE_string("workdir", None, "A dpjax.main workdir.")


def write_plots(workdir: str | Path) -> list[Path]:
  """Writes the PNG plots of ``workdir/metrics.jsonl``; returns their paths."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  rows = metrics_lib.read(workdir)
  out_dir = Path(workdir) / "plots"
  out_dir.mkdir(exist_ok=True)
  series = [
      ("loss", "train", "loss", "training loss (mean over the sampled batch)"),
      ("eval_accuracy", "eval", "accuracy", "eval accuracy"),
      ("epsilon", "train", "epsilon", "ε spent (privacy ledger)"),
  ]
  written = []
  for name, split, key, title in series:
    points = [(r["step"], r[key]) for r in rows
              if r.get("split") == split and isinstance(r.get(key), (int, float))]
    if not points:
      continue
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
  for path in write_plots(_WORKDIR.value):
    print(path)


if __name__ == "__main__":
  app.run(main)
