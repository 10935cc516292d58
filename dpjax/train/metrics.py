"""Metrics: ``workdir/metrics.jsonl`` (one JSON row per log/eval) and TensorBoard events.

Train rows are computed on the sampled private batch without noise: they are
for the operator and are not covered by the run's (ε, δ). Eval rows come from
the held-out split.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def _plain(value: Any) -> Any:
  try:
    value = float(value)
  except (TypeError, ValueError):
    return value
  return value if math.isfinite(value) else str(value)


class MetricsWriter:
  """Appends rows to ``metrics.jsonl`` and scalars to ``workdir/tensorboard``.

  On resume, rows and events past the restored step (written after the last
  checkpoint by the interrupted run) are dropped, so each step appears once.
  """

  def __init__(self, workdir: str | Path, resume_step: int = 0):
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
    self.tensorboard = SummaryWriter(str(Path(workdir) / "tensorboard"),
                                     purge_step=resume_step or None)
    self.path = Path(workdir) / "metrics.jsonl"
    if self.path.exists():
      rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
      kept = [r for r in rows if r.get("step", 0) <= resume_step]
      if len(kept) != len(rows):
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        tmp.replace(self.path)

  def write(self, step: int, split: str, values: dict[str, Any]) -> None:
    row = {"step": int(step), "split": split, **{k: _plain(v) for k, v in values.items()}}
    with self.path.open("a") as f:
      f.write(json.dumps(row) + "\n")
    for key, value in row.items():
      if key not in ("step", "split") and isinstance(value, float):
        self.tensorboard.add_scalar(f"{split}/{key}", value, int(step))
    self.tensorboard.flush()

  def close(self) -> None:
    self.tensorboard.close()


def read(workdir: str | Path) -> list[dict[str, Any]]:
  """All rows of a workdir's metrics.jsonl."""
  path = Path(workdir) / "metrics.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
