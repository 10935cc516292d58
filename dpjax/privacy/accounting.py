"""Privacy accounting with dp_accounting: the ledger, ε(δ), and noise calibration.

Neighbouring relation: add/remove one example (or one user, for user-level DP).
A training run is a sequence of :class:`Segment` s, each ``steps`` steps of the
Poisson-subsampled Gaussian mechanism with rate q and noise multiplier σ (or of
the truncated-Poisson variant when the sampler caps the batch at M examples).
:class:`PrivacyLedger` stores them, composes them in bulk (one self-composition
per segment, which is far faster than one composition per step) and answers
ε(δ) with the PLD accountant (default), RDP, or PRV.

Every accountant here is rigorous: its ε is an upper bound on the true ε(δ).

* ``"pld"``: dp_accounting's privacy loss distributions, pessimistic estimate
  (connect-the-dots discretization), an upper bound for the discretization;
  for δ < :data:`PLD_MIN_DELTA` (1e-11), where floating point dominates the
  PLD's tails, it answers by RDP instead.
* ``"rdp"``: Rényi DP converted to (ε, δ); looser (5-7% more σ for the same ε).
* ``"prv"``: the privacy random variable accountant of Gopi et al. 2021 (the
  ``prv-accountant`` package), whose answer is the upper end of its certified
  interval [ε - e_ε, ε + e_ε] (e_ε = :data:`PRV_EPS_ERROR`).

:meth:`PrivacyLedger.epsilon_interval` brackets the true ε by two independent
methods (PLD optimistic/pessimistic, and PRV's lower/upper);
:meth:`PrivacyLedger.tpr_bound` and :meth:`PrivacyLedger.gdp_mu` state the same
guarantee as an attacker's power. Analytical *estimates* (Edgeworth, the CLT)
are in :mod:`dpjax.privacy.estimates` and are never used here.

User-level DP by example-level sampling (ELS, Charles et al. 2024): every user
contributes at most k examples, examples are Poisson-sampled at rate q and
clipped to C. Adding or removing one user moves the clipped sum by at most J·C,
J ~ Binomial(k, q) the number of the user's examples in the batch, so a step is
the mixture-of-Gaussians mechanism with sensitivities 0..k and probabilities
Binomial(k, q)(j) (dominating the vector-valued mixture: Choquette-Choo et al.
2023, Cor. 4.7). A :class:`Segment` with ``max_examples_per_user=k`` records
such steps; only the PLD accountant composes them (pessimistic estimate).
:func:`group_privacy_epsilon` gives the classical group-privacy conversion of
the example-level guarantee, the looser bound to compare against.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging as std_logging
import math
from typing import Any

import dp_accounting
import numpy as np
from dp_accounting.pld import pld_privacy_accountant, privacy_loss_distribution
from dp_accounting.rdp import rdp_privacy_accountant
from scipy import special, stats

from dpjax import _validation

ACCOUNTANTS = ("pld", "rdp", "prv")
NEIGHBORING_RELATION = "add_or_remove_one"
DEFAULT_PLD_DISCRETIZATION = 1e-4
# Beyond this a "private" run is not meaningfully private, and PLDs of the tiny σ it
# needs get very large; calibrate_noise refuses such targets.
MAX_TARGET_EPSILON = 100.0
_LEDGER_FORMAT = 1
#: Below this δ the PLD's answers are dominated by floating point (its FFT composition
#: resolves tail masses to ~1e-16 absolute): ``accountant="pld"`` then answers by RDP.
PLD_MIN_DELTA = 1e-11
#: calibrate_noise never searches below this σ: the PLD of a small σ spans a privacy
#: loss range ~1/σ² (at σ = 0.01 memory blows up), and the noise generator refuses σ < ~0.3.
#: When even this σ meets the target (e.g. δ >= q for a single step), it is returned.
MIN_CALIBRATED_SIGMA = 0.2
#: The optimistic PLD of :meth:`PrivacyLedger.epsilon_interval` is built on this grid: a
#: valid lower bound at a tenth of the fine grid's cost (PRV's lower end is the tight one).
OPTIMISTIC_PLD_DISCRETIZATION = 1e-3
#: PRV's certified error in ε: its interval is [ε̂ - e, ε̂ + e] (plus its δ error δ/1000).
PRV_EPS_ERROR = 0.01
#: The attacker's view: false-positive rates at which summaries state the TPR bound.
SUMMARY_FPRS = (0.001, 0.01, 0.1)
# ε grid of the privacy profile used for the TPR bound and the GDP μ (fine where it matters).
_PROFILE_EPSILONS = np.concatenate([np.linspace(0.0, 10.0, 501), np.linspace(10.2, 60.0, 250)])
_RELATIONS = {
  NEIGHBORING_RELATION: dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
  "replace_one": dp_accounting.NeighboringRelation.REPLACE_ONE,
}


def default_delta(dataset_size: int) -> float:
  """δ = N^-1.1, the convention of Li et al. 2022 (always < 1/N)."""
  _validation.require_int_in("dataset_size", dataset_size, 2)
  return float(dataset_size) ** -1.1


@dataclasses.dataclass(frozen=True)
class Segment:
  """``steps`` steps of the (possibly truncated) Poisson-subsampled Gaussian.

  Attributes:
    sampling_prob: q in (0, 1], the rate at which each example is sampled.
    noise_multiplier: σ >= 0 (σ = 0 is not private: ε = inf).
    steps: number of steps >= 0.
    dataset_size: N, needed for the truncated event and to check δ < 1/N. With
      ``max_examples_per_user`` set, N is the number of *users* (the units the
      guarantee protects).
    max_batch_size: M if the sample was truncated to M examples, else None.
    max_examples_per_user: k for user-level DP by example-level sampling (each
      user has at most k examples in the dataset, each sampled at rate q): a
      step is then the mixture of Gaussians with sensitivities 0..k and
      probabilities Binomial(k, q), and ε is per user. None (default): the
      guarantee is per example.
  """

  sampling_prob: float
  noise_multiplier: float
  steps: int
  dataset_size: int | None = None
  max_batch_size: int | None = None
  max_examples_per_user: int | None = None

  def __post_init__(self):
    object.__setattr__(
      self, "sampling_prob", _validation.require_probability("sampling_prob", self.sampling_prob)
    )
    object.__setattr__(
      self,
      "noise_multiplier",
      _validation.require_non_negative("noise_multiplier", self.noise_multiplier),
    )
    _validation.require_int_in("steps", self.steps, 0)
    if self.dataset_size is not None:
      _validation.require_int_in("dataset_size", self.dataset_size, 1)
    if self.max_batch_size is not None:
      if self.dataset_size is None:
        raise ValueError("max_batch_size needs dataset_size (the truncated event depends on N)")
      _validation.require_int_in("max_batch_size", self.max_batch_size, 1, self.dataset_size)
    if self.max_examples_per_user is not None:
      _validation.require_int_in("max_examples_per_user", self.max_examples_per_user, 1)
      if self.max_batch_size is not None:
        raise ValueError(
          "max_examples_per_user cannot be combined with max_batch_size: a truncated batch is "
          "not accounted at the user level"
        )

  @property
  def user_level(self) -> bool:
    """True if ε is per user (``max_examples_per_user`` set)."""
    return self.max_examples_per_user is not None

  def mixture(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(sensitivities 0..k, their probabilities Binomial(k, q)) of one user-level step."""
    if self.max_examples_per_user is None:
      raise ValueError("mixture() needs max_examples_per_user")
    k = self.max_examples_per_user
    counts = np.arange(k + 1)
    probs = stats.binom.pmf(counts, k, self.sampling_prob)
    return tuple(float(j) for j in counts), tuple(float(p) for p in probs)

  def to_dict(self) -> dict[str, Any]:
    """The fields as a dict; ``max_examples_per_user`` only when set (older ledgers lack it)."""
    out = dataclasses.asdict(self)
    if self.max_examples_per_user is None:
      del out["max_examples_per_user"]
    return out

  def same_mechanism(self, other: Segment) -> bool:
    """True if the two differ at most in their step counts."""
    return dataclasses.replace(self, steps=0) == dataclasses.replace(other, steps=0)

  def dp_event(self) -> dp_accounting.DpEvent:
    """The dp_accounting event of this segment (all its steps)."""
    if self.max_examples_per_user is not None:
      sensitivities, probs = self.mixture()
      step = dp_accounting.dp_event.MixtureOfGaussiansDpEvent(
        standard_deviation=self.noise_multiplier,
        sensitivities=sensitivities,
        sampling_probs=probs,
      )
    elif self.max_batch_size is not None:
      step = dp_accounting.TruncatedSubsampledGaussianDpEvent(
        dataset_size=self.dataset_size,
        sampling_probability=self.sampling_prob,
        truncated_batch_size=self.max_batch_size,
        noise_multiplier=self.noise_multiplier,
      )
    else:
      step = dp_accounting.PoissonSampledDpEvent(
        self.sampling_prob, dp_accounting.GaussianDpEvent(self.noise_multiplier)
      )
    return dp_accounting.SelfComposedDpEvent(step, self.steps)


