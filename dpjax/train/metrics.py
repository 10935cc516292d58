"""Metrics: one JSON object per line in ``workdir/metrics.jsonl`` (train and eval rows)."""

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
  """Appends rows to ``metrics.jsonl``; on resume drops rows past the restored step."""

  def __init__(self, workdir: str | Path, resume_step: int = 0):
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


def read(workdir: str | Path) -> list[dict[str, Any]]:
  """All rows of a workdir's metrics.jsonl."""
  path = Path(workdir) / "metrics.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
