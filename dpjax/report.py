"""A report of one run or several: plots titled with the recipe and ε, and ``report.md``.

    python -m dpjax.report --workdir=DIR                   # into DIR/plots/
    python -m dpjax.report --workdir=A,B,C --out=OUT       # several (or --workdir=A --workdir=B)

One workdir: ``eval_accuracy.png`` (``eval_perplexity.png`` for a causal LM, with the ε
spent written at each eval point) and ``epsilon.png`` (ε spent against the step, the target
ε dashed, a budget other than the target dotted), each titled with the run's recipe, e.g.
"sst2 · minilm lora · B=500 · σ=0.5 · ε=7.99 (δ=1.8e-5)"; and ``report.md``: a table of the
run (N, B, q, steps, σ, ε, δ, final eval), the plots and the audit reports of ``python -m
dpjax.audit``. Several workdirs: the same plots with one line per run,
``accuracy_vs_epsilon.png`` (final eval accuracy of each run against its ε; non-private runs
at ∞, the right edge; runs whose configs differ only in the seed drawn as mean ± std) and
``report.md`` with one row per run. A run still in progress (no ``summary.json`` yet) is
reported with what its config, privacy journal and metrics say so far.

The default plots are public (rule 13 of the design): evaluation on the held-out split and
the ledger's ε. A run with ``train.private_metrics`` also gets ``private_loss.png``, the loss
on the private batches, labelled "OPERATOR ONLY: not covered by (ε, δ)" and kept under a
heading of its own in ``report.md``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from absl import app, flags

from dpjax import _cli
from dpjax.train import journal as journal_lib
from dpjax.train import metrics as metrics_lib

_WORKDIR = flags.DEFINE_multi_string(
  "workdir", None, "A dpjax.main workdir; several: repeat the flag or separate them by commas."
)
_OUT = flags.DEFINE_string(
  "out", None, "Where the plots and report.md go (default WORKDIR/plots; needed for several)."
)

OPERATOR_ONLY = "OPERATOR ONLY: not covered by (ε, δ)"
REPORT_FILENAME = "report.md"
INFINITY_TICK = "∞\n(non-private)"  # where accuracy_vs_epsilon.png puts runs without DP
# Config keys that do not change what a run computes: runs equal but for these are seeds.
NOT_RECIPE = ("seed", "dp.insecure_fixed_noise_seed", "data.cache_dir", "resume")
# (file stem, private rows?, split, key, caption) of the curves against the step.
_CURVES = (
  ("eval_accuracy", False, "eval", "accuracy", "eval accuracy (held-out split)"),
  ("eval_perplexity", False, "eval", "perplexity", "eval perplexity (causal LM, held-out split)"),
  ("epsilon", False, "privacy", "epsilon", "ε spent (privacy ledger)"),
  ("private_loss", True, "train", "loss", "training loss on the private batches"),
)
_EPSILON_LINES = ("target ε", "ε budget")  # labelled on the plot, not in the legend
_TRAINS = {"all": "full", "lora": "lora", "head": "head"}


class ReportError(ValueError):
  """Bad input (a missing workdir, metrics file or rows): one line, exit code 2."""


def _number(value: Any) -> float | None:
  """A float from a metrics or summary value ("inf" included); None if it is none or NaN."""
  if isinstance(value, bool) or value is None:
    return None
  try:
    number = float(value)
  except (TypeError, ValueError):
    return None
  return None if math.isnan(number) else number


def _first(*values: Any) -> Any:
  """The first value that is not None (None if all are)."""
  return next((v for v in values if v is not None), None)


def _read_json(path: Path) -> dict[str, Any] | None:
  """A JSON object from ``path``; None if it is absent or unreadable (a run in progress)."""
  try:
    value = json.loads(path.read_text())
  except (OSError, ValueError):
    return None
  return value if isinstance(value, dict) else None


@dataclasses.dataclass
class Run:
  """What a workdir says about its run: metrics rows, and summary, config and plan if known.

  Attributes:
    workdir: the run's workdir.
    public: the rows of ``metrics.jsonl``.
    private: the rows of ``private_metrics.jsonl`` (operator only; [] if none).
    summary: ``summary.json`` (None while the run is in progress).
    config: ``config.json`` (None if absent).
    plan: the public plan (N, q, σ) of the privacy journal's last step line ({} if none).
    name: a short name (the workdir's), unique among the runs of a report.
    color: the run's matplotlib colour, the same in every plot.
  """

  workdir: Path
  public: list[dict[str, Any]]
  private: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  summary: dict[str, Any] | None = None
  config: dict[str, Any] | None = None
  plan: dict[str, Any] = dataclasses.field(default_factory=dict)
  name: str = ""
  color: str = "C0"

  def __post_init__(self):
    self.name = self.name or self.workdir.name or str(self.workdir)

  def cfg(self, dotted: str) -> Any:
    """A value of ``config.json`` by its dotted key (None if unknown)."""
    node: Any = self.config or {}
    for part in dotted.split("."):
      if not isinstance(node, dict) or part not in node:
        return None
      node = node[part]
    return node

  def _summary(self, key: str) -> Any:
    return (self.summary or {}).get(key)

  @property
  def finished(self) -> bool:
    return self.summary is not None

  @property
  def dp(self) -> bool:
    return bool(_first(self._summary("dp"), self.cfg("dp.enabled"), True))

  @property
  def no_guarantee(self) -> bool:
    """A fixed (public) noise seed: the run's ε is void (noise and sampling are public)."""
    guarantee = str(self._summary("guarantee") or "")
    return "fixed noise seed" in guarantee or self.cfg("dp.insecure_fixed_noise_seed") is not None

  @property
  def user_level(self) -> bool:
    return self._summary("unit") == "user" or self.cfg("dp.unit") == "user"

  @property
  def samples_users(self) -> bool:
    """User-level DP by user sampling: B counts users."""
    sampling = _first(self._summary("user_sampling"), self.cfg("dp.user_sampling"))
    return self.user_level and sampling == "uls"

  @property
  def num_users(self) -> int | None:
    users = _number(self._summary("num_users")) if self.user_level else None
    return None if users is None else int(users)

  @property
  def epsilon(self) -> float | None:
    """ε spent: the summary's, else the last logged (∞ without DP; None if none logged)."""
    if not self.dp:
      return math.inf
    logged = points(self.public, "privacy", "epsilon")
    return _first(_number(self._summary("epsilon")), logged[-1][1] if logged else None)

  @property
  def epsilon_replace_one(self) -> float | None:
    return _number(self._summary("epsilon_replace_one")) if self.dp else math.inf

  @property
  def delta(self) -> float | None:
    return _number(_first(self._summary("delta"), self.cfg("dp.delta"))) if self.dp else None

  @property
  def sigma(self) -> float | None:
    return _number(
      _first(
        self._summary("noise_multiplier"),
        self.plan.get("noise_multiplier"),
        self.cfg("dp.noise_multiplier"),
      )
    )

  @property
  def sampling_prob(self) -> float | None:
    return _number(_first(self._summary("sampling_prob"), self.plan.get("sampling_prob")))

  @property
  def dataset_size(self) -> int | None:
    size = _number(_first(self._summary("dataset_size"), self.plan.get("dataset_size")))
    return None if size is None else int(size)

  @property
  def batch_size(self) -> float | None:
    return _number(_first(self._summary("expected_batch_size"), self.cfg("train.batch_size")))

  @property
  def steps(self) -> int:
    """The steps taken: the summary's, else the last logged."""
    logged = max((int(r.get("step", 0)) for r in self.public), default=0)
    return int(_first(_number(self._summary("steps")), logged))

  @property
  def target_epsilon(self) -> float | None:
    """The ε that σ was calibrated to spend (None without DP or when σ was given)."""
    if not self.dp:
      return None
    if self.finished:
      return _number(self._summary("target_epsilon"))
    return _number(self.cfg("dp.epsilon")) if self.cfg("dp.noise_multiplier") is None else None

  @property
  def epsilon_budget(self) -> float | None:
    """The hard budget training stops at (None without DP or when there is none)."""
    if not self.dp:
      return None
    if self.finished:
      return _number(self._summary("epsilon_budget"))
    return _number(_first(self.cfg("dp.epsilon_budget"), self.target_epsilon))

  def final_eval(self, key: str) -> tuple[float, float | None] | None:
    """(value, ε at that point) of the last eval row with ``key`` (None if there is none)."""
    for row in reversed(self.public):
      value = _number(row.get(key)) if row.get("split") == "eval" else None
      if value is not None and math.isfinite(value):
        epsilon = math.inf if not self.dp else _number(row.get("epsilon"))
        return value, _first(epsilon, self.epsilon)
    return None

  @property
  def label(self) -> str:
    """The legend's label: the name, ε and whether the run is still in progress."""
    epsilon, facts = self.epsilon, []
    if not self.dp:
      facts.append("non-private")
    elif epsilon is not None:
      facts.append(f"ε={format_epsilon(epsilon)}")
    if not self.finished:
      facts.append("in progress")
    return f"{self.name} ({', '.join(facts)})" if facts else self.name


def load_run(workdir: str | Path) -> Run:
  """Reads a workdir; a missing workdir, ``metrics.jsonl`` or rows is a ReportError."""
  path = Path(workdir)
  if not path.is_dir():
    raise ReportError(f"--workdir: {workdir} is not a directory")
  if not (path / "metrics.jsonl").is_file():
    raise ReportError(f"--workdir: {workdir}/metrics.jsonl not found")
  try:
    public = metrics_lib.read(path)
    private = metrics_lib.read(path, private=True)
  except (OSError, ValueError) as err:
    raise ReportError(f"--workdir: {err}") from None
  if not public:
    raise ReportError(f"--workdir: {workdir}/metrics.jsonl holds no rows to plot yet")
  records = journal_lib.PrivacyJournal(path, writer=False).records()
  return Run(
    workdir=path,
    public=public,
    private=private,
    summary=_read_json(path / "summary.json"),
    config=_read_json(path / "config.json"),
    plan=dict(records[-1].get("segment") or {}) if records else {},
  )


def points(rows: Iterable[dict[str, Any]], split: str, key: str) -> list[tuple[int, float]]:
  """(step, value) of the rows of ``split`` with a finite ``key``."""
  out = []
  for row in rows:
    value = _number(row.get(key)) if row.get("split") == split else None
    if value is not None and math.isfinite(value):
      out.append((int(row["step"]), value))
  return out


def format_epsilon(epsilon: float) -> str:
  """ε in a title or a table: 7.99, 0.253, ∞."""
  if math.isinf(epsilon):
    return "∞"
  return f"{epsilon:.2f}" if epsilon >= 0.1 else f"{epsilon:.3g}"


def _scientific(value: float) -> str:
  """δ in a title or a table: 1e-5, 1.8e-5, 9.8e-4."""
  mantissa, exponent = f"{value:.1e}".split("e")
  return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _dataset_name(train: str) -> str:
  """ "sst2:train" -> "sst2"; a file -> its name."""
  if "/" not in train and ":" in train:
    return train.split(":")[0]
  return Path(train).name


def recipe(run: Run) -> str:
  """The data, model and what is trained, e.g. "sst2 · minilm lora" (· user-level)."""
  parts = []
  if run.cfg("data.train"):
    parts.append(_dataset_name(str(run.cfg("data.train"))))
  model = _first(run._summary("model"), run.cfg("model.name"))
  trained = run.cfg("model.train")
  model_text = " ".join(
    text
    for text in (
      Path(str(model)).name if model else None,
      _TRAINS.get(str(trained), "custom") if trained else None,
    )
    if text
  )
  if model_text:
    parts.append(model_text)
  if run.user_level:
    parts.append("user-level")
  return " · ".join(parts)


def title_line(run: Run) -> str:
  """Recipe, B, σ, ε and δ in one line: "sst2 · minilm lora · B=500 · σ=0.5 · ε=7.99 (δ=1.8e-5)"."""
  parts = [recipe(run)] if recipe(run) else []
  if run.batch_size is not None:
    parts.append(f"B={run.batch_size:g}" + (" users" if run.samples_users else ""))
  if not run.dp:
    parts.append("non-private (ε=∞)")
  else:
    if run.sigma is not None:
      parts.append(f"σ={run.sigma:.3g}")
    if run.epsilon is not None:
      delta = f" (δ={_scientific(run.delta)})" if run.delta is not None else ""
      parts.append(f"ε={format_epsilon(run.epsilon)}{delta}")
  if run.dp and run.no_guarantee:
    parts.append("NO GUARANTEE (fixed noise seed)")
  if not run.finished:
    parts.append(f"in progress (step {run.steps})")
  return " · ".join(parts)


def _without(config: dict[str, Any], dotted_keys: Iterable[str]) -> dict[str, Any]:
  """A copy of ``config`` without the given dotted keys."""
  config = json.loads(json.dumps(config))
  for dotted in dotted_keys:
    *path, leaf = dotted.split(".")
    node: Any = config
    for part in path:
      node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict):
      node.pop(leaf, None)
  return config