def _make_accountant(
  accountant: str, pld_discretization: float, relation: str = NEIGHBORING_RELATION
) -> dp_accounting.PrivacyAccountant:
  if relation == "replace_one":
    return pld_privacy_accountant.PLDAccountant(
      dp_accounting.NeighboringRelation.REPLACE_ONE,
      value_discretization_interval=pld_discretization,
    )
  if accountant == "pld":
    return pld_privacy_accountant.PLDAccountant(value_discretization_interval=pld_discretization)
  if accountant == "rdp":
    return rdp_privacy_accountant.RdpAccountant()
  raise ValueError(f"accountant must be one of {ACCOUNTANTS} (got {accountant!r})")


@functools.lru_cache(maxsize=64)
def _poisson_gaussian_pld(
  noise_multiplier: float,
  sampling_prob: float,
  pld_discretization: float,
  relation: str,
  pessimistic: bool = True,
) -> privacy_loss_distribution.PrivacyLossDistribution:
  """One step of the Poisson-subsampled Gaussian as dp_accounting's PLD accountant builds it.

  Building it is most of the cost of an ε query; a run asks for ε with the same
  (q, σ) at every log step, so it is built once. ``pessimistic=False`` gives the
  optimistic discretization (privacy buckets rounding down), whose ε is a lower
  bound.
  """
  return privacy_loss_distribution.from_gaussian_mechanism(
    standard_deviation=noise_multiplier,
    value_discretization_interval=pld_discretization,
    sampling_prob=sampling_prob,
    neighboring_relation=_RELATIONS[relation],
    pessimistic_estimate=pessimistic,
    use_connect_dots=pessimistic,
  )


@functools.lru_cache(maxsize=16)
def _mixture_gaussian_pld(
  noise_multiplier: float,
  sensitivities: tuple[float, ...],
  sampling_probs: tuple[float, ...],
  pld_discretization: float,
) -> privacy_loss_distribution.PrivacyLossDistribution:
  """One user-level step (mixture of Gaussians) as dp_accounting's PLD accountant builds it.

  Its privacy loss has no closed-form inverse, so building it (a bisection per
  grid point) takes seconds to a minute at the default discretization; it is
  built once per mechanism.
  """
  return privacy_loss_distribution.from_mixture_gaussian_mechanism(
    standard_deviation=noise_multiplier,
    sensitivities=sensitivities,
    sampling_probs=sampling_probs,
    value_discretization_interval=pld_discretization,
  )


