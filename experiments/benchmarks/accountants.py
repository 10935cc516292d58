"""Benchmark: rigorous accountants against the Edgeworth and CLT *estimates* of ε.

    python -m experiments.benchmarks.accountants

For the SST-2 regime of Li et al. 2022 (N = 67349, expected batch 1024,
T = 197 steps, δ = N^-1.1) and each target ε in {3, 8}: the σ that PLD
calibration picks; ε at that σ by RDP, PLD, PRV (its [lower, upper] bounds)
and the two estimates; then the σ that RDP, PLD, the Edgeworth estimate and the
CLT estimate would each pick for the target, its difference from the PLD σ,
and the ε that σ truly gives (PLD). A second block does the same, for the
target ε = 3 only, in a many-epoch regime: MNIST as in Abadi et al. 2016 and
the TF Privacy tutorial (N = 60000, batch 256, 60 epochs = 14062 steps,
δ = 1e-5), after ε at the published σ = 1.1. Takes about half a minute.

The estimates come from :mod:`dpjax.privacy.estimates`; the project never uses
them for calibration, budget stops or reported ε.
"""

from __future__ import annotations

import time

from absl import app
from prv_accountant import PoissonSubsampledGaussianMechanism, PRVAccountant

from dpjax.privacy import calibrate_noise, compute_epsilon
from dpjax.privacy.estimates import estimate_clt, estimate_edgeworth, sigma_for_estimate

# (name, N, expected batch, steps, δ, published σ or None, targets)
REGIMES = [
  ("SST-2 li2022, 3 epochs", 67349, 1024, 197, 67349**-1.1, None, (3.0, 8.0)),
  ("MNIST abadi2016, 60 epochs", 60000, 256, 14062, 1e-5, 1.1, (3.0,)),
]
ESTIMATES = {"Edgeworth": estimate_edgeworth, "CLT": estimate_clt}


def _prv_bounds(sigma: float, q: float, steps: int, delta: float) -> tuple[float, float]:
  prv = PoissonSubsampledGaussianMechanism(noise_multiplier=sigma, sampling_probability=q)
  accountant = PRVAccountant(
    prvs=[prv], max_self_compositions=[steps], eps_error=0.01, delta_error=delta / 1000
  )
  lower, _, upper = accountant.compute_epsilon(delta, [steps])
  return lower, upper


def _pld_sigma(target: float, q: float, steps: int, delta: float, n: int) -> float:
  """The σ the ledger calibrates for ``target`` (PLD ε within 1% below it)."""
  sigma = calibrate_noise(target, delta, q, steps, "pld", dataset_size=n)
  eps = compute_epsilon(sigma, q, steps, delta)
  if not 0.99 * target <= eps <= target:
    raise AssertionError(f"calibrate_noise gave σ={sigma:.4f} with PLD ε={eps:.4f}")
  return sigma


def _epsilons_at(sigma: float, q: float, steps: int, delta: float) -> dict[str, str]:
  """ε at σ by each accountant and estimate, formatted."""
  lower, upper = _prv_bounds(sigma, q, steps, delta)
  cells = {
    "RDP": f"{compute_epsilon(sigma, q, steps, delta, 'rdp'):.3f}",
    "PLD": f"{compute_epsilon(sigma, q, steps, delta, 'pld'):.3f}",
    "PRV": f"[{lower:.3f}, {upper:.3f}]",
  }
  for name, fn in ESTIMATES.items():
    cells[name] = f"{fn(sigma, q, steps, delta):.3f}"
  return cells


def _print_epsilons(sigma: float, q: float, steps: int, delta: float, title: str) -> float:
  cells = _epsilons_at(sigma, q, steps, delta)
  print(f"  {title}")
  print(f"    {'accountant':22} {'ε at this σ':>16}")
  for name, cell in cells.items():
    kind = " (estimate)" if name in ESTIMATES else ""
    print(f"    {name + kind:22} {cell:>16}")
  return float(cells["PLD"])


def _print_calibrations(
  target: float, pld_sigma: float, q: float, steps: int, delta: float, n: int
) -> None:
  sigmas = {
    "RDP": calibrate_noise(target, delta, q, steps, "rdp", dataset_size=n),
    "PLD": pld_sigma,
  }
  for name, fn in ESTIMATES.items():
    sigmas[name] = sigma_for_estimate(fn, target, delta, q, steps)
  print(
    f"    {'accountant':22} {f'σ for ε={target:g}':>12} {'vs PLD σ':>9} "
    f"{'true ε (PLD) at that σ':>23}"
  )
  for name, sigma in sigmas.items():
    kind = " (estimate)" if name in ESTIMATES else ""
    change = (sigma - sigmas["PLD"]) / sigmas["PLD"]
    true_eps = compute_epsilon(sigma, q, steps, delta)
    print(f"    {name + kind:22} {sigma:12.4f} {change:+9.1%} {true_eps:23.3f}")


def main(argv):
  del argv
  start = time.perf_counter()
  for name, n, batch, steps, delta, published_sigma, targets in REGIMES:
    q = batch / n
    print(
      f"{name}: N={n}, q={batch}/{n}={q:.5f}, T={steps} (T·q={steps * q:.1f} epochs), δ={delta:.3g}"
    )
    if published_sigma is not None:
      _print_epsilons(published_sigma, q, steps, delta, f"published σ = {published_sigma:g}")
    for target in targets:
      sigma = _pld_sigma(target, q, steps, delta, n)
      _print_epsilons(sigma, q, steps, delta, f"target ε={target:g}: σ by PLD = {sigma:.4f}")
      _print_calibrations(target, sigma, q, steps, delta, n)
    print()
  print(f"wall time: {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
  app.run(main)
