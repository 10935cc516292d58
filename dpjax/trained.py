"""The trained model of a ``dpjax.main`` workdir: config, task model and full parameters.

    trained = load_trained("workdirs/sst2_quick")
    logits = trained.model.apply({"params": trained.params}, batch)

The parameters are rebuilt the way training built them (pretrained or seeded
frozen weights) and the trainable ones are restored from the latest checkpoint;
no data file is read.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import flax.linen as nn
import ml_collections
import numpy as np
import tokenizers

from dpjax.models import lora
from dpjax.train import builders, checkpoint
from dpjax.train.config import ConfigError

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Trained:
  """The model of a run at its latest checkpoint.

  Attributes:
    config: the run's config (``workdir/config.json``).
    model: the Flax task model (``SequenceClassifier`` or ``LabelWordClassifier``).
    params: the full parameter tree, frozen and trainable combined; LoRA adapters
      are still separate leaves (``lora_a``, ``lora_b``).
    step: the checkpoint's step.
    tokenizer: the tokenizer the run encoded its data with.
    ledger: the privacy ledger saved with the checkpoint (``PrivacyLedger.to_dict``).
  """

  config: ml_collections.ConfigDict
  model: nn.Module
  params: PyTree
  step: int
  tokenizer: tokenizers.Tokenizer
  ledger: dict[str, Any]


def read_config(workdir: str | Path) -> ml_collections.ConfigDict:
  """The config a run saved in ``workdir/config.json``.

  Raises:
    ConfigError: the file is missing or not JSON (``workdir`` is no run).
  """
  config_file = Path(workdir) / "config.json"
  if not config_file.is_file():
    raise ConfigError(f"{config_file} not found: --workdir must be a dpjax.main workdir")
  try:
    return ml_collections.ConfigDict(json.loads(config_file.read_text()))
  except (ValueError, UnicodeDecodeError) as err:
    raise ConfigError(f"{config_file} is not a dpjax config: {err}") from None


def label_word_ids(
  c: ml_collections.ConfigDict, tokenizer: tokenizers.Tokenizer
) -> tuple[int, ...] | None:
  """The token id of each label word (as the data layer computes it); None for ``classify``."""
  template = builders.template_for(c)
  if template is None:
    return None
  try:
    return template.label_word_ids(tokenizer)
  except ValueError as err:
    raise ConfigError(f"config.data.label_words: {err}") from None


def example_batch(c: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """A one-row batch with every input the task model reads (for ``init``: shapes only)."""
  ids = np.zeros((1, 2), np.int32)
  batch = {
    "input_ids": ids,
    "attention_mask": np.ones_like(ids),
    "token_type_ids": np.zeros_like(ids),
  }
  if c.model.task == "label_words":
    batch["mask_position"] = np.zeros((1,), np.int32)
  return batch


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
    restored = ckpts.restore_latest(builders.abstract_state(c, trainable))
  finally:
    ckpts.close()
  if restored is None:
    raise ConfigError(f"{workdir} has no checkpoint yet")
  return restored


def load_trained(workdir: str | Path) -> Trained:
  """The run's model at its latest checkpoint: config, task model, full params, tokenizer.

  Raises:
    ConfigError: ``workdir`` is not a run or has no checkpoint.
    CheckpointError: the run's pretrained model cannot be loaded.
  """
  workdir = Path(workdir)
  c = read_config(workdir)
  backbone, backbone_params, head_params, tokenizer = builders.backbone_for(c)
  model = builders.task_model(c, backbone, label_word_ids(c, tokenizer))
  trainable, frozen = builders.init_params(c, model, example_batch(c), backbone_params, head_params)
  state, meta = _restore(workdir, c, trainable)
  return Trained(
    config=c,
    model=model,
    params=lora.combine(state.params, frozen),
    step=int(meta["step"]),
    tokenizer=tokenizer,
    ledger=meta["ledger"],
  )
