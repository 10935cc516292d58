"""Integrity of a run's workdir: sealed checkpoint metadata, state digests, one run at a time.

The privacy claim of a run is computed from its checkpoint metadata (the
ledger). Edits, bit rot and two runs writing one workdir must therefore be
detected, never silently believed:

* **Seal.** ``meta["seal"]`` = HMAC-SHA256 over the canonical JSON of the rest
  of the metadata, keyed by a key derived from the run's secret. A hand edit
  (say, ``"steps": 8`` -> ``1`` in the ledger) breaks it and the resume is
  refused. The secret sits in the same checkpoint, so the seal stops edits and
  corruption, not an adversary who recomputes it; the ledger is also
  cross-checked against the state's step and the privacy journal.
* **State digest.** ``meta["state_sha256"]`` is the SHA-256 of the saved train
  state (every leaf's bytes, in tree order). A restored state that does not hash
  to it (flipped bits in an array file) is treated like an unreadable checkpoint.
* **Lock.** An exclusive ``flock`` on ``<workdir>/.lock`` for the whole run; a
  second run on the same workdir is refused (the kernel drops the lock when its
  holder dies, so a crashed run leaves no stale lock).
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import socket
from pathlib import Path
from typing import Any

import numpy as np

LOCK_FILE = ".lock"
#: The purpose string of the seal's key (``RunSecret.derive``).
SEAL_PURPOSE = "checkpoint seal"

#: Config keys that change the saved train state's structure: a resume with any of them
#: changed cannot restore the checkpoints, even with ``resume=allow_changes``.
STRUCTURE_KEYS = (
  "model.name",
  "model.task",
  "model.train",
  "model.lora_rank",
  "model.lora_targets",
  "model.pooling",
  "data.num_labels",
  "dp.enabled",
  "train.optimizer",
)


def state_digest(host_state: Any) -> str:
  """SHA-256 over every leaf of a (host, numpy) pytree: dtype, shape and bytes, in tree order."""
  import jax  # local: keeps this module importable without initializing jax

  digest = hashlib.sha256()
  for leaf in jax.tree_util.tree_leaves(host_state):
    array = np.ascontiguousarray(np.asarray(leaf))
    digest.update(f"{array.dtype.str}{array.shape}".encode())
    digest.update(array.tobytes())
  return digest.hexdigest()


def seal(meta: dict[str, Any], key: bytes) -> str:
  """HMAC-SHA256 of the canonical JSON of ``meta`` without its ``seal`` entry."""
  body = {k: v for k, v in meta.items() if k != "seal"}
  text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=True)
  return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


def seal_matches(meta: dict[str, Any], key: bytes) -> bool:
  return isinstance(meta.get("seal"), str) and hmac.compare_digest(meta["seal"], seal(meta, key))


def verify_sealed(state: Any, meta: dict[str, Any]) -> None:
  """Checks a restored checkpoint's seal and state digest.

  Raises:
    CheckpointError: no seal, or the metadata does not match it (refuse: the
      privacy ledger cannot be trusted).
    ValueError: the state does not hash to ``meta["state_sha256"]`` (treat the
      checkpoint as unreadable).
  """
  from dpjax import parallel
  from dpjax.privacy.secret import RunSecret
  from dpjax.train.checkpoint import CheckpointError

  step = meta.get("step")
  if "seal" not in meta or "secret" not in meta:
    raise CheckpointError(
      f"checkpoint {step} has no integrity seal (written by an older version, or edited); "
      "use a new workdir"
    )
  key = RunSecret.from_checkpoint(meta["secret"]).derive(SEAL_PURPOSE)
  if not seal_matches(meta, key):
    raise CheckpointError(
      f"checkpoint {step}'s metadata does not match its seal (edited or damaged): its privacy "
      "ledger cannot be trusted; refusing to use it"
    )
  if state_digest(parallel.to_host(state)) != meta.get("state_sha256"):
    raise ValueError("the restored state does not match its SHA-256 (damaged array files)")


def verify_against_journal(meta: dict[str, Any], journal: Any) -> None:
  """Refuses (CheckpointError) a checkpoint ledger below what the privacy journal shows executed.

  The ledger must hold at least the state's step and ``journal.ledger_floor``
  steps in all, and, plan by plan (q, σ, N), at least the steps the journal
  records under that plan: a ledger re-sealed with a larger σ or a smaller q is
  caught here.
  """
  from dpjax.privacy import accounting
  from dpjax.train import journal as journal_lib
  from dpjax.train.checkpoint import CheckpointError

  step, name = meta["step"], journal.path.name
  ledger_steps = accounting.PrivacyLedger.from_dict(meta["ledger"]).steps
  floor = max(step, journal.ledger_floor(meta["attempt"], step))
  if ledger_steps < floor:
    raise CheckpointError(
      f"checkpoint {step}'s ledger holds {ledger_steps} steps but at least {floor} were "
      f"executed (see {name}); refusing an under-counted ledger"
    )
  recorded = journal_lib.steps_by_plan(meta["ledger"]["segments"])
  executed = journal_lib.steps_by_plan(journal.executed_segments(meta["attempt"], step))
  for plan, steps in executed.items():
    if recorded.get(plan, 0) < steps:
      raise CheckpointError(
        f"checkpoint {step}'s ledger records {recorded.get(plan, 0)} steps of the plan {plan} "
        f"but {name} shows {steps} executed; refusing an under-counted ledger"
      )


def verify_record(state: Any, meta: dict[str, Any], journal: Any) -> None:
  """:func:`verify_sealed`, then :func:`verify_against_journal`: what every reader checks."""
  verify_sealed(state, meta)
  verify_against_journal(meta, journal)


def structure_changes(saved: dict[str, Any], new: dict[str, Any]) -> list[str]:
  """The :data:`STRUCTURE_KEYS` whose value differs between two configs (as JSON dicts)."""

  def get(tree, key):
    for part in key.split("."):
      if not isinstance(tree, dict) or part not in tree:
        return None
      tree = tree[part]
    return tree

  norm = lambda v: tuple(v) if isinstance(v, list) else v
  return [k for k in STRUCTURE_KEYS if norm(get(saved, k)) != norm(get(new, k))]


class WorkdirBusy(Exception):
  """Another live process holds the workdir's lock (``holder`` says which)."""

  def __init__(self, holder: str):
    super().__init__(holder)
    self.holder = holder


class WorkdirLock:
  """An exclusive advisory lock on ``<workdir>/.lock``, held until :meth:`release`.

  Raises:
    WorkdirBusy: another process holds it.
  """

  def __init__(self, workdir: Path):
    self.path = Path(workdir) / LOCK_FILE
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "an unknown process"
      os.close(fd)
      raise WorkdirBusy(holder) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    self._fd: int | None = fd

  def release(self) -> None:
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None