class _ComposedPLD:
  """ε(δ) of Poisson-subsampled Gaussian segments, composed as ``PLDAccountant`` does.

  The same operations in the same order as ``PLDAccountant.compose`` on the
  segments' events (identity, then each segment's single-step PLD
  self-composed ``steps`` times), with the single-step PLDs memoized: the
  answer is the accountant's, bit for bit (tested). User-level segments
  (mixtures of Gaussians) are composed the same way, pessimistic only.
  """

  def __init__(
    self,
    segments: tuple[Segment, ...],
    pld_discretization: float,
    relation: str,
    pessimistic: bool = True,
  ):
    self.non_private = any(s.noise_multiplier == 0 for s in segments if s.steps)
    pld = privacy_loss_distribution.identity(
      value_discretization_interval=pld_discretization, pessimistic_estimate=pessimistic
    )
    if not self.non_private:
      for s in segments:
        if s.steps and s.user_level:  # _composed_accountant admits pessimistic add/remove only
          one = _mixture_gaussian_pld(s.noise_multiplier, *s.mixture(), pld_discretization)
          pld = pld.compose(one.self_compose(s.steps))
        elif s.steps:
          one = _poisson_gaussian_pld(
            s.noise_multiplier,
            s.sampling_prob,
            pld_discretization,
            relation,
            pessimistic,
          )
          pld = pld.compose(one.self_compose(s.steps))
    self.pld = pld

  def get_epsilon(self, delta: float) -> float:
    return math.inf if self.non_private else self.pld.get_epsilon_for_delta(delta)


class _ComposedPRV:
  """ε(δ) of Poisson-subsampled Gaussian segments by the PRV accountant (Gopi et al. 2021).

  Each segment is one privacy random variable self-composed ``steps`` times
  (heterogeneous composition). ``interval(δ)`` is PRV's certified
  [lower, upper]; ``get_epsilon`` its upper end. Raises ``ValueError`` where
  PRV cannot answer (e.g. δ so small that floating point dominates, ~1e-18).
  """

  def __init__(self, segments: tuple[Segment, ...], eps_error: float = PRV_EPS_ERROR):
    active = [s for s in segments if s.steps]
    self.non_private = any(s.noise_multiplier == 0 for s in active)
    self.segments = tuple(active)
    self.eps_error = eps_error
    self._answers: dict[float, tuple[float, float]] = {}

  def interval(self, delta: float) -> tuple[float, float]:
    if delta not in self._answers:
      self._answers[delta] = self._interval(delta)
    return self._answers[delta]

  def _interval(self, delta: float) -> tuple[float, float]:
    if self.non_private:
      return math.inf, math.inf
    if not self.segments:
      return 0.0, 0.0
    import prv_accountant  # a dependency; imported here to keep `import dpjax` light

    prvs = [
      prv_accountant.PoissonSubsampledGaussianMechanism(s.sampling_prob, s.noise_multiplier)
      for s in self.segments
    ]
    steps = [s.steps for s in self.segments]
    try:
      acc = prv_accountant.PRVAccountant(
        prvs=prvs,
        max_self_compositions=steps,
        eps_error=self.eps_error,
        delta_error=delta / 1000,
      )
      lower, _, upper = acc.compute_epsilon(delta, steps)
    except (ValueError, RuntimeError, OverflowError, FloatingPointError, MemoryError) as err:
      raise ValueError(f"the PRV accountant cannot answer at delta={delta:.3g}: {err}") from err
    if not (math.isfinite(lower) and math.isfinite(upper)):
      raise ValueError(f"the PRV accountant returned a non-finite epsilon at delta={delta:.3g}")
    return max(float(lower), 0.0), max(float(upper), 0.0)

  def get_epsilon(self, delta: float) -> float:
    return self.interval(delta)[1]


@functools.lru_cache(maxsize=256)
def _composed_accountant(
  segments: tuple[Segment, ...],
  accountant: str,
  pld_discretization: float,
  relation: str = NEIGHBORING_RELATION,
  pessimistic: bool = True,
) -> dp_accounting.PrivacyAccountant | _ComposedPLD | _ComposedPRV:
  if accountant in ("rdp", "prv") and any(s.max_batch_size is not None for s in segments):
    raise ValueError(
      f"accountant='{accountant}' cannot account a truncated batch (max_batch_size); "
      "use accountant='pld' or max_batch_size=None"
    )
  if any(s.user_level for s in segments):
    if accountant in ("rdp", "prv"):
      raise ValueError(
        f"accountant='{accountant}' cannot account user-level sampling "
        "(max_examples_per_user); use accountant='pld'"
      )
    if relation != NEIGHBORING_RELATION:
      raise ValueError(
        "user-level sampling (max_examples_per_user) is accounted for adding or removing "
        "one user only, not for replace-one neighbours"
      )
    if not pessimistic:
      raise ValueError("an optimistic PLD is available for example-level Poisson segments only")
  if accountant == "prv":
    if relation != NEIGHBORING_RELATION:
      raise ValueError("accountant='prv' accounts add/remove-one neighbours only")
    return _ComposedPRV(segments)
  if accountant == "pld" and all(s.max_batch_size is None for s in segments):
    return _ComposedPLD(segments, pld_discretization, relation, pessimistic)
  if not pessimistic:
    raise ValueError("an optimistic PLD is available for untruncated Poisson segments only")
  acc = _make_accountant(accountant, pld_discretization, relation)
  with _quiet_rdp():
    acc.compose(dp_accounting.ComposedDpEvent([s.dp_event() for s in segments if s.steps]))
  return acc


