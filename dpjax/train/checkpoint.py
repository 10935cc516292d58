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

import errno
import shutil
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
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
    self.manager = ocp.CheckpointManager(
      self.directory,
      options=options,
      item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
    )

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    """Writes checkpoint ``step``; a full disk is a one-line ``CheckpointError``.

    The partial write is removed; earlier checkpoints are untouched (orbax
    commits a checkpoint only once it is complete).
    """
    thread_errors: list[Any] = []
    hook, unraisable = threading.excepthook, sys.unraisablehook
    verbosity = logging.get_verbosity()
    # Orbax's writer threads log and print every failed write; hold those back until it is
    # known whether the failure is a full disk (one line) or something else (shown in full).
    threading.excepthook = sys.unraisablehook = thread_errors.append
    logging.set_verbosity(logging.FATAL)
    try:
      self.manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        force=True,
      )
      self.manager.wait_until_finished()
    except Exception as err:  # pylint: disable=broad-except
      text = str(err)
      full = isinstance(err, OSError) and err.errno == errno.ENOSPC
      if not (full or "RESOURCE_EXHAUSTED" in text or "No space left" in text):
        for args in thread_errors:
          (hook if hasattr(args, "thread") else unraisable)(args)
        raise
      for partial in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
        shutil.rmtree(partial, ignore_errors=True)
      earlier = [s for s in self.steps() if s < step]
      advice = (
        f"checkpoint {earlier[-1]} and those before it are intact: free some space and run "
        "the same command again"
        if earlier
        else "there is no earlier checkpoint: free some space and run the same command again "
        "with --config.resume=allow_changes (the steps already run are charged to the ledger)"
      )
      raise CheckpointError(
        f"no space left writing checkpoint {step} in {self.directory}; {advice}"
      ) from None
    finally:
      threading.excepthook, sys.unraisablehook = hook, unraisable
      logging.set_verbosity(verbosity)

  def saved_shapes(self, step: int) -> list[tuple[tuple[int, ...], str]] | None:
    """The sorted (shape, dtype) of every saved state array of ``step``; None if unreadable."""
    try:
      tree = self.manager.item_metadata(step)["state"]
      return sorted(
        (tuple(leaf.shape), str(leaf.dtype)) for leaf in jax.tree_util.tree_leaves(tree)
      )
    except Exception:  # pylint: disable=broad-except
      return None

  def steps(self) -> list[int]:
    self.manager.reload()
    return sorted(self.manager.all_steps())

  def restore_latest(
    self,
    abstract_state: Any,
    verify: Callable[[Any, dict[str, Any]], None] | None = None,
    read_only: bool = False,
  ) -> tuple[Any, dict[str, Any]] | None:
    """(state, meta) of the newest readable checkpoint; None if there is none at all.

    Args:
      abstract_state: the state's structure, shapes, dtypes and shardings.
      verify: called on each restored (state, meta): a ``ValueError`` makes the
        checkpoint unreadable (fall back to the previous one); a
        ``CheckpointError`` refuses the restore outright.
      read_only: skip unreadable checkpoints without moving them aside.
    """
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
        if verify is not None:
          verify(restored["state"], meta)
      except CheckpointError:
        raise
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
      if read_only:
        logging.warning("checkpoint %d is unreadable (%s); trying the previous one", step, reason)
        continue
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
    if read_only and steps:
      raise CheckpointError(f"no checkpoint in {self.directory} can be read")
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
    """Waits for and releases orbax's resources (idempotent)."""
    if self.manager is not None:
      self.manager.close()
      self.manager = None