def seed_groups(runs: Sequence[Run]) -> list[list[Run]]:
  """The runs grouped by recipe: same config but for ``NOT_RECIPE``, finished or not, and ε.

  A run without ``config.json`` is a group of its own. Groups keep the runs' order.
  """
  groups: dict[str, list[Run]] = {}
  for index, run in enumerate(runs):
    key = f"#{index}"
    if run.config is not None:
      epsilon = None if run.epsilon is None else format_epsilon(run.epsilon)
      recipe_key = [_without(run.config, NOT_RECIPE), run.finished, epsilon, run.no_guarantee]
      key = json.dumps(recipe_key, sort_keys=True)
    groups.setdefault(key, []).append(run)
  return list(groups.values())


@dataclasses.dataclass(frozen=True)
class Plot:
  """A figure of the report.

  Attributes:
    name: the file stem (``name.png``).
    figure: the matplotlib Figure.
    caption: what it shows (the markdown's alt text).
    operator_only: it shows statistics of the private batches (not covered by (ε, δ)).
  """

  name: str
  figure: Any
  caption: str
  operator_only: bool = False


def _pyplot():
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  return plt


def _legend(ax: Any) -> None:
  """The legend of the runs beside the axes, where it covers no data (not the ε lines)."""
  handles, labels = ax.get_legend_handles_labels()
  kept = [(h, label) for h, label in zip(handles, labels) if not label.startswith(_EPSILON_LINES)]
  if kept:
    ax.legend(*zip(*kept), loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)


