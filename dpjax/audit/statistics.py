"""What attack scores prove: ROC, AUROC, TPR at low FPR, and lower bounds on ε.

An audit ends with two samples of attack scores: those of canaries that were
IN the training run (positives) and those that were OUT (negatives), the
attack guessing "in" when a score is at or above a threshold τ. Everything
here is a function of those two samples only.

* **ROC.** The attainable (FPR, TPR) points are the concave hull of the
  threshold points (an attacker may randomize between two thresholds);
  :meth:`ScoreAudit.auroc` and :meth:`ScoreAudit.tpr_at_fpr` read the hull.
* **Clopper–Pearson bound** (Jagielski et al. 2020; Nasr et al. 2023). Any
  (ε, δ)-DP mechanism has TPR <= e^ε·FPR + δ at every threshold, so with
  one-sided Clopper–Pearson bounds TPR_lb, FPR_ub (each at significance α/2)

      ε_lb = ln((TPR_lb - δ) / FPR_ub)

  holds with probability >= 1 - α for a threshold fixed in advance. Valid
  ways to look at several thresholds: ``"ranks"`` (default) takes the bound
  over a family fixed without looking at which canaries were in: "guess in
  for the r highest scores of all", for r on a geometric grid
  (:data:`RANK_GRID` values), α divided by their number (Bonferroni);
  ``"split"`` chooses the threshold on a random half of the scores and
  computes the bound on the other half. ``"hull"`` takes every threshold of
  the ROC hull with α divided by their number: the hull is chosen with the
  coins, so this is a heuristic (it rejected a null at ~7% for a nominal 5%
  in one simulation); it is kept to reproduce published numbers.
* **Intervals of AUROC and TPR at a fixed FPR** (:func:`auroc_interval`,
  :func:`tpr_at_fpr_interval`). The AUROC is the Mann–Whitney statistic
  (unbiased; the hull's area is >= 0.5 even for uninformative scores) with a
  BCa bootstrap interval, its acceleration from the placement values. The
  TPR at FPR α is read at a threshold set on the OUT scores alone, with a
  distribution-free interval: order statistics of the OUT scores bracket the
  true α threshold, Clopper–Pearson bounds the IN scores beyond the bracket.
  A percentile bootstrap interval is biased for both (a reported AUROC fell
  outside its own interval).
* **GDP fit** (Nasr et al. 2023): μ = Φ^-1(1 - FPR_ub) - Φ^-1(FNR_ub) at the
  best threshold (Bonferroni over thresholds and both rates), reported as the
  ε(δ) of μ-GDP. A lower bound if the mechanism is Gaussian-like.
* **One run** (Steinke, Nasr, Jagielski 2023): m canaries, each in by an
  independent fair coin; an attacker that guesses "in" for the r highest
  scores and is right c times rejects (ε, δ)-DP when
  P(Binomial(r, e^ε/(1+e^ε)) >= c) + 2mδ·max_i P(c-i <= X < c)/i <= α.
* **f-DP in one run** (Mahloujifar et al. 2024): the same guesses tested
  against the trade-off curve of the Gaussian mechanism that is (ε, δ)-DP,
  which is tighter for Gaussian mechanisms.

Each ε bound is the largest ε the observed scores reject at significance α
(so it holds with probability >= 1 - α for the valid families), 0 when none
is rejected.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import dp_accounting
import numpy as np
from scipy import optimize, special, stats

THRESHOLD_STRATEGIES = ("ranks", "split", "hull")
#: Size of the coin-blind family of "ranks": r = 1 .. all scores, geometrically spaced.
RANK_GRID = 48


def clopper_pearson_upper(successes: np.ndarray | int, trials: int, significance: float):
  """One-sided upper confidence bound p with P(Binomial(trials, p) <= successes) = significance."""
  successes = np.asarray(successes)
  bound = stats.beta.ppf(1 - significance, successes + 1, np.maximum(trials - successes, 1))
  return np.where(successes < trials, bound, 1.0)


def _hull_indices(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Indices of the vertices of the upper concave hull of the points (x, y), x ascending.

  Points on a chord between two other points (collinear included) are dropped;
  the first and last points are always kept.
  """
  # Interior points between two parallel steps lie on a chord: drop them first (vectorized),
  # then a monotone chain over the corners that remain.
  candidates = np.arange(len(x))
  if len(x) > 2:
    dx, dy = np.diff(x), np.diff(y)
    turn = dy[:-1] * dx[1:] - dy[1:] * dx[:-1]
    candidates = candidates[np.r_[True, turn != 0, True]]
  keep: list[int] = []
  for k in candidates:
    while len(keep) >= 2:
      i, j = keep[-2], keep[-1]
      turn = (y[j] - y[i]) * (x[k] - x[j]) - (y[k] - y[j]) * (x[j] - x[i])
      if turn > 0:
        break
      keep.pop()
    keep.append(k)
  return np.asarray(keep, np.int64)


