"""Score a trained run on any file in the training format (labelled, for classifiers).

    python -m dpjax.evaluate --workdir=DIR --data=FILE.tsv [--batch_size=64]

Prints JSON: accuracy, loss, count, macro F1, ``per_class`` (by the run's
``data.label_names``: count, accuracy = recall, precision, F1) and ``confusion_matrix``
(``counts[i][j]``: examples of label i predicted as j); causal LMs: loss, perplexity,
token accuracy and target tokens over the completions. Then the checkpoint step, and
the run's ε and δ (from the checkpoint's ledger and plan, as ``summary.json`` states them).
Evaluation touches only the given file (and the public pretrained weights).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from absl import app, flags, logging

from dpjax import _cli
from dpjax.data import DataError
from dpjax.models.pretrained import PretrainedError
from dpjax.train import splits
from dpjax.train import task as task_lib
from dpjax.train.config import ConfigError, label_names
from dpjax.trained import load_trained, spent_ledger


def _define_flags() -> None:
  """The command line's flags (defined only when run as a program: importable as a library)."""
  flags.DEFINE_string("workdir", None, "A dpjax.main workdir.")
  flags.DEFINE_string(
    "data",
    None,
    "A labelled .tsv/.csv/.jsonl file (or sst2:validation, or tfds:NAME:SPLIT).",
  )
  flags.DEFINE_integer("batch_size", 64, "Evaluation batch size.")


def evaluate_workdir(workdir: str | Path, data: str, batch_size: int = 64) -> dict:
  """Restores the latest checkpoint of ``workdir`` and evaluates it on ``data``."""
  trained = load_trained(workdir)
  c = trained.config
  split = splits.load_split(data, trained.tokenizer, c, None, key="--data")
  result = task_lib.evaluate_model(trained.params, trained.model, split, batch_size, per_class=True)
  if "confusion_matrix" in result:
    result.update(per_class_metrics(result.pop("confusion_matrix"), label_names(c)))
  plan = trained.mechanism
  if "delta" not in plan:
    raise ConfigError(f"{workdir}'s checkpoint does not state its privacy plan (delta)")
  ledger, note = spent_ledger(workdir, trained)
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
  if note:
    result["epsilon_note"] = note
  return result


def per_class_metrics(confusion: list[list[int]], names: tuple[str, ...]) -> dict:
  """``macro_f1``, ``per_class`` ({name: count, accuracy (recall), precision, f1}) and
  ``confusion_matrix`` ({labels, counts}: rows are true labels, columns predictions)
  of a confusion matrix; a ratio with a zero denominator is None."""

  def ratio(a: float, b: float) -> float | None:
    return a / b if b else None

  per_class, f1s = {}, []
  for k, name in enumerate(names):
    hits = confusion[k][k]
    count, predicted = sum(confusion[k]), sum(row[k] for row in confusion)
    recall, precision = ratio(hits, count), ratio(hits, predicted)
    f1 = ratio(2 * hits, count + predicted)
    per_class[name] = {"count": count, "accuracy": recall, "precision": precision, "f1": f1}
    if f1 is not None:  # a class in the data or in the predictions (as scikit-learn)
      f1s.append(f1)
  return {
    "macro_f1": sum(f1s) / len(f1s) if f1s else None,
    "per_class": per_class,
    "confusion_matrix": {"labels": list(names), "counts": confusion},
  }


def main(argv):
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Library INFO logs (checkpointing) off by default.
  workdir, data, batch_size = flags.FLAGS.workdir, flags.FLAGS.data, flags.FLAGS.batch_size
  if len(argv) > 1 or not workdir or not data:
    print("error: usage: python -m dpjax.evaluate --workdir=DIR --data=FILE", file=sys.stderr)
    sys.exit(2)
  if batch_size < 1:
    print(f"error: --batch_size must be an integer >= 1 (got {batch_size})", file=sys.stderr)
    sys.exit(2)
  try:
    result = evaluate_workdir(workdir, data, batch_size)
  except (ConfigError, DataError, PretrainedError) as err:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)
  print(json.dumps(result))


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=_cli.parse_flags)