def _epsilon_lines(ax: Any, runs: Sequence[Run]) -> None:
  """Draws the runs' target ε (dashed) and budgets (dotted, when another), each value once."""
  lines: dict[float, tuple[str, str]] = {}
  for run in runs:
    target, budget = run.target_epsilon, run.epsilon_budget
    if target is not None:
      lines.setdefault(target, ("--", "target ε"))
    if budget is not None and budget != target:
      lines.setdefault(budget, (":", "ε budget"))
  for value, (style, what) in sorted(lines.items()):
    ax.axhline(value, color="0.3", linestyle=style, linewidth=1.2, label=f"{what} = {value:g}")
    ax.annotate(
      f"{what} = {value:g}",
      (0.0, value),
      xycoords=("axes fraction", "data"),
      xytext=(3, 2),
      textcoords="offset points",
      ha="left",
      va="bottom",
      fontsize=7,
      color="0.3",
    )


def _annotate_epsilon(ax: Any, run: Run, key: str) -> None:
  """Writes the ε spent at each eval point (the last one only when there are many)."""
  if not run.dp:
    return
  marks = [
    (step, value, _number(row.get("epsilon")))
    for row in run.public
    if row.get("split") == "eval"
    for step, value in points([row], "eval", key)
  ]
  marks = [m for m in marks if m[2] is not None]
  for step, value, epsilon in marks if len(marks) <= 6 else marks[-1:]:
    ax.annotate(
      f"ε={format_epsilon(epsilon)}",
      (step, value),
      xytext=(0, 6),
      textcoords="offset points",
      ha="center",
      fontsize=7,
      color="0.25",
    )
  ax.margins(x=0.08, y=0.2)


