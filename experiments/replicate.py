"""The SST-2 replication grid: accuracy at ε ∈ {1, 3, 8, ∞} per recipe, over seeds.

    python -m experiments.replicate --grid=cpu --root=DIR            # run what is missing
    python -m experiments.replicate --grid=cpu --root=DIR --plan     # cells and status only
    python -m experiments.replicate --grid=cpu --root=DIR --report   # table + plot only

Each cell (recipe, ε, seed) is a normal workdir, ``DIR/RECIPE/eps_E/seed_S``, trained by
``python -m dpjax.main`` in a child process. Running the command again resumes the grid:
finished cells are skipped, a cell that was interrupted resumes from its checkpoint (the
same command), and cells not started are run. After every cell, ``DIR/replication.md`` (one
row per recipe, mean ± sample std of the dev accuracy over seeds per ε, the ε each run's
ledger spent) and ``DIR/accuracy_vs_epsilon.png`` (one line per recipe, error bars over
seeds) are rewritten from the runs' ``summary.json`` files.

A seed (``config.seed``) sets the training subset's hash (``data.train_fraction < 1``) and
the head's initialization; noise and sampling come from each run's own secret either way.
ε = ∞ runs the recipe without DP (``dp.enabled=False``, with the recipe's non-private
learning rate). ε is at δ = N^-1.1, the runs' default.

Grids:
  cpu   MiniLM with LoRA on the top 3 layers and the CLS head (mean pooling): sst2.py:quick
        (30% of SST-2 train) with flat clipping and with automatic clipping (Bu et al. 2023),
        2-3 min per run on a 2-core CPU; `make run`'s sst2.py:demo (all of SST-2 train,
        B = 1500, 1.5 epochs), about 7 min 20 s per run; and sst2.py:demo_large (B = 3000,
        3 epochs: the same 67 steps), about 15 min per run.
  full  all of SST-2, 3 epochs, B = 1000, as Li et al. 2022: the CLS head (mean pooling) with
        full fine-tuning (book-keeping) or LoRA, each with flat (C = 0.1) or automatic
        clipping; and the label-word objective with full fine-tuning, which needs a
        checkpoint with a masked-LM head (--model=DIR). Hours per run on a CPU: for a GPU.

Wall times are the operator's (a run's duration depends on its sampled batch sizes): they
are not covered by ε.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from absl import app, flags

_GRID = flags.DEFINE_enum("grid", "cpu", ["cpu", "full"], "Which grid (see the docstring).")
_ROOT = flags.DEFINE_string("root", None, "Directory of the grid's workdirs, table and plot.")
_EPSILONS = flags.DEFINE_list("epsilons", ["1", "3", "8", "inf"], "Target ε values; inf: no DP.")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Seeds per cell: config.seed = 0 .. seeds-1.")
_RECIPES = flags.DEFINE_list("recipes", None, "Only these recipes of the grid (default: all).")
_MODEL = flags.DEFINE_string("model", None, "model.name for every run (a checkpoint directory).")
_PLAN = flags.DEFINE_bool("plan", False, "Print the cells and their status; run nothing.")
_REPORT = flags.DEFINE_bool("report", False, "Rewrite the table and plot only; run nothing.")
_MAX_RUNS = flags.DEFINE_integer("max_runs", None, "Stop after starting this many runs.")

TABLE = "replication.md"
PLOT = "accuracy_vs_epsilon.png"


@dataclasses.dataclass(frozen=True)
class Recipe:
  """One row of the grid.

  Attributes:
    name: the row's name and its directory under the root.
    config: ``FILE:VARIANT`` for ``--config``.
    overrides: ``--config.KEY=VALUE`` for every run of the row.
    nonprivate: extra overrides of the ε = ∞ runs (besides ``dp.enabled=False``).
    describe: one line for the table.
    nonprivate_of: the recipe whose ε = ∞ runs this one shares (a recipe that differs
      only in its DP settings trains the same model without DP).
  """

  name: str
  config: str
  overrides: dict[str, Any]
  nonprivate: dict[str, Any]
  describe: str
  nonprivate_of: str = ""


_QUICK = "experiments/sst2.py:quick"
_LI = "experiments/sst2.py:li2022"
GRIDS: dict[str, tuple[Recipe, ...]] = {
  "cpu": (
    Recipe(
      "lora_flat",
      _QUICK,
      {},
      {"train.learning_rate": 5e-3},
      "LoRA top 3 layers, 30% of SST-2 (20k rows), B = 500, flat clipping C = 1",
    ),
    Recipe(
      "lora_automatic",
      _QUICK,
      {"dp.clip": "automatic"},
      {"train.learning_rate": 5e-3},
      "the same with automatic clipping",
      nonprivate_of="lora_flat",
    ),
    Recipe(
      "demo",
      "experiments/sst2.py:demo",
      {},
      {"train.learning_rate": 5e-3},
      "`make run`: LoRA top 3 layers, all of SST-2 (67k rows), B = 1500, 1.5 epochs, flat C = 1",
    ),
    Recipe(
      "demo_large",
      "experiments/sst2.py:demo_large",
      {},
      {"train.learning_rate": 5e-3},
      "`demo` with B = 3000 for 3 epochs (the same 67 steps), flat C = 1",
    ),
  ),
  "full": (
    Recipe(
      "cls_full_flat",
      _LI,
      {"model.task": "classify", "data.template": ""},
      {},
      "CLS head, full fine-tuning, flat clipping C = 0.1",
    ),
    Recipe(
      "cls_full_automatic",
      _LI,
      {"model.task": "classify", "data.template": "", "dp.clip": "automatic"},
      {},
      "CLS head, full fine-tuning, automatic clipping",
      nonprivate_of="cls_full_flat",
    ),
    Recipe(
      "cls_lora_flat",
      _LI,
      {"model.task": "classify", "data.template": "", "model.train": "lora"},
      {},
      "CLS head, LoRA (rank 8, all layers), flat clipping C = 0.1",
    ),
    Recipe(
      "cls_lora_automatic",
      _LI,
      {
        "model.task": "classify",
        "data.template": "",
        "model.train": "lora",
        "dp.clip": "automatic",
      },
      {},
      "CLS head, LoRA (rank 8, all layers), automatic clipping",
      nonprivate_of="cls_lora_flat",
    ),
    Recipe(
      "words_full_flat",
      _LI,
      {},
      {},
      "label words (`{text} It was [MASK] .`), full fine-tuning, flat clipping C = 0.1",
    ),
  ),
}


@dataclasses.dataclass(frozen=True)
class Cell:
  recipe: Recipe
  epsilon: float  # math.inf: without DP
  seed: int

  def workdir(self, root: Path) -> Path:
    if math.isinf(self.epsilon):
      return (
        root / (self.recipe.nonprivate_of or self.recipe.name) / "eps_inf" / f"seed_{self.seed}"
      )
    return root / self.recipe.name / f"eps_{self.epsilon:g}" / f"seed_{self.seed}"

  def command(self, root: Path, model: str | None) -> list[str]:
    overrides = dict(self.recipe.overrides)
    overrides["seed"] = self.seed
    if math.isinf(self.epsilon):
      overrides = {k: v for k, v in overrides.items() if not k.startswith("dp.")}
      overrides["seed"] = self.seed
      overrides["dp.enabled"] = False
      overrides.update(self.recipe.nonprivate)
    else:
      overrides["dp.epsilon"] = self.epsilon
    if model:
      overrides["model.name"] = model
    args = [f"--config.{key}={_flag_value(value)}" for key, value in overrides.items()]
    return (
      [sys.executable, "-m", "dpjax.main", f"--config={self.recipe.config}"]
      + [f"--workdir={self.workdir(root)}"]
      + args
    )


def _flag_value(value: Any) -> str:
  if isinstance(value, bool):
    return str(value)
  return f"{value:g}" if isinstance(value, float) else str(value)


def parse_epsilons(values: Sequence[str]) -> list[float]:
  """``["1", "3", "inf"]`` -> [1.0, 3.0, inf]; raises ValueError naming the bad one."""
  epsilons = []
  for value in values:
    try:
      epsilon = float(value)
    except ValueError:
      epsilon = math.nan
    if math.isnan(epsilon) or epsilon <= 0:
      raise ValueError(f"--epsilons: {value!r} is not a number > 0 or inf")
    epsilons.append(epsilon)
  return sorted(set(epsilons))


def cells(recipes: Sequence[Recipe], epsilons: Sequence[float], seeds: int) -> list[Cell]:
  """Every (recipe, ε, seed), seed-major: a partial grid has every recipe and ε at seed 0."""
  return [Cell(r, e, s) for s in range(seeds) for r in recipes for e in epsilons]


def read_summary(workdir: Path) -> dict[str, Any] | None:
  try:
    return json.loads((workdir / "summary.json").read_text())
  except (OSError, ValueError):
    return None


def finished(summary: dict[str, Any] | None) -> bool:
  """A run that ended normally: all its planned steps, or as many as its budget allowed."""
  if not summary or summary.get("preempted"):
    return False
  return bool(summary.get("stopped_by_budget")) or summary.get("steps") == summary.get(
    "planned_steps"
  )


def status(cell: Cell, root: Path) -> str:
  workdir = cell.workdir(root)
  if finished(read_summary(workdir)):
    return "done"
  return "partial" if workdir.exists() else "missing"


@dataclasses.dataclass
class Entry:
  """The finished runs of one (recipe, ε) cell."""

  accuracies: list[float]
  epsilons: list[float]  # what each run's ledger spent (inf: without DP)
  seconds: list[float]

  @property
  def mean(self) -> float:
    return statistics.fmean(self.accuracies)

  @property
  def std(self) -> float:
    return statistics.stdev(self.accuracies) if len(self.accuracies) > 1 else math.nan


def collect(grid_cells: Sequence[Cell], root: Path) -> dict[tuple[str, float], Entry]:
  """The finished runs' dev accuracy, ε and wall time, per (recipe name, target ε)."""
  times = _times(root)
  entries: dict[tuple[str, float], Entry] = {}
  for cell in grid_cells:
    summary = read_summary(cell.workdir(root))
    if not finished(summary) or not (summary.get("eval") or {}).get("accuracy"):
      continue
    entry = entries.setdefault((cell.recipe.name, cell.epsilon), Entry([], [], []))
    entry.accuracies.append(float(summary["eval"]["accuracy"]))
    spent = summary.get("epsilon")
    entry.epsilons.append(math.inf if spent is None or not summary.get("dp") else float(spent))
    seconds = times.get(str(cell.workdir(root)))
    if seconds is not None:
      entry.seconds.append(seconds)
  return entries


