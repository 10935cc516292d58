"""Orbax checkpoints holding the train state AND the privacy ledger, restored together.

A checkpoint is one orbax step directory with two items: ``state`` (the
TrainState pytree) and ``meta`` (JSON: ledger, config, step, run facts). Orbax
writes to a temporary directory and commits it at the end, so a killed save
leaves no half-written checkpoint. Restore takes the latest checkpoint that
reads back; one that does not is moved to ``checkpoints_unreadable/`` with a
warning — but the run never falls back to a fresh ledger while any checkpoint
exists. With several processes they agree on each checkpoint (unreadable on any
process = unreadable) and process 0 moves it.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp
from absl import logging

from dpjax import parallel
from dpjax.train.config import ConfigError


class CheckpointError(ConfigError):
  """A run's training checkpoints cannot be restored (a user-facing, one-line error)."""


class Checkpoints:
  """Save/restore of (state, meta) under ``workdir/checkpoints``."""

  def __init__(self, workdir: str | Path, keep: int):
    self.directory = Path(workdir).resolve() / "checkpoints"
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    self.manager.save(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
      force=True,
    )
    self.manager.wait_until_finished()

  def steps(self) -> list[int]:
    self.manager.reload()
    return sorted(self.manager.all_steps())

  def restore_latest(self, abstract_state: Any) -> tuple[Any, dict[str, Any]] | None:
    """(state, meta) of the newest readable checkpoint; None if there is none at all."""
    steps = self.steps()
    for step in reversed(steps):
      error = None
      try:
        restored = self.manager.restore(
          step,
          args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
          ),
        )
        meta = dict(restored["meta"])
        if meta.get("step") != step or "ledger" not in meta:
          raise ValueError("metadata is incomplete")
      except Exception as err:  # pylint: disable=broad-except
        error = err
      # Every process must take the same branch: the next save is collective.
      if not parallel.any_process(error is not None):
        return restored["state"], meta
      quarantine = self.directory.parent / "checkpoints_unreadable" / str(step)
      reason = (
        f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}"
        if error is not None
        else "unreadable on another process"
      )
      logging.warning(
        "checkpoint %d in %s is unreadable (%s); moved to %s, trying the previous one",
        step,
        self.directory,
        reason,
        quarantine,
      )
      if parallel.is_main_process():
        # Kept for inspection, but out of the way: the run will write this step again.
        quarantine.parent.mkdir(exist_ok=True)
        shutil.rmtree(quarantine, ignore_errors=True)
        (self.directory / str(step)).rename(quarantine)
      parallel.sync(f"quarantined checkpoint {step}")
      self.manager.reload()
    unreadable = self.directory.parent / "checkpoints_unreadable"
    if steps or (unreadable.is_dir() and any(unreadable.iterdir())):
      raise CheckpointError(
        f"no checkpoint in {self.directory} can be read (see {unreadable}); "
        "refusing to restart with a fresh privacy ledger"
      )
    return None

  def skipped_after(self, step: int) -> bool:
    """True if a checkpoint newer than ``step`` was set aside as unreadable (now or before)."""
    unreadable = self.directory.parent / "checkpoints_unreadable"
    if not unreadable.is_dir():
      return False
    return any(p.name.isdigit() and int(p.name) > step for p in unreadable.iterdir())

  def close(self) -> None:
    self.manager.close()
