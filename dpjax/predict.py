"""Predict with the classifier of a ``dpjax.main`` run: a label and class probabilities per text.

    python -m dpjax.predict --workdir=DIR --data=FILE [--out=preds.jsonl] [--batch_size=64]
        [--text_field=COLUMN]

``--data`` is a .tsv/.csv/.jsonl file (or ``sst2:validation``, or a TFDS split
``tfds:NAME[/CONFIG][:VERSION]:SPLIT`` prepared in the run's ``data.tfds_dir``) with the run's
text column (``data.text_field``, or ``--text_field``); a label column is optional. Each row
becomes one JSON line, in file order: ``text``, ``line`` (of a file), ``prediction`` (the label id),
``prediction_name`` (from the run's ``data.label_names``; the id when unset),
``probabilities`` (P(label k) at index k), and ``label`` where the file has one. The lines go
to ``--out`` (written whole, only once every row is scored) or to stdout; a summary line
(count, the checkpoint step, and the accuracy when the file has labels) goes to stdout with
``--out``, to stderr without. Texts are encoded exactly as the run encoded its data (template,
``data.max_length``: longer texts lose their end). A user mistake is one ``error:`` line on
stderr, exit 2, nothing written.

From Python::

    from dpjax.predict import predict
    predict("workdirs/sst2_quick", ["a gripping film", "dull"])
    # [{"text": "a gripping film", "prediction": 1, "prediction_name": "1",
    #   "probabilities": [0.12, 0.88]}, ...]

Only the released parameters and the given texts are used: predictions are covered by the
run's (ε, δ) like anything else computed from the model.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from absl import app, flags, logging

from dpjax import _cli
from dpjax import data as data_lib
from dpjax.data import DataError
from dpjax.models.pretrained import PretrainedError
from dpjax.train import splits
from dpjax.train import task as task_lib
from dpjax.train.config import ConfigError, label_names
from dpjax.trained import Trained, load_trained, read_config


def _define_flags() -> None:
  """The command line's flags (defined only when run as a program: importable as a library)."""
  flags.DEFINE_string("workdir", None, "A dpjax.main workdir of a classifier.")
  flags.DEFINE_string(
    "data",
    None,
    "A .tsv/.csv/.jsonl file (labels optional), sst2:validation or tfds:NAME:SPLIT.",
  )
  flags.DEFINE_string("out", None, "Write the predictions (JSON lines) here; default: stdout.")
  flags.DEFINE_integer("batch_size", 64, "Prediction batch size.")
  flags.DEFINE_string("text_field", None, "The text column; default: the run's data.text_field.")


def _refuse_causal(workdir: str | Path, task: str) -> None:
  if task == "causal_lm":
    raise ConfigError(
      f"{workdir} is a language model (config.model.task=causal_lm), not a classifier: "
      f"generate text with python -m dpjax.generate --workdir={workdir}"
    )


def _trained(workdir_or_trained: str | Path | Trained) -> Trained:
  """The run's classifier; a causal LM is refused before its checkpoint is read."""
  if isinstance(workdir_or_trained, Trained):
    trained = workdir_or_trained
    _refuse_causal("the run", trained.config.model.task)
    return trained
  _refuse_causal(workdir_or_trained, read_config(workdir_or_trained).model.task)
  return load_trained(workdir_or_trained)


def _check_batch_size(batch_size: Any) -> int:
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
    raise ConfigError(f"batch_size must be an integer >= 1 (got {batch_size!r})")
  return batch_size


def _rows(trained: Trained, source: data_lib.Source, batch_size: int) -> list[dict[str, Any]]:
  """One dict per example of ``source``: the text, the prediction and its probabilities."""
  c = trained.config
  encoded = splits.encode_source(source, trained.tokenizer, c, None)
  split = splits.Split(encoded, np.arange(len(encoded)))
  logits = task_lib.predict_logits(trained.params, trained.model, split, batch_size)
  shifted = np.exp(logits.astype(np.float64) - logits.max(-1, keepdims=True))
  probabilities = shifted / shifted.sum(-1, keepdims=True)
  names = label_names(c)
  line_of = getattr(source, "line_of", None)
  rows = []
  for i, p in enumerate(probabilities):
    example = source[i]
    predicted = int(np.argmax(logits[i]))
    row: dict[str, Any] = {"text": example.text}
    if line_of is not None:
      row["line"] = line_of(i)
    row.update(
      {
        "prediction": predicted,
        "prediction_name": names[predicted],
        "probabilities": [float(x) for x in p],
      }
    )
    if example.label is not None:
      row["label"] = int(example.label)
    rows.append(row)
  return rows


