"""Score a trained run on any labelled file in the training format.

    python -m dpjax.evaluate --workdir=DIR --data=FILE.tsv [--batch_size=64]

Prints JSON: accuracy, loss, count, the checkpoint step and the run's ε.
Evaluation touches only the given file (and the public pretrained weights).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import ml_collections
import numpy as np
from absl import app, flags

from dpjax import privacy
from dpjax.data import DataError
from dpjax.models import lora
from dpjax.models.pretrained import CheckpointError
from dpjax.train import builders, checkpoint, loop
from dpjax.train.config import ConfigError

_WORKDIR = flags.DEFINE_string("workdir", None, "A dpjax.main workdir.")
_DATA = flags.DEFINE_string("data", None, "A labelled .tsv/.csv/.jsonl file (or sst2:validation).")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Evaluation batch size.")


def evaluate_workdir(workdir: str | Path, data: str, batch_size: int = 64) -> dict:
  """Restores the latest checkpoint of ``workdir`` and evaluates it on ``data``."""
  workdir = Path(workdir)
  config_file = workdir / "config.json"
  if not config_file.is_file():
    raise ConfigError(f"{config_file} not found: --workdir must be a dpjax.main workdir")
  c = ml_collections.ConfigDict(json.loads(config_file.read_text()))
  backbone, backbone_params, head_params, tokenizer = builders.backbone_for(c)
  split = builders.load_split(data, 0, 0, tokenizer, c, None)
  model = builders.task_model(c, backbone, split.encoded.label_word_ids)
  trainable, frozen = builders.init_params(c, model, split.batch(np.arange(1)), backbone_params,
                                           head_params)
  state = builders.abstract_state(c, trainable)
  restored = checkpoint.Checkpoints(workdir, c.train.keep_checkpoints).restore_latest(state)
  if restored is None:
    raise ConfigError(f"{workdir} has no checkpoint yet")
  state, meta = restored
  params = lora.combine(state.params, frozen)
  result = loop.evaluate(params, model, split, batch_size)
  ledger = privacy.PrivacyLedger.from_dict(meta["ledger"])
  delta = c.dp.delta or privacy.default_delta(ledger.dataset_size or 2)
  result.update({"step": meta["step"], "data": data,
                 "epsilon": ledger.epsilon(delta) if c.dp.enabled else "inf"})
  return result


def main(argv):
  if len(argv) > 1 or not _WORKDIR.value or not _DATA.value:
    print("error: usage: python -m dpjax.evaluate --workdir=DIR --data=FILE", file=sys.stderr)
    sys.exit(2)
  try:
    result = evaluate_workdir(_WORKDIR.value, _DATA.value, _BATCH.value)
  except (ConfigError, DataError, CheckpointError) as err:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