def curve_figure(
  runs: Sequence[Run], split: str, key: str, caption: str, private: bool = False
) -> Any:
  """``key`` of the rows of ``split`` against the step, one line per run (None: no points)."""
  plt = _pyplot()
  series = [(run, points(run.private if private else run.public, split, key)) for run in runs]
  series = [(run, pts) for run, pts in series if pts]
  if not series:
    return None
  single = len(runs) == 1
  fig, ax = plt.subplots(figsize=(6.4, 3.8) if single else (8.0, 4.0), dpi=120)
  for run, pts in series:
    steps, values = zip(*pts)
    label = None if single else run.label
    ax.plot(steps, values, marker="o", markersize=3, color=run.color, label=label)
  title = caption
  if key == "epsilon":
    _epsilon_lines(ax, [run for run, _ in series])
    highest = max(max(line.get_ydata()) for line in ax.lines)
    ax.set_ylim(0, highest * 1.08)
    skipped = [run.name for run in runs if not run.dp]
    if skipped and not single:
      title += f"\nnot drawn, non-private (ε = ∞): {', '.join(skipped)}"
  if split == "eval" and single:
    _annotate_epsilon(ax, runs[0], key)
  if private:
    title += f"\n{OPERATOR_ONLY}"
    ax.text(
      0.5, 0.5, "OPERATOR ONLY", transform=ax.transAxes, ha="center", va="center",
      fontsize=28, color="red", alpha=0.12, rotation=20,
    )  # fmt: skip
  if single:
    title += f"\n{title_line(runs[0])}"
  ax.set_title(title, fontsize=9, color="darkred" if private else "black")
  ax.set_xlim(left=0)
  ax.set_xlabel("step")
  ax.set_ylabel("ε" if key == "epsilon" else key)
  ax.grid(alpha=0.3)
  if not single:
    _legend(ax)
  fig.tight_layout()
  return fig