def _times(root: Path) -> dict[str, float]:
  """Wall seconds of the runs this script made (``DIR/times.jsonl``; the last per workdir)."""
  found: dict[str, float] = {}
  try:
    lines = (root / "times.jsonl").read_text().splitlines()
  except OSError:
    return found
  for line in lines:
    try:
      row = json.loads(line)
      found[row["workdir"]] = float(row["seconds"])
    except (ValueError, KeyError, TypeError):
      continue
  return found


def _eps_label(epsilon: float) -> str:
  return "∞ (non-private)" if math.isinf(epsilon) else f"ε = {epsilon:g}"


def _accuracy_cell(entry: Entry | None, seeds: int) -> str:
  if entry is None:
    return "not run"
  text = f"{100 * entry.mean:.1f}"
  if len(entry.accuracies) > 1:
    text += f" ± {100 * entry.std:.1f}"
  if len(entry.accuracies) < seeds:
    text += f" ({len(entry.accuracies)} of {seeds} seeds)"
  finite = [e for e in entry.epsilons if math.isfinite(e)]
  if finite:
    text += f" [ε {max(finite):.2f}]"
  return text


def table(
  recipes: Sequence[Recipe],
  epsilons: Sequence[float],
  seeds: int,
  entries: dict[tuple[str, float], Entry],
) -> list[str]:
  """Markdown: one row per recipe, the dev accuracy (%) per ε, then the gaps and times."""
  header = ["recipe"] + [_eps_label(e) for e in epsilons]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for recipe in recipes:
    cells_ = [_accuracy_cell(entries.get((recipe.name, e)), seeds) for e in epsilons]
    lines.append(f"| `{recipe.name}`: {recipe.describe} | " + " | ".join(cells_) + " |")
  lines.append("")
  nonprivate = [entries[(r.name, math.inf)] for r in recipes if (r.name, math.inf) in entries]
  if nonprivate:
    best = max(nonprivate, key=lambda entry: entry.mean)
    best_name = next(r.name for r in recipes if entries.get((r.name, math.inf)) is best)
    lines.append(f"Best non-private recipe: `{best_name}`, {100 * best.mean:.1f}% dev accuracy.")
    for target, allowed in ((8.0, 2.0), (3.0, 3.0)):
      private = [
        (r.name, entries[(r.name, target)]) for r in recipes if (r.name, target) in entries
      ]
      if private:
        name, top = max(private, key=lambda item: item[1].mean)
        gap = 100 * (best.mean - top.mean)
        verdict = "within" if gap <= allowed else "more than"
        lines.append(
          f"- ε = {target:g}: best `{name}` {100 * top.mean:.1f}%, {gap:.1f} points below "
          f"the table's best non-private recipe ({verdict} {allowed:g} points)."
        )
  lines.append("")
  lines.append(
    "Mean ± sample std of the SST-2 dev accuracy (872 rows) over seeds; [ε]: the largest ε "
    "any run of the cell spent (PLD ledger, δ = N^-1.1)."
  )
  timed = [
    (r.name, e, entries[(r.name, e)].seconds)
    for r in recipes
    for e in epsilons
    if (r.name, e) in entries and entries[(r.name, e)].seconds
  ]
  if timed:
    lines.append("")
    lines.append("Median wall time per run (operator only, not covered by ε): ")
    lines.append(
      "; ".join(f"`{n}` {_eps_label(e)}: {statistics.median(s):.0f} s" for n, e, s in timed)
    )
  return lines


