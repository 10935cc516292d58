"""Edgeworth and central-limit *estimates* of ε for the Poisson-subsampled Gaussian.

Everything here is an estimate with no guarantee: neither an upper nor a lower
bound on the true ε. The project never uses these estimates to calibrate noise,
to stop a run at its budget, or to report a run's ε; those go through the
accountants in :mod:`dpjax.privacy.accounting` (PLD or RDP), which give upper
bounds. The estimates exist to compare against published claims that
approximate accountants allow less noise (a test enforces that only the
benchmarks and a planner import this module).

Setting (add-or-remove neighbours, sensitivity 1): one step releases
x ~ P0 = N(0, σ²) without the example and x ~ P1 = (1 - q)·N(0, σ²) + q·N(1, σ²)
with it. The per-step privacy loss of P1 against P0 is

    ℓ(x) = log(P1(x) / P0(x)) = log(1 - q + q·exp((2x - 1) / (2σ²))),

and T steps compose to L = ℓ(x_1) + ... + ℓ(x_T) with independent x_t. Its
profile is the hockey-stick divergence

    δ(ε) = P1(L > ε) - e^ε · P0(L > ε),

and ε(δ) is the smallest ε with δ(ε) <= δ. The PLD accountant computes the
distribution of L exactly (up to discretization). The estimates below replace
it by a few of its moments:

* :func:`estimate_edgeworth` (Wang et al. 2022, "Analytical composition of
  differential privacy via the Edgeworth accountant"): the per-step cumulants
  κ_j of ℓ under P0 and under P1 (computed by quadrature), summed over T steps,
  give an Edgeworth expansion of each tail of L.
* :func:`estimate_clt` (Dong, Roth and Su 2019; Bu et al. 2020): the central
  limit theorem for composition, T steps of the subsampled Gaussian being
  approximately μ-GDP with μ = q·sqrt(T·(e^{1/σ²} - 1)).

Both are asymptotic in the number of steps in which one example is actually
used, T·q (the number of epochs), not in T: the loss L is close to a sum of a
Poisson(T·q) number of large terms, one per step that used the example, plus
many near-zero ones. With a few epochs (e.g. 197 steps at q = 1024/67349, three
epochs) L is far from Gaussian in the tail that δ ≈ 5e-6 probes, where the
Edgeworth correction is hundreds of times its normal leading term; both
estimates miss the heavy right tail of L and under-report ε (there, by 18% and
27% for the Edgeworth estimate at a PLD ε of 3 and 8, by about 40% for the
CLT). After tens of epochs at σ around 1 the Edgeworth estimate is within 1%
of PLD.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
from scipy import optimize, special

from dpjax import _validation

# Estimates above this are reported as inf: the expansions say nothing useful there.
MAX_ESTIMATE_EPSILON = 500.0
EDGEWORTH_ORDERS = (0, 1, 2)
# Quadrature over the standard normal variable z of each mixture component: the
# trapezoid rule on [-Z, Z] is exponentially accurate for these smooth integrands.
_QUADRATURE_Z = 38.0
_QUADRATURE_POINTS = 8001
# Beyond this many standard deviations above its mean an Edgeworth tail is 0 in float64.
_TAIL_SDS = 45.0
_MAX_GRID = 200_000
_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def _check_common(noise_multiplier, sampling_prob, steps, delta) -> tuple[float, float]:
  sigma = _validation.require_non_negative("noise_multiplier", noise_multiplier)
  q = _validation.require_probability("sampling_prob", sampling_prob)
  _validation.require_int_in("steps", steps, 0)
  _validation.require_delta(delta)
  return sigma, q


def _step_privacy_loss(x: np.ndarray, sampling_prob: float, sigma: float) -> np.ndarray:
  """ℓ(x) = log(1 - q + q·exp(a)), a = (2x - 1) / (2σ²), without overflow or cancellation."""
  a = (2 * x - 1) / (2 * sigma * sigma)
  q = sampling_prob
  near = np.abs(a) <= 1
  # log1p keeps relative precision where ℓ is close to 0; log-sum-exp handles |a| large
  # (including q = 1, where ℓ = a).
  small = np.log1p(q * np.expm1(np.where(near, a, 0.0)))
  with np.errstate(divide="ignore"):
    large = np.logaddexp(np.log1p(-q), math.log(q) + a)
  return np.where(near, small, large)


@functools.lru_cache(maxsize=256)
def _step_cumulants(noise_multiplier: float, sampling_prob: float) -> tuple[np.ndarray, np.ndarray]:
  """(κ under P0, κ under P1): the first four cumulants of one step's privacy loss ℓ.

  E_P0[g(ℓ)] integrates over x = σz, E_P1[g(ℓ)] is (1 - q)·E_P0[g(ℓ)] plus q
  times the integral over x = 1 + σz, with z standard normal (trapezoid rule).
  Central moments are integrated directly (not from raw moments) to keep
  precision when the mean is far smaller than the spread.
  """
  sigma, q = noise_multiplier, sampling_prob
  z = np.linspace(-_QUADRATURE_Z, _QUADRATURE_Z, _QUADRATURE_POINTS)
  weights = np.exp(-0.5 * z * z - _LOG_SQRT_2PI) * (z[1] - z[0])
  loss_base = _step_privacy_loss(sigma * z, q, sigma)
  loss_shifted = _step_privacy_loss(1.0 + sigma * z, q, sigma)
  mixtures = {"p0": ((1.0, loss_base),), "p1": ((1.0 - q, loss_base), (q, loss_shifted))}
  result = []
  for parts in mixtures.values():
    mean = sum(c * np.dot(weights, loss) for c, loss in parts)
    m2 = m3 = m4 = 0.0
    for c, loss in parts:
      d = loss - mean
      d2 = d * d
      m2 += c * np.dot(weights, d2)
      m3 += c * np.dot(weights, d2 * d)
      m4 += c * np.dot(weights, d2 * d2)
    result.append(np.array([mean, m2, m3, m4 - 3 * m2 * m2], np.float64))
  return result[0], result[1]


def _edgeworth_polynomial(x: np.ndarray, cumulants: np.ndarray, order: int) -> np.ndarray:
  """p(x) with P(L > κ1 + x·sqrt(κ2)) ≈ Φ̄(x) + φ(x)·p(x) (Edgeworth, up to ``order``)."""
  _, k2, k3, k4 = cumulants
  skew = k3 / k2**1.5
  kurt = k4 / (k2 * k2)
  poly = np.zeros_like(x)
  if order >= 1:
    poly = poly + skew / 6 * (x * x - 1)  # He2
  if order >= 2:
    he3 = x**3 - 3 * x
    he5 = x**5 - 10 * x**3 + 15 * x
    poly = poly + kurt / 24 * he3 + skew * skew / 72 * he5
  return poly


def _scaled_tail(eps: np.ndarray, cumulants: np.ndarray, order: int, log_scale: np.ndarray):
  """exp(log_scale) · P(L > eps) under the Edgeworth expansion, clipped to [0, exp(log_scale)].

  The expansion is not a distribution: its tail can leave [0, 1]; a tail
  outside is clipped there (a probability is never negative).
  """
  x = (eps - cumulants[0]) / math.sqrt(cumulants[1])
  normal = np.exp(log_scale + special.log_ndtr(-x))
  correction = np.exp(log_scale - 0.5 * x * x - _LOG_SQRT_2PI) * _edgeworth_polynomial(
    x, cumulants, order
  )
  return np.clip(normal + correction, 0.0, np.exp(log_scale))


def _edgeworth_delta(eps: np.ndarray, alt: np.ndarray, null: np.ndarray, order: int) -> np.ndarray:
  """The estimated δ(ε) = P_alt(L > ε) - e^ε · P_null(L > ε) of the composed loss L."""
  return _scaled_tail(eps, alt, order, np.zeros_like(eps)) - _scaled_tail(eps, null, order, eps)


def _edgeworth_epsilon(alt: np.ndarray, null: np.ndarray, delta: float, order: int) -> float:
  """The largest root of estimated δ(ε) = δ on [0, MAX_ESTIMATE_EPSILON], 0 if none, inf if above.

  The estimated δ(ε) need not decrease, so this takes the last crossing (the
  most pessimistic reading) on a grid a twentieth of a standard deviation fine,
  then refines it. Above κ1 + 45·sd of the alternative both tails are 0, so
  the search stops there.
  """
  sd_alt, sd_null = math.sqrt(alt[1]), math.sqrt(null[1])
  hi = alt[0] + _TAIL_SDS * sd_alt
  if hi <= 0:
    return 0.0
  if hi > MAX_ESTIMATE_EPSILON:
    hi = MAX_ESTIMATE_EPSILON
    if _edgeworth_delta(np.array([hi]), alt, null, order)[0] > delta:
      return math.inf
  spacing = max(min(sd_alt, sd_null) / 20, hi / _MAX_GRID)
  grid = np.linspace(0.0, hi, int(math.ceil(hi / spacing)) + 1)
  above = np.flatnonzero(_edgeworth_delta(grid, alt, null, order) > delta)
  if above.size == 0:
    return 0.0
  i = int(above[-1])
  if i == grid.size - 1:
    return float(grid[i])
  root = optimize.brentq(
    lambda e: _edgeworth_delta(np.array([e]), alt, null, order)[0] - delta,
    grid[i],
    grid[i + 1],
    xtol=1e-10,
  )
  return max(float(root), 0.0)


def estimate_edgeworth(
  noise_multiplier: float, sampling_prob: float, steps: int, delta: float, order: int = 2
) -> float:
  """An Edgeworth-expansion *estimate* of ε(δ) for T steps of the Poisson-subsampled Gaussian.

  Not a bound, and never used by the project for noise calibration, budget
  stops or reported ε (use :func:`dpjax.privacy.compute_epsilon` for those).

  Method (Wang et al. 2022, "Analytical composition of differential privacy
  via the Edgeworth accountant"): the per-step cumulants κ_1..κ_4 of the
  privacy loss ℓ under P0 and P1 (module docstring) are computed by
  quadrature; the composed loss L has cumulants K_j = T·κ_j. With
  x = (ε - K_1) / sqrt(K_2), γ1 = K_3 / K_2^{3/2}, γ2 = K_4 / K_2², each tail
  is approximated by

      P(L > ε) ≈ Φ̄(x) + φ(x)·[γ1/6·He2(x) + γ2/24·He3(x) + γ1²/72·He5(x)]

  (order 2; order 1 keeps only the γ1 term, order 0 is the normal
  approximation with L's exact mean and variance), with He_k the probabilists'
  Hermite polynomials, and each tail clipped to [0, 1]. ε solves
  δ(ε) = P1(L > ε) - e^ε·P0(L > ε) = δ; as the approximate δ(ε) need not
  decrease, the largest solution is taken. For add-or-remove neighbours the
  answer is the larger of the two orderings (P1 against P0, and P0 against
  P1, whose loss is -L), as the PLD accountant does.

  Where it under-reports: the expansion corrects a Gaussian by polynomials,
  but the composed loss is roughly a sum over a Poisson(T·q) number of steps
  that used the example, so its right tail is much heavier than any such
  correction when T·q (the number of epochs) is small and δ is small. At
  q = 1024/67349, T = 197, δ = 67349^-1.1 it reports 2.45 and 5.82 where PLD
  says 2.99 and 7.99: at the first σ the true P1(L > 3) is 2.2e-5, the
  expansion gives 7e-9 (and the normal term alone 1e-11), though the mean and
  variance it uses match the exact ones. It is close (within a few percent) after tens of epochs
  at σ around 1, e.g. q = 256/60000, σ = 1.1, T = 14062, δ = 1e-5.

  Args:
    noise_multiplier: σ >= 0 (σ = 0 gives inf).
    sampling_prob: q in (0, 1].
    steps: T >= 0 (0 gives 0).
    delta: δ in (0, 1).
    order: 0, 1 or 2 (terms of the expansion kept).

  Returns:
    The estimate of ε, >= 0; inf for σ = 0, when the per-step cumulants are
    not finite (σ too small for float64), or when the estimate would exceed
    ``MAX_ESTIMATE_EPSILON``.

  Raises:
    ValueError: arguments out of range.
  """
  sigma, q = _check_common(noise_multiplier, sampling_prob, steps, delta)
  if order not in EDGEWORTH_ORDERS:
    raise ValueError(f"order must be one of {EDGEWORTH_ORDERS} (got {order!r})")
  if steps == 0:
    return 0.0
  if sigma == 0:
    return math.inf
  with np.errstate(over="ignore", invalid="ignore"):
    p0, p1 = _step_cumulants(sigma, q)
  p0, p1 = p0 * steps, p1 * steps
  if not (np.all(np.isfinite(p0)) and np.all(np.isfinite(p1))):
    return math.inf
  if p0[1] <= 0 or p1[1] <= 0:
    return 0.0  # σ so large that the loss is 0 to float64 precision
  flip = np.array([-1.0, 1.0, -1.0, 1.0])  # cumulants of -L
  return max(
    _edgeworth_epsilon(p1, p0, delta, order),  # P1 against P0: loss L
    _edgeworth_epsilon(p0 * flip, p1 * flip, delta, order),  # P0 against P1: loss -L
  )


def gdp_clt_mu(noise_multiplier: float, sampling_prob: float, steps: int) -> float:
  """The μ of the central-limit *estimate*: T steps are approximately μ-GDP.

  μ = q·sqrt(T·(exp(1/σ²) - 1)) (Bu et al. 2020, from the CLT of Dong, Roth and
  Su 2019). An estimate for large T, not a bound; the project never uses it for
  calibration, budget stops or reported ε.

  Returns:
    μ >= 0; inf when σ = 0 or exp(1/σ²) overflows.
  """
  sigma = _validation.require_non_negative("noise_multiplier", noise_multiplier)
  q = _validation.require_probability("sampling_prob", sampling_prob)
  _validation.require_int_in("steps", steps, 0)
  if steps == 0:
    return 0.0
  if sigma == 0:
    return math.inf
  try:
    return q * math.sqrt(steps * math.expm1(1.0 / (sigma * sigma)))
  except OverflowError:
    return math.inf


def _gdp_log_delta(eps: float, mu: float) -> float:
  """log δ(ε) of μ-GDP: δ(ε) = Φ(-ε/μ + μ/2) - e^ε·Φ(-ε/μ - μ/2), in log space."""
  log_a = special.log_ndtr(-eps / mu + mu / 2)
  log_b = eps + special.log_ndtr(-eps / mu - mu / 2)
  if log_b >= log_a:
    return -1e4  # δ is 0 to float64 precision
  return float(log_a + math.log(-math.expm1(log_b - log_a)))


def estimate_clt(noise_multiplier: float, sampling_prob: float, steps: int, delta: float) -> float:
  """A central-limit (μ-GDP) *estimate* of ε(δ) for T steps of the Poisson-subsampled Gaussian.

  Not a bound, and never used by the project for noise calibration, budget
  stops or reported ε (use :func:`dpjax.privacy.compute_epsilon` for those).

  μ = :func:`gdp_clt_mu`; ε solves the μ-GDP profile
  δ(ε) = Φ(-ε/μ + μ/2) - e^ε·Φ(-ε/μ - μ/2) = δ (Dong, Roth and Su 2019,
  Corollary 2.13), which decreases in ε, so the root is unique.

  Where it under-reports: the CLT replaces the composed loss by a Gaussian; with
  few epochs (small T·q) the true loss has a much heavier right tail, e.g. it
  reports 1.81 and 4.97 at q = 1024/67349, T = 197, δ = 67349^-1.1 where PLD
  says 2.99 and 7.99. It also omits the O(1/sqrt(T)) terms the Edgeworth
  estimate keeps, and under-reports somewhat even after tens of epochs. Its μ
  is derived for small q: for large q it over-reports (at q = 1 the exact
  composition is sqrt(T)/σ-GDP, a smaller μ than the formula's).

  Returns:
    The estimate of ε, >= 0 (0 when δ(0) <= δ); inf for σ = 0, when μ
    overflows, or when the estimate would exceed ``MAX_ESTIMATE_EPSILON``.

  Raises:
    ValueError: arguments out of range.
  """
  _check_common(noise_multiplier, sampling_prob, steps, delta)
  mu = gdp_clt_mu(noise_multiplier, sampling_prob, steps)
  if mu == 0:
    return 0.0
  if math.isinf(mu):
    return math.inf
  target = math.log(delta)
  f = lambda e: _gdp_log_delta(e, mu) - target
  if f(0.0) <= 0:
    return 0.0
  if f(MAX_ESTIMATE_EPSILON) > 0:
    return math.inf
  hi = 1.0
  while f(hi) > 0:
    hi *= 2
  hi = min(hi, MAX_ESTIMATE_EPSILON)
  return max(float(optimize.brentq(f, 0.0, hi, xtol=1e-12, rtol=1e-12)), 0.0)


def sigma_for_estimate(
  estimate_fn: Callable[[float, float, int, float], float],
  target_epsilon: float,
  delta: float,
  sampling_prob: float,
  steps: int,
  *,
  rel_width: float = 1e-4,
) -> float:
  """The σ at which ``estimate_fn`` *estimates* ε(δ) = ``target_epsilon`` (bisection).

  For comparison only: this is the noise an approximate accountant would pick,
  which can deliver a larger true ε than the target. The project never
  calibrates with it (:func:`dpjax.privacy.calibrate_noise` does that).

  Bisection in log σ, assuming the estimate decreases in σ (the CLT estimate
  does; the Edgeworth one does in practice).

  Args:
    estimate_fn: ``(noise_multiplier, sampling_prob, steps, delta) -> ε``, e.g.
      :func:`estimate_edgeworth` or :func:`estimate_clt`.
    target_epsilon: the ε the estimate should reach, > 0.
    delta: δ in (0, 1).
    sampling_prob: q in (0, 1].
    steps: T >= 1.
    rel_width: the bracket's final relative width.

  Returns:
    The upper end σ of a bracket [σ/(1 + rel_width), σ] across which the
    estimate falls to ``target_epsilon`` or below.

  Raises:
    ValueError: bad arguments, or a target no σ <= 1e4 reaches.
  """
  _validation.require_positive("target_epsilon", target_epsilon)
  _validation.require_delta(delta)
  _validation.require_probability("sampling_prob", sampling_prob)
  _validation.require_int_in("steps", steps, 1)
  _validation.require_positive("rel_width", rel_width)
  eps = lambda s: estimate_fn(s, sampling_prob, steps, delta)
  hi = 1.0
  while eps(hi) > target_epsilon:
    hi *= 2
    if hi > 1e4:
      raise ValueError(f"target_epsilon={target_epsilon} is not reached by any σ <= 1e4")
  lo = hi / 2
  while eps(lo) <= target_epsilon:
    hi, lo = lo, lo / 2
    if lo < 1e-3:
      return hi
  while hi / lo > 1 + rel_width:
    mid = math.sqrt(lo * hi)
    if eps(mid) > target_epsilon:
      lo = mid
    else:
      hi = mid
  return hi
