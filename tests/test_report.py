"""``python -m dpjax.report`` on synthetic workdirs: titles, target ε, overlays, report.md, errors.

The report only reads files, so these workdirs are written here in the formats that
``dpjax.main`` writes (``metrics.jsonl`` rows as ``dpjax.train.metrics`` writes them,
``summary.json``, ``config.json``, the privacy journal): no training.
"""

import json
import math
import re
import subprocess
import sys

import pytest

from dpjax import report
from tests.train.runs import ROOT

PNG = b"\x89PNG\r\n\x1a\n"


def _plain(value):
  return value if math.isfinite(value) else str(value)  # as metrics.jsonl writes inf


def _write_rows(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_run(
  workdir,
  *,
  epsilon=8.0,
  accuracy=0.8,
  seed=0,
  dp=True,
  steps=40,
  finished=True,
  sigma=None,
  lm=False,
  private_metrics=False,
  fixed_noise_seed=None,
):
  """A workdir as dpjax.main leaves it; ε grows as sqrt(step) to ``epsilon`` at ``steps``.

  ``sigma`` given: ε is reported, not targeted (no target line); else the target is
  ``epsilon`` rounded. ``finished=False``: a
  run in progress at step ``steps`` (no summary.json yet).
  """
  workdir.mkdir(parents=True)
  n, batch = 20000, 500
  target = float(round(epsilon))  # what σ was calibrated to (ε lands just below it)
  noise = sigma if sigma is not None else 0.5
  spent = lambda step: epsilon * math.sqrt(step / steps) if dp else math.inf
  metric = "perplexity" if lm else "accuracy"
  rows = []
  for step in range(10, steps + 1, 10):
    rows.append({"step": step, "split": "privacy", "epsilon": _plain(spent(step))})
    if step % 20 == 0:
      value = accuracy - 0.1 * (steps - step) / steps
      rows.append(
        {
          "step": step,
          "split": "eval",
          metric: value,
          "count": 872.0,
          "epsilon": _plain(spent(step)),
        }
      )
  _write_rows(workdir / "metrics.jsonl", rows)
  if private_metrics:
    _write_rows(
      workdir / "private_metrics.jsonl",
      [{"step": s, "split": "train", "loss": 1.0 / s} for s in range(10, steps + 1, 10)],
    )
  config = {
    "seed": seed,
    "data": {"train": "sst2:train", "cache_dir": f"/cache/{seed}"},
    "model": {"name": "gpt2" if lm else "minilm", "train": "lora"},
    "dp": {
      "enabled": dp,
      "epsilon": target,
      "noise_multiplier": sigma,
      "epsilon_budget": None,
      "insecure_fixed_noise_seed": fixed_noise_seed,
    },
    "train": {"batch_size": batch},
  }
  (workdir / "config.json").write_text(json.dumps(config))
  segment = {"dataset_size": n, "sampling_prob": batch / n, "noise_multiplier": noise if dp else 0}
  journal = {"attempt": 0, "fingerprint": "f", "segment": {**segment, "steps": 0}, "start": 0}
  _write_rows(workdir / "privacy_journal.jsonl", [{**journal, "step": steps}])
  if finished:
    summary = {
      "epsilon": _plain(spent(steps)),
      "epsilon_replace_one": _plain(spent(steps) * 1.05),
      "dp": dp,
      "delta": 1e-5,
      "noise_multiplier": noise if dp else 0.0,
      "sampling_prob": batch / n,
      "dataset_size": n,
      "expected_batch_size": float(batch),
      "target_epsilon": target if dp and sigma is None else None,
      "epsilon_budget": target if dp and sigma is None else None,
      "unit": "example",
      "steps": steps,
      "eval": {metric: accuracy, "count": 872},
      "model": config["model"]["name"],
      "guarantee": (
        "none (fixed noise seed)"
        if fixed_noise_seed is not None
        else "(epsilon, delta)-DP for add/remove of one training example"
      ),
    }
    (workdir / "summary.json").write_text(json.dumps(summary))
  return workdir


def table_rows(text):
  """{run: {column: cell}} of report.md's table."""
  lines = [line for line in text.splitlines() if line.startswith("| ")]
  header = [c.strip() for c in lines[0].strip("|").split("|")]
  rows = [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[1:]]
  return {row["run"]: row for row in rows}


def test_one_run_is_titled_with_its_recipe_and_draws_the_target_epsilon(tmp_path):
  run = report.load_run(make_run(tmp_path / "sst2_lora", epsilon=7.99))
  plots = {p.name: p for p in report.build_plots([run])}
  try:
    assert set(plots) == {"eval_accuracy", "epsilon"}
    recipe = "sst2 · minilm lora · B=500 · σ=0.5 · ε=7.99 (δ=1e-5)"
    for plot in plots.values():
      assert plot.figure.axes[0].get_title().endswith(recipe)
    ax = plots["epsilon"].figure.axes[0]
    [target] = [line for line in ax.lines if line.get_label() == "target ε = 8"]
    assert target.get_linestyle() == "--" and list(target.get_ydata()) == [8.0, 8.0]
    assert ax.get_ylim()[1] > 8.0  # the line is inside the plot, not on its frame
    # Each eval point says how much ε had been spent when it was measured.
    marks = [t.get_text() for t in plots["eval_accuracy"].figure.axes[0].texts]
    assert marks == ["ε=5.65", "ε=7.99"]
  finally:
    report.close(list(plots.values()))


def test_a_given_sigma_has_no_target_line_and_a_run_in_progress_says_what_is_known(tmp_path):
  run = report.load_run(make_run(tmp_path / "a", sigma=0.7, epsilon=3.0, finished=False))
  assert run.target_epsilon is None and run.epsilon_budget is None
  assert report.title_line(run) == (
    "sst2 · minilm lora · B=500 · σ=0.7 · ε=3.00 · in progress (step 40)"
  )  # σ from the journal's plan (N and q too); δ unknown until the summary
  assert (run.dataset_size, run.sampling_prob) == (20000, 0.025)
  [plot] = [p for p in report.build_plots([run]) if p.name == "epsilon"]
  try:
    assert not [line for line in plot.figure.axes[0].lines if line.get_linestyle() == "--"]
  finally:
    report.close([plot])
  calibrated = report.load_run(make_run(tmp_path / "b", finished=False))
  assert calibrated.target_epsilon == 8.0  # from the config, before the summary exists
  budgeted = make_run(tmp_path / "c", sigma=0.7, epsilon=2.5)
  summary = json.loads((budgeted / "summary.json").read_text())
  (budgeted / "summary.json").write_text(json.dumps({**summary, "epsilon_budget": 3.0}))
  [plot] = [p for p in report.build_plots([report.load_run(budgeted)]) if p.name == "epsilon"]
  try:
    [budget] = [line for line in plot.figure.axes[0].lines if line.get_linestyle() == ":"]
    assert budget.get_label() == "ε budget = 3" and list(budget.get_ydata()) == [3.0, 3.0]
  finally:
    report.close([plot])


def test_several_runs_overlay_with_accuracy_vs_epsilon_and_a_table(tmp_path, capsys):
  workdirs = [
    make_run(tmp_path / "eps3", epsilon=3.0, accuracy=0.75),
    make_run(tmp_path / "s0", seed=0, accuracy=0.80),
    make_run(tmp_path / "s1", seed=1, accuracy=0.84),
    make_run(tmp_path / "nonprivate", dp=False, accuracy=0.9),
  ]
  out = tmp_path / "out"
  written = report.run([str(workdirs[0]), *(f"{w}" for w in workdirs[1:])], str(out))
  assert [p.name for p in written] == [
    "eval_accuracy.png",
    "epsilon.png",
    "accuracy_vs_epsilon.png",
    "report.md",
  ]
  assert capsys.readouterr().out.split() == [str(p) for p in written]
  for path in written[:-1]:
    assert path.read_bytes()[:8] == PNG and path.stat().st_size > 5000
  text = (out / "report.md").read_text()
  rows = table_rows(text)
  assert list(rows) == ["eps3", "s0", "s1", "nonprivate"]
  assert [rows[r]["ε"] for r in rows] == ["3.00", "8.00", "8.00", "∞"]
  assert rows["nonprivate"]["δ"] == "–" and rows["s1"]["δ"] == "1e-5"
  assert rows["s1"]["eval accuracy"] == "0.8400" and rows["eps3"]["N"] == "20000"
  for name in ("eval_accuracy", "epsilon", "accuracy_vs_epsilon"):
    assert f"]({name}.png)" in text
  assert "Operator only" not in text

  runs = [report.load_run(w) for w in workdirs]
  report.name_runs(runs)
  assert [len(g) for g in report.seed_groups(runs)] == [1, 2, 1]  # s0, s1: seeds of one recipe
  figure = report.tradeoff_figure(runs, "accuracy")
  try:
    ax = figure.axes[0]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels[-1] == "∞\n(non-private)" and "8" in labels
    infinity = ax.get_xticks()[-1]
    [private_point] = [line for line in ax.lines if line.get_label() == "nonprivate (non-private)"]
    assert private_point.get_xdata()[0] == infinity > 8 and private_point.get_marker() == "D"
    [seeds] = [c for c in ax.containers if c.get_label().startswith("s0 +1 (mean ± std of 2")]
    x, y = seeds.lines[0].get_data()
    assert (x[0], y[0]) == (pytest.approx(8.0), pytest.approx(0.82))
    assert ax.get_legend().get_bbox_to_anchor().x0 > ax.get_window_extent().x1 - 1  # outside
  finally:
    report.close([report.Plot("tradeoff", figure, "")])


def test_operator_only_plots_are_labelled_and_kept_apart_and_audits_listed(tmp_path):
  workdir = make_run(tmp_path / "run", private_metrics=True)
  (workdir / "audit").mkdir()
  audit = {"report": "whitebox", "applicable": False, "why": "a test"}
  (workdir / "audit" / "whitebox.json").write_text(json.dumps(audit))
  (workdir / "audit" / "whitebox_scores.png").write_bytes(PNG)
  written = report.write_report([report.load_run(workdir)], workdir / "plots")
  assert {p.name for p in written} == {
    "eval_accuracy.png",
    "epsilon.png",
    "private_loss.png",
    "report.md",
  }
  text = (workdir / "plots" / "report.md").read_text()
  public, operator = text.split("## Operator only: not covered by (ε, δ)")
  assert "private_loss.png" in operator and "private_loss.png" not in public
  assert "- whitebox: not applicable (a test)" in public
  assert "](../audit/whitebox_scores.png)" in public


def test_a_causal_lm_gets_perplexity_curves(tmp_path):
  runs = [
    report.load_run(make_run(tmp_path / "a", lm=True, accuracy=30.0)),
    report.load_run(make_run(tmp_path / "b", lm=True, accuracy=20.0, dp=False)),
  ]
  report.name_runs(runs)
  plots = report.build_plots(runs)
  try:
    assert [p.name for p in plots] == ["eval_perplexity", "epsilon", "perplexity_vs_epsilon"]
    assert "eval perplexity" in report.run_table(runs)[0]
  finally:
    report.close(plots)


def _fails(capsys, *args, **kwargs):
  with pytest.raises(SystemExit) as exit_info:
    report.run(*args, **kwargs)
  err = capsys.readouterr().err
  assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
  return err.strip()


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
  assert _fails(capsys, [str(tmp_path / "nope")]).startswith("error: --workdir: ")
  assert _fails(capsys, [str(tmp_path)]).endswith("metrics.jsonl not found")
  (tmp_path / "metrics.jsonl").write_text("")
  assert _fails(capsys, [str(tmp_path)]).endswith("holds no rows to plot yet")
  (tmp_path / "metrics.jsonl").write_text('{"step": 4, "spl\n{"step": 8}\n')
  assert re.search(
    r"^error: --workdir: .*metrics.jsonl:1 is not a JSON line$", _fails(capsys, [str(tmp_path)])
  )
  a, b = make_run(tmp_path / "a"), make_run(tmp_path / "b")
  assert _fails(capsys, [str(a), str(b)]).startswith("error: --out: several workdirs need --out")
  assert "given twice" in _fails(capsys, [str(a), f"{a}/"], str(tmp_path / "out"))
  (tmp_path / "file").write_text("")
  assert "is not a directory" in _fails(capsys, [str(a)], str(tmp_path / "file"))
  assert not (tmp_path / "out").exists()


def test_the_command_line_takes_a_comma_list_and_repeated_flags(tmp_path):
  a, b, c = (make_run(tmp_path / name) for name in "abc")
  assert report.workdirs_of([f"{a},{b}", f" {c} "]) == [str(a), str(b), str(c)]
  result = subprocess.run(
    [sys.executable, "-m", "dpjax.report", f"--workdir={a},{b}", f"--workdir={c}"],
    cwd=ROOT,
    capture_output=True,
    text=True,
  )
  assert result.returncode == 2 and result.stderr.startswith("error: --out: several workdirs")
  assert "Traceback" not in result.stderr


def test_a_fixed_noise_seed_run_is_marked_void_and_never_averaged_with_a_real_one(tmp_path):
  runs = [
    report.load_run(make_run(tmp_path / "real", epsilon=7.99)),
    report.load_run(make_run(tmp_path / "fixed", epsilon=7.99, seed=1, fixed_noise_seed=3)),
  ]
  assert [r.no_guarantee for r in runs] == [False, True]
  assert report.title_line(runs[1]).endswith("NO GUARANTEE (fixed noise seed)")
  assert "GUARANTEE" not in report.title_line(runs[0])
  assert len(report.seed_groups(runs)) == 2  # the same recipe otherwise
  rows = table_rows("\n".join(report.run_table(runs)))
  assert rows["fixed"]["ε"] == "7.99 (void: fixed noise seed)" and rows["real"]["ε"] == "7.99"
