"""The audit reports and ``python -m dpjax.audit`` on a finished tiny run."""

import json
import subprocess
import sys
import types

import ml_collections
import pytest

from dpjax import privacy, report
from dpjax.audit import __main__ as audit_cli
from dpjax.audit import reports
from dpjax.models import pretrained
from dpjax.train import loop, splits
from dpjax.train.config import ConfigError
from tests.train.runs import ROOT, SHARED_RUN, copy_run, tiny


def flags_for(workdir, **overrides):
  values = dict(
    workdir=str(workdir),
    reports=["membership", "groups", "whitebox"],
    reference=None,
    group_by="label",
    max_rows=150,
    shadows=0,
    bootstrap=20,
    trials=2000,
    seed=0,
  )
  return types.SimpleNamespace(**{**values, **overrides})


def test_every_report_is_written_and_states_its_inputs(trained, tmp_path, capsys):
  workdir, summary = trained
  run = copy_run(workdir, tmp_path / "run")
  written = audit_cli.run(flags_for(run, reference=str(run), shadows=1))
  names = sorted(p.name for p in written)
  assert names == sorted(
    [
      "membership.json",
      "membership_roc.png",
      "groups_by_label.json",
      "groups_by_label.png",
      "whitebox.json",
    ]
  )
  lines = capsys.readouterr().out.splitlines()
  assert [line.split(" ")[0] for line in lines] == ["membership", "groups", "whitebox:"]
  shown = report.audit_lines(run)  # python -m dpjax.report lists them too (by file name)
  assert sorted(line for line in shown if not line.endswith(".png")) == sorted(lines)
  assert sum(line.endswith(".png") for line in shown) == 2

  mia = json.loads((run / "audit" / "membership.json").read_text())
  assert mia["epsilon"] == pytest.approx(summary["epsilon"])
  assert "not itself a release" in mia["computed_from"]
  assert mia["members"].startswith("150 rows of the training subset")
  assert "outside the training subset" in mia["non_members"]
  ledger = privacy.PrivacyLedger.from_dict(summary["ledger"])
  assert [a["attack"] for a in mia["attacks"]] == ["loss", "loss_vs_pretrained", "lira_offline"]
  for attack in mia["attacks"]:
    assert 0 <= attack["auroc"] <= 1
    low, high = attack["auroc_interval"]
    assert 0 <= low <= attack["auroc"] <= high <= 1 and low < high  # BCa: the estimate inside
    assert attack["interval_method"] == "BCa bootstrap, 20 resamples"
    # 150 non-members are too few for FPR 0.1%: the report says so rather than a tight interval.
    assert "fewer than 1/FPR" in attack["tpr_at_fpr_note"]["0.001"]
    assert attack["tpr_intervals"]["0.001"][0] == 0
    assert attack["max_tpr_at_fpr"]["0.01"] == pytest.approx(float(ledger.tpr_bound(0.01)))
    assert set(attack["auroc_by_label"]) <= {"label 0", "label 1"}
    assert all(0 <= v <= 1 for v in attack["auroc_by_label"].values())

  # The shadow run trained on rows of the file that are neither members nor non-member targets.
  shadow = run / "audit" / "shadows" / "shadow_0"
  shadow_rows = {json.loads(line)["sentence"] for line in (shadow / "train.jsonl").open()}
  shadow_summary = json.loads((shadow / "run" / "summary.json").read_text())
  assert shadow_summary["dataset_size"] == len(shadow_rows)
  c = ml_collections.ConfigDict(json.loads((run / "config.json").read_text()))
  _, _, tokenizer = pretrained.load("minilm")
  source = splits.source_for(c.data.train, c)
  members = splits.load_split(
    c.data.train, tokenizer, c, c.data.cache_dir, fraction=c.data.train_fraction, seed=c.seed
  )
  assert not shadow_rows & {source[int(i)].text for i in members.indices}

  groups = json.loads((run / "audit" / "groups_by_label.json").read_text())
  assert groups["computed_from"] == "released parameters and the public evaluation split only"
  assert sum(row["count"] for row in groups["groups"]) == summary["eval"]["count"]
  accuracy = (
    sum(row["count"] * row["dp_accuracy"] for row in groups["groups"]) / summary["eval"]["count"]
  )
  assert accuracy == pytest.approx(summary["eval"]["accuracy"])
  # The run is its own reference here: no accuracy drop in any group.
  assert all(row["accuracy_drop"] == 0 for row in groups["groups"])
  assert all(
    0 <= row["clipped_fraction"] <= 1 and row["mean_grad_norm"] > 0 for row in groups["groups"]
  )

  box = json.loads((run / "audit" / "whitebox.json").read_text())
  assert box["applicable"] and not box["violated"]
  assert box["noise_multiplier"] == pytest.approx(summary["noise_multiplier"])
  assert box["trials_in"] + box["trials_out"] == 2000