def _tradeoff_entries(runs: Sequence[Run], key: str) -> list[tuple]:
  """Per recipe (``seed_groups``) with a final eval ``key``: (label, colour, finished, ε,
  mean, std, [(ε, value)] of its runs)."""
  entries = []
  for group in seed_groups(runs):
    finals = [(run, run.final_eval(key)) for run in group]
    finals = [(run, final) for run, final in finals if final is not None and final[1] is not None]
    if not finals:
      continue
    first = finals[0][0]
    values = [value for _, (value, _) in finals]
    epsilons = [epsilon for _, (_, epsilon) in finals]
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1))
    label = first.label
    if len(finals) > 1:
      label = f"{first.name} +{len(finals) - 1} (mean ± std of {len(finals)} runs"
      label += ", non-private)" if not first.dp else f", ε={format_epsilon(max(epsilons))})"
    members = list(zip(epsilons, values))
    entries.append((label, first.color, first.finished, max(epsilons), mean, std, members))
  return entries


def tradeoff_figure(runs: Sequence[Run], key: str) -> Any:
  """Final eval ``key`` of each run against its ε (None: no run has ``key``).

  Non-private runs stand at the right edge, at a tick "∞"; runs of one recipe (see
  ``seed_groups``) are drawn as mean ± std (sample std) with their runs faint beside.
  """
  plt = _pyplot()
  entries = _tradeoff_entries(runs, key)
  if not entries:
    return None
  finite = [e[3] for e in entries if math.isfinite(e[3])]
  top = max(finite, default=0.0)
  at_infinity = top * 1.25 if top > 0 else 1.0
  where = lambda epsilon: epsilon if math.isfinite(epsilon) else at_infinity

  fig, ax = plt.subplots(figsize=(8.0, 4.0), dpi=120)
  for label, color, finished, epsilon, mean, std, members in entries:
    marker = "o" if math.isfinite(epsilon) else "D"
    if len(members) > 1:
      ax.scatter([where(e) for e, _ in members], [v for _, v in members], color=color, alpha=0.3)
      ax.errorbar(
        where(epsilon), mean, yerr=std, color=color, marker=marker, capsize=4, label=label
      )
    else:
      ax.plot(
        where(epsilon),
        mean,
        marker=marker,
        markersize=7,
        color=color,
        markerfacecolor=color if finished else "none",  # hollow: a run in progress
        linestyle="none",
        label=label,
      )
  if not finite or len(finite) < len(entries):
    _infinity_axis(ax, top, at_infinity)
  else:
    ax.set_xlim(left=0, right=top * 1.1)
  ax.set_xlabel("ε spent (privacy ledger; δ per run in report.md)")
  ax.set_ylabel(f"final eval {key}")
  ax.set_title(f"final eval {key} (held-out split) vs ε", fontsize=9)
  ax.grid(alpha=0.3)
  ax.margins(y=0.15)
  _legend(ax)
  fig.tight_layout()
  return fig


def _infinity_axis(ax: Any, top: float, at_infinity: float) -> None:
  """Ticks up to the largest finite ε, then "∞ (non-private)" beyond a dotted break."""
  from matplotlib.ticker import MaxNLocator  # pylint: disable=import-outside-toplevel

  ticks = [t for t in MaxNLocator(nbins=5).tick_values(0, top) if 0 <= t <= top * 1.02]
  ticks = ticks if top > 0 else []
  ax.set_xticks(ticks + [at_infinity], [f"{t:g}" for t in ticks] + [INFINITY_TICK])
  ax.axvline((top + at_infinity) / 2 if top > 0 else 0.5, color="0.6", linestyle=":", linewidth=1)
  ax.set_xlim(0, at_infinity * 1.12)