def predict(
  workdir_or_trained: str | Path | Trained, texts: Sequence[str], batch_size: int = 64
) -> list[dict[str, Any]]:
  """The run's prediction for each text: ``{"text", "prediction", "prediction_name",
  "probabilities"}``, in the order given.

  ``workdir_or_trained``: a ``dpjax.main`` workdir, or its :func:`dpjax.load_trained`
  (load once, predict many times).

  Raises:
    ConfigError: the workdir is not a run or is a causal LM; ``batch_size`` < 1.
    TypeError / ValueError: ``texts`` is not a sequence of non-empty strings.
  """
  if isinstance(texts, (str, bytes)):
    raise TypeError("texts must be a sequence of strings, not one string")
  texts = list(texts)
  for i, text in enumerate(texts):
    if not isinstance(text, str):
      raise TypeError(f"texts[{i}] must be a string (got {type(text).__name__})")
    if not text.strip():
      raise ValueError(f"texts[{i}] is empty")
  batch_size = _check_batch_size(batch_size)
  trained = _trained(workdir_or_trained)
  if not texts:
    return []
  examples = data_lib.ExampleList([data_lib.Example(t) for t in texts], name="texts")
  return _rows(trained, examples, batch_size)


def predict_data(
  workdir_or_trained: str | Path | Trained,
  data: str,
  batch_size: int = 64,
  text_field: str | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
  """(one row per example of ``data`` as :func:`predict`'s, with its file ``line`` and
  ``label`` when the file has labels; a summary: count, step, label names, accuracy).

  Raises:
    ConfigError: as :func:`predict`; ``data`` is missing or has a label outside the run's
      ``[0, data.num_labels)``.
    DataError: ``data`` has a bad row (the message names its line).
  """
  batch_size = _check_batch_size(batch_size)
  named = data.startswith("sst2:") or data_lib.TfdsSpec.matches(data)
  if not named and not Path(data).is_file():
    raise ConfigError(
      f"--data file {data!r} not found (a .tsv/.csv/.jsonl file, sst2:validation or "
      f"{data_lib.TfdsSpec.FORM} in the run's data.tfds_dir)"
    )
  trained = _trained(workdir_or_trained)
  c = trained.config
  if text_field:
    c = c.copy_and_resolve_references()
    c.data.text_field = text_field
  source = splits.source_for(data, c, key="--data", optional_labels=True)
  rows = _rows(trained, source, batch_size)
  summary: dict[str, Any] = {
    "count": len(rows),
    "step": trained.step,
    "data": data,
    "label_names": list(label_names(c)),
  }
  labelled = [r for r in rows if "label" in r]
  if labelled:
    correct = sum(r["prediction"] == r["label"] for r in labelled)
    summary["accuracy"] = correct / len(labelled)
  return rows, summary


def _write_atomically(path: Path, lines: list[str]) -> None:
  """``lines`` in ``path``, which appears only complete (a temporary file renamed)."""
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
  try:
    with os.fdopen(fd, "w") as f:
      f.writelines(line + "\n" for line in lines)
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise


def _fail(message: str) -> None:
  print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
  sys.exit(2)


def _check_out(out: str, data: str) -> Path:
  path = Path(out)
  if path.is_dir():
    _fail(f"--out {out} is a directory; give a file name, e.g. {path / 'predictions.jsonl'}")
  if not path.parent.is_dir():
    _fail(f"--out {out}: directory {path.parent} does not exist")
  if path.exists() and Path(data).exists() and path.samefile(data):
    _fail(f"--out {out} is the --data file; give another file name")
  return path


def main(argv: list[str]) -> None:
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Library INFO logs (checkpointing) off by default.
  FLAGS = flags.FLAGS
  if len(argv) > 1 or not FLAGS.workdir or not FLAGS.data:
    _fail("usage: python -m dpjax.predict --workdir=DIR --data=FILE [--out=preds.jsonl]")
  if FLAGS.batch_size < 1:
    _fail(f"--batch_size must be an integer >= 1 (got {FLAGS.batch_size})")
  out = _check_out(FLAGS.out, FLAGS.data) if FLAGS.out else None
  # Through the imported module: run as ``-m`` this file is ``__main__``.
  import dpjax.predict as library  # pylint: disable=import-outside-toplevel

  try:
    rows, summary = library.predict_data(
      FLAGS.workdir, FLAGS.data, FLAGS.batch_size, FLAGS.text_field
    )
  except (ConfigError, DataError, PretrainedError) as err:
    _fail(str(err))
  lines = [json.dumps(row, ensure_ascii=False) for row in rows]
  if out is None:
    sys.stdout.write("".join(line + "\n" for line in lines))
    print(json.dumps(summary), file=sys.stderr)
    return
  _write_atomically(out, lines)
  print(json.dumps({**summary, "out": str(out)}))


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=_cli.parse_flags)