@contextlib.contextmanager
def _quiet_rdp():
  """Silences dp_accounting's RDP note that it skips a fractional order it cannot sum.

  Skipping an order leaves the RDP bound valid (ε is a minimum over the orders
  kept); the note would only be noise on a run's stderr.
  """
  logger = std_logging.getLogger("absl")
  level = logger.level
  logger.setLevel(std_logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


def clear_cache() -> None:
  """Forgets memoized compositions (for benchmarks that time the computation)."""
  _composed_accountant.cache_clear()
  _poisson_gaussian_pld.cache_clear()
  _mixture_gaussian_pld.cache_clear()
  _profile_on_grid.cache_clear()


def gdp_delta(mu: float, epsilons: np.ndarray) -> np.ndarray:
  """δ(ε) of μ-Gaussian DP: Φ(-ε/μ + μ/2) - e^ε Φ(-ε/μ - μ/2) (Dong et al. 2019, Cor. 2.13)."""
  eps = np.asarray(epsilons, np.float64)
  if mu <= 0:
    return np.zeros_like(eps)
  # The second term as exp(ε + log Φ(·)) stays finite for large ε.
  second = np.exp(eps + special.log_ndtr(-eps / mu - mu / 2))
  return np.maximum(special.ndtr(-eps / mu + mu / 2) - second, 0.0)


@dataclasses.dataclass(frozen=True)
class EpsilonInterval:
  """The true ε(δ) of a ledger, bracketed by independent numerical methods.

  Attributes:
    delta: the δ of every bound here.
    pld: (optimistic, pessimistic) PLD ε: the true ε lies between them (the
      optimistic end on the coarser grid :data:`OPTIMISTIC_PLD_DISCRETIZATION`; the
      PLD's truncated tails carry < 1e-15 of mass, below
      :data:`PLD_MIN_DELTA`). The optimistic end is None for a truncated-Poisson
      or user-level ledger (only the pessimistic one is built); the whole pair is
      None for δ < :data:`PLD_MIN_DELTA`.
    prv: PRV's certified (lower, upper), or None where it cannot answer
      (always for a truncated-Poisson or user-level ledger).
    rdp: the RDP upper bound (None for a truncated-Poisson or user-level ledger).
    unavailable: {method: why} for each method that gave no answer.
  """

  delta: float
  pld: tuple[float | None, float] | None
  prv: tuple[float, float] | None
  rdp: float | None
  unavailable: dict[str, str] = dataclasses.field(default_factory=dict)

  @property
  def lower(self) -> float:
    """The largest lower bound of the methods (0 if none gives one)."""
    lows = [b[0] for b in (self.pld, self.prv) if b is not None and b[0] is not None]
    return max(lows, default=0.0)

  @property
  def upper(self) -> float:
    """The smallest upper bound of the methods."""
    ups = [b[1] for b in (self.pld, self.prv) if b is not None] + [self.rdp]
    return min((u for u in ups if u is not None), default=math.inf)

  def to_dict(self) -> dict[str, Any]:
    return {
      "delta": self.delta,
      "pld_optimistic_pessimistic": list(self.pld) if self.pld is not None else None,
      "prv_lower_upper": list(self.prv) if self.prv is not None else None,
      "rdp_upper": self.rdp,
      **({"unavailable": dict(self.unavailable)} if self.unavailable else {}),
    }


def _pmf_deltas(pmf: Any, epsilons: np.ndarray) -> np.ndarray:
  """δ(ε) = ∞-mass + Σ_{l > ε} p_l (1 − e^{ε−l}) of one PLD PMF at sorted ``epsilons``.

  The hockey-stick divergence as dp_accounting's ``DensePLDPmf.get_delta_for_epsilon``
  computes it for an array (the same running sums from the largest loss down, in the
  same order, so the same floating-point result up to the last bit of ``exp``), with
  numpy cumulative sums in place of its Python loop over every loss above ε_min (~1 s
  for a run's PMF; this takes milliseconds). Other PMF kinds go to the library.
  """
  needed = ("_probs", "_lower_loss", "_discretization", "_infinity_mass")
  if not all(hasattr(pmf, name) for name in needed):
    return np.asarray(pmf.get_delta_for_epsilon(epsilons), np.float64)
  probs = np.asarray(pmf._probs, np.float64)  # pylint: disable=protected-access
  losses = (np.arange(probs.size) + pmf._lower_loss) * pmf._discretization  # pylint: disable=protected-access
  infinity = float(pmf._infinity_mass)  # pylint: disable=protected-access
  finite = np.isfinite(epsilons)
  low = float(np.min(epsilons[finite])) if finite.any() else math.inf
  keep = losses > low  # only these ever enter a running sum
  top_losses, top_probs = losses[keep][::-1], probs[keep][::-1]
  # Running sums from the largest loss down, started as the library starts them.
  upper = np.cumsum(np.concatenate([[infinity], top_probs]))
  lower = np.cumsum(np.concatenate([[0.0], top_probs * np.exp(-top_losses)]))
  # For ε_j the sums hold the losses > ε_j: the first count_j terms.
  count = keep.sum() - (np.searchsorted(losses[keep], epsilons, side="right"))
  count = np.clip(count, 0, keep.sum())
  deltas = upper[count] - np.exp(np.where(finite, epsilons, 0.0)) * lower[count]
  return np.where(finite, deltas, infinity)


@functools.lru_cache(maxsize=32)
def _profile_on_grid(segments: tuple[Segment, ...], pld_discretization: float) -> np.ndarray:
  ledger = PrivacyLedger(segments, "pld", pld_discretization)
  profile = np.minimum(ledger.deltas(_PROFILE_EPSILONS), 1.0)
  profile.setflags(write=False)
  return profile


@dataclasses.dataclass(frozen=True)
class PrivacyLedger:
  """An immutable record of the mechanisms a run has executed, and their ε.

  ``record`` returns a new ledger (consecutive segments of the same mechanism
  are merged, so a run of any length is a handful of bulk compositions). The
  ledger serializes to JSON and is stored in every checkpoint: ε is always
  computed from the steps actually taken, across resumes.

  A ledger is example-level (every segment has ``max_examples_per_user=None``)
  or user-level (every segment has it set): the two guarantees protect
  different units and do not compose.

  Attributes:
    segments: the recorded segments, in order.
    accountant: ``"pld"`` (default), ``"rdp"`` or ``"prv"``.
    pld_discretization: the PLD value discretization interval.
  """

  segments: tuple[Segment, ...] = ()
  accountant: str = "pld"
  pld_discretization: float = DEFAULT_PLD_DISCRETIZATION

  def __post_init__(self):
    if self.accountant not in ACCOUNTANTS:
      raise ValueError(f"accountant must be one of {ACCOUNTANTS} (got {self.accountant!r})")
    _validation.require_positive("pld_discretization", self.pld_discretization)
    object.__setattr__(self, "segments", tuple(self.segments))
    if len({s.user_level for s in self.segments}) > 1:
      raise ValueError(
        "a ledger's segments must be all example-level or all user-level "
        "(max_examples_per_user set on every segment or on none)"
      )

  @property
  def steps(self) -> int:
    """Total number of steps recorded."""
    return sum(s.steps for s in self.segments)

  @property
  def user_level(self) -> bool:
    """True if the ledger's ε is per user (its segments set ``max_examples_per_user``)."""
    return any(s.user_level for s in self.segments)

  @property
  def dataset_size(self) -> int | None:
    """The smallest recorded N (of users, for a user-level ledger), or None."""
    sizes = {s.dataset_size for s in self.segments if s.dataset_size is not None}
    return min(sizes) if sizes else None

  def record(self, segment: Segment) -> PrivacyLedger:
    """A new ledger with ``segment`` appended (merged into the last one if equal)."""
    if not isinstance(segment, Segment):
      raise ValueError(f"record() takes a Segment (got {type(segment).__name__})")
    if segment.steps == 0:
      return self
    segments = list(self.segments)
    if segments and segments[-1].same_mechanism(segment):
      segments[-1] = dataclasses.replace(segments[-1], steps=segments[-1].steps + segment.steps)
    else:
      segments.append(segment)
    return dataclasses.replace(self, segments=tuple(segments))

  def dp_event(self) -> dp_accounting.DpEvent:
    """All recorded steps as one dp_accounting event."""
    return dp_accounting.ComposedDpEvent([s.dp_event() for s in self.segments if s.steps])

  def epsilon(self, delta: float) -> float:
    """ε at ``delta`` for everything recorded (0 if nothing; inf if σ = 0 anywhere)."""
    _validation.require_delta(delta, self.dataset_size)
    if self.steps == 0:
      return 0.0
    return self._epsilon(self.accountant, delta)

  def _epsilon(self, accountant: str, delta: float, relation: str = NEIGHBORING_RELATION) -> float:
    if accountant == "pld" and delta < PLD_MIN_DELTA:
      if any(s.max_batch_size is not None for s in self.segments):
        raise ValueError(
          f"delta must be >= {PLD_MIN_DELTA:g} for a truncated batch (max_batch_size): below it "
          f"the PLD's floating point error exceeds delta, and RDP cannot account the truncation "
          f"(got {delta:g})"
        )
      if self.user_level:
        raise ValueError(
          f"delta must be >= {PLD_MIN_DELTA:g} for user-level sampling (max_examples_per_user): "
          f"below it the PLD's floating point error exceeds delta, and RDP cannot account it "
          f"(got {delta:g})"
        )
      accountant = "rdp"  # rigorous at any δ (log space); the PLD is not below PLD_MIN_DELTA
    acc = _composed_accountant(self.segments, accountant, self.pld_discretization, relation)
    return float(acc.get_epsilon(delta))

  def deltas(self, epsilons: np.ndarray) -> np.ndarray:
    """δ(ε) of everything recorded at each ε (PLD): the run's privacy profile.

    1 everywhere once a non-private step is in the ledger, 0 for an empty one.
    """
    epsilons = np.asarray(epsilons, np.float64)
    if self.steps == 0:
      return np.zeros_like(epsilons)
    acc = _composed_accountant(self.segments, "pld", self.pld_discretization)
    if isinstance(acc, _ComposedPLD):
      if acc.non_private:
        return np.ones_like(epsilons)
      pld = acc.pld
      deltas = _pmf_deltas(pld._pmf_remove, epsilons)  # pylint: disable=protected-access
      if not pld._symmetric:  # pylint: disable=protected-access
        deltas = np.maximum(deltas, _pmf_deltas(pld._pmf_add, epsilons))  # pylint: disable=protected-access
      return deltas
    return np.array([acc.get_delta(float(e)) for e in epsilons.ravel()]).reshape(epsilons.shape)

  def epsilon_interval(self, delta: float) -> EpsilonInterval:
    """ε(δ) bracketed by independent numerical methods (see :class:`EpsilonInterval`)."""
    _validation.require_delta(delta, self.dataset_size)
    if self.steps == 0:
      return EpsilonInterval(delta, (0.0, 0.0), (0.0, 0.0), 0.0)
    # Only the pessimistic PLD accounts truncated batches and user-level sampling.
    pld_only = self.user_level or any(s.max_batch_size is not None for s in self.segments)
    rdp = None if pld_only else self._epsilon("rdp", delta)
    pld, notes = None, {}
    if delta >= PLD_MIN_DELTA:
      upper = self._epsilon("pld", delta)
      lower = None
      if not pld_only:
        optimistic = _composed_accountant(
          self.segments,
          "pld",
          max(self.pld_discretization, OPTIMISTIC_PLD_DISCRETIZATION),
          NEIGHBORING_RELATION,
          False,
        )
        lower = min(float(optimistic.get_epsilon(delta)), upper)
      pld = (lower, upper)
    else:
      notes["pld"] = f"delta below {PLD_MIN_DELTA:g}: the PLD's floating point error exceeds it"
    prv = None
    try:
      prv = _composed_accountant(self.segments, "prv", self.pld_discretization).interval(delta)
    except ValueError as err:
      notes["prv"] = str(err)
    return EpsilonInterval(delta, pld, prv, rdp, notes)

  def _profile(self) -> np.ndarray:
    """min(δ(ε), 1) on the grid of :data:`_PROFILE_EPSILONS` (memoized per ledger)."""
    return _profile_on_grid(self.segments, self.pld_discretization)

  def tpr_bound(self, fpr: float | np.ndarray) -> np.ndarray:
    """The largest true-positive rate any membership test can have at false-positive rate ``fpr``.

    A test deciding "this example was in the training set" from anything
    computed from the released parameters has, at FPR α, TPR at most

        min over ε of  min(e^ε α + δ(ε),  1 - e^{-ε} (1 - α - δ(ε)))

    where δ(ε) is the run's privacy profile (:meth:`deltas`, PLD pessimistic,
    which holds for both directions of add/remove): each (ε, δ(ε)) guarantee
    bounds the test's power, and the run has all of them at once. The minimum
    runs over a grid of ε in [0, 60]; any grid gives a valid (if slightly
    looser) bound.
    """
    fpr = np.asarray(fpr, np.float64)
    if np.any((fpr < 0) | (fpr > 1)) or not np.all(np.isfinite(fpr)):
      raise ValueError("fpr must be in [0, 1]")
    eps, delta = _PROFILE_EPSILONS, self._profile()
    x = fpr[..., None]
    bound = np.minimum(np.exp(eps) * x + delta, 1 - np.exp(-eps) * (1 - delta - x))
    return np.clip(np.min(bound, axis=-1), fpr, 1.0)

  def gdp_mu(self, delta_floor: float) -> float:
    """The smallest μ such that every (ε, δ) guarantee of μ-GDP with δ >= ``delta_floor`` holds.

    μ-GDP (Dong et al. 2019) has the privacy profile
    δ_μ(ε) = Φ(-ε/μ + μ/2) - e^ε Φ(-ε/μ - μ/2): a membership test is no better
    than telling N(0, 1) from N(μ, 1). A DP-SGD run is not exactly μ-GDP (its
    profile has heavier tails, so the μ that covers it grows as the floor
    falls); this is the μ whose guarantees, down to ``delta_floor`` (the run's
    δ in summaries), the run has. Checked as δ_μ(ε_{i+1}) >= δ(ε_i) on the
    grid of :meth:`tpr_bound` wherever δ(ε_i) >= ``delta_floor``: both profiles
    decrease in ε, so this covers every ε in between. inf for a non-private
    ledger, 0 for an empty one.
    """
    _validation.require_delta(delta_floor, name="delta_floor")
    if self.steps == 0:
      return 0.0
    eps, delta = _PROFILE_EPSILONS, self._profile()
    if np.any(delta >= 1.0):
      return math.inf
    relevant = delta[:-1] >= delta_floor
    covers = lambda mu: bool(np.all(gdp_delta(mu, eps[1:])[relevant] >= delta[:-1][relevant]))
    # Subsampling only helps: the unsubsampled composition, μ = sqrt(Σ T_i k_i² / σ_i²), covers
    # (k_i the most examples of one user a step can hold: 1 at the example level).
    hi = math.sqrt(
      sum(
        s.steps * (s.max_examples_per_user or 1) ** 2 / s.noise_multiplier**2
        for s in self.segments
        if s.steps
      )
    )
    hi = max(hi, 1e-6)
    while not covers(hi):  # the discretized profile can lie slightly above the exact one
      hi *= 1.01
    lo = 0.0
    while hi - lo > 1e-4 * hi:
      mid = 0.5 * (lo + hi)
      lo, hi = (lo, mid) if covers(mid) else (mid, hi)
    return hi

  def statement(self, delta: float) -> dict[str, Any]:
    """What a summary states beside ε: the interval, and the attacker's view.

    ``epsilon_interval``: :meth:`epsilon_interval` as a dict. ``attacker``: the
    most TPR of any membership test at each FPR of :data:`SUMMARY_FPRS`
    (:meth:`tpr_bound`) and the μ-GDP summary (:meth:`gdp_mu` down to ``delta``).
    Non-private (or empty) ledgers state only what is meaningful.
    """
    interval = self.epsilon_interval(delta)
    tpr = self.tpr_bound(np.asarray(SUMMARY_FPRS))
    return {
      "epsilon_interval": interval.to_dict(),
      "attacker": {
        "max_tpr_at_fpr": {f"{f:g}": float(t) for f, t in zip(SUMMARY_FPRS, tpr)},
        "gdp_mu": self.gdp_mu(delta),
        "gdp_mu_covers_delta_down_to": delta,
      },
    }

  def epsilon_replace_one(self, delta: float) -> float:
    """ε at ``delta`` under replace-one neighbours (same N, one example changed), by PLD.

    The run's guarantee is stated for add/remove-one, with N treated as public;
    this is the bound for a reader who instead fixes N and swaps one example.
    """
    _validation.require_delta(delta, self.dataset_size)
    if self.steps == 0:
      return 0.0
    return self._epsilon("pld", delta, "replace_one")

  def to_dict(self) -> dict[str, Any]:
    return {
      "format": _LEDGER_FORMAT,
      "neighboring_relation": NEIGHBORING_RELATION,
      "accountant": self.accountant,
      "pld_discretization": self.pld_discretization,
      "segments": [s.to_dict() for s in self.segments],
    }

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), sort_keys=True)

  @classmethod
  def from_dict(cls, data: dict[str, Any]) -> PrivacyLedger:
    if data.get("format") != _LEDGER_FORMAT:
      raise ValueError(
        f"unknown privacy ledger format {data.get('format')!r} "
        f"(this version reads format {_LEDGER_FORMAT})"
      )
    if data.get("neighboring_relation") != NEIGHBORING_RELATION:
      raise ValueError(f"ledger neighboring_relation must be {NEIGHBORING_RELATION!r}")
    return cls(
      segments=tuple(Segment(**s) for s in data["segments"]),
      accountant=data["accountant"],
      pld_discretization=data["pld_discretization"],
    )

  @classmethod
  def from_json(cls, text: str) -> PrivacyLedger:
    return cls.from_dict(json.loads(text))