def plot(
  recipes: Sequence[Recipe], epsilons: Sequence[float], entries: dict[tuple[str, float], Entry]
) -> Any:
  """Accuracy vs ε: one line per recipe, error bars over seeds; ε evenly spaced, ∞ last."""
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=120)
  for recipe in recipes:
    points = [(i, entries.get((recipe.name, e))) for i, e in enumerate(epsilons)]
    points = [(i, entry) for i, entry in points if entry is not None]
    if not points:
      continue
    ax.errorbar(
      [i for i, _ in points],
      [100 * entry.mean for _, entry in points],
      yerr=[0 if math.isnan(entry.std) else 100 * entry.std for _, entry in points],
      marker="o",
      capsize=4,
      label=recipe.name,
    )
  ax.set_xticks(range(len(epsilons)), [("∞" if math.isinf(e) else f"{e:g}") for e in epsilons])
  ax.set_xlabel("target ε (δ = N^-1.1); ∞: without DP")
  ax.set_ylabel("SST-2 dev accuracy (%)")
  ax.set_title("SST-2 replication grid: mean ± std over seeds", fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  return fig


def write_outputs(
  root: Path, recipes: Sequence[Recipe], epsilons: Sequence[float], seeds: int
) -> list[Path]:
  """Rewrites ``replication.md`` and the plot from the finished runs; returns their paths."""
  entries = collect(cells(recipes, epsilons, seeds), root)
  lines = ["# SST-2 replication grid", ""] + table(recipes, epsilons, seeds, entries)
  lines += ["", f"![accuracy vs ε]({PLOT})", ""]
  root.mkdir(parents=True, exist_ok=True)
  (root / TABLE).write_text("\n".join(lines))
  written = [root / TABLE]
  if entries:
    figure = plot(recipes, epsilons, entries)
    figure.savefig(root / PLOT)
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    plt.close(figure)
    written.append(root / PLOT)
  return written


def run_cell(cell: Cell, root: Path, model: str | None) -> int:
  """Trains one cell in a child process (its output in ``WORKDIR.log``); returns its exit code."""
  workdir = cell.workdir(root)
  workdir.parent.mkdir(parents=True, exist_ok=True)
  command = cell.command(root, model)
  started = time.time()
  with open(f"{workdir}.log", "a") as log:
    code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT)
  seconds = time.time() - started
  if code == 0:
    with open(root / "times.jsonl", "a") as times:
      times.write(json.dumps({"workdir": str(workdir), "seconds": seconds}) + "\n")
  return code


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments {' '.join(argv[1:])}")
  if not _ROOT.value:
    _fail("--root: a directory for the grid's workdirs is required")
  if _SEEDS.value < 1:
    _fail(f"--seeds: {_SEEDS.value} is not an integer >= 1")
  if _MAX_RUNS.value is not None and _MAX_RUNS.value < 0:
    _fail(f"--max_runs: {_MAX_RUNS.value} is not an integer >= 0")
  try:
    epsilons = parse_epsilons(_EPSILONS.value)
  except ValueError as err:
    _fail(str(err))
  recipes = GRIDS[_GRID.value]
  if _RECIPES.value:
    known = {r.name: r for r in recipes}
    unknown = [name for name in _RECIPES.value if name not in known]
    if unknown:
      _fail(f"--recipes: {unknown[0]!r} is not in grid {_GRID.value}: {', '.join(known)}")
    recipes = tuple(known[name] for name in _RECIPES.value)
  root = Path(_ROOT.value)
  if root.exists() and not root.is_dir():
    _fail(f"--root: {root} is not a directory")
  todo = cells(recipes, epsilons, _SEEDS.value)
  if _PLAN.value:
    for cell in todo:
      print(f"{status(cell, root):8s} {cell.workdir(root)}")
      print("         " + " ".join(cell.command(root, _MODEL.value)[1:]))
    return
  started = 0
  if not _REPORT.value:
    for cell in todo:
      if status(cell, root) == "done":
        continue
      if _MAX_RUNS.value is not None and started >= _MAX_RUNS.value:
        break
      started += 1
      print(f"running {cell.workdir(root)}", flush=True)
      code = run_cell(cell, root, _MODEL.value)
      write_outputs(root, recipes, epsilons, _SEEDS.value)
      if code != 0:
        print(
          f"error: {cell.workdir(root)} exited with {code}; its log: {cell.workdir(root)}.log "
          "(run the same command again to resume the grid)",
          file=sys.stderr,
        )
        sys.exit(code if code in (2, 75) else 1)
  for path in write_outputs(root, recipes, epsilons, _SEEDS.value):
    print(path)
  left = [c for c in todo if status(c, root) != "done"]
  if left:
    print(f"{len(left)} of {len(todo)} runs not done yet: run the same command to go on")


if __name__ == "__main__":
  os.environ.setdefault("PYTHONUNBUFFERED", "1")
  app.run(main)