def build_plots(runs: Sequence[Run]) -> list[Plot]:
  """The report's figures (curves against the step; for several runs, final eval vs ε)."""
  plots = []
  for name, private, split, key, caption in _CURVES:
    figure = curve_figure(runs, split, key, caption, private=private)
    if figure is not None:
      plots.append(Plot(name, figure, caption, operator_only=private))
  if len(runs) > 1:
    for key in ("accuracy", "perplexity"):
      figure = tradeoff_figure(runs, key)
      if figure is not None:
        plots.append(Plot(f"{key}_vs_epsilon", figure, f"final eval {key} vs ε"))
  return plots


def save_plots(plots: Sequence[Plot], out_dir: Path) -> list[Path]:
  """Writes ``out_dir/NAME.png`` of each plot and closes its figure; returns the paths."""
  plt = _pyplot()
  written = []
  for plot in plots:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{plot.name}.png"
    plot.figure.savefig(path, bbox_inches="tight")
    plt.close(plot.figure)
    written.append(path)
  return written


def close(plots: Sequence[Plot]) -> None:
  """Closes the plots' figures (when they are not saved)."""
  plt = _pyplot()
  for plot in plots:
    plt.close(plot.figure)


def name_runs(runs: Sequence[Run]) -> None:
  """Gives each run a unique short name (the workdir's, or more of its path) and a colour."""
  names = [run.workdir.name or str(run.workdir) for run in runs]
  if len(set(names)) < len(names):
    names = ["/".join(run.workdir.parts[-2:]) for run in runs]
  if len(set(names)) < len(names):
    names = [str(run.workdir) for run in runs]
  for index, (run, name) in enumerate(zip(runs, names)):
    run.name, run.color = name, f"C{index % 10}"