def gaussian_epsilon(mu: float, delta: float) -> float:
  """ε(δ) of μ-GDP (the Gaussian mechanism with sensitivity/σ = μ), 0 for μ = 0."""
  if mu <= 0:
    return 0.0
  return float(dp_accounting.get_epsilon_gaussian(1.0 / mu, delta))


def one_run_p_value(m: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
  """P-value of ``correct`` right guesses out of ``guesses`` among m canaries under (ε, δ)-DP.

  Steinke, Nasr, Jagielski 2023 (Theorem 5.2, k_- = 0): with q = e^ε/(1 + e^ε),
  p = P(X >= c) + 2mδ·max_{1<=i<=c} P(c - i <= X <= c - 1)/i,  X ~ Binomial(r, q).
  """
  q = special.expit(epsilon)
  tail = float(stats.binom.sf(correct - 1, guesses, q))
  if delta == 0 or correct == 0:
    return min(tail, 1.0)
  i = np.arange(1, correct + 1)
  window = stats.binom.sf(correct - i - 1, guesses, q) - tail
  return min(tail + 2 * m * delta * float(np.max(window / i)), 1.0)


def _gaussian_tradeoff_inverse(epsilon: float, delta: float) -> Callable[[float], float]:
  """x -> Φ(Φ^-1(x) - μ) for the μ of the Gaussian mechanism that is exactly (ε, δ)-DP."""
  sigma = dp_accounting.get_sigma_gaussian(epsilon, delta)
  if sigma == 0:
    return lambda x: float(x == 1.0)
  mu = 1.0 / sigma
  return lambda x: float(stats.norm.cdf(stats.norm.ppf(x) - mu))


def one_run_fdp_rejects(
  m: int, guesses: int, correct: int, epsilon: float, delta: float, significance: float
) -> float:
  """> 0 when the guesses reject the Gaussian trade-off curve of (ε, δ) at ``significance``.

  Mahloujifar et al. 2024 (the recursion bounding the expected right and wrong
  guesses of an f-DP mechanism, with its cap at 1): starts from the mass α·c/m
  of right and α·(r - c)/m of wrong guesses and pushes it down the curve.
  """
  inverse = _gaussian_tradeoff_inverse(epsilon, delta)
  right = significance * correct / m
  wrong = significance * (guesses - correct) / m
  for i in range(correct - 1, -1, -1):
    new_wrong = max(wrong, inverse(right))
    if new_wrong == wrong:
      break
    right = min(right + i / (guesses - i) * (new_wrong - wrong), 1.0)
    wrong = new_wrong
  return right + wrong - guesses / m


def _clopper_pearson_epsilon(
  tp, num_in: int, fp, num_out: int, significance: float, delta: float
) -> np.ndarray:
  """ln((TPR_lb - δ) / FPR_ub), one-sided Clopper–Pearson bounds at α/2 each; 0 if TPR_lb <= δ."""
  tpr_lb = 1 - clopper_pearson_upper(num_in - np.asarray(tp), num_in, significance / 2)
  fpr_ub = clopper_pearson_upper(np.asarray(fp), num_out, significance / 2)
  with np.errstate(divide="ignore", invalid="ignore"):
    eps = np.log(tpr_lb - delta) - np.log(fpr_ub)
  return np.where(tpr_lb > delta, eps, 0.0)


def _largest_rejected(rejects: Callable[[float], float], floor: float) -> float:
  """The root of ``rejects`` (> 0: ε rejected) above ``floor``; ``floor`` if it rejects nothing."""
  if rejects(floor) <= 0:
    return floor
  low, high = floor, max(1.0, 2 * floor)
  while rejects(high) > 0:
    low, high = high, 2 * high
    if high > 1e3:
      return high
  return float(optimize.brentq(rejects, low, high, xtol=1e-6))


def placement_values(
  in_scores: np.ndarray, out_scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
  """Mann–Whitney placement values of each score against the other sample.

  For an IN score x: the fraction of OUT scores below it, ties counting one
  half; for an OUT score y: the fraction of IN scores above it, ties one half.
  Both average to the Mann–Whitney AUROC. O(n log n) by sorting.
  """
  sorted_in, sorted_out = np.sort(in_scores), np.sort(out_scores)
  below = np.searchsorted(sorted_out, in_scores, side="left")
  at_or_below = np.searchsorted(sorted_out, in_scores, side="right")
  v_in = (below + at_or_below) / (2 * sorted_out.size)
  above = sorted_in.size - np.searchsorted(sorted_in, out_scores, side="right")
  at_or_above = sorted_in.size - np.searchsorted(sorted_in, out_scores, side="left")
  v_out = (above + at_or_above) / (2 * sorted_in.size)
  return v_in, v_out


def mann_whitney_auroc(in_scores: Sequence[float], out_scores: Sequence[float]) -> float:
  """P(IN score > OUT score) + P(tie)/2: the area under the empirical ROC (trapezoids).

  Unbiased for the true AUROC, unlike the area under the ROC hull
  (:meth:`ScoreAudit.auroc`), which is >= 0.5 even for uninformative scores.
  """
  v_in, _ = placement_values(np.asarray(in_scores, np.float64), np.asarray(out_scores, np.float64))
  return float(np.mean(v_in))


@dataclasses.dataclass(frozen=True)
class Interval:
  """A confidence interval for a statistic, with how it was computed.

  Attributes:
    low: lower end.
    high: upper end.
    confidence: the nominal coverage.
    method: how the interval was computed, in words.
    note: why the interval may not mean what it says (None when nothing to flag).
  """

  low: float
  high: float
  confidence: float
  method: str
  note: str | None = None


def bca_interval(
  estimate: float,
  replicates: np.ndarray,
  influence: Sequence[np.ndarray],
  confidence: float = 0.95,
) -> tuple[float, float]:
  """Bias-corrected and accelerated (BCa) bootstrap interval (Efron 1987).

  Args:
    estimate: the statistic θ̂ on the data.
    replicates: the statistic on bootstrap resamples.
    influence: per sample (resampled separately), its jackknife influence values
      (n - 1)·(mean_i θ̂_(i) - θ̂_(i)), θ̂_(i) leaving out observation i.
    confidence: nominal coverage.

  The ends are the bootstrap quantiles at Φ(z0 + (z0 + z)/(1 - a·(z0 + z)))
  for z = Φ^-1((1 ∓ confidence)/2), with the bias correction z0 = Φ^-1(the
  fraction of replicates below θ̂, ties counting one half) and the acceleration
  a = Σ_k Σ_i U_ki^3 / n_k^3 / (6·(Σ_k Σ_i U_ki^2 / n_k^2)^(3/2)) over the
  samples k. These levels straddle the fraction p0 = Φ(z0), so the interval
  contains θ̂ unless θ̂ lies far in a tail of the replicates (|z0| > z); it is
  then widened to reach θ̂. Constant replicates give [θ̂, θ̂]-like intervals:
  the bootstrap sees no variation (see the caller's note).
  """
  replicates = np.asarray(replicates, np.float64).ravel()
  count = replicates.size
  fraction = (np.sum(replicates < estimate) + 0.5 * np.sum(replicates == estimate)) / count
  fraction = np.clip(fraction, 0.5 / count, 1 - 0.5 / count)  # finite z0 when θ̂ is outside
  z0 = stats.norm.ppf(fraction)
  numerator = sum(np.sum(np.asarray(u, np.float64) ** 3) / len(u) ** 3 for u in influence)
  spread = sum(np.sum(np.asarray(u, np.float64) ** 2) / len(u) ** 2 for u in influence)
  acceleration = numerator / (6 * spread**1.5) if spread > 0 else 0.0
  ends = []
  for z in stats.norm.ppf([(1 - confidence) / 2, (1 + confidence) / 2]):
    shifted = z0 + z
    denominator = 1 - acceleration * shifted
    # a·(z0 + z) >= 1 only for extreme skew: the end moves to the last replicate.
    level = stats.norm.cdf(z0 + shifted / denominator) if denominator > 0 else float(z > 0)
    ends.append(float(np.quantile(replicates, level)))
  return min(ends[0], estimate), max(ends[1], estimate)


def auroc_interval(
  in_scores: Sequence[float],
  out_scores: Sequence[float],
  samples: int = 2000,
  confidence: float = 0.95,
  seed: int = 0,
) -> Interval:
  """BCa bootstrap interval of the Mann–Whitney AUROC (:func:`mann_whitney_auroc`).

  Members and non-members are resampled separately (each keeps its size). The
  jackknife that gives the acceleration needs no recomputation: leaving out IN
  score i moves the AUROC to (n·A - V_i)/(n - 1), V_i its placement value, so
  its influence value is exactly V_i - A (the same for OUT scores).

  Why BCa and not DeLong's interval (asymptotic normal, variance from the same
  placement values): DeLong's is symmetric about A, can leave [0, 1], and
  under-covers near 0 or 1 and at a few hundred scores; BCa follows the skew
  of the AUROC near the ends of [0, 1], is invariant to monotone
  reparametrization (it does not need the logit trick) and is second-order
  accurate. Both fail when the samples are separated (A = 0 or 1) or all
  scores are equal: every resample then gives A and the interval is [A, A],
  which ``note`` flags.
  """
  if samples < 1:
    raise ValueError(f"samples must be >= 1 (got {samples!r})")
  if not 0 < confidence < 1:
    raise ValueError(f"confidence must be in (0, 1) (got {confidence!r})")
  x = np.asarray(in_scores, np.float64).ravel()
  y = np.asarray(out_scores, np.float64).ravel()
  v_in, v_out = placement_values(x, y)
  estimate = float(np.mean(v_in))
  replicates = _bootstrap_mann_whitney(x, y, samples, np.random.default_rng(seed))
  low, high = bca_interval(estimate, replicates, [v_in - estimate, v_out - estimate], confidence)
  note = None
  if np.all(replicates == replicates[0]):
    note = (
      f"every resample gave AUROC {estimate:g} (separated or constant scores): the bootstrap "
      "sees no variation and the interval is not a measure of uncertainty"
    )
  return Interval(
    max(low, 0.0), min(high, 1.0), confidence, f"BCa bootstrap, {samples} resamples", note
  )


def _bootstrap_mann_whitney(
  x: np.ndarray, y: np.ndarray, samples: int, rng: np.random.Generator
) -> np.ndarray:
  """The Mann–Whitney AUROC of ``samples`` resamples of x and y (each resampled separately).

  Vectorized: scores become codes into their pooled distinct values; per
  resample, counts of the OUT codes give each value's placement, summed over
  the IN codes drawn. Resamples are processed in chunks of bounded memory.
  """
  values, codes = np.unique(np.concatenate([x, y]), return_inverse=True)
  in_codes, out_codes = codes[: x.size], codes[x.size :]
  width = values.size
  chunk = max(1, (1 << 22) // max(width, x.size, y.size))
  out = np.empty(samples)
  for start in range(0, samples, chunk):
    m = min(chunk, samples - start)
    drawn_out = out_codes[rng.integers(0, y.size, (m, y.size))]
    flat = (drawn_out + width * np.arange(m)[:, None]).ravel()
    counts = np.bincount(flat, minlength=m * width).reshape(m, width)
    placement = np.cumsum(counts, axis=1) - 0.5 * counts  # OUT below each value, ties half
    drawn_in = in_codes[rng.integers(0, x.size, (m, x.size))]
    out[start : start + m] = np.take_along_axis(placement, drawn_in, axis=1).sum(axis=1)
  return out / (x.size * y.size)


def tpr_at_fpr_interval(
  in_scores: Sequence[float],
  out_scores: Sequence[float],
  fpr: float,
  confidence: float = 0.95,
) -> tuple[float, Interval]:
  """TPR at false positive rate ``fpr`` with a threshold set on the OUT scores, and its interval.

  The estimate: with k = ⌊fpr·n_out⌋, guess "in" above the (k+1)-th highest
  OUT score (at most k false positives among the OUT scores), TPR = the
  fraction of IN scores above it.

  The interval is distribution-free and conservative (coverage >= confidence
  at every sample size, ties included). The target is the TPR of the test
  whose true FPR is ``fpr``, i.e. of the threshold q at the (1 - fpr) quantile
  of the OUT distribution. The number of OUT scores above q is Binomial(n_out,
  fpr), so two order statistics of the OUT scores bracket q, q_lo <= q <= q_hi,
  each failing with probability <= e = (1 - confidence)/4. Given the OUT
  scores, the IN scores above q_hi (at or above q_lo) are binomial, and
  one-sided Clopper–Pearson bounds at e each give TPR_low <= TPR(fpr) <=
  TPR_high. The threshold's own uncertainty thus widens the interval; when
  (1 - fpr)^n_out > e there are too few OUT scores to put any threshold
  provably at or above q, and TPR_low = 0.

  Returns:
    (estimate, interval); ``interval.note`` says when n_out is too small for fpr.
  """
  if not 0 < fpr < 1:
    raise ValueError(f"fpr must be in (0, 1) (got {fpr!r})")
  if not 0 < confidence < 1:
    raise ValueError(f"confidence must be in (0, 1) (got {confidence!r})")
  x = np.sort(np.asarray(in_scores, np.float64).ravel())
  descending = np.sort(np.asarray(out_scores, np.float64).ravel())[::-1]
  n_in, n_out = x.size, descending.size
  err = (1 - confidence) / 4
  above = lambda tau: n_in - int(np.searchsorted(x, tau, side="right"))  # IN scores > tau
  at_or_above = lambda tau: n_in - int(np.searchsorted(x, tau, side="left"))
  k = int(np.floor(fpr * n_out * (1 + 1e-12)))
  estimate = above(descending[k]) / n_in if k < n_out else 1.0
  # The j-th highest OUT score (j from 0) is <= q when at most j OUT scores exceed q:
  # P <= Binomial(n_out, fpr).cdf(j). q_hi: the lowest such score with cdf(j) <= err.
  j = np.arange(n_out)
  cdf = stats.binom.cdf(j, n_out, fpr)
  provable = np.flatnonzero(cdf <= err)
  if provable.size:
    low = 1 - float(clopper_pearson_upper(n_in - above(descending[provable[-1]]), n_in, err))
  else:
    low = 0.0
  # The j-th highest is > q when more than j exceed q: P <= sf(j). q_lo: the highest with sf <= err.
  safe = np.flatnonzero(stats.binom.sf(j, n_out, fpr) <= err)
  high = (
    float(clopper_pearson_upper(at_or_above(descending[safe[0]]), n_in, err)) if safe.size else 1.0
  )
  notes = []
  if k == 0:
    notes.append(
      f"{n_out} non-members are fewer than 1/FPR = {1 / fpr:g}: the threshold is the highest "
      f"non-member score, whose true FPR is about 1/(n+1) = {1 / (n_out + 1):.2g}, so the "
      "estimate is the TPR at a higher FPR than stated"
    )
  if not provable.size:
    needed = int(np.ceil(np.log(err) / np.log1p(-fpr)))
    notes.append(
      f"no threshold is provably at FPR <= {fpr:g} with {n_out} non-members (needs >= "
      f"{needed}): the lower end is 0"
    )
  method = (
    "distribution-free: the FPR threshold bracketed by order statistics of the non-members, "
    "Clopper-Pearson for the members beyond it (conservative)"
  )
  interval = Interval(
    min(low, estimate), max(high, estimate), confidence, method, "; ".join(notes) or None
  )
  return estimate, interval


@dataclasses.dataclass(frozen=True)
class Bootstrap:
  """A percentile bootstrap interval of a statistic of the scores.

  Attributes:
    low: the (1 - confidence)/2 quantile of the resampled statistic.
    high: its (1 + confidence)/2 quantile.
    confidence: the interval's nominal coverage.
    samples: the number of resamples.
  """

  low: float
  high: float
  confidence: float
  samples: int


class ScoreAudit:
  """Attack scores of IN canaries (positives) and OUT canaries (negatives).

  Higher scores mean "more likely in"; negate a loss before passing it.

  Args:
    in_scores: scores of the canaries that were in the run.
    out_scores: scores of the canaries that were out.
  """

  def __init__(self, in_scores: Sequence[float], out_scores: Sequence[float]):
    self.in_scores = np.asarray(in_scores, np.float64).ravel()
    self.out_scores = np.asarray(out_scores, np.float64).ravel()
    for name, scores in (("in_scores", self.in_scores), ("out_scores", self.out_scores)):
      if scores.size == 0:
        raise ValueError(f"{name} must not be empty")
      if not np.all(np.isfinite(scores)):
        raise ValueError(f"{name} must be finite numbers")
    thresholds = np.concatenate([np.union1d(self.in_scores, self.out_scores), [np.inf]])
    # As τ rises, the false negatives (in below τ) and true negatives (out below τ) rise.
    fn = np.searchsorted(np.sort(self.in_scores), thresholds, side="left")
    tn = np.searchsorted(np.sort(self.out_scores), thresholds, side="left")
    hull = _hull_indices(fn.astype(np.float64), tn.astype(np.float64))
    self.thresholds = thresholds[hull]
    #: True and false positives at each hull threshold (guess "in" when score >= τ).
    self.true_positives = self.num_in - fn[hull]
    self.false_positives = self.num_out - tn[hull]

  @property
  def num_in(self) -> int:
    return int(self.in_scores.size)

  @property
  def num_out(self) -> int:
    return int(self.out_scores.size)

  # The ROC curve.

  def roc(self) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) of the hull vertices, FPR ascending from 0 to 1."""
    return self.false_positives[::-1] / self.num_out, self.true_positives[::-1] / self.num_in

  def auroc(self) -> float:
    """Area under the ROC hull (0.5: no better than guessing)."""
    fpr, tpr = self.roc()
    return float(np.sum((fpr[1:] - fpr[:-1]) * (tpr[1:] + tpr[:-1]) / 2))

  def empirical_auroc(self) -> float:
    """Area under the empirical ROC (:func:`mann_whitney_auroc`); unbiased, unlike :meth:`auroc`."""
    return mann_whitney_auroc(self.in_scores, self.out_scores)

  def tpr_at_fpr(self, fpr: float | np.ndarray) -> float | np.ndarray:
    """The highest TPR at false positive rate ``fpr`` (randomizing between two thresholds)."""
    fpr = np.asarray(fpr, np.float64)
    if np.any((fpr < 0) | (fpr > 1)):
      raise ValueError(f"fpr must be in [0, 1] (got {fpr})")
    xs, ys = self.roc()
    # Where the hull has a vertical step at x (FPR 0), take its top.
    out = np.interp(fpr, xs, ys, left=ys[0])
    top_at_zero = ys[xs == 0].max()
    out = np.where(fpr == 0, top_at_zero, out)
    return float(out) if out.ndim == 0 else out

  # ε lower bounds.

  def _family(self, family: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds, true positives, false positives) of a threshold family.

    ``"ranks"``: the r-th highest of all scores pooled, r on a geometric grid
    (a function of the pooled scores alone, blind to which are in);
    ``"hull"``: the ROC hull's thresholds.
    """
    if family == "hull":
      return self.thresholds, self.true_positives, self.false_positives
    if family != "ranks":
      raise ValueError(f"family must be 'ranks' or 'hull' (got {family!r})")
    pooled = np.sort(np.concatenate([self.in_scores, self.out_scores]))[::-1]
    ranks = np.unique(np.geomspace(1, pooled.size, RANK_GRID).round().astype(np.int64))
    thresholds = pooled[ranks - 1]
    sorted_in, sorted_out = np.sort(self.in_scores), np.sort(self.out_scores)
    tp = self.num_in - np.searchsorted(sorted_in, thresholds, side="left")
    fp = self.num_out - np.searchsorted(sorted_out, thresholds, side="left")
    return thresholds, tp, fp

  def epsilon_clopper_pearson(
    self,
    significance: float = 0.05,
    delta: float = 0.0,
    thresholds: str = "ranks",
    seed: int = 0,
  ) -> tuple[float, float]:
    """(ε lower bound, threshold used) from TPR <= e^ε·FPR + δ with Clopper–Pearson bounds.

    Args:
      significance: α; the bound holds with probability >= 1 - α.
      delta: the δ of the (ε, δ) claim being audited.
      thresholds: ``"ranks"`` (the coin-blind family, α / its size), ``"split"``
        (choose on a random half, bound on the other half) or ``"hull"`` (every
        hull threshold, α / their number; a heuristic, see the module docstring).
      seed: the split's seed (the split only needs to be independent of the scores).
    """
    _check_significance(significance)
    if thresholds not in THRESHOLD_STRATEGIES:
      raise ValueError(f"thresholds must be one of {THRESHOLD_STRATEGIES} (got {thresholds!r})")
    if thresholds != "split":
      taus, tp, fp = self._family(thresholds)
      eps = _clopper_pearson_epsilon(
        tp, self.num_in, fp, self.num_out, significance / len(taus), delta
      )
      best = int(np.argmax(eps))
      return max(0.0, float(eps[best])), float(taus[best])
    rng = np.random.default_rng(seed)
    in_perm, out_perm = rng.permutation(self.num_in), rng.permutation(self.num_out)
    half_in, half_out = self.num_in // 2, self.num_out // 2
    if min(half_in, half_out) == 0:
      return 0.0, float("inf")
    choose = ScoreAudit(self.in_scores[in_perm[:half_in]], self.out_scores[out_perm[:half_out]])
    _, threshold = choose.epsilon_clopper_pearson(significance, delta, "ranks")
    held_in, held_out = self.in_scores[in_perm[half_in:]], self.out_scores[out_perm[half_out:]]
    eps = _clopper_pearson_epsilon(
      np.sum(held_in >= threshold),
      held_in.size,
      np.sum(held_out >= threshold),
      held_out.size,
      significance,
      delta,
    )
    return max(0.0, float(eps)), threshold

  def gdp_mu(self, significance: float = 0.05, family: str = "ranks") -> float:
    """The largest μ the scores prove for a Gaussian-like mechanism (Nasr et al. 2023).

    μ = Φ^-1(1 - FPR_ub) - Φ^-1(FNR_ub), Clopper–Pearson at α / (2·thresholds)
    over the threshold ``family`` (``"ranks"`` or ``"hull"``).
    """
    _check_significance(significance)
    taus, tp, fp = self._family(family)
    alpha = significance / (2 * len(taus))
    fnr_ub = clopper_pearson_upper(self.num_in - tp, self.num_in, alpha)
    fpr_ub = clopper_pearson_upper(fp, self.num_out, alpha)
    usable = (fnr_ub < 1) & (fpr_ub < 1)
    if not np.any(usable):
      return 0.0
    mu = stats.norm.isf(fpr_ub[usable]) - stats.norm.ppf(fnr_ub[usable])
    return max(0.0, float(np.max(mu)))

  def epsilon_gdp(self, significance: float = 0.05, delta: float = 1e-5) -> float:
    """ε(δ) of the μ-GDP mechanism with μ = :meth:`gdp_mu`."""
    return gaussian_epsilon(self.gdp_mu(significance), delta)

  def _one_run(self, significance: float, family: str, bound) -> float:
    """The largest ε any threshold of ``family`` rejects; ``bound(m, guesses, right, α, best)``
    gives one threshold's, or ``best`` when it cannot beat it."""
    _check_significance(significance, upper=1.0)
    taus, tp, fp = self._family(family)
    m, alpha = self.num_in + self.num_out, significance / len(taus)
    best = 0.0
    for k in np.argsort(-(tp + 1) / (tp + fp + 2), kind="stable"):  # most promising first
      if tp[k] + fp[k] > 0:
        best = bound(m, int(tp[k] + fp[k]), int(tp[k]), alpha, best)
    return best

  def epsilon_one_run(
    self, significance: float = 0.05, delta: float = 1e-6, family: str = "ranks"
  ) -> float:
    """ε lower bound of Steinke, Nasr, Jagielski 2023 (m = in + out canaries, fair coins).

    The attacker guesses "in" at or above each threshold of ``family``
    (``"ranks"``: the r highest scores for r on a fixed grid; ``"hull"``: the
    ROC hull, as published); α is divided by their number.
    """

    def bound(m, guesses, right, alpha, best):
      if right / guesses <= special.expit(best):
        return best  # its precision cannot reject any ε >= best
      if one_run_p_value(m, guesses, right, best, 0.0) > alpha:
        return best  # not even δ = 0 rejects best
      rejects = lambda eps: alpha - one_run_p_value(m, guesses, right, eps, delta)
      return _largest_rejected(rejects, best)

    return self._one_run(significance, family, bound)

  def epsilon_one_run_fdp(
    self, significance: float = 0.05, delta: float = 1e-6, family: str = "ranks"
  ) -> float:
    """ε lower bound of the f-DP one-run audit (Mahloujifar et al. 2024), Gaussian curves.

    Thresholds as in :meth:`epsilon_one_run`.
    """

    def bound(m, guesses, right, alpha, best):
      if right / guesses <= 0.5:
        return best
      rejects = lambda eps: one_run_fdp_rejects(m, guesses, right, eps, delta, alpha)
      return _largest_rejected(rejects, best)

    return self._one_run(significance, family, bound)

  # Uncertainty of the estimates.

  def bootstrap(
    self,
    statistic: Callable[[ScoreAudit], float],
    samples: int = 200,
    confidence: float = 0.95,
    seed: int = 0,
  ) -> Bootstrap:
    """Percentile interval of ``statistic`` over resamples (with replacement) of both samples."""
    if not 0 < confidence < 1:
      raise ValueError(f"confidence must be in (0, 1) (got {confidence!r})")
    values = self.resample(statistic, samples, seed)
    low, high = np.quantile(values, [(1 - confidence) / 2, (1 + confidence) / 2])
    return Bootstrap(float(low), float(high), confidence, samples)

  def resample(
    self, statistic: Callable[[ScoreAudit], Any], samples: int = 200, seed: int = 0
  ) -> np.ndarray:
    """``statistic`` (a number or an array) of ``samples`` bootstrap resamples, stacked."""
    if samples < 1:
      raise ValueError(f"samples must be >= 1 (got {samples!r})")
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(samples):
      resampled = ScoreAudit(
        rng.choice(self.in_scores, self.num_in), rng.choice(self.out_scores, self.num_out)
      )
      values.append(np.asarray(statistic(resampled), np.float64))
    return np.stack(values)


def _check_significance(significance: float, upper: float = 0.5) -> None:
  if not 0 < significance < upper:
    raise ValueError(f"significance must be in (0, {upper:g}) (got {significance!r})")