def group_privacy_epsilon(record: PrivacyLedger | Segment, group_size: int, delta: float) -> float:
  """ε at ``delta`` for a group of ``group_size`` examples, by group privacy (a comparison only).

  The classical conversion of an example-level guarantee to groups of k examples
  (e.g. a user's k examples): a mechanism that is (ε₁, δ₁)-DP for one example
  is, along a chain of k neighbouring datasets,

      (k ε₁,  δ₁ (1 + e^ε₁ + ... + e^{(k-1)ε₁}))-DP

  for the group; the δ factor is at most k e^{(k-1)ε₁}, the form usually
  quoted. Every example-level δ₁ with ε₁ = ε(δ₁) of the example-level ledger
  gives such a bound; this returns k ε(δ₁) for the largest δ₁ (found by a
  search in log δ₁: half-decade steps down from δ/k, then bisection) whose
  group δ is <= ``delta``. Each δ₁ it may return is checked, so the answer is a
  valid bound (though the search may miss a slightly better δ₁).

  ``record`` is a :class:`PrivacyLedger` or a single :class:`Segment`; its
  segments are read at the example level (``max_examples_per_user`` dropped),
  and ε(δ₁) comes from its accountant (PLD by default, which answers by RDP
  for δ₁ < :data:`PLD_MIN_DELTA`, as large groups need). The user-level
  accounting of the same steps (``max_examples_per_user=k``) is tighter; this
  is the baseline it is compared against.

  inf when no δ₁ >= 1e-300 meets ``delta``: group privacy then gives no useful
  bound (any it gives is at least k ε(δ/k), since every δ₁ that meets it is <= δ/k).
  """
  _validation.require_int_in("group_size", group_size, 1)
  _validation.require_delta(delta)
  if isinstance(record, Segment):
    record = PrivacyLedger().record(record)
  if not isinstance(record, PrivacyLedger):
    raise ValueError(f"group_privacy_epsilon() takes a PrivacyLedger or a Segment (got {record!r})")
  segments = tuple(dataclasses.replace(s, max_examples_per_user=None) for s in record.segments)
  ledger = dataclasses.replace(record, segments=segments)
  k = group_size
  if k == 1 or ledger.steps == 0:
    return ledger.epsilon(delta)
  log_delta = math.log(delta)

  def epsilon_if_meets(log_delta1: float) -> float | None:
    """k ε(δ₁) if δ₁'s group δ is <= delta, else None."""
    try:
      eps1 = ledger.epsilon(math.exp(log_delta1))
    except ValueError:
      return None
    if not math.isfinite(eps1):
      return None
    log_factor = float(special.logsumexp(eps1 * np.arange(k)))
    return k * eps1 if log_delta1 + log_factor <= log_delta else None

  step = 0.5 * math.log(10.0)
  high = log_delta - math.log(k)  # the group δ factor is >= k: δ₁ <= δ/k
  if ledger.epsilon(math.exp(high)) == math.inf:
    return math.inf
  answer = epsilon_if_meets(high)
  if answer is not None:
    return answer
  low = high
  # Descend until a δ₁ meets it: one does once ε₁ grows by less than log(10) / (k - 1) per
  # decade of δ₁ (its growth typically slows), unless that is beyond 1e-300.
  while answer is None:
    high, low = low, low - step
    if low < math.log(1e-300):
      return math.inf
    answer = epsilon_if_meets(low)
  while high - low > 1e-4:  # low meets the target, high does not
    mid = 0.5 * (low + high)
    found = epsilon_if_meets(mid)
    if found is None:
      high = mid
    else:
      low, answer = mid, found
  return answer


