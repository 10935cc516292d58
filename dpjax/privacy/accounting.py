"""Privacy accounting with dp_accounting: the ledger, ε(δ), and noise calibration.

Neighbouring relation: add/remove one example (or one user, for user-level DP).
A training run is a sequence of :class:`Segment` s, each ``steps`` steps of the
Poisson-subsampled Gaussian mechanism with rate q and noise multiplier σ (or of
the truncated-Poisson variant when the sampler caps the batch at M examples).
:class:`PrivacyLedger` stores them, composes them in bulk (one self-composition
per segment, which is far faster than one composition per step) and answers
ε(δ) with the PLD accountant (default) or RDP.

PLD answers are pessimistic estimates (dp_accounting's default), i.e. upper
bounds on the true ε for the given discretization.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from typing import Any

import dp_accounting
import numpy as np
from dp_accounting.pld import pld_privacy_accountant, privacy_loss_distribution
from dp_accounting.rdp import rdp_privacy_accountant

from dpjax import _validation

ACCOUNTANTS = ("pld", "rdp")
NEIGHBORING_RELATION = "add_or_remove_one"
DEFAULT_PLD_DISCRETIZATION = 1e-4
# Beyond this a "private" run is not meaningfully private, and PLDs of the tiny σ it
# needs get very large; calibrate_noise refuses such targets.
MAX_TARGET_EPSILON = 100.0
_LEDGER_FORMAT = 1
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
    sampling_prob: q in (0, 1].
    noise_multiplier: σ >= 0 (σ = 0 is not private: ε = inf).
    steps: number of steps >= 0.
    dataset_size: N, needed for the truncated event and to check δ < 1/N.
    max_batch_size: M if the sample was truncated to M examples, else None.
  """

  sampling_prob: float
  noise_multiplier: float
  steps: int
  dataset_size: int | None = None
  max_batch_size: int | None = None

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

  def same_mechanism(self, other: Segment) -> bool:
    """True if the two differ at most in their step counts."""
    return dataclasses.replace(self, steps=0) == dataclasses.replace(other, steps=0)

  def dp_event(self) -> dp_accounting.DpEvent:
    """The dp_accounting event of this segment (all its steps)."""
    if self.max_batch_size is not None:
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
  noise_multiplier: float, sampling_prob: float, pld_discretization: float, relation: str
) -> privacy_loss_distribution.PrivacyLossDistribution:
  """One step of the Poisson-subsampled Gaussian as dp_accounting's PLD accountant builds it.

  Building it is most of the cost of an ε query; a run asks for ε with the same
  (q, σ) at every log step, so it is built once.
  """
  return privacy_loss_distribution.from_gaussian_mechanism(
    standard_deviation=noise_multiplier,
    value_discretization_interval=pld_discretization,
    sampling_prob=sampling_prob,
    neighboring_relation=_RELATIONS[relation],
  )


class _ComposedPLD:
  """ε(δ) of Poisson-subsampled Gaussian segments, composed as ``PLDAccountant`` does.

  The same operations in the same order as ``PLDAccountant.compose`` on the
  segments' events (identity, then each segment's single-step PLD
  self-composed ``steps`` times), with the single-step PLDs memoized: the
  answer is the accountant's, bit for bit (tested).
  """

  def __init__(self, segments: tuple[Segment, ...], pld_discretization: float, relation: str):
    self.non_private = any(s.noise_multiplier == 0 for s in segments if s.steps)
    pld = privacy_loss_distribution.identity(value_discretization_interval=pld_discretization)
    if not self.non_private:
      for s in segments:
        if s.steps:
          one = _poisson_gaussian_pld(
            s.noise_multiplier, s.sampling_prob, pld_discretization, relation
          )
          pld = pld.compose(one.self_compose(s.steps))
    self.pld = pld

  def get_epsilon(self, delta: float) -> float:
    return math.inf if self.non_private else self.pld.get_epsilon_for_delta(delta)