def test_groups_by_length_and_a_mismatched_reference(trained, tmp_path):
  workdir, _ = trained
  report = reports.groups(workdir, group_by="length", bootstrap_samples=20)
  assert all(row["group"].startswith("len ") for row in report["groups"])
  other = copy_run(workdir, tmp_path / "other")
  config = json.loads((other / "config.json").read_text())
  config["data"]["eval_limit"] = 32
  (other / "config.json").write_text(json.dumps(config))
  with pytest.raises(ConfigError, match="evaluates on other rows"):
    reports.groups(workdir, reference=other, bootstrap_samples=20)


def test_groups_by_a_column_of_the_eval_file(trained, tmp_path):
  workdir, _ = trained
  run = copy_run(workdir, tmp_path / "column")
  rows = ["sentence\tlabel\ttopic"]
  rows += [
    f"a {'fine' if i % 2 else 'poor'} film number {i}\t{i % 2}\t{'ab'[i % 3 == 0]}"
    for i in range(30)
  ]
  eval_file = tmp_path / "eval.tsv"
  eval_file.write_text("\n".join(rows) + "\n")
  saved = json.loads((run / "config.json").read_text())
  saved["data"].update(eval=str(eval_file), eval_limit=None)
  (run / "config.json").write_text(json.dumps(saved))
  report = reports.groups(run, group_by="column:topic", bootstrap_samples=20)
  counts = {row["group"]: row["count"] for row in report["groups"]}
  assert counts == {"a": 20, "b": 10}
  with pytest.raises(ConfigError, match="column:colour: .*colour"):
    reports.groups(run, group_by="column:colour", bootstrap_samples=20)
  with pytest.raises(ConfigError, match="needs an eval file with that column"):
    reports.groups(workdir, group_by="column:topic", bootstrap_samples=20)


def test_shadows_need_rows_outside_the_training_subset(trained):
  workdir, _ = trained
  with pytest.raises(ConfigError, match="--shadows needs rows"):
    reports.membership(workdir, max_rows=10**6, shadows=1, bootstrap_samples=10)


def test_a_run_saved_before_the_audit_keys_existed_is_audited_and_resumed(trained, tmp_path):
  workdir, summary = trained
  run = copy_run(workdir, tmp_path / "old")
  saved = json.loads((run / "config.json").read_text())
  del saved["audit"]
  (run / "config.json").write_text(json.dumps(saved))
  with pytest.raises(ConfigError, match="set config.audit.canaries"):
    reports.canaries(run)  # read with the default (no canaries), not an AttributeError
  c = tiny(saved["data"]["cache_dir"], **SHARED_RUN)
  assert loop.train_and_evaluate(c, run)["params_sha256"] == summary["params_sha256"]


def test_membership_without_held_out_rows_is_refused(trained, tmp_path):
  workdir, _ = trained
  run = copy_run(workdir, tmp_path / "whole_file")
  saved = json.loads((run / "config.json").read_text())
  saved["data"].update(train_fraction=1.0, eval="sst2:train")
  (run / "config.json").write_text(json.dumps(saved))
  with pytest.raises(ConfigError, match="no held-out rows to use as non-members"):
    reports.membership(run, max_rows=10, bootstrap_samples=5)


def test_an_unknown_group_column_is_refused_before_loading_anything(tmp_path):
  with pytest.raises(ConfigError, match="--group_by must be one of"):
    reports.groups(tmp_path / "no_run", group_by="colour")


def test_the_canary_report_needs_a_run_with_canaries(trained):
  workdir, _ = trained
  with pytest.raises(ConfigError, match="set config.audit.canaries"):
    reports.canaries(workdir)


def test_bad_flags_exit_2_with_one_line(trained, capsys):
  workdir, _ = trained
  # Through the command line, one case per path to exit 2 (launched side by side): absl's
  # flag parsing, and the CLI's own checks (_check_flags)...
  cases = {
    "--reports=membership,nonsense": "--reports must be a comma-separated subset",
    "--max_rows=abc": "flag --max_rows=abc: invalid literal",
  }
  launched = {
    arg: subprocess.Popen(
      [sys.executable, "-m", "dpjax.audit", f"--workdir={workdir}", arg],
      cwd=ROOT,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for arg in cases
  }
  for arg, proc in launched.items():
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2, stderr
    assert stderr.strip().count("\n") == 0 and cases[arg] in stderr
  # ... and another of those checks called directly: the same one line on stderr, exit 2.
  capsys.readouterr()
  with pytest.raises(SystemExit) as exited:
    audit_cli._check_flags(flags_for(workdir, max_rows=1))  # pylint: disable=protected-access
  stderr = capsys.readouterr().err
  assert exited.value.code == 2
  assert stderr.strip().count("\n") == 0 and "--max_rows must be an integer >= 2" in stderr
  assert not (workdir / "audit").exists()
