"""Orbax checkpoints holding the train state AND the privacy ledger, restored together.

A checkpoint is one orbax step directory with two items: ``state`` (the
TrainState pytree) and ``meta`` (JSON: ledger, config, step, run facts). Orbax
writes to a temporary directory and commits it at the end, so a killed save
leaves no half-written checkpoint. Restore takes the latest checkpoint that
reads back; one that does not is moved to ``checkpoints_unreadable/`` with a
warning — but the run never falls back to a fresh ledger while any checkpoint
exists.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp
from absl import logging

from dpjax.train.config import ConfigError


class Checkpoints:
  """Save/restore of (state, meta) under ``workdir/checkpoints``."""

  def __init__(self, workdir: str | Path, keep: int):
    self.directory = Path(workdir).resolve() / "checkpoints"
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
    self.manager.wait_until_finished()

  def steps(self) -> list[int]:
    self.manager.reload()
    return sorted(self.manager.all_steps())

  def restore_latest(self, abstract_state: Any) -> tuple[Any, dict[str, Any]] | None:
    """(state, meta) of the newest readable checkpoint; None if there is none at all."""
    steps = self.steps()
    for step in reversed(steps):
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        meta = dict(restored["meta"])
        if meta.get("step") != step or "ledger" not in meta:
          raise ValueError("metadata is incomplete")
        return restored["state"], meta
      except Exception as err:  # pylint: disable=broad-except
        quarantine = self.directory.parent / "checkpoints_unreadable" / str(step)
        logging.warning("checkpoint %d in %s is unreadable (%s: %s); moved to %s, trying the "
                        "previous one", step, self.directory, type(err).__name__,
                        (str(err).splitlines() or [""])[0][:200], quarantine)
        # Kept for inspection, but out of the way: the run will write this step again.
        quarantine.parent.mkdir(exist_ok=True)
        shutil.rmtree(quarantine, ignore_errors=True)
        (self.directory / str(step)).rename(quarantine)
        self.manager.reload()
    unreadable = self.directory.parent / "checkpoints_unreadable"
    if steps or (unreadable.is_dir() and any(unreadable.iterdir())):
      raise ConfigError(f"no checkpoint in {self.directory} can be read (see {unreadable}); "
                        "refusing to restart with a fresh privacy ledger")
    return None

  def close(self) -> None:
    self.manager.close()
