"""The experiment runner end to end on a tiny model: summary, resume, budget, errors, eval CLI."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dpjax import privacy, report
from dpjax.privacy.secret import RunSecret
from dpjax.train import loop
from dpjax.train import metrics as metrics_lib
from dpjax.train import task as task_lib
from dpjax.train.config import ConfigError
from experiments import sst2, sst2_small
from tests.train.runs import ROOT, SHARED_RUN, copy_run, run_main, tiny


def tensorboard_scalars(logdir):
  """{tag: [(step, value)]} read back from the TFRecord event files."""
  from tensorboardX.proto import event_pb2

  scalars = {}
  for path in sorted(Path(logdir).glob("events.out.tfevents.*")):
    data = path.read_bytes()
    offset = 0
    while offset < len(data):
      length = int.from_bytes(data[offset : offset + 8], "little")
      event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
      offset += 16 + length
      for value in event.summary.value:
        scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars


def test_summary_fields_are_present_and_sane(trained):
  tmp_path, summary = trained
  on_disk = json.loads((tmp_path / "summary.json").read_text())
  assert on_disk == json.loads(json.dumps(summary))
  n, b = summary["dataset_size"], 64
  assert 400 < n < 640 and summary["sampling_prob"] == pytest.approx(b / n)
  assert summary["delta"] == pytest.approx(n**-1.1)
  assert summary["steps"] == 16 and summary["accountant"] == "pld"
  assert 0.99 * 8.0 <= summary["epsilon"] <= 8.0
  # ε is the ledger's: recompute it from (q, σ, steps) with dp_accounting.
  assert summary["epsilon"] == pytest.approx(
    privacy.compute_epsilon(summary["noise_multiplier"], b / n, 16, summary["delta"]), rel=1e-9
  )
  assert summary["eval"]["count"] == 64 and 0.0 <= summary["eval"]["accuracy"] <= 1.0
  assert len(summary["params_sha256"]) == 64 and summary["params_global_norm"] > 0
  assert not summary["stopped_by_budget"] and not summary["preempted"]
  # Only public quantities beside ε: nothing computed from the private batches.
  for private in ("examples_seen", "examples_per_second", "wall_seconds", "loss", "seed"):
    assert private not in summary
  assert summary["guarantee"].startswith("(epsilon, delta)-DP for add/remove")
  assert summary["neighboring_relation"] == "add_or_remove_one" and "N" in summary["public"]
  assert summary["epsilon_replace_one"] == pytest.approx(
    _replace_one_epsilon(summary["noise_multiplier"], b / n, 16, summary["delta"]), rel=1e-9
  )
  assert summary["epsilon_replace_one"] > summary["epsilon"]
  # The cross-check brackets the reported ε, and the attacker's view is the ledger's.
  interval = summary["epsilon_interval"]
  low, high = interval["pld_optimistic_pessimistic"]
  assert low <= summary["epsilon"] == high and interval["rdp_upper"] > summary["epsilon"]
  # PRV's discretization fails on this tiny run's (q = 1/8, σ = 0.57, 16 steps): it says why.
  assert interval["prv_lower_upper"] is None
  assert "Discrete mean differs" in interval["unavailable"]["prv"]
  ledger = privacy.PrivacyLedger.from_dict(summary["ledger"])
  tpr = summary["attacker"]["max_tpr_at_fpr"]
  assert tpr["0.01"] == pytest.approx(float(ledger.tpr_bound(0.01)), rel=1e-9)
  assert 0.001 < tpr["0.001"] < tpr["0.01"] < tpr["0.1"] < 1
  assert 0 < summary["attacker"]["gdp_mu"] < 10
  assert summary["noise"]["max_abs_normal"] > 11 and summary["noise"]["tail_probability"] < 1e-12
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert {r["split"] for r in rows} == {"privacy", "eval"}
  assert [r["step"] for r in rows if r["split"] == "privacy"] == [4, 8, 12, 16]
  assert rows[-1]["split"] == "eval" and rows[-1]["epsilon"] == summary["epsilon"]
  assert not (tmp_path / "private_metrics.jsonl").exists()
  events = tensorboard_scalars(tmp_path / "tensorboard")
  assert not any(tag.startswith(("train/", "private")) for tag in events)
  assert events["eval/epsilon"] == [(16, pytest.approx(summary["epsilon"], rel=1e-6))]
  # ε spent grows with every logged step and ends at the summary's.
  spent = [e for _, e in events["privacy/epsilon"]]
  assert spent == sorted(spent) and spent[-1] == pytest.approx(summary["epsilon"], rel=1e-6)
  plots = report.write_plots(tmp_path)
  assert {p.name for p in plots} == {"eval_accuracy.png", "epsilon.png"}
  assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 1000 for p in plots)


def _replace_one_epsilon(sigma, q, steps, delta):
  import dp_accounting
  from dp_accounting.pld import pld_privacy_accountant

  acc = pld_privacy_accountant.PLDAccountant(
    dp_accounting.NeighboringRelation.REPLACE_ONE, value_discretization_interval=1e-4
  )
  acc.compose(
    dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
    )
  )
  return acc.get_epsilon(delta)


def test_sigkill_then_resume_gives_identical_params_and_epsilon(tmp_path, token_cache):
  """The killed run's resume equals its uninterrupted twin (same fixed noise seed)."""
  steps = "--config.train.steps=24 --config.dp.insecure_fixed_noise_seed=5".split()
  cache = f"--config.data.cache_dir={token_cache}"
  evals = "--config.data.eval_limit=64"
  reference = run_main(tmp_path / "a", *steps, cache, evals)
  assert reference.returncode == 0, reference.stderr[-2000:]
  assert "compiling the train step (2 batch shape(s))" in reference.stdout
  want = json.loads((tmp_path / "a" / "summary.json").read_text())

  killed_dir = tmp_path / "b"
  proc = subprocess.Popen(
    [
      sys.executable,
      "-m",
      "dpjax.main",
      "--config=experiments/sst2.py:tiny",
      f"--workdir={killed_dir}",
      *steps,
      cache,
      evals,
    ],
    cwd=ROOT,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    ckpts = killed_dir / "checkpoints"
    if ckpts.exists() and any(p.name.isdigit() and int(p.name) >= 8 for p in ckpts.iterdir()):
      break
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (killed_dir / "summary.json").exists(), "the run finished before it was killed"
  resumed = run_main(killed_dir, *steps, cache, evals)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  resumed_from = re.search(r"resumed from step (\d+)", resumed.stdout)
  assert resumed_from and 8 <= int(resumed_from.group(1)) < 24, resumed.stdout[-2000:]
  got = json.loads((killed_dir / "summary.json").read_text())
  assert got["params_sha256"] == want["params_sha256"]
  assert got["epsilon"] == want["epsilon"] and got["steps"] == want["steps"] == 24
  assert got["ledger_steps"] == 24  # the replayed steps were recomputed exactly: no charge
  assert got["guarantee"] == "none (fixed noise seed)"


def test_sigterm_saves_a_checkpoint_before_exit(tmp_path, token_cache):
  proc = subprocess.Popen(
    [
      sys.executable,
      "-m",
      "dpjax.main",
      "--config=experiments/sst2.py:tiny",
      f"--workdir={tmp_path}",
      "--config.train.steps=400",
      "--config.train.checkpoint_every_steps=0",
      f"--config.data.cache_dir={token_cache}",
      "--config.data.eval_limit=64",
    ],
    cwd=ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.DEVNULL,
    text=True,
  )
  deadline = time.time() + 240
  while time.time() < deadline and not (tmp_path / "metrics.jsonl").exists():
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  # Exit 75 (EX_TEMPFAIL): saved and resumable, not finished.
  assert proc.returncode == 75 and "SIGTERM: saved checkpoint at step" in out
  assert "preempted: checkpoint saved at step" in out and "done" not in out
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["preempted"] and 4 <= summary["steps"] < 400
  steps = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
  assert steps == [summary["steps"]]


def test_corrupt_latest_checkpoint_falls_back_to_previous_never_to_a_fresh_ledger(
  tmp_path, trained
):
  # A copy of the shared finished 16-step run (σ calibrated to ε = 8, checkpoints 4 to 16).
  shared, first = trained
  workdir = copy_run(shared, tmp_path / "run")
  token_cache = str(shared.parent / "token_cache")
  fixed = {"dp.noise_multiplier": 0.7}  # σ given from now on: ε is reported, no budget
  for f in (workdir / "checkpoints" / "16").rglob("*"):
    if f.is_file():
      f.write_bytes(b"garbage")
  c = tiny(token_cache, **fixed, **{"train.steps": 20, "resume": "allow_changes"})
  summary = loop.train_and_evaluate(c, workdir)
  # Restored from step 12 (not 16, not 0) and trained to 20. Steps 13-16 had been executed
  # (and their outputs written) before: they are charged again, and re-keyed.
  q = 64 / summary["dataset_size"]
  assert summary["steps"] == 20 and summary["ledger_steps"] == 24
  sigma = first["noise_multiplier"]  # steps 1-16 (13-16 charged again) ran under it
  segments = [(s["noise_multiplier"], s["steps"]) for s in summary["ledger"]["segments"]]
  assert segments == [(sigma, 16), (0.7, 8)]
  assert summary["epsilon"] == pytest.approx(
    privacy.compute_epsilon(0.7, q, 8, summary["delta"], prior=(privacy.Segment(q, sigma, 16),)),
    rel=1e-9,
  )
  assert (workdir / "checkpoints_unreadable" / "16").is_dir()  # Kept aside, not deleted.
  journal_text = (workdir / "privacy_journal.jsonl").read_text()
  journal = [json.loads(line) for line in journal_text.splitlines()]
  assert {(r["attempt"], r["start"]) for r in journal} == {(0, 0), (1, 12)}
  assert max(r["step"] for r in journal if r["attempt"] == 0) == 16
  meta = json.loads((workdir / "checkpoints" / "20" / "meta" / "metadata").read_text())
  secret = RunSecret.from_checkpoint(meta["secret"])
  assert meta["attempt"] == 1 and secret.noise_key(1).tolist() != secret.noise_key(0).tolist()
  # Every checkpoint unreadable: refuse rather than start over with an empty ledger.
  for f in (workdir / "checkpoints").rglob("*"):
    if f.is_file():
      f.write_bytes(b"garbage")
  again = tiny(token_cache, **fixed, **{"train.steps": 24, "resume": "allow_changes"})
  with pytest.raises(ConfigError, match="refusing to restart with a fresh privacy ledger"):
    loop.train_and_evaluate(again, workdir)
  # Also on the next attempt, when the unreadable checkpoints have been moved aside.
  with pytest.raises(ConfigError, match="refusing to restart with a fresh privacy ledger"):
    loop.train_and_evaluate(again, workdir)


def test_training_stops_at_the_budget_and_refuses_to_exceed_it(tmp_path, token_cache):
  c = tiny(
    token_cache,
    **{
      "dp.noise_multiplier": 0.8,
      "dp.epsilon_budget": 3.0,
      "train.steps": 60,
      "train.private_metrics": True,
    },
  )
  summary = loop.train_and_evaluate(c, tmp_path)
  # Asked for, the private batch statistics go to their own file, tag and plot, labelled.
  private_text = (tmp_path / "private_metrics.jsonl").read_text()
  private = [json.loads(line) for line in private_text.splitlines()]
  assert {r["split"] for r in private} == {"train", "run"} and private[-1]["examples_seen"] > 0
  public = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert not any("loss" in r and r["split"] != "eval" for r in public)
  assert any(
    t.startswith("private_not_covered_by_dp/")
    for t in tensorboard_scalars(tmp_path / "tensorboard")
  )
  assert "private_loss.png" in {p.name for p in report.write_plots(tmp_path)}
  assert summary["stopped_by_budget"] and 0 < summary["steps"] < 60
  assert summary["epsilon"] <= 3.0
  one_more = privacy.compute_epsilon(
    0.8, summary["sampling_prob"], summary["steps"] + 1, summary["delta"]
  )
  assert one_more > 3.0  # It stopped at the last step that fits, not earlier.
  with pytest.raises(ConfigError, match="the epsilon budget 3 is already spent"):
    loop.train_and_evaluate(c, tmp_path)


@pytest.mark.parametrize(
  "args, message",
  [
    # One case per path to exit 2: absl's unknown key and wrong type, config validation,
    # and a check that needs the data (N). The messages of the other checks: next test.
    (["--config.dp.epsilonn=3"], "epsilonn"),
    (["--config.train.batch_size=abc"], "batch_size"),
    (["--config.dp.epsilon=1000"], "config.dp.epsilon must be in (0, 100]"),
    (["--config.train.batch_size=100000"], "config.train.batch_size must be in (0, dataset_size="),
    # and data that cannot be opened: a TFDS dataset not prepared in data.tfds_dir
    (
      ["--config.data.train=tfds:dpjax_no_such:train", "--config.data.tfds_dir=/nonexistent"],
      "config.data.train='tfds:dpjax_no_such:train': tfds dataset 'dpjax_no_such': not "
      "registered and not prepared in /nonexistent (config.data.tfds_dir names",
    ),
    (["--config=/nonexistent/config.py"], "--config cannot be loaded: [Errno 2]"),
    (["--config=tests/fixtures/broken_config.py"], "--config: invalid syntax"),
  ],
)
def test_config_errors_are_one_line_and_exit_2(tmp_path, args, message):
  result = run_main(tmp_path / "w", *args, timeout=120)
  assert result.returncode == 2, result.stderr[-1000:]
  stderr_lines = result.stderr.splitlines()
  lines = [line for line in stderr_lines if line.startswith("error:") or "Error" in line]
  assert len(lines) == 1 and message in lines[0], result.stderr[-1000:]
  assert "Traceback" not in result.stderr
  assert not (tmp_path / "w").exists()


@pytest.mark.parametrize(
  "overrides, message",
  [
    ({"dp.epsilon": -1}, "config.dp.epsilon must be a number > 0 (got -1.0)"),
    ({"data.train": "/nonexistent.tsv"}, "data file '/nonexistent.tsv' not found"),
    ({"data.train_fraction": 1.5}, "config.data.train_fraction must be a number in (0, 1]"),
    ({"dp.insecure_fixed_noise_seed": -3}, "dp.insecure_fixed_noise_seed must be None or"),
    ({"dp.epsilon_budget": 0}, "config.dp.epsilon_budget must be a number > 0, or None (got 0.0)"),
    ({"dp.delta": 2.0}, "config.dp.delta must be in (0, 1), or None (got 2.0)"),
    ({"train.steps": 0}, "config.train.steps must be an integer > 0, or None (got 0)"),
    ({"model.train": "nomatch"}, "config.model.train='nomatch' selects no parameter"),
    ({"dp.noise_multiplier": 0.0}, "dp.noise_multiplier must be > 0, or None (for no noise"),
    ({"data.eval": "sst2:test"}, "data source 'sst2:test': sst2 split must be one of"),
  ],
)
def test_config_errors_name_the_key_and_range_and_write_nothing(
  tmp_path, token_cache, overrides, message
):
  with pytest.raises(ConfigError) as err:
    loop.train_and_evaluate(tiny(token_cache, **overrides), tmp_path / "w")
  assert message in str(err.value) and "\n" not in str(err.value)
  assert not (tmp_path / "w").exists()


def test_label_words_on_a_model_without_an_mlm_head_is_refused_unless_accepted(
  tmp_path, token_cache
):
  """all-MiniLM-L6-v2 ships no masked-LM head: a fresh one knows no label word."""
  li2022 = {"model.name": "minilm", "model.task": "label_words", "model.train": "head"}
  c = tiny(token_cache, **li2022, **{"data.template": "{text} It was [MASK] ."})
  with pytest.raises(ConfigError) as err:
    loop.train_and_evaluate(c, tmp_path / "w")
  assert "config.model.task=label_words needs a pretrained masked-LM head" in str(err.value)
  assert "allow_fresh_mlm_head=True" in str(err.value) and not (tmp_path / "w").exists()
  c.model.allow_fresh_mlm_head = True
  task = task_lib.build(c)
  assert task.fresh_heads == ("lm_head",)
  task_lib.check_fresh_heads(c, task)  # accepted
  # The tiny random encoder has no pretrained anything: nothing is "fresh" by surprise.
  cloze = {"model.task": "label_words", "data.template": "{text} It was [MASK] ."}
  assert task_lib.build(tiny(token_cache, **cloze)).fresh_heads == ()


def test_a_diverging_run_is_one_line_not_a_traceback(tmp_path, token_cache):
  c = tiny(token_cache, **{"train.steps": 4, "train.learning_rate": 1e30})
  with pytest.raises(ConfigError, match="a non-finite loss at step 2; lower config.train"):
    loop.train_and_evaluate(c, tmp_path)


def test_report_refuses_empty_metrics_and_skips_a_torn_last_line(tmp_path):
  (tmp_path / "metrics.jsonl").write_text("")
  result = subprocess.run(
    [sys.executable, "-m", "dpjax.report", f"--workdir={tmp_path}"],
    cwd=ROOT,
    capture_output=True,
    text=True,
  )
  assert result.returncode == 2 and result.stderr.strip().endswith("holds no rows to plot yet")
  (tmp_path / "metrics.jsonl").write_text(
    '{"step": 4, "split": "privacy", "epsilon": 1.0}\n{"step": 8, "spl'
  )
  assert [r["step"] for r in metrics_lib.read(tmp_path)] == [4]
  (tmp_path / "metrics.jsonl").write_text('{"step": 4, "spl\n{"step": 8}\n')
  with pytest.raises(ValueError, match=r"metrics.jsonl:1 is not a JSON line"):
    metrics_lib.read(tmp_path)


def test_workdir_of_another_config_and_unwritable_workdir_are_refused(
  tmp_path, token_cache, trained
):
  workdir, _ = trained
  before = (workdir / "summary.json").read_text()
  with pytest.raises(ConfigError, match=r"holds a run with a different config \(dp.epsilon\)"):
    shared_cache = str(workdir.parent / "token_cache")  # the run's own: only dp.epsilon differs
    loop.train_and_evaluate(tiny(shared_cache, **{**SHARED_RUN, "dp.epsilon": 3.0}), workdir)
  assert (workdir / "summary.json").read_text() == before
  if os.geteuid() != 0:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(ConfigError, match="is not writable"):
      loop.train_and_evaluate(tiny(token_cache), locked / "run")
  with pytest.raises(ConfigError, match="is not writable"):
    loop.train_and_evaluate(tiny(token_cache), "/proc/dpjax-run")
  with pytest.raises(ConfigError, match="workdir must be a directory path, not a URL"):
    loop.train_and_evaluate(tiny(token_cache), "gs://bucket/run")
  assert not Path("gs:").exists()


def test_lora_targets_choose_the_adapted_modules():
  import numpy as np
  from flax import traverse_util

  from dpjax.train import config as config_lib
  from dpjax.train import task as task_lib

  c = sst2.get_config("tiny")
  c.model.train = "lora"
  c.model.lora_targets = ("layer_1/.*(query|intermediate)",)
  config_lib.validate(c)
  backbone, _, _, _ = task_lib.backbone_for(c)
  model = task_lib.task_model(c, backbone, None)
  batch = {
    "input_ids": np.ones((1, 8), np.int32),
    "attention_mask": np.ones((1, 8), np.int32),
    "token_type_ids": np.zeros((1, 8), np.int32),
    "label": np.zeros(1, np.int32),
  }
  trainable, frozen = task_lib.init_params(c, model, batch, None, {})
  adapted = {p.rsplit("/", 1)[0] for p in traverse_util.flatten_dict(trainable, sep="/")}
  assert adapted == {
    "backbone/encoder/layer_1/attention/self/query",
    "backbone/encoder/layer_1/intermediate/dense",
    "head",
  }
  assert "lora_a" not in str(traverse_util.flatten_dict(frozen, sep="/").keys())
  c.model.lora_targets = ("no_such_module",)
  with pytest.raises(ConfigError, match=r"config.model.lora_targets must match at least one"):
    task_lib.init_params(c, task_lib.task_model(c, backbone, None), batch, None, {})
  c.model.lora_targets = ("query(",)
  with pytest.raises(ConfigError, match=r"config.model.lora_targets must be a tuple of regular"):
    config_lib.validate(c)


@pytest.mark.parametrize(
  "experiment,variant",
  [
    (sst2, v)
    for v in (
      "tiny",
      "quick",
      "nonprivate",
      "demo",
      "demo_nonprivate",
      "demo_large",
      "lora",
      "li2022",
    )
  ]
  + [(sst2_small, v) for v in sst2_small.VARIANTS],
  ids=lambda x: x if isinstance(x, str) else x.__name__.split(".")[-1],
)
def test_every_sst2_variant_is_valid_and_its_adapters_exist_in_minilm(experiment, variant):
  import jax
  import numpy as np
  from flax import traverse_util

  from dpjax.models import bert
  from dpjax.train import config as config_lib
  from dpjax.train import task as task_lib

  c = experiment.get_config(variant)
  config_lib.validate(c)
  if c.model.train != "lora":
    return
  model = task_lib.task_model(c, bert.BertConfig(), None)  # the defaults are MiniLM's shape
  batch = {
    "input_ids": np.ones((1, 8), np.int32),
    "attention_mask": np.ones((1, 8), np.int32),
    "token_type_ids": np.zeros((1, 8), np.int32),
  }
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), batch))["params"]
  adapted = sorted(p[:-1] for p in traverse_util.flatten_dict(shapes) if p[-1] == "lora_a")
  layers = {p[2] for p in adapted}
  if c.model.lora_targets:  # quick's: every Dense layer of the top 3 of 6 layers
    assert layers == {"layer_3", "layer_4", "layer_5"} and len(adapted) == 18
  else:  # the preset: queries and values of every layer
    assert len(layers) == 6 and {p[-1] for p in adapted} == {"query", "value"}


