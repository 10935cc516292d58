"""Plan a DP run: the noise σ each (batch size, epochs) needs for a target ε, and what it costs.

    python -m dpjax.plan --dataset_size=67349 --epsilon=3 [--delta=...] \
        [--batch=256,1024,4096] [--epochs=1,3,10] [--clip_norm=1.0] [--accountant=pld] \
        [--min_steps=100] [--max_epochs=...] [--plot=PATH.png]
    python -m dpjax.plan --from_config=experiments/sst2.py:quick [--epsilon=...] \
        [--from_config.train.batch_size=...]

One row per (expected batch size B, epochs E) of the grid:

* T = :func:`dpjax.privacy.steps_for_epochs` (E, N, B) steps, sampling rate q = B/N;
* σ: the noise multiplier that makes the run's ε(δ) at most the target, rounded up to
  the 4 significant digits shown. It is searched on coarse PLD grids (discretizations
  1e-2, then 1e-3) and the shown σ is then certified by the ledger itself
  (:func:`dpjax.privacy.compute_epsilon`, PLD discretization 1e-4): the ``ε`` column is
  that certificate, always <= the target and normally within 1% of it. A σ is never
  shown without it.
* σC/B: the standard deviation of the noise in each coordinate of the averaged clipped
  gradient (C the clip norm): the noise a step adds, on the scale of the signal (the
  average of B clipped gradients has norm at most C).
* examples: T·B, the examples the run processes (compute grows with it, ≈ E·N).

Flags mark settings a DP researcher would avoid (see :data:`FLAG_HELP`); the
recommended row (``*``) is the lowest σC/B among the rows without a flag (and with E
at most ``--max_epochs``). σC/B falls with B at fixed E and grows with E at fixed B,
so at a given compute this is the largest batch that still leaves ``--min_steps``
steps, which is the lesson of Li et al. 2022 (large batches, few epochs, a tuned
learning rate).

With ``--from_config`` the run of that config is planned as dpjax.main would run it
(N counted from its training data, its B, steps, ε, δ, clip norm, accountant and
label-histogram release) and shown as row ``>``, next to the grid. ``--epsilon``,
``--delta``, ``--clip_norm``, ``--accountant`` and ``--dataset_size`` override the
config's values.

Exit codes: 0, or 2 for a user mistake (one line ``error: ...`` on stderr naming the
flag and its valid range).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import multiprocessing
import os
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from dpjax import _validation

if TYPE_CHECKING:
  from dpjax.privacy import accounting

# dpjax.privacy (JAX, dp_accounting: ~1.5 s to import) is imported where it is used, so
# that the command line answers a mistyped flag at once.

DEFAULT_EPOCHS = (1.0, 3.0, 10.0)
#: Default grid: this many powers of two (see :func:`default_batch_sizes`).
DEFAULT_BATCH_COUNT = 4
#: Fewer steps than this are too few to fine-tune (Li et al. 2022 ran ~200 on SST-2).
MIN_STEPS = 100
#: "noisy" above this σ/B, i.e. σC/B above 0.005·C. Recipes that come close to
#: non-private accuracy sit near 1e-3 or below (Li et al. 2022 on SST-2: B = 1000 for 3
#: epochs, σ ≈ 0.77 at ε = 3; De et al. 2022 on CIFAR-10: B = 4096, σ = 3). At 5e-3 a
#: model with only 10^5 trainable parameters already gets noise of norm √d·σC/B ≈ 1.6·C
#: per step, more than the largest possible signal C.
NOISY_ABOVE = 5e-3
#: "σ<0.5" below this σ: one step leaks a lot on its own (the Gaussian alone: ε ≈ 10 at
#: δ = 1e-5, against 4.4 at σ = 1), so the guarantee rests mostly on amplification by
#: sampling: it holds only while the batches stay secret and truly Poisson.
LOW_SIGMA = 0.5
LOW_SIGMA_FLAG = f"σ<{LOW_SIGMA:g}"
#: The largest σ searched: a target needing more is "unreachable".
MAX_SIGMA = 1e4
#: Relative width of the band the certified ε is placed in: [target·(1 - this), target].
TOLERANCE = 0.01
SIGNIFICANT_DIGITS = 4

FLAG_HELP = {
  "noisy": f"σC/B > {NOISY_ABOVE:g}·C: the noise swamps the averaged gradient",
  LOW_SIGMA_FLAG: "each step leaks a lot alone; the guarantee rests on amplification by sampling",
  "T<min": "too few steps to train",
  "B>N/2": "sampling rate above 1/2: little amplification by sampling",
  "refused": "σ below what dpjax.main accepts at these steps (noise generator tails)",
  "unreachable": f"no σ <= {MAX_SIGMA:g} reaches the target",
}

_COARSE = 1e-2
_MEDIUM = 1e-3
_PLOT_DISCRETIZATION = 1e-3


@dataclasses.dataclass(frozen=True)
class PlanRow:
  """One planned run.

  Attributes:
    batch_size: B, the expected (Poisson) batch size.
    epochs: E (for a run given by its steps: T·B/N).
    steps: T.
    sampling_prob: q = B/N.
    noise_multiplier: the calibrated σ (rounded up to 4 significant digits), or None when
      the row is "unreachable" or "refused".
    epsilon: the ledger's ε(δ) of exactly this σ (PLD at discretization 1e-4, or the
      chosen accountant): <= the target. None when σ is None.
    noise_to_signal: σ·C/B, or None.
    examples: T·B.
    flags: the names of :data:`FLAG_HELP` that apply (``"T<min"`` is written with the
      threshold, e.g. ``"T<100"``).
    sigma_floor: the smallest σ dpjax.main accepts for T steps at this δ (its noise
      generator's tail check); a "refused" row needs less than this.
    recommended: the lowest σC/B among the rows without a flag (and at most
      ``max_epochs`` epochs).
    extra: a run asked for besides the grid (e.g. the config's); not a grid cell.
  """

  batch_size: float
  epochs: float
  steps: int
  sampling_prob: float
  noise_multiplier: float | None
  epsilon: float | None
  noise_to_signal: float | None
  examples: float
  flags: tuple[str, ...]
  sigma_floor: float
  recommended: bool = False
  extra: bool = False


def default_batch_sizes(
  dataset_size: int,
  epochs: Sequence[float] = DEFAULT_EPOCHS,
  min_steps: int = MIN_STEPS,
  count: int = DEFAULT_BATCH_COUNT,
) -> tuple[int, ...]:
  """``count`` powers of two up to the largest B <= N/2 that leaves ``min_steps`` steps.

  That top batch is the largest that is not flagged for too few steps at the largest
  epochs; smaller ones show what a smaller batch costs in noise.
  """
  n = _validation.require_int_in("dataset_size", dataset_size, 2)
  top = min(n / 2, max(epochs) * n / max(1, min_steps))
  largest = 2 ** max(0, math.floor(math.log2(max(top, 1))))
  return tuple(largest >> k for k in reversed(range(count)) if largest >> k >= 1)


def sigma_floor(steps: int, delta: float) -> float:
  """The smallest σ (4 significant digits, rounded up) whose generator tails dpjax.main
  accepts over ``steps`` steps (see :func:`dpjax.privacy.make_mechanism`)."""
  from dpjax.privacy import mechanism, noise  # pylint: disable=import-outside-toplevel

  limit = mechanism.MAX_TAIL_FRACTION_OF_DELTA * delta
  lo, hi = 1e-3, 10.0
  for _ in range(60):
    mid = math.sqrt(lo * hi)
    if noise.tail_probability(mid, steps) > limit:
      lo = mid
    else:
      hi = mid
  return _round_up(hi)


def _round_up(sigma: float) -> float:
  """σ rounded up to :data:`SIGNIFICANT_DIGITS` significant digits (a larger σ: more private)."""
  exponent = math.floor(math.log10(sigma)) - (SIGNIFICANT_DIGITS - 1)
  scale = 10.0**exponent
  rounded = math.ceil(sigma / scale - 1e-9) * scale
  return float(f"{rounded:.{SIGNIFICANT_DIGITS}g}")


@dataclasses.dataclass
class _Solution:
  status: str  # "ok" | "unreachable" | "below" (the target is met below the lowest σ allowed)
  sigma: float = math.nan
  epsilon: float = math.nan
  slope: float = -1.5  # d log ε / d log σ near the solution


def _solve(
  eps_fn: Callable[[float], float],
  target: float,
  band: tuple[float, float],
  start: float,
  slope: float,
  domain: tuple[float, float],
  max_evals: int = 40,
) -> _Solution:
  """A σ in ``domain`` with target·band[0] <= eps_fn(σ) <= target·band[1].

  ε falls smoothly with σ, close to a power law locally, so this takes secant steps
  on log ε against log σ (extrapolating with ``slope`` until the target is bracketed,
  then keeping the bracket).
  """
  lo_ok, hi_ok = target * band[0], target * band[1]
  aim = math.log(math.sqrt(lo_ok * hi_ok))
  lo_u, hi_u = math.log(domain[0]), math.log(domain[1])
  above: tuple[float, float] | None = None  # (u, y): ε too large (σ too small)
  below: tuple[float, float] | None = None  # (u, y): ε at most the band's top
  best: _Solution | None = None
  last: tuple[float, float] | None = None
  u = min(max(math.log(start), lo_u), hi_u)
  for _ in range(max_evals):
    eps = eps_fn(math.exp(u))
    y = math.log(eps) - aim if eps > 0 else -math.inf
    if last is not None and math.isfinite(y) and u != last[0]:
      measured = (y - last[1]) / (u - last[0])
      if measured < 0:
        slope = measured
    if eps <= hi_ok:
      if best is None or math.exp(u) < best.sigma:
        best = _Solution("ok", math.exp(u), eps, slope)
      if eps >= lo_ok:
        return best
      below = (u, y) if below is None or u < below[0] else below
      if u <= lo_u:
        return _Solution("below", math.exp(u), eps, slope)
    else:
      above = (u, y) if above is None or u > above[0] else above
      if u >= hi_u:
        return _Solution("unreachable")
    last = (u, y) if math.isfinite(y) else last
    step = -y / slope if math.isfinite(y) else -math.log(4.0)
    new = u + max(-math.log(4.0), min(math.log(4.0), step))
    if above is not None and below is not None:
      a, b = above[0], below[0]
      if b - a < 1e-6:
        break
      if not a < new < b or min(new - a, b - new) < 0.05 * (b - a):
        new = 0.5 * (a + b)
    u = min(max(new, lo_u), hi_u)
  if best is not None:
    return best
  return _Solution("unreachable")


def _calibrate(
  target: float,
  delta: float,
  sampling_prob: float,
  steps: int,
  accountant: str,
  dataset_size: int,
  prior: tuple[accounting.Segment, ...],
  floor: float,
  start: float,
) -> _Solution:
  """σ (rounded up) with ε certified by the ledger; status "below" when the target is met
  at ``floor`` already (dpjax.main would refuse the σ it calibrates)."""
  from dpjax.privacy import accounting  # pylint: disable=import-outside-toplevel

  def eps(discretization: float, round_up: bool = False) -> Callable[[float], float]:
    def fn(sigma: float) -> float:
      return accounting.compute_epsilon(
        _round_up(sigma) if round_up else sigma,
        sampling_prob,
        steps,
        delta,
        accountant,
        dataset_size=dataset_size,
        pld_discretization=discretization,
        prior=prior,
      )

    return fn

  domain = (floor, MAX_SIGMA)
  fine = accounting.DEFAULT_PLD_DISCRETIZATION
  slope = -1.5
  if accountant == "pld":
    # Coarse grids first (pessimistic, ~10-100x cheaper to build), then the ledger's grid.
    # A coarse grid's verdict only moves the start: its pessimism (it adds up over many
    # steps) can make a reachable target look unreachable there.
    for discretization, band in ((_COARSE, (0.98, 1.0)), (_MEDIUM, (0.994, 0.999))):
      found = _solve(eps(discretization), target, band, start, slope, domain)
      if found.status == "below" and discretization == _MEDIUM:
        return found  # met at the floor already on a grid within ~0.1% of the ledger's
      if found.status != "unreachable":
        start, slope = found.sigma, found.slope
  found = _solve(eps(fine, True), target, (1 - TOLERANCE, 1.0), start, slope, domain)
  if found.status != "ok":
    return found
  sigma = _round_up(found.sigma)
  certified = eps(fine)(sigma)  # exactly what the run's ledger reports (cached)
  if not certified <= target:  # never a σ without its certificate
    raise RuntimeError(f"calibration failed: σ={sigma} gives ε={certified} > {target}")
  return _Solution("ok", sigma, certified, found.slope)


def _calibrate_task(task: tuple) -> _Solution:
  *args, start = task
  target, delta, sampling_prob, steps = args[:4]
  return _calibrate(*args, start or _start_sigma(target, delta, sampling_prob, steps))


def _solve_all(tasks: list[tuple], workers: int) -> list[_Solution]:
  """The calibrations of ``tasks`` (arguments of :func:`_calibrate`, the start last).

  Serially, each batch size's calibration starts from the previous one's σ. With
  ``workers`` > 1 (and the fork start method: the workers share this process's
  imports), the cells are spread over that many processes.
  """
  if workers > 1 and len(tasks) > 1 and "fork" in multiprocessing.get_all_start_methods():
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenizers may have run here
    context = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(min(workers, len(tasks)), context) as pool:
      return list(pool.map(_calibrate_task, tasks))
  solutions, start = [], {}
  for task in tasks:
    q = task[2]
    found = _calibrate_task((*task[:-1], start.get(q)))
    if found.status == "ok":
      start[q] = found.sigma
    solutions.append(found)
  return solutions


def _start_sigma(target: float, delta: float, sampling_prob: float, steps: int) -> float:
  """A first guess: the large-σ approximation q·√(2T·log(1/δ))/ε, at least 0.6."""
  return max(0.6, sampling_prob * math.sqrt(2 * steps * math.log(1 / delta)) / target)


def _check_list(name: str, values: Any, low: float, high: float) -> tuple[float, ...]:
  try:
    items = tuple(values)
  except TypeError:
    items = ()
  ok = bool(items) and all(
    isinstance(v, (int, float)) and not isinstance(v, bool) and low < v <= high for v in items
  )
  if not ok:
    bound = "inf" if high == math.inf else f"{high:g}"
    raise ValueError(
      f"{name} must be a non-empty list of numbers in ({low:g}, {bound}] ({values!r})"
    )
  return tuple(float(v) for v in items)


def plan(
  dataset_size: int,
  epsilon: float,
  delta: float | None = None,
  batch_sizes: Sequence[float] | None = None,
  epochs: Sequence[float] = DEFAULT_EPOCHS,
  clip_norm: float = 1.0,
  accountant: str = "pld",
  *,
  min_steps: int = MIN_STEPS,
  max_epochs: float | None = None,
  runs: Sequence[tuple[float, int] | tuple[float, int, float]] = (),
  prior: tuple[accounting.Segment, ...] = (),
  workers: int = 1,
) -> list[PlanRow]:
  """The planning table: one :class:`PlanRow` per (batch size, epochs), sorted by B then E.

  Args:
    dataset_size: N, the training examples (>= 2).
    epsilon: the target ε, in (0, 100].
    delta: δ < 1/N; None: N^-1.1 (:func:`dpjax.privacy.default_delta`).
    batch_sizes: expected batch sizes in (0, N]; None: :func:`default_batch_sizes`.
    epochs: epochs of the grid, > 0.
    clip_norm: C (the L2 sensitivity of one example's clipped gradient), > 0.
    accountant: one of :data:`dpjax.privacy.accounting.ACCOUNTANTS`.
    min_steps: rows with fewer steps are flagged ``"T<min_steps"``.
    max_epochs: the recommended row has at most this many epochs (None: no limit).
    runs: (batch size, steps[, epochs]) of runs to plan besides the grid (e.g. a
      config's; epochs default to T·B/N); their rows have ``extra=True`` (a grid row with
      the same B and T is marked instead).
    prior: ledger segments every run also spends (e.g. a label-histogram release).
    workers: calibrate in this many processes (forked: use only from a process that has
      not started JAX's backends or other threads).

  Raises:
    ValueError: an argument out of range (the message names it).
  """
  from dpjax.privacy import accounting, sampling  # pylint: disable=import-outside-toplevel

  n = _validation.require_int_in("dataset_size", dataset_size, 2)
  _validation.require_positive("epsilon", epsilon)
  if epsilon > accounting.MAX_TARGET_EPSILON:
    raise ValueError(
      f"epsilon must be in (0, {accounting.MAX_TARGET_EPSILON:g}] (got {epsilon!r}; "
      "for a non-private run disable DP instead)"
    )
  delta = accounting.default_delta(n) if delta is None else delta
  delta = _validation.require_delta(delta, n)
  epochs = _check_list("epochs", epochs, 0, math.inf)
  _validation.require_int_in("min_steps", min_steps, 1)
  if batch_sizes is None:
    batch_sizes = default_batch_sizes(n, epochs, min_steps)
  batch_sizes = _check_list("batch_sizes", batch_sizes, 0, n)
  clip_norm = _validation.require_positive("clip_norm", clip_norm)
  if accountant not in accounting.ACCOUNTANTS:
    raise ValueError(f"accountant must be one of {accounting.ACCOUNTANTS} (got {accountant!r})")
  if max_epochs is not None:
    _validation.require_positive("max_epochs", max_epochs)
  cells: dict[tuple[float, int], tuple[float, bool]] = {}
  for b in sorted(set(batch_sizes)):
    for e in sorted(set(epochs)):
      cells.setdefault((b, sampling.steps_for_epochs(e, n, b)), (e, False))
  for run in runs:
    b = _check_list("runs batch size", [run[0]], 0, n)[0]
    t = _validation.require_int_in("runs steps", run[1], 1)
    e = float(run[2]) if len(run) > 2 else t * b / n
    cells[(b, t)] = (cells[(b, t)][0] if (b, t) in cells else e, True)

  keys = sorted(cells)
  floors = {key: sigma_floor(key[1], delta) for key in keys}
  tasks = [
    (epsilon, delta, b / n, t, accountant, n, tuple(prior), floors[(b, t)], None) for b, t in keys
  ]
  solutions = _solve_all(tasks, workers)
  rows = []
  for (b, t), found in zip(keys, solutions):
    e, extra = cells[(b, t)]
    q, floor = b / n, floors[(b, t)]
    sigma = found.sigma if found.status == "ok" else None
    names = []
    if found.status == "unreachable":
      names.append("unreachable")
    if found.status == "below" or (sigma is not None and sigma < floor):
      names.append("refused")
      sigma = None
    if q > 0.5:
      names.append("B>N/2")
    if t < min_steps:
      names.append(f"T<{min_steps}")
    if sigma is not None and sigma < LOW_SIGMA:
      names.append(LOW_SIGMA_FLAG)
    if sigma is not None and sigma / b > NOISY_ABOVE:
      names.append("noisy")
    rows.append(
      PlanRow(
        batch_size=b,
        epochs=e,
        steps=t,
        sampling_prob=q,
        noise_multiplier=sigma,
        epsilon=found.epsilon if sigma is not None else None,
        noise_to_signal=sigma * clip_norm / b if sigma is not None else None,
        examples=t * b,
        flags=tuple(names),
        sigma_floor=floor,
        extra=extra,
      )
    )
  eligible = [
    r
    for r in rows
    if not r.flags
    and r.noise_to_signal is not None
    and (max_epochs is None or r.epochs <= max_epochs)
  ]
  if eligible:
    best = min(eligible, key=lambda r: (r.noise_to_signal, r.examples))
    rows = [dataclasses.replace(r, recommended=r is best) for r in rows]
  return rows


# ----------------------------------------------------------------------------- the table


def _sig(value: float, digits: int = SIGNIFICANT_DIGITS) -> str:
  """``value`` with ``digits`` significant digits, trailing zeros kept (σ is rounded to them)."""
  return f"{value:#.{digits}g}".rstrip(".")


def _floor_sig(value: float, digits: int = 5) -> str:
  """``value`` rounded down to ``digits`` significant digits (a shown ε never exceeds the
  certified one)."""
  if value <= 0 or not math.isfinite(value):
    return f"{value:g}"
  scale = 10.0 ** (math.floor(math.log10(value)) - digits + 1)
  return f"{math.floor(value / scale) * scale:#.{digits}g}".rstrip(".")


def format_table(rows: Sequence[PlanRow], min_steps: int = MIN_STEPS) -> str:
  """The rows as a fixed-width table, with a line per flag that occurs."""
  header = ("", "B", "epochs", "T", "q", "σ", "ε", "σC/B", "examples", "flags")
  lines = [header]
  for r in rows:
    mark = ("*" if r.recommended else "") + (">" if r.extra else "")
    if r.noise_multiplier is None:
      sigma = f"<{_sig(r.sigma_floor, 3)}" if "refused" in r.flags else "-"
      eps = ratio = "-"
    else:
      sigma = _sig(r.noise_multiplier)
      eps = _floor_sig(r.epsilon)
      ratio = f"{r.noise_to_signal:.2e}"
    lines.append(
      (
        mark,
        f"{r.batch_size:g}",
        f"{r.epochs:.3g}",
        f"{r.steps:,}",
        f"{r.sampling_prob:.3g}",
        sigma,
        eps,
        ratio,
        f"{r.examples:,.0f}",
        ",".join(r.flags),
      )
    )
  widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
  left = {0, len(header) - 1}
  text = [
    "  ".join(
      cell.ljust(w) if i in left else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths))
    ).rstrip()
    for line in lines
  ]
  used = {f for r in rows for f in r.flags}
  for name, help_text in FLAG_HELP.items():
    shown = f"T<{min_steps}" if name == "T<min" else name
    if shown in used:
      text.append(f"  {shown}: {help_text}")
  return "\n".join(text)


def describe(
  rows: Sequence[PlanRow],
  *,
  dataset_size: int,
  epsilon: float,
  delta: float,
  clip_norm: float,
  accountant: str,
  min_steps: int = MIN_STEPS,
  max_epochs: float | None = None,
  source: str = "",
  extra: str = "the config's run",
) -> str:
  """The planner's report: a header line, the table, its legend and the recommendation.

  ``source`` says where N came from; ``extra`` what the rows marked ``>`` are.
  """
  from dpjax.privacy import accounting  # pylint: disable=import-outside-toplevel

  default_delta = math.isclose(delta, accounting.default_delta(dataset_size), rel_tol=1e-12)
  head = (
    f"N={dataset_size:,}{f' ({source})' if source else ''}  target ε={epsilon:g}  "
    f"δ={delta:.3g}{' (N^-1.1)' if default_delta else ''}  C={clip_norm:g}  "
    f"accountant={accountant}"
  )
  certifier = "PLD, discretization 1e-4" if accountant == "pld" else accountant
  legend = [
    "T = steps, q = B/N, σ = noise multiplier for ε(δ) <= target (rounded up); ε = the "
    f"ledger's ε of that σ ({certifier}); σC/B = noise std per coordinate of the "
    "averaged clipped gradient; examples = T·B (compute).",
  ]
  best = [r for r in rows if r.recommended]
  budget = "" if max_epochs is None else f" and at most {max_epochs:g} epochs"
  if best:
    r = best[0]
    legend.append(
      f"* recommended: B={r.batch_size:g} epochs={r.epochs:.3g} (T={r.steps:,}, "
      f"σ={_sig(r.noise_multiplier)}): the lowest σC/B among rows without "
      f"a flag{budget} (in practice the largest batch that still leaves >= {min_steps} "
      "steps); tune the learning rate for it."
    )
  else:
    legend.append(
      f"* no row without a flag{budget}: try more epochs, smaller batches or a larger ε."
    )
  if any(r.extra for r in rows):
    legend.append(f"> {extra}.")
  wrapped = [textwrap.fill(line, 100, subsequent_indent="  ") for line in legend]
  return "\n".join([head, format_table(rows, min_steps), *wrapped])


# ----------------------------------------------------------------------------- the plot


def plot(
  rows: Sequence[PlanRow],
  path: str | Path,
  *,
  dataset_size: int,
  epsilon: float,
  delta: float,
  accountant: str = "pld",
  prior: tuple[accounting.Segment, ...] = (),
) -> list[PlanRow]:
  """ε against steps for the σ of up to 4 rows (the recommended one, the config's, the
  smallest and the largest σ), with the target as a horizontal line; writes a PNG.

  Returns the rows drawn. The curves use PLD discretization 1e-3 (for speed; within
  ~0.1% of the ledger's 1e-4), and each row's certified (T, ε) is marked.
  """
  import matplotlib  # pylint: disable=import-outside-toplevel

  from dpjax.privacy import accounting  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel

  calibrated = [r for r in rows if r.noise_multiplier is not None]
  chosen: list[PlanRow] = []
  by_sigma = sorted(calibrated, key=lambda r: r.noise_multiplier)
  candidates = [r for r in calibrated if r.recommended or r.extra]
  if by_sigma:
    thirds = [by_sigma[len(by_sigma) // 3], by_sigma[2 * len(by_sigma) // 3]]
    candidates += [by_sigma[0], by_sigma[-1], *thirds]
  for r in candidates:
    if r not in chosen and len(chosen) < 4:
      chosen.append(r)
  chosen.sort(key=lambda r: r.noise_multiplier)
  fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
  last = max([r.steps for r in chosen] + [10]) * 3
  steps = np.unique(np.round(np.geomspace(1, last, 36)).astype(int))
  discretization = _PLOT_DISCRETIZATION if accountant == "pld" else None
  for r in chosen:
    kwargs = {"dataset_size": dataset_size, "prior": prior}
    if discretization:
      kwargs["pld_discretization"] = discretization
    curve = [
      accounting.compute_epsilon(
        r.noise_multiplier, r.sampling_prob, int(t), delta, accountant, **kwargs
      )
      for t in steps
    ]
    tags = ("recommended, " if r.recommended else "") + ("config, " if r.extra else "")
    label = (
      f"σ={_sig(r.noise_multiplier)} ({tags}B={r.batch_size:g}, E={r.epochs:.3g}, "
      f"q={r.sampling_prob:.3g})"
    )
    (line,) = ax.plot(steps, curve, label=label, linewidth=1.8)
    ax.plot([r.steps], [r.epsilon], "o", color=line.get_color(), markersize=6)
  ax.axhline(epsilon, color="black", linestyle="--", linewidth=1, label=f"target ε={epsilon:g}")
  ax.set_xscale("log")
  ax.set_ylim(0, 2.2 * epsilon)
  ax.set_xlabel("training steps T")
  ax.set_ylabel(f"ε at δ={delta:.2g}")
  grid = (
    f"PLD, discretization 1e{round(math.log10(discretization))}" if discretization else accountant
  )
  ax.set_title(f"ε vs steps, N={dataset_size:,} ({grid}); dots: the planned runs", fontsize=10)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=8, loc="upper left")
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return chosen


# ----------------------------------------------------------------------------- configs


@dataclasses.dataclass(frozen=True)
class ConfigRun:
  """What a config asks of the mechanism, as dpjax.main would plan it."""

  dataset_size: int
  source: str  # how N was found
  batch_size: float
  steps: int
  epochs: float  # train.epochs, or T·B/N when train.steps is given
  epsilon: float
  delta: float | None
  clip_norm: float
  accountant: str
  prior: tuple[accounting.Segment, ...]
  notes: tuple[str, ...]


class PlanError(ValueError):
  """A user mistake; the message names the flag or config key and its valid range."""


def training_set_size(c: Any) -> tuple[int, str]:
  """(N, how it was found) for the training data of config ``c``, as dpjax.main counts it.

  A whole file without canaries is counted by reading its rows; a
  ``data.train_fraction`` < 1 or audit canaries need the kept subset, which depends on
  the tokens (rows are kept by a hash of their tokens), so the data are tokenized as
  the run does (a couple of seconds for SST-2), without writing a token cache.
  Under user-level sampling (``dp.user_sampling=uls``) N is the number of users
  (the sampler's units), counted after each user's rows are capped at k.
  """
  # pylint: disable=import-outside-toplevel
  from dpjax.train import config as config_lib
  from dpjax.train import splits

  spec = c.data.train
  users = config_lib.samples_users(c)
  if c.data.train_fraction >= 1 and not c.audit.canaries and not users:
    return len(splits.source_for(spec, c)), f"rows of {spec}"
  import tokenizers

  from dpjax.models import pretrained

  name = "minilm" if c.model.name == "tiny" else c.model.name
  tokenizer = tokenizers.Tokenizer.from_file(str(pretrained.resolve(name) / "tokenizer.json"))
  train, canaries = splits.training_split(c, tokenizer, None)
  if users:
    return splits.count_users(train), (
      f"users of {spec} (column {c.data.user_field!r}; at most "
      f"{c.dp.max_examples_per_user} rows each)"
    )
  parts = [spec]
  if c.data.train_fraction < 1:
    parts.append(f"data.train_fraction={c.data.train_fraction:g}")
  if canaries:
    parts.append(f"{canaries} audit canaries")
  return len(train), ", ".join(parts)


def config_run(c: Any, dataset_size: int | None = None) -> ConfigRun:
  """The run config ``c`` describes (N counted from its data unless ``dataset_size``).

  Raises:
    PlanError: the config is invalid, not private, or its data cannot be read.
  """
  # pylint: disable=import-outside-toplevel
  from dpjax.data import DataError
  from dpjax.models.pretrained import PretrainedError
  from dpjax.privacy import histogram
  from dpjax.train import config as config_lib

  try:
    config_lib.validate(c)
    if not c.dp.enabled:
      raise PlanError("config.dp.enabled must be True to plan a private run (got False)")
    if c.dp.unit != "example" and not config_lib.samples_users(c):
      raise PlanError(
        f"config.dp.user_sampling must be uls to plan a user-level run here (got "
        f"{c.dp.user_sampling!r}); an example-sampled (els) run reports its plan when "
        "python -m dpjax.main starts it"
      )
    if dataset_size is None:
      n, source = training_set_size(c)
    else:
      n, source = dataset_size, "--dataset_size"
    b = float(c.train.batch_size)
    if b > n:
      raise PlanError(f"config.train.batch_size must be in (0, N={n}] (got {b:g})")
    steps = config_lib.planned_steps(c, n)
    prior = ()
    if c.dp.label_histogram_noise:
      prior = (histogram.segment(float(c.dp.label_histogram_noise), n),)
    notes = []
    if c.dp.noise_multiplier is not None:
      notes.append(
        f"the config fixes dp.noise_multiplier={c.dp.noise_multiplier:g}: its run reports ε "
        "instead of targeting dp.epsilon"
      )
    if config_lib.samples_users(c):
      notes.append(
        "dp.user_sampling=uls: N, B and q count users (each a unit of DP-SGD clipped to C)"
      )
    if c.dp.clip == "automatic":
      notes.append("dp.clip=automatic: C is its sensitivity 1 (the clip norm is unused)")
    if prior:
      notes.append(
        f"every run also releases a label histogram (σ={c.dp.label_histogram_noise:g}) "
        "within the target ε"
      )
    return ConfigRun(
      dataset_size=n,
      source=source,
      batch_size=b,
      steps=steps,
      epochs=float(c.train.epochs) if c.train.steps is None else steps * b / n,
      epsilon=float(c.dp.epsilon),
      delta=c.dp.delta,
      clip_norm=float(config_lib.clip_rule(c).sensitivity),
      accountant=c.dp.accountant,
      prior=prior,
      notes=tuple(notes),
    )
  except (config_lib.ConfigError, DataError, PretrainedError) as err:
    raise PlanError(str(err)) from None


# ----------------------------------------------------------------------------- command line


def _define_flags() -> None:
  flags.DEFINE_integer("dataset_size", None, "N, the training examples.")
  flags.DEFINE_float("epsilon", None, "Target ε (default: the config's).")
  flags.DEFINE_float("delta", None, "δ < 1/N (default: N^-1.1, or the config's).")
  flags.DEFINE_list("batch", None, "Expected batch sizes (default: 4 powers of two).")
  flags.DEFINE_list("epochs", None, "Epochs (default: 1,3,10).")
  flags.DEFINE_float("clip_norm", None, "Clip norm C (default: 1, or the config's).")
  flags.DEFINE_string("accountant", None, "pld | rdp (default: pld, or the config's).")
  flags.DEFINE_integer("min_steps", MIN_STEPS, "Rows with fewer steps are flagged.")
  flags.DEFINE_float("max_epochs", None, "At most this many epochs for the recommended row.")
  flags.DEFINE_string("plot", None, "Write ε vs steps for a few rows to this PNG.")
  config_flags.DEFINE_config_file(
    "from_config", None, "Plan around the run of this config FILE.py[:variant]."
  )


def _flag(name: str) -> Any:
  return flags.FLAGS[name].value


def _given(name: str) -> bool:
  return bool(flags.FLAGS[name].present)


_VALID = {
  "dataset_size": "an integer >= 2",
  "epsilon": "a number > 0",
  "delta": "a number in (0, 1/N)",
  "clip_norm": "a number > 0",
  "min_steps": "an integer >= 1",
  "max_epochs": "a number > 0",
}


def _fail(message: str) -> None:
  print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
  sys.exit(2)


def _last_line(text: Any) -> str:
  lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
  return lines[-1] if lines else ""


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing; a bad flag or a config file that fails to load is one line and exit 2."""
  try:
    return flags.FLAGS(argv)
  except SyntaxError as err:  # the config file is Python: its mistakes are the user's
    _fail(f"--from_config: {err.msg} ({err.filename}, line {err.lineno})")
  except (
    flags.Error,
    ImportError,
    NameError,
    OSError,
    ValueError,
    KeyError,
    AttributeError,
  ) as err:
    text = str(err)
    if "Traceback" in text:  # a config file whose get_config raised: its last line says why
      text = f"--from_config cannot be loaded: {_last_line(text)}"
    elif isinstance(err, (KeyError, AttributeError)):
      text = f"--from_config: unknown config key {text.strip(chr(34) + chr(39))}"
    else:
      for name, valid in _VALID.items():
        if f"--{name}=" in text:
          text = f"{text} (--{name} must be {valid})"
          break
    _fail(text or type(err).__name__)
  return []


def _numbers(flag: str, kind: type, valid: str, high: float = math.inf) -> list[float] | None:
  """The comma-separated numbers of ``--flag`` (None if not given), each in (0, high]."""
  values = _flag(flag)
  if values is None:
    return None
  try:
    numbers = [kind(v) for v in values]
  except ValueError:
    numbers = []
  if not numbers or not all(math.isfinite(v) and 0 < v <= high for v in numbers):
    _fail(f"--{flag} must be a comma-separated list of {valid} (got {','.join(values)!r})")
  return numbers


def _fail_epsilon(value: float | None) -> None:
  from dpjax.privacy import accounting  # pylint: disable=import-outside-toplevel

  _fail(f"--epsilon must be in (0, {accounting.MAX_TARGET_EPSILON:g}] (got {value})")


def _setting(name: str, run: ConfigRun | None, default: Any) -> Any:
  """``--name`` if given, else the config's value (if planning a config), else ``default``."""
  if _given(name) or run is None:
    value = _flag(name)
    return default if value is None else value
  return getattr(run, name)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]}")
  # What can be checked before the (slow) imports of the DP modules and the config's data.
  n = _flag("dataset_size")
  if n is not None and n < 2:
    _fail(f"--dataset_size must be an integer >= 2 (got {n})")
  if _flag("from_config") is None and n is None:
    _fail("--dataset_size=N (an integer >= 2) or --from_config=FILE.py[:variant] is required")
  epochs = _numbers("epochs", float, "epochs > 0") or DEFAULT_EPOCHS
  batch_range = f"integer batch sizes in [1, N={n}]" if n else "integer batch sizes >= 1"
  batches = _numbers("batch", int, batch_range, n or math.inf)
  if _flag("epsilon") is not None and not _flag("epsilon") > 0:
    _fail_epsilon(_flag("epsilon"))
  for name in ("clip_norm", "max_epochs"):
    value = _flag(name)
    if value is not None and not (math.isfinite(value) and value > 0):
      _fail(f"--{name} must be a number > 0 (got {value:g})")
  if _flag("min_steps") < 1:
    _fail(f"--min_steps must be an integer >= 1 (got {_flag('min_steps')})")
  plot_path = _flag("plot")
  if plot_path is not None:
    parent = Path(plot_path).expanduser().resolve().parent
    if not plot_path.lower().endswith(".png") or not parent.is_dir():
      _fail(f"--plot must be a .png path in an existing directory (got {plot_path!r})")

  run = None
  if _flag("from_config") is not None:
    config = _flag("from_config")
    try:
      config.keys()  # a file that failed to load raises here (ml_collections defers it)
    except OSError as err:
      _fail(
        f"--from_config cannot be loaded: {_last_line(err.__cause__ or err)} "
        "(expected FILE.py[:variant], e.g. experiments/sst2.py:quick)"
      )
    try:
      run = config_run(config, n)
    except PlanError as err:
      _fail(f"--from_config: {err}")
    n = run.dataset_size
    if batches is not None and max(batches) > n:
      _fail(
        f"--batch must be a comma-separated list of integer batch sizes in [1, N={n}] "
        f"(got {','.join(_flag('batch'))})"
      )

  delta = _setting("delta", run, None)
  if delta is not None and not 0 < delta < 1 / n:
    _fail(
      f"--delta must be in (0, 1/N) = (0, {1 / n:.3g}) for N={n:,} (got {delta:g}; the "
      f"default is N^-1.1 = {n**-1.1:.3g})"
    )

  from dpjax.privacy import accounting  # pylint: disable=import-outside-toplevel

  epsilon = _setting("epsilon", run, None)
  if epsilon is None or not 0 < epsilon <= accounting.MAX_TARGET_EPSILON:
    _fail_epsilon(epsilon)
  delta = accounting.default_delta(n) if delta is None else delta
  clip_norm = _setting("clip_norm", run, 1.0)
  accountant = _setting("accountant", run, "pld")
  if accountant not in accounting.ACCOUNTANTS:
    _fail(f"--accountant must be one of {', '.join(accounting.ACCOUNTANTS)} (got {accountant!r})")

  start = time.perf_counter()
  prior = run.prior if run else ()
  rows = plan(
    n,
    epsilon,
    delta,
    batches,
    epochs,
    clip_norm,
    accountant,
    min_steps=_flag("min_steps"),
    max_epochs=_flag("max_epochs"),
    runs=((run.batch_size, run.steps, run.epochs),) if run else (),
    prior=prior,
    workers=min(4, os.cpu_count() or 1),
  )
  seconds = time.perf_counter() - start
  print(
    describe(
      rows,
      dataset_size=n,
      epsilon=epsilon,
      delta=delta,
      clip_norm=clip_norm,
      accountant=accountant,
      min_steps=_flag("min_steps"),
      max_epochs=_flag("max_epochs"),
      source=run.source if run else "",
    )
  )
  for note in run.notes if run else ():
    print(f"note: {note}")
  print(f"({len(rows)} row{'s' * (len(rows) != 1)} calibrated and certified in {seconds:.1f} s)")
  if plot_path is not None:
    drawn = plot(
      rows,
      plot_path,
      dataset_size=n,
      epsilon=epsilon,
      delta=delta,
      accountant=accountant,
      prior=prior,
    )
    print(f"plot: {plot_path} (ε vs steps for {len(drawn)} row{'s' * (len(drawn) != 1)})")


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=parse_flags)
