"""The trained model of a ``dpjax.main`` workdir: config, task model and full parameters.

    trained = load_trained("workdirs/sst2_quick")
    logits = trained.model.apply({"params": trained.params}, batch)

The parameters are rebuilt the way training built them (pretrained or seeded
frozen weights) and the trainable ones are restored from the latest checkpoint;
no data file is read.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

import flax.linen as nn
import ml_collections
import tokenizers

from dpjax.models import lora
from dpjax.privacy import accounting
from dpjax.train import checkpoint, integrity, optimizer
from dpjax.train import config as config_lib
from dpjax.train import journal as journal_lib
from dpjax.train import task as task_lib
from dpjax.train.config import ConfigError

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Trained:
  """The model of a run at its latest checkpoint.

  Attributes:
    config: the run's config (``workdir/config.json``).
    model: the Flax task model (``SequenceClassifier``, ``LabelWordClassifier`` or, for
      ``model.task = causal_lm``, ``GPT2LMHeadModel``).
    params: the full parameter tree, frozen and trainable combined; LoRA adapters
      are still separate leaves (``lora_a``, ``lora_b``).
    step: the checkpoint's step.
    tokenizer: the tokenizer the run encoded its data with.
    ledger: the privacy ledger saved with the checkpoint (``PrivacyLedger.to_dict``).
    mechanism: the run's plan as the checkpoint stated it (``Mechanism.public_facts``):
      δ, σ, q, the accountant and the budget.
    trainable: the trained parameters alone (what DP clipped and noised).
    frozen: the parameters training did not change (pretrained or seeded).
    initial: the full parameters before training (pretrained or seeded; public).
    releases: one-off releases of the run besides its steps, as the checkpoint holds
      them (e.g. ``{"label_histogram": {"counts": [...], ...}}``; in the ledger).
  """

  config: ml_collections.ConfigDict
  model: nn.Module
  params: PyTree
  step: int
  tokenizer: tokenizers.Tokenizer
  ledger: dict[str, Any]
  mechanism: dict[str, Any]
  trainable: PyTree = dataclasses.field(repr=False, default=None)
  frozen: PyTree = dataclasses.field(repr=False, default=None)
  initial: PyTree = dataclasses.field(repr=False, default=None)
  releases: dict[str, Any] = dataclasses.field(default_factory=dict)


def read_config(workdir: str | Path) -> ml_collections.ConfigDict:
  """The config a run saved in ``workdir/config.json``.

  Raises:
    ConfigError: the file is missing or not JSON (``workdir`` is no run).
  """
  config_file = Path(workdir) / "config.json"
  if not config_file.is_file():
    raise ConfigError(f"{config_file} not found: --workdir must be a dpjax.main workdir")
  try:
    saved = json.loads(config_file.read_text())
    if not isinstance(saved, dict):
      raise ValueError("not a JSON object")
    return ml_collections.ConfigDict(config_lib.with_defaults(saved))
  except (ValueError, UnicodeDecodeError) as err:
    raise ConfigError(f"{config_file} is not a dpjax config: {err}") from None


def _restore(
  workdir: Path, c: ml_collections.ConfigDict, trainable: PyTree
) -> tuple[Any, dict[str, Any]]:
  """(train state, meta) of the latest checkpoint of ``workdir``.

  Raises:
    ConfigError: ``workdir`` has no checkpoint.
  """
  if not (workdir / "checkpoints").is_dir():  # Checkpoints() would create the directory.
    raise ConfigError(f"{workdir} has no checkpoint yet")
  ckpts = checkpoint.Checkpoints(workdir, c.train.keep_checkpoints)
  try:
    restored = ckpts.restore_latest(
      optimizer.abstract_state(config_lib.mechanism_spec(c), c, trainable),
      verify=functools.partial(
        integrity.verify_record, journal=journal_lib.PrivacyJournal(workdir, writer=False)
      ),
      read_only=True,
    )
  finally:
    ckpts.close()
  if restored is None:
    raise ConfigError(f"{workdir} has no checkpoint yet")
  return restored


def load_trained(workdir: str | Path) -> Trained:
  """The run's model at its latest checkpoint: config, task model, full params, tokenizer.

  Raises:
    ConfigError: ``workdir`` is not a run or has no checkpoint.
    PretrainedError: the run's pretrained model cannot be loaded.
  """
  workdir = Path(workdir)
  c = read_config(workdir)
  task = task_lib.build(c)
  state, meta = _restore(workdir, c, task.trainable)
  return Trained(
    config=c,
    model=task.model,
    params=lora.combine(state.params, task.frozen),
    step=int(meta["step"]),
    tokenizer=task.tokenizer,
    ledger=meta["ledger"],
    mechanism=meta.get("mechanism", {}),
    trainable=state.params,
    frozen=task.frozen,
    initial=lora.combine(task.trainable, task.frozen),
    releases=meta.get("releases", {}),
  )


def spent_ledger(
  workdir: str | Path, trained: Trained
) -> tuple[accounting.PrivacyLedger, str | None]:
  """(the ledger to report ε from, a note or None) for the model of ``trained``.

  The checkpoint's ledger, unless the run executed (and may have released the
  outputs of) steps past that checkpoint, e.g. a newer one is damaged: then
  every execution in ``privacy_journal.jsonl`` counts, with a note saying so.
  """
  ledger = accounting.PrivacyLedger.from_dict(trained.ledger)
  journal = journal_lib.PrivacyJournal(workdir, writer=False)
  executed = journal.executed_segments()
  delta = trained.mechanism.get("delta")
  if executed and delta is not None:
    # Every release drawn (the label histogram), then every executed step.
    released = [r["segment"] for r in journal.releases()]
    total = accounting.PrivacyLedger.from_dict(
      {**trained.ledger, "segments": released + list(executed)}
    )
    if total.epsilon(delta) > ledger.epsilon(delta):
      return total, (
        f"checkpoint {trained.step} is older than the run's last executed step: epsilon "
        "counts every step in privacy_journal.jsonl"
      )
  return ledger, None