def write_plots(workdir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
  """Writes the PNG plots of one run (default into ``workdir/plots``); returns their paths."""
  runs = [load_run(workdir)]
  return save_plots(build_plots(runs), Path(out_dir or Path(workdir) / "plots"))


def write_report(runs: Sequence[Run], out_dir: str | Path) -> list[Path]:
  """Writes the plots and ``report.md`` of ``runs`` into ``out_dir``; returns their paths.

  Raises:
    ReportError: no run has anything to plot yet.
  """
  out_dir = Path(out_dir)
  name_runs(runs)
  plots = build_plots(runs)
  if not plots:
    where = f"{runs[0].workdir}/metrics.jsonl holds" if len(runs) == 1 else "no metrics.jsonl holds"
    raise ReportError(f"--workdir: {where} no rows to plot yet")
  written = save_plots(plots, out_dir)
  report = out_dir / REPORT_FILENAME
  report.write_text(markdown(runs, plots, out_dir))
  return written + [report]


def _cell(value: Any, spec: str = "") -> str:
  if value is None:
    return "–"
  text = format(value, spec) if spec else str(value)
  return text.replace("|", "\\|")


def run_table(runs: Sequence[Run]) -> list[str]:
  """The markdown table: one row per run."""
  metrics = [key for key in ("accuracy", "perplexity") if any(r.final_eval(key) for r in runs)]
  metrics = metrics or ["accuracy"]
  header = ["run", "recipe", "N", "B", "q", "steps", "σ", "ε", "ε replace-one", "δ"]
  header += [f"eval {key}" for key in metrics]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for run in runs:
    steps = f"{run.steps}" + ("" if run.finished else " (in progress)")
    epsilon, replace_one = run.epsilon, run.epsilon_replace_one
    void = " (void: fixed noise seed)" if run.dp and run.no_guarantee else ""
    cells = [
      _cell(run.name),
      _cell(recipe(run) or None),
      _cell(run.dataset_size) + (f" ({run.num_users} users)" if run.num_users else ""),
      _cell(run.batch_size, "g"),
      _cell(run.sampling_prob, ".3g"),
      steps,
      _cell(run.sigma, ".3g") if run.dp else "0 (non-private)",
      _cell(None if epsilon is None else format_epsilon(epsilon) + void),
      _cell(None if replace_one is None else format_epsilon(replace_one) + void),
      _cell(None if run.delta is None else _scientific(run.delta)),
    ]
    for key in metrics:
      final = run.final_eval(key)
      cells.append(_cell(None if final is None else final[0], ".4f"))
    lines.append("| " + " | ".join(cells) + " |")
  return lines


def markdown(runs: Sequence[Run], plots: Sequence[Plot], out_dir: Path) -> str:
  """``report.md``: the runs' table, the public plots, the audit reports, then operator-only."""
  lines = [
    "# dpjax report",
    "",
    "ε: the privacy ledger's upper bound at the δ shown, for adding or removing one training "
    "example (one user for user-level runs; ε replace-one: for replacing one); ∞: a run "
    "without DP. N, the config and the plan (σ, q, steps, δ) are treated as public. Eval: "
    "the held-out split, at the run's last evaluation.",
    "",
    *run_table(runs),
    "",
    *[f"- `{run.name}`: `{run.workdir}`" for run in runs],
    "",
    "## Plots",
    "",
  ]
  lines += [f"![{p.caption}]({p.name}.png)\n" for p in plots if not p.operator_only]
  audits = [(run, audit_lines(run.workdir)) for run in runs]
  if any(found for _, found in audits):
    lines += ["## Audit reports (`python -m dpjax.audit`)", ""]
    for run, found in audits:
      if not found:
        continue
      lines += [f"### {run.name}", ""]
      for line in found:
        if line.endswith(".png"):  # the figure of the report above, inside its list item
          link = Path(os.path.relpath(line, out_dir)).as_posix()
          lines += ["", f"  ![{Path(line).stem}]({link})", ""]
        else:
          lines.append(f"- {line}")
      lines.append("")
  private = [p for p in plots if p.operator_only]
  if private:
    lines += [
      "## Operator only: not covered by (ε, δ)",
      "",
      "Statistics of the private training batches (`train.private_metrics`): not covered by "
      "the runs' (ε, δ); do not publish them.",
      "",
    ]
    lines += [f"![{p.caption} ({OPERATOR_ONLY})]({p.name}.png)\n" for p in private]
  return "\n".join(lines).rstrip() + "\n"


def audit_lines(workdir: str | Path) -> list[str]:
  """A summary line and the figures of each report in ``workdir/audit`` (none: [])."""
  found = sorted((Path(workdir) / "audit").glob("*.json"))
  if not found:
    return []
  from dpjax.audit import reports  # pylint: disable=import-outside-toplevel

  lines = []
  for path in found:
    try:
      lines.append(reports.summary_line(json.loads(path.read_text())))
    except (OSError, ValueError, KeyError, TypeError):
      continue
    lines += [str(p) for p in sorted(path.parent.glob(f"{path.stem}*.png"))]
  return lines


def _fail(message: str) -> NoReturn:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def workdirs_of(values: Sequence[str] | None) -> list[str]:
  """The workdirs of ``--workdir`` flags, each one or several separated by commas."""
  return [w.strip() for value in values or () for w in value.split(",") if w.strip()]


def run(workdirs: Sequence[str], out: str | None = None) -> list[Path]:
  """The command line's work: writes the report, prints its files and the audit lines.

  Bad input is one line on stderr, ``error: ...`` naming the flag, and exit code 2.
  """
  if not workdirs:
    _fail("usage: python -m dpjax.report --workdir=DIR[,DIR...] [--out=DIR]")
  if len(workdirs) > 1 and not out:
    _fail("--out: several workdirs need --out=DIR, where the overlays and report.md go")
  resolved = [Path(w).resolve() for w in workdirs]
  for index, path in enumerate(resolved):
    if path in resolved[:index]:
      _fail(f"--workdir: {workdirs[index]} is given twice")
  out_dir = Path(out) if out else Path(workdirs[0]) / "plots"
  if out_dir.exists() and not out_dir.is_dir():
    _fail(f"--out: {out_dir} is not a directory")
  try:
    runs = [load_run(w) for w in workdirs]
    written = write_report(runs, out_dir)
  except ReportError as err:
    _fail(str(err))
  except OSError as err:
    _fail(f"--out: cannot write into {out_dir}: {err.strerror or err}")
  for path in written:
    print(path)
  for one in runs:
    for line in audit_lines(one.workdir):
      print(line if len(runs) == 1 else f"{one.name}: {line}")
  return written


def main(argv):
  if len(argv) > 1:
    _fail(
      f"unexpected arguments {' '.join(argv[1:])}; usage: python -m dpjax.report "
      "--workdir=DIR[,DIR...] [--out=DIR]"
    )
  run(workdirs_of(_WORKDIR.value), _OUT.value)


if __name__ == "__main__":
  app.run(main, flags_parser=_cli.parse_flags)