def test_evaluate_equals_scoring_one_example_at_a_time(tmp_path):
  """Length-sorted, padded eval batches give the same sums as each example alone."""
  import numpy as np
  import optax

  from dpjax.models import lora
  from dpjax.train import splits
  from dpjax.train import task as task_lib

  words = "a fine , moving and often very funny film about grief and hope".split()
  rows = [" ".join(words[:n]) for n in (14, 2, 9, 1, 15, 5, 3)] + [" ".join(words * 2)]
  data = tmp_path / "mixed.tsv"
  data.write_text("sentence\tlabel\n" + "".join(f"{r}\t{i % 2}\n" for i, r in enumerate(rows)))
  c = sst2.get_config("tiny")
  backbone, _, _, tokenizer = task_lib.backbone_for(c)
  split = splits.load_split(str(data), tokenizer, c, None)
  assert len(set(split.encoded.lengths)) > 4 and max(split.encoded.lengths) > 16
  model = task_lib.task_model(c, backbone, None)
  params = lora.combine(*task_lib.init_params(c, model, split.batch(np.arange(1)), None, {}))
  losses, correct = [], []
  for i in range(len(split)):
    example = split.batch(np.array([i]))
    logits = model.apply({"params": params}, example)
    losses.append(
      float(optax.softmax_cross_entropy_with_integer_labels(logits, example["label"])[0])
    )
    correct.append(float(np.argmax(logits[0]) == example["label"][0]))
  for batch_size in (3, 8, 64):
    result = task_lib.evaluate(params, model, split, batch_size)
    assert result["count"] == len(rows)
    assert result["accuracy"] == pytest.approx(np.mean(correct), abs=1e-9)
    assert result["loss"] == pytest.approx(np.mean(losses), rel=1e-5)


def test_evaluate_cli_scores_a_labelled_file(tmp_path, trained):
  workdir, summary = trained
  data = tmp_path / "mine.tsv"
  data.write_text("sentence\tlabel\na wonderful film\t1\na dull , lifeless mess\t0\nfine\t1\n")
  result = subprocess.run(
    [sys.executable, "-m", "dpjax.evaluate", f"--workdir={workdir}", f"--data={data}"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  scores = json.loads(result.stdout.strip().splitlines()[-1])
  assert scores["count"] == 3 and scores["step"] == 16 and 0 <= scores["accuracy"] <= 1
  # ε and δ exactly as the run's summary states them (the ledger at the run's own δ).
  assert (scores["epsilon"], scores["delta"]) == (summary["epsilon"], summary["delta"])
  bad = subprocess.run(
    [sys.executable, "-m", "dpjax.evaluate", f"--workdir={tmp_path / 'none'}", f"--data={data}"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert bad.returncode == 2 and bad.stderr.startswith("error:")
