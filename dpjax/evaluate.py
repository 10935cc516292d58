"""Score a trained run on any labelled file in the training format.

    python -m dpjax.evaluate --workdir=DIR --data=FILE.tsv [--batch_size=64]

Prints JSON: accuracy, loss, count, the checkpoint step, and the run's ε and δ (from
the checkpoint's ledger and plan, as ``summary.json`` states them).
Evaluation touches only the given file (and the public pretrained weights).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from absl import app, flags, logging

from dpjax import privacy
from dpjax.data import DataError
from dpjax.models.pretrained import PretrainedError
from dpjax.train import splits
from dpjax.train import task as task_lib
from dpjax.train.config import ConfigError
from dpjax.trained import load_trained

_WORKDIR = flags.DEFINE_string("workdir", None, "A dpjax.main workdir.")
_DATA = flags.DEFINE_string("data", None, "A labelled .tsv/.csv/.jsonl file (or sst2:validation).")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Evaluation batch size.")


def evaluate_workdir(workdir: str | Path, data: str, batch_size: int = 64) -> dict:
  """Restores the latest checkpoint of ``workdir`` and evaluates it on ``data``."""
  trained = load_trained(workdir)
  c = trained.config
  split = splits.load_split(data, trained.tokenizer, c, None)
  result = task_lib.evaluate(trained.params, trained.model, split, batch_size)
  plan = trained.mechanism
  if "delta" not in plan:
    raise ConfigError(f"{workdir}'s checkpoint does not state its privacy plan (delta)")
  ledger = privacy.PrivacyLedger.from_dict(trained.ledger)
  # ε and δ exactly as the run reports them: the ledger at the run's own δ.
  epsilon = ledger.epsilon(plan["delta"])
  result.update(
    {
      "step": trained.step,
      "data": data,
      "epsilon": epsilon if math.isfinite(epsilon) else str(epsilon),
      "delta": plan["delta"],
      "guarantee": plan.get("guarantee"),
    }
  )
  return result


def main(argv):
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Library INFO logs (checkpointing) off by default.
  if len(argv) > 1 or not _WORKDIR.value or not _DATA.value:
    print("error: usage: python -m dpjax.evaluate --workdir=DIR --data=FILE", file=sys.stderr)
    sys.exit(2)
  if _BATCH.value < 1:
    print(f"error: --batch_size must be an integer >= 1 (got {_BATCH.value})", file=sys.stderr)
    sys.exit(2)
  try:
    result = evaluate_workdir(_WORKDIR.value, _DATA.value, _BATCH.value)
  except (ConfigError, DataError, PretrainedError) as err:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
