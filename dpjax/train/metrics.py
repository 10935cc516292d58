"""Metrics: ``workdir/metrics.jsonl`` (public rows), ``private_metrics.jsonl`` and TensorBoard.

Public rows hold what is computed from the noised parameters or from public
data: ε spent (split "privacy") and evaluation on the held-out split ("eval").
Statistics of the private batches (train loss and accuracy, realized batch
sizes, clipped fraction, timings) are written only when the operator asks for
them (``train.private_metrics``), to ``private_metrics.jsonl`` and under the
TensorBoard prefix ``private_not_covered_by_dp/``: they are NOT covered by the
run's (ε, δ) and must not be published.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

PRIVATE_FILENAME = "private_metrics.jsonl"
PRIVATE_TAG = "private_not_covered_by_dp"


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

    self.tensorboard = SummaryWriter(
      str(Path(workdir) / "tensorboard"), purge_step=resume_step or None
    )
    self.path = Path(workdir) / "metrics.jsonl"
    self.private_path = Path(workdir) / PRIVATE_FILENAME
    for path in (self.path, self.private_path):
      _truncate_after(path, resume_step)

  def write(self, step: int, split: str, values: dict[str, Any], private: bool = False) -> None:
    """Appends a row; ``private`` rows go to the operator-only file and tag."""
    row = {"step": int(step), "split": split, **{k: _plain(v) for k, v in values.items()}}
    with (self.private_path if private else self.path).open("a") as f:
      f.write(json.dumps(row) + "\n")
    prefix = f"{PRIVATE_TAG}/{split}" if private else split
    for key, value in row.items():
      if key not in ("step", "split") and isinstance(value, float):
        self.tensorboard.add_scalar(f"{prefix}/{key}", value, int(step))
    self.tensorboard.flush()

  def close(self) -> None:
    self.tensorboard.close()


def _truncate_after(path: Path, step: int) -> None:
  """Drops rows past ``step`` (written after the last checkpoint by an interrupted run)."""
  if not path.exists():
    return
  rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  kept = [r for r in rows if r.get("step", 0) <= step]
  if len(kept) != len(rows):
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    tmp.replace(path)


def read(workdir: str | Path, private: bool = False) -> list[dict[str, Any]]:
  """All rows of a workdir's metrics.jsonl (or of private_metrics.jsonl; [] if absent).

  A torn last line (a crash in the middle of a write) is left out; a damaged
  line elsewhere is a ``ValueError`` naming the file and line.
  """
  path = Path(workdir) / (PRIVATE_FILENAME if private else "metrics.jsonl")
  if private and not path.exists():
    return []
  lines = [(i, line) for i, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
  rows = []
  for position, (number, line) in enumerate(lines):
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      if position == len(lines) - 1:
        continue
      raise ValueError(f"{path}:{number} is not a JSON line") from None
  return rows