def compute_epsilon(
  noise_multiplier: float,
  sampling_prob: float,
  steps: int,
  delta: float,
  accountant: str = "pld",
  *,
  dataset_size: int | None = None,
  max_batch_size: int | None = None,
  pld_discretization: float = DEFAULT_PLD_DISCRETIZATION,
  prior: tuple[Segment, ...] = (),
  max_examples_per_user: int | None = None,
) -> float:
  """ε(δ) of ``steps`` steps of the Poisson-subsampled Gaussian with rate q and noise σ.

  ``prior`` segments (e.g. a one-off Gaussian release of a label histogram) are
  composed first, as the run's ledger records them. With
  ``max_examples_per_user=k`` the ε is per user (see :class:`Segment`; the
  ``prior`` segments must then be user-level too).
  """
  segment = Segment(
    sampling_prob, noise_multiplier, steps, dataset_size, max_batch_size, max_examples_per_user
  )
  ledger = PrivacyLedger(accountant=accountant, pld_discretization=pld_discretization)
  for earlier in prior:
    ledger = ledger.record(earlier)
  return ledger.record(segment).epsilon(delta)


def calibrate_noise(
  target_epsilon: float,
  delta: float,
  sampling_prob: float,
  steps: int,
  accountant: str = "pld",
  *,
  dataset_size: int | None = None,
  max_batch_size: int | None = None,
  rel_tolerance: float = 0.01,
  pld_discretization: float = DEFAULT_PLD_DISCRETIZATION,
  prior: tuple[Segment, ...] = (),
  max_examples_per_user: int | None = None,
) -> float:
  """The smallest noise multiplier σ whose ε(δ) is at most ``target_epsilon``.

  With ``prior`` segments (releases the run makes besides its steps), ε(σ) is
  that of the prior segments composed with the steps: the target covers both.
  With ``max_examples_per_user=k`` the target is a per-user ε (user-level
  sampling, PLD only; ``dataset_size`` is then the number of users).

  Returns σ with target·(1 - rel_tolerance) <= ε(σ) <= target, where ε(σ) is
  what :class:`PrivacyLedger` with the same accountant and discretization will
  report for the run (or :data:`MIN_CALIBRATED_SIGMA`, if even that σ meets the target).

  PLD calibration is fast because most of the search runs on a coarse PLD grid
  (discretization 1e-2, ~40x cheaper to compose than 1e-4) and only the answer
  is verified, and if needed adjusted, on the ledger's fine grid. (With
  ``max_examples_per_user`` each fine-grid evaluation builds a mixture PLD, seconds
  to a minute at the default grid, the larger k / σ the longer.)

  Raises:
    ValueError: bad arguments, or a target no σ <= 1e4 reaches.
  """
  _validation.require_positive("target_epsilon", target_epsilon)
  if target_epsilon > MAX_TARGET_EPSILON:
    raise ValueError(
      f"target_epsilon must be in (0, {MAX_TARGET_EPSILON:g}] (got {target_epsilon!r}; "
      "for a non-private run disable DP instead)"
    )
  _validation.require_delta(delta, dataset_size)
  _validation.require_probability("sampling_prob", sampling_prob)
  _validation.require_int_in("steps", steps, 1)
  _validation.require_positive("rel_tolerance", rel_tolerance)
  if not rel_tolerance < 1:
    raise ValueError(f"rel_tolerance must be in (0, 1) (got {rel_tolerance!r})")
  if accountant not in ACCOUNTANTS:
    raise ValueError(f"accountant must be one of {ACCOUNTANTS} (got {accountant!r})")

  def eps(sigma: float, discretization: float) -> float:
    return compute_epsilon(
      sigma,
      sampling_prob,
      steps,
      delta,
      accountant,
      dataset_size=dataset_size,
      max_batch_size=max_batch_size,
      pld_discretization=discretization,
      prior=prior,
      max_examples_per_user=max_examples_per_user,
    )

  fine = pld_discretization
  coarse = max(fine, 1e-2) if accountant == "pld" else fine
  search = functools.partial(_bisect_sigma, lambda s: eps(s, coarse), target_epsilon)
  lo, hi = search(rel_width=1e-3)
  if coarse == fine:
    return hi
  # hi is feasible on the coarse grid; verify on the fine grid the ledger uses.
  eps_hi = eps(hi, fine)
  while eps_hi > target_epsilon:
    lo, hi = hi, hi * 1.002
    eps_hi = eps(hi, fine)
  if eps_hi < target_epsilon * (1 - rel_tolerance):
    # The coarse grid was too pessimistic here (it can be by 30% over 10^4 steps): bisect on
    # the fine grid, from a lower end that is infeasible there too.
    lo = hi
    while lo > MIN_CALIBRATED_SIGMA:
      lo = max(lo * 0.9, MIN_CALIBRATED_SIGMA)
      if eps(lo, fine) > target_epsilon:
        break
      hi = lo
    else:
      return hi
    lo, hi = _bisect_sigma(lambda s: eps(s, fine), target_epsilon, rel_width=1e-3, bracket=(lo, hi))
  return hi


def _bisect_sigma(
  eps_fn, target: float, rel_width: float, bracket: tuple[float, float] | None = None
) -> tuple[float, float]:
  """(lo, hi) with eps_fn(lo) > target >= eps_fn(hi) and hi / lo <= 1 + rel_width."""
  if bracket is None:
    hi = 1.0
    while eps_fn(hi) > target:
      hi *= 2
      if hi > 1e4:
        raise ValueError(f"target_epsilon={target} is unreachable with noise_multiplier <= 1e4")
    lo = hi / 2
    while eps_fn(lo) <= target:
      hi = lo
      if hi <= MIN_CALIBRATED_SIGMA:
        return hi, hi
      lo = max(lo / 2, MIN_CALIBRATED_SIGMA)
  else:
    lo, hi = bracket
  while hi / lo > 1 + rel_width:
    mid = math.sqrt(lo * hi)
    if eps_fn(mid) > target:
      lo = mid
    else:
      hi = mid
  return lo, hi
