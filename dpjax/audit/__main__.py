"""Audit a trained run: membership inference, disparate impact, white-box step, canaries.

    python -m dpjax.audit --workdir=DIR [--reports=membership,groups,whitebox,canaries]
        [--reference=NONPRIVATE_DIR] [--group_by=label|length|column:NAME] [--max_rows=2000]
        [--shadows=K]

``canaries`` (the one-run audit) needs a run trained with ``config.audit.canaries``;
``--shadows=K`` adds offline LiRA against K shadow runs to the membership report.

Writes ``DIR/audit/<report>.json`` (the groups report: ``groups_by_<group_by>.json``)
with the figures ``membership_roc.png`` and ``groups_by_<group_by>.png``, and prints
one summary line per report. Each report states what it was computed from (see
:mod:`dpjax.audit.reports`).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from absl import app, flags, logging

from dpjax import _cli, privacy
from dpjax.audit import plots, reports
from dpjax.data import DataError
from dpjax.models.pretrained import PretrainedError
from dpjax.train.checkpoint import CheckpointError
from dpjax.train.config import ConfigError

REPORTS = ("membership", "groups", "whitebox", "canaries")


def _define_flags() -> None:
  flags.DEFINE_string("workdir", None, "A dpjax.main workdir to audit.")
  flags.DEFINE_list(
    "reports",
    ["membership", "groups", "whitebox"],
    f"Which reports, from {REPORTS} (canaries: runs with config.audit.canaries).",
  )
  flags.DEFINE_string("reference", None, "A non-private twin run's workdir (groups report).")
  flags.DEFINE_string("group_by", "label", f"Groups of the groups report: {reports.GROUP_BY}.")
  flags.DEFINE_integer("max_rows", 2000, "Members and non-members scored (each).")
  flags.DEFINE_integer("shadows", 0, "Shadow runs for offline LiRA (0: no LiRA).")
  flags.DEFINE_integer("bootstrap", 2000, "Bootstrap resamples of every bootstrap interval.")
  flags.DEFINE_integer("trials", 100_000, "Steps of the white-box audit.")
  flags.DEFINE_integer("seed", 0, "The auditor's seed (row choice, resampling, coins).")


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def _check_flags(f) -> None:
  if not f.workdir:
    _fail("usage: python -m dpjax.audit --workdir=DIR [--reports=membership,groups,whitebox]")
  unknown = [r for r in f.reports if r not in REPORTS]
  if unknown or not f.reports:
    _fail(f"--reports must be a comma-separated subset of {REPORTS} (got {','.join(f.reports)})")
  if not reports.valid_group_by(f.group_by):
    _fail(f"--group_by must be one of {reports.GROUP_BY} (got {f.group_by!r})")
  for name, low in (("max_rows", 2), ("bootstrap", 1), ("trials", 100)):
    if getattr(f, name) < low:
      _fail(f"--{name} must be an integer >= {low} (got {getattr(f, name)})")
  if f.shadows < 0:
    _fail(f"--shadows must be an integer >= 0 (got {f.shadows})")
  if f.seed < 0:
    _fail(f"--seed must be an integer >= 0 (got {f.seed})")
  if not (Path(f.workdir) / "config.json").is_file():
    _fail(f"{f.workdir}/config.json not found: --workdir must be a dpjax.main workdir")


def run(f) -> list[Path]:
  workdir = Path(f.workdir)
  out = workdir / "audit"
  written = []
  for name in f.reports:
    if name == "membership":
      report = reports.membership(
        workdir,
        max_rows=f.max_rows,
        shadows=f.shadows,
        bootstrap_samples=f.bootstrap,
        seed=f.seed,
      )
    elif name == "groups":
      report = reports.groups(
        workdir,
        reference=f.reference,
        group_by=f.group_by,
        bootstrap_samples=max(f.bootstrap, 200),
        seed=f.seed,
      )
    elif name == "canaries":
      report = reports.canaries(workdir)
    else:
      report = reports.whitebox_report(workdir, trials=f.trials, seed=f.seed)
    out.mkdir(exist_ok=True)
    stem = f"groups_by_{re.sub(r'[^A-Za-z0-9_-]', '_', f.group_by)}" if name == "groups" else name
    path = out / f"{stem}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(path)
    written.append(path)
    if name == "membership":
      ledger = privacy.PrivacyLedger.from_dict(report["ledger"])
      written.append(plots.roc_plot(report, ledger, out / "membership_roc.png"))
    if name == "groups":
      written.append(plots.group_plot(report, out / f"{stem}.png"))
    print(reports.summary_line(report), flush=True)
  return written


def main(argv):
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  if len(argv) > 1:
    _fail(f"unexpected arguments {' '.join(argv[1:])}")
  _check_flags(flags.FLAGS)
  try:
    for path in run(flags.FLAGS):
      print(path)
  except (ConfigError, DataError, PretrainedError, CheckpointError) as err:
    _fail(str(err))


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=_cli.parse_flags)
