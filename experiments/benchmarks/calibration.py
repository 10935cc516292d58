"""Benchmark: time to calibrate σ for a target ε, against dp_accounting's own search.

    python -m experiments.benchmarks.calibration [--compare]

Prints one row per setting: σ, the ledger's ε at that σ, its gap to the target,
and the median wall time of ``dpjax.privacy.calibrate_noise`` over --repeats
runs. With --compare it also times ``dp_accounting.calibrate_dp_mechanism`` with
a fine-grid PLD accountant (the plain approach) on the same problem.
"""

from __future__ import annotations

import statistics
import time

import dp_accounting
from absl import app, flags
from dp_accounting.pld import pld_privacy_accountant

from dpjax.privacy import accounting, calibrate_noise, compute_epsilon

_COMPARE = flags.DEFINE_bool("compare", False, "Also time dp_accounting.calibrate_dp_mechanism.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repetitions per row.")

# (name, N, expected batch, steps, target ε)
SETTINGS = [
  ("SST-2 li2022 eps=3", 67349, 1024, 197, 3.0),
  ("SST-2 li2022 eps=6.27", 67349, 1024, 197, 6.27),
  ("SST-2 li2022 eps=8", 67349, 1024, 197, 8.0),
  ("SST-2 B=32 1 epoch eps=8", 67349, 32, 2105, 8.0),
  ("N=10k B=250 200 steps eps=1", 10000, 250, 200, 1.0),
]


def _median_seconds(fn, repeats):
  times, result = [], None
  for _ in range(repeats):
    accounting.clear_cache()  # Time the computation, not the ledger's ε cache.
    start = time.perf_counter()
    result = fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times), result


def _plain(target, delta, q, steps):
  make_event = lambda sigma: dp_accounting.SelfComposedDpEvent(
    dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
  )
  return dp_accounting.calibrate_dp_mechanism(
    pld_privacy_accountant.PLDAccountant,
    make_event,
    target,
    delta,
    dp_accounting.LowerEndpointAndGuess(0.1, 1.0),
  )


def main(argv):
  del argv
  header = f"{'setting':32} {'acct':5} {'sigma':>8} {'eps':>8} {'gap':>7} {'seconds':>8}"
  print(header + (f" {'plain sigma':>11} {'plain s':>8}" if _COMPARE.value else ""))
  for name, n, batch, steps, target in SETTINGS:
    q, delta = batch / n, n**-1.1
    for accountant in ("pld", "rdp"):
      seconds, sigma = _median_seconds(
        lambda: calibrate_noise(target, delta, q, steps, accountant, dataset_size=n), _REPEATS.value
      )
      eps = compute_epsilon(sigma, q, steps, delta, accountant)
      row = (
        f"{name:32} {accountant:5} {sigma:8.4f} {eps:8.4f} "
        f"{(eps - target) / target:+7.2%} {seconds:8.2f}"
      )
      if _COMPARE.value and accountant == "pld":
        plain_seconds, plain_sigma = _median_seconds(lambda: _plain(target, delta, q, steps), 1)
        row += f" {plain_sigma:11.4f} {plain_seconds:8.2f}"
      print(row, flush=True)


if __name__ == "__main__":
  app.run(main)
