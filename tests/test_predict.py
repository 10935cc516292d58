"""python -m dpjax.predict and dpjax.predict.predict on the shared tiny run; data.label_names;
the refusals of an eval split that does not fit the task."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

import dpjax
from dpjax import evaluate, predict
from dpjax.train import config as config_lib
from dpjax.train import loop, splits
from dpjax.train.config import ConfigError
from experiments import sst2, sst2_users
from tests.train.runs import ROOT, copy_run, shared_run, tiny

DEV_ROWS = [
  line.split("\t") for line in (ROOT / "third_party/sst2/dev.tsv").read_text().split("\n")[1:41]
]
TEXTS = [text for text, _ in DEV_ROWS]


def _cli(module: str, *flags: str) -> subprocess.Popen:
  return subprocess.Popen(
    [sys.executable, "-m", module, *flags],
    cwd=ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


def _write(path, text: str):
  path.write_text(text)
  return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """Input files: labelled TSV, unlabeled TSV, unlabeled JSONL with another text field."""
  d = tmp_path_factory.mktemp("predict_data")
  labelled = "sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in DEV_ROWS)
  return {
    "labelled": _write(d / "labelled.tsv", labelled),
    "tsv": _write(d / "texts.tsv", "sentence\n" + "".join(f"{t}\n" for t in TEXTS)),
    "jsonl": _write(d / "texts.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in TEXTS)),
    "bad_label": _write(d / "bad.tsv", "sentence\tlabel\ngood .\t1\nawful .\t5\n"),
  }


@pytest.fixture(scope="module")
def mistakes(tmp_path_factory, files):
  """User mistakes on the command lines, started first: they run while the run trains."""
  d = tmp_path_factory.mktemp("mistakes")
  causal = d / "causal_run"
  causal.mkdir()
  (causal / "config.json").write_text(json.dumps({"model": {"task": "causal_lm"}}))
  data = f"--data={files['tsv']}"
  cases = {
    "no workdir": (
      ("dpjax.predict", f"--workdir={d / 'nope'}", data, f"--out={d / 'a.jsonl'}"),
      "config.json not found: --workdir must be a dpjax.main workdir",
      d / "a.jsonl",
    ),
    "no data file": (
      (
        "dpjax.predict",
        f"--workdir={causal}",
        f"--data={d / 'nope.tsv'}",
        f"--out={d / 'b.jsonl'}",
      ),
      "--data file",
      d / "b.jsonl",
    ),
    "causal run": (
      ("dpjax.predict", f"--workdir={causal}", data, f"--out={d / 'c.jsonl'}"),
      "python -m dpjax.generate",
      d / "c.jsonl",
    ),
    "sst2 eval of a 3-class file": (
      (
        "dpjax.main",
        "--config=experiments/sst2.py:tiny",
        f"--workdir={d / 'run3'}",
        f"--config.data.train={files['labelled']}",
        "--config.data.num_labels=3",
      ),
      "config.data.eval='sst2:validation' (binary SST-2) cannot score a model of "
      "config.data.num_labels=3",
      d / "run3",
    ),
  }
  runs = {name: _cli(*flags) for name, (flags, _, _) in cases.items()}  # concurrently
  yield {name: (runs[name], expected, written) for name, (_, expected, written) in cases.items()}
  for run in runs.values():
    if run.poll() is None:
      run.kill()
      run.communicate()


@pytest.fixture(scope="module")
def workdir(mistakes, tmp_path_factory):  # noqa: ARG001  (after the mistakes are started)
  return shared_run(tmp_path_factory)


@pytest.fixture(scope="module")
def trained(workdir):
  return dpjax.load_trained(workdir)


@pytest.fixture(scope="module")
def commands(workdir, files, tmp_path_factory):
  """The command line on unlabeled TSV (to --out) and on labelled TSV (to stdout), together."""
  out = tmp_path_factory.mktemp("predict_out") / "preds.jsonl"
  to_file = _cli("dpjax.predict", f"--workdir={workdir}", f"--data={files['tsv']}", f"--out={out}")
  to_stdout = _cli("dpjax.predict", f"--workdir={workdir}", f"--data={files['labelled']}")
  yield to_file, out, to_stdout
  for run in (to_file, to_stdout):
    if run.poll() is None:
      run.kill()
      run.communicate()


def test_predictions_are_the_argmax_of_the_model_evaluate_scores(workdir, trained, files):
  rows, summary = predict.predict_data(trained, str(files["labelled"]), batch_size=16)
  assert [r["text"] for r in rows] == TEXTS and [r["line"] for r in rows] == list(range(2, 42))
  assert [r["label"] for r in rows] == [int(y) for _, y in DEV_ROWS]
  # The model applied directly to the rows as the run encodes them.
  split = splits.load_split(str(files["labelled"]), trained.tokenizer, trained.config, None)
  logits = trained.model.apply({"params": trained.params}, split.batch(np.arange(len(split))))
  assert [r["prediction"] for r in rows] == np.argmax(logits, -1).tolist()
  probs = np.array([r["probabilities"] for r in rows])
  np.testing.assert_allclose(probs, np.asarray(jax.nn.softmax(logits)), rtol=1e-4, atol=1e-6)
  # dpjax.evaluate on the same file: its confusion matrix is the predictions'.
  result = evaluate.evaluate_workdir(workdir, str(files["labelled"]), batch_size=8)
  confusion = np.zeros((2, 2), int)
  for r in rows:
    confusion[r["label"], r["prediction"]] += 1
  assert result["confusion_matrix"] == {"labels": ["0", "1"], "counts": confusion.tolist()}
  assert summary["accuracy"] == pytest.approx(result["accuracy"]) and summary["count"] == 40
  assert summary["step"] == result["step"] == 16
  recall = confusion[1, 1] / confusion[1].sum()
  assert result["per_class"]["1"]["accuracy"] == pytest.approx(recall)
  assert result["per_class"]["0"]["count"] + result["per_class"]["1"]["count"] == 40


def test_unlabeled_tsv_and_jsonl_give_one_row_per_text_in_file_order(trained, files):
  from_texts = predict.predict(trained, TEXTS, batch_size=16)
  assert [r["text"] for r in from_texts] == TEXTS and "label" not in from_texts[0]
  tsv_rows, tsv_summary = predict.predict_data(trained, str(files["tsv"]))
  jsonl_rows, _ = predict.predict_data(trained, str(files["jsonl"]), text_field="text")
  assert "accuracy" not in tsv_summary and tsv_summary["count"] == 40
  assert [r["line"] for r in jsonl_rows] == list(range(1, 41))
  for rows in (tsv_rows, jsonl_rows):
    assert [r["text"] for r in rows] == TEXTS and all("label" not in r for r in rows)
    assert [r["prediction"] for r in rows] == [r["prediction"] for r in from_texts]
    for r, t in zip(rows, from_texts):
      assert r["probabilities"] == pytest.approx(t["probabilities"], abs=1e-6)
      assert r["prediction_name"] == str(r["prediction"])
      assert sum(r["probabilities"]) == pytest.approx(1.0)


def test_label_names_name_the_predictions_and_the_evaluated_classes(workdir, files, tmp_path):
  run = copy_run(workdir, tmp_path / "named")
  saved = json.loads((run / "config.json").read_text())
  saved["data"]["label_names"] = ["negative", "positive"]
  (run / "config.json").write_text(json.dumps(saved))
  (row,) = predict.predict(run, ["a gorgeous , witty , seductive movie ."])
  assert row["prediction_name"] == ["negative", "positive"][row["prediction"]]
  result = evaluate.evaluate_workdir(run, str(files["labelled"]))
  assert list(result["per_class"]) == ["negative", "positive"]
  assert result["confusion_matrix"]["labels"] == ["negative", "positive"]


def test_label_names_must_be_one_distinct_name_per_label():
  c = sst2.get_config("tiny")
  c.data.label_names = ("negative", "positive")
  config_lib.validate(c)
  assert config_lib.label_names(c) == ("negative", "positive")
  for names in [("negative",), ("a", "a"), ("a", ""), ("a", "b", "c")]:
    c.data.label_names = names
    with pytest.raises(ConfigError, match=r"^config.data.label_names must be \(\) or one distinct"):
      config_lib.validate(c)
  c.data.label_names = ()
  assert config_lib.label_names(c) == ("0", "1")


def test_bad_requests_are_refused(trained, files):
  with pytest.raises(TypeError, match="not one string"):
    predict.predict(trained, "one text")
  with pytest.raises(ValueError, match=r"texts\[1\] is empty"):
    predict.predict(trained, ["fine", " "])
  with pytest.raises(ConfigError, match="batch_size must be an integer >= 1"):
    predict.predict(trained, ["fine"], batch_size=0)
  # Labels of another task in --data: refused, naming the flag and the run's num_labels.
  with pytest.raises(ConfigError, match=r"^--data=.* has a label outside \[0, config.data.num"):
    predict.predict_data(trained, str(files["bad_label"]))


def test_cli_writes_the_library_predictions(trained, files, commands):
  to_file, out, to_stdout = commands
  stdout, stderr = to_file.communicate(timeout=300)
  assert to_file.returncode == 0, stderr[-2000:]
  summary = json.loads(stdout)
  assert summary["count"] == 40 and summary["out"] == str(out) and "accuracy" not in summary
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  library, _ = predict.predict_data(trained, str(files["tsv"]))
  assert [r["text"] for r in rows] == TEXTS
  assert [r["prediction"] for r in rows] == [r["prediction"] for r in library]
  # Without --out: the rows on stdout, the summary (with accuracy: the file has labels) on stderr.
  stdout, stderr = to_stdout.communicate(timeout=300)
  assert to_stdout.returncode == 0, stderr[-2000:]
  assert len(stdout.splitlines()) == 40 and json.loads(stdout.splitlines()[0])["label"] == 0
  assert 0 <= json.loads(stderr.splitlines()[-1])["accuracy"] <= 1


def test_cli_user_mistakes_are_one_line_exit_2_and_write_nothing(mistakes):
  for name, (run, expected, written) in mistakes.items():
    out, err = run.communicate(timeout=300)
    assert run.returncode == 2, (name, err[-2000:])
    assert "Traceback" not in err and len(err.splitlines()) == 1, (name, err)
    assert err.startswith("error: ") and expected in err, (name, err)
    assert out == "" and not written.exists(), name


def test_a_training_file_with_the_sst2_eval_is_refused_unless_binary(files):
  c = sst2.get_config("tiny")
  c.data.train = str(files["labelled"])
  config_lib.validate(c)  # binary: a file of SST-2 rows may be scored on SST-2's dev set
  config_lib.validate(sst2_users.get_config("tiny"))
  c.data.num_labels = 3
  with pytest.raises(ConfigError, match="config.data.eval=.*config.data.train="):
    config_lib.validate(c)
  c.data.eval = str(files["labelled"])
  config_lib.validate(c)


def test_eval_labels_outside_num_labels_are_refused_naming_the_keys(files, tmp_path):
  c = tiny(
    str(tmp_path / "cache"), **{"data.train": str(files["labelled"]), "data.train_fraction": 1.0}
  )
  c.data.eval = str(files["bad_label"])
  with pytest.raises(ConfigError) as refused:
    loop.train_and_evaluate(c, tmp_path / "run")
  message = str(refused.value)
  assert message.startswith(f"config.data.eval={str(files['bad_label'])!r} has a label outside")
  assert "config.data.num_labels=2" in message and "bad.tsv:3: label 5" in message
  assert "\n" not in message and not (tmp_path / "run").exists()