@functools.lru_cache(maxsize=256)
def _composed_accountant(
  segments: tuple[Segment, ...],
  accountant: str,
  pld_discretization: float,
  relation: str = NEIGHBORING_RELATION,
) -> dp_accounting.PrivacyAccountant | _ComposedPLD:
  if accountant == "rdp" and any(s.max_batch_size is not None for s in segments):
    raise ValueError(
      "accountant='rdp' cannot account a truncated batch (max_batch_size); "
      "use accountant='pld' or max_batch_size=None"
    )
  if accountant == "pld" and all(s.max_batch_size is None for s in segments):
    return _ComposedPLD(segments, pld_discretization, relation)
  acc = _make_accountant(accountant, pld_discretization, relation)
  acc.compose(dp_accounting.ComposedDpEvent([s.dp_event() for s in segments if s.steps]))
  return acc


def clear_cache() -> None:
  """Forgets memoized compositions (for benchmarks that time the computation)."""
  _composed_accountant.cache_clear()
  _poisson_gaussian_pld.cache_clear()


@dataclasses.dataclass(frozen=True)
class PrivacyLedger:
  """An immutable record of the mechanisms a run has executed, and their ε.

  ``record`` returns a new ledger (consecutive segments of the same mechanism
  are merged, so a run of any length is a handful of bulk compositions). The
  ledger serializes to JSON and is stored in every checkpoint: ε is always
  computed from the steps actually taken, across resumes.

  Attributes:
    segments: the recorded segments, in order.
    accountant: ``"pld"`` (default) or ``"rdp"``.
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

  @property
  def steps(self) -> int:
    """Total number of steps recorded."""
    return sum(s.steps for s in self.segments)

  @property
  def dataset_size(self) -> int | None:
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
    acc = _composed_accountant(self.segments, self.accountant, self.pld_discretization)
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
      return np.asarray(acc.pld.get_delta_for_epsilon(epsilons), np.float64)
    return np.array([acc.get_delta(float(e)) for e in epsilons.ravel()]).reshape(epsilons.shape)

  def epsilon_replace_one(self, delta: float) -> float:
    """ε at ``delta`` under replace-one neighbours (same N, one example changed), by PLD.

    The run's guarantee is stated for add/remove-one, with N treated as public;
    this is the bound for a reader who instead fixes N and swaps one example.
    """
    _validation.require_delta(delta, self.dataset_size)
    if self.steps == 0:
      return 0.0
    acc = _composed_accountant(self.segments, "pld", self.pld_discretization, "replace_one")
    return float(acc.get_epsilon(delta))

  def to_dict(self) -> dict[str, Any]:
    return {
      "format": _LEDGER_FORMAT,
      "neighboring_relation": NEIGHBORING_RELATION,
      "accountant": self.accountant,
      "pld_discretization": self.pld_discretization,
      "segments": [dataclasses.asdict(s) for s in self.segments],
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
) -> float:
  """ε(δ) of ``steps`` steps of the Poisson-subsampled Gaussian with rate q and noise σ.

  ``prior`` segments (e.g. a one-off Gaussian release of a label histogram) are
  composed first, as the run's ledger records them.
  """
  segment = Segment(sampling_prob, noise_multiplier, steps, dataset_size, max_batch_size)
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
) -> float:
  """The smallest noise multiplier σ whose ε(δ) is at most ``target_epsilon``.

  With ``prior`` segments (releases the run makes besides its steps), ε(σ) is
  that of the prior segments composed with the steps: the target covers both.

  Returns σ with target·(1 - rel_tolerance) <= ε(σ) <= target, where ε(σ) is
  what :class:`PrivacyLedger` with the same accountant and discretization will
  report for the run.

  PLD calibration is fast because most of the search runs on a coarse PLD grid
  (discretization 1e-2, ~40x cheaper to compose than 1e-4) and only the answer
  is verified, and if needed adjusted, on the ledger's fine grid.

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
    # The coarse grid was too pessimistic here: bisect on the fine grid.
    lo, hi = _bisect_sigma(
      lambda s: eps(s, fine), target_epsilon, rel_width=1e-3, bracket=(lo * 0.9, hi)
    )
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
      hi, lo = lo, lo / 2
      if lo < 1e-4:
        return lo, hi
  else:
    lo, hi = bracket
  while hi / lo > 1 + rel_width:
    mid = math.sqrt(lo * hi)
    if eps_fn(mid) > target:
      lo = mid
    else:
      hi = mid
  return lo, hi
