"""The privacy journal: a write-ahead record of every step a workdir has executed.

A step's noise is a function of (run secret, attempt, step). Replaying a step
with the same noise is harmless only if it recomputes exactly the same output;
the same noise on *different* gradients releases their difference unprotected.
The journal makes resumes safe:

* Before anything computed at step t is written (metrics, evaluations,
  checkpoints, summary), one line "attempt a executed steps (start, t]" is
  appended and fsync'ed to ``workdir/privacy_journal.jsonl``.
* On restart from a checkpoint at step s, steps in (s, executed] were run and
  may have been observed. If the run is an exact replay (same attempt, same
  keyed fingerprint of config + data + platform, no checkpoint was skipped as
  unreadable), they are recomputed with the same noise to the same values and
  cost nothing more: a killed run resumes bit for bit. Otherwise the run moves
  to a new attempt (fresh noise and sampling keys) and the abandoned executions
  are charged to the privacy ledger, so ε counts every execution whose output
  may have been released.

One-off releases besides the steps (the DP label histogram) get a line of
their own, ``{"release": name, "index": i, "segment": ...}``, written before
the release is drawn: every one ever drawn is charged, even if the checkpoint
that held it is lost and the run draws another (with fresh noise: the index
keys it).

The journal holds step numbers, attempts, the public plan (q, σ, N) and keyed
fingerprints (HMAC with a key derived from the run secret), never the secret.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

FILENAME = "privacy_journal.jsonl"


@dataclasses.dataclass(frozen=True)
class ResumePlan:
  """How a (re)started run continues.

  Attributes:
    attempt: the attempt number the run uses from now on (keys its noise and sampling).
    replay: True if executed steps past the checkpoint are recomputed with the same noise.
    charges: (segment fields, steps) of abandoned executions to add to the ledger.
  """

  attempt: int
  replay: bool
  charges: tuple[tuple[dict[str, Any], int], ...]

  @property
  def charged_steps(self) -> int:
    return sum(steps for _, steps in self.charges)


class PrivacyJournal:
  """Append-only ``privacy_journal.jsonl`` of (attempt, start, step, fingerprint, segment)."""

  def __init__(self, workdir: str | Path, writer: bool = True):
    self.path = Path(workdir) / FILENAME
    self.writer = writer
    self._last: tuple[int, int] | None = None  # (attempt, step) of the last line written

  def _lines(self) -> list[dict[str, Any]]:
    """All lines written so far (a torn last line, from a crash mid-write, is ignored)."""
    if not self.path.exists():
      return []
    out = []
    for line in self.path.read_text().splitlines():
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:
        continue
    return out

  def records(self) -> list[dict[str, Any]]:
    """The step lines: (attempt, start, step, fingerprint, segment)."""
    return [r for r in self._lines() if "release" not in r]

  def releases(self) -> list[dict[str, Any]]:
    """The release lines, in order: ``{"release", "index", "segment"}``."""
    return [r for r in self._lines() if "release" in r]

  def next_release_index(self) -> int:
    """The index the next release will have (the number on record)."""
    return len(self.releases())

  def write_release(self, name: str, index: int, segment: dict[str, Any]) -> None:
    """Durably records release ``index`` before it is drawn (it is charged from then on)."""
    if self.writer:
      line = json.dumps({"release": name, "index": index, "segment": segment}, sort_keys=True)
      with self.path.open("a") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())

  def plan_resume(
    self,
    restored_step: int | None,
    restored_attempt: int | None,
    fingerprint: str,
    skipped_checkpoint: bool,
  ) -> ResumePlan:
    """What to do with the executions the journal knows and the checkpoint does not.

    Args:
      restored_step: the step of the restored checkpoint (None: no checkpoint).
      restored_attempt: the attempt stored in that checkpoint (None: no checkpoint).
      fingerprint: the keyed fingerprint of this run's computation.
      skipped_checkpoint: a newer checkpoint was unreadable and set aside.
    """
    records = self.records()
    if restored_step is None:  # no checkpoint: every execution on record is abandoned
      by_attempt = _group(records)
      charges = tuple(
        (r[-1]["segment"], r[-1]["step"] - r[0]["start"])
        for r in by_attempt.values()
        if r[-1]["step"] > r[0]["start"]
      )
      return ResumePlan(max(by_attempt, default=-1) + 1, False, charges)
    by_attempt = _group(records)
    mine = by_attempt.get(restored_attempt, [])
    later = [rs for a, rs in by_attempt.items() if a > restored_attempt]
    charges = []
    if mine and mine[-1]["step"] > restored_step:
      charges.append((mine[-1]["segment"], mine[-1]["step"] - restored_step))
    for rs in later:
      if rs[-1]["step"] > rs[0]["start"]:
        charges.append((rs[-1]["segment"], rs[-1]["step"] - rs[0]["start"]))
    same = not later and (not mine or mine[-1]["fingerprint"] == fingerprint)
    if same and not (charges and skipped_checkpoint):
      return ResumePlan(restored_attempt, bool(charges), ())
    return ResumePlan(max(by_attempt, default=restored_attempt) + 1, False, tuple(charges))

  def ledger_floor(self, attempt: int, step: int) -> int:
    """The fewest ledger steps a checkpoint of ``attempt`` at ``step`` can honestly hold.

    Every earlier attempt's executions (its last recorded step minus its first
    start) were either recorded or charged before ``attempt`` began, and
    ``attempt`` itself executed ``step`` minus its first start. A checkpoint
    ledger below this was edited or rolled back.
    """
    return sum(segment["steps"] for segment in self.executed_segments(attempt, step))

  def executed_segments(
    self, attempt: int | None = None, step: int | None = None
  ) -> list[dict[str, Any]]:
    """The ledger segments of every execution on record (each attempt's plan and step count).

    With ``attempt`` and ``step`` (a checkpoint of that attempt at that step):
    the attempts before it in full and ``attempt`` up to ``step``; later
    attempts are left out. Without: every attempt in full (what the workdir's
    outputs have cost, whatever checkpoint is read).
    """
    out = []
    for a, rs in sorted(_group(self.records()).items()):
      if attempt is not None and a > attempt:
        continue
      end = step if attempt is not None and a == attempt else max(r["step"] for r in rs)
      if end > rs[0]["start"]:
        out.append({**rs[-1]["segment"], "steps": end - rs[0]["start"]})
    return out

  def write_ahead(
    self, attempt: int, start: int, step: int, fingerprint: str, segment: dict[str, Any]
  ) -> None:
    """Durably records that ``attempt`` executed steps (start, step], before they are used."""
    if not self.writer or self._last == (attempt, step) or step <= start:
      return
    line = json.dumps(
      {
        "attempt": attempt,
        "start": start,
        "step": step,
        "fingerprint": fingerprint,
        "segment": segment,
      },
      sort_keys=True,
    )
    with self.path.open("a") as f:
      f.write(line + "\n")
      f.flush()
      os.fsync(f.fileno())
    self._last = (attempt, step)


def _group(records: list[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
  by_attempt: dict[int, list[dict[str, Any]]] = {}
  for record in records:
    by_attempt.setdefault(int(record["attempt"]), []).append(record)
  return by_attempt


def steps_by_plan(segments: list[dict[str, Any]]) -> dict[str, int]:
  """Steps per plan (a segment's fields but ``steps``, as canonical JSON)."""
  counts: dict[str, int] = {}
  for segment in segments:
    plan = json.dumps({k: v for k, v in segment.items() if k != "steps"}, sort_keys=True)
    counts[plan] = counts.get(plan, 0) + int(segment["steps"])
  return counts
