"""Benchmark: user-level ε of example-level sampling (ELS) against group privacy.

    python -m experiments.benchmarks.user_level [--ks=1,2,4,8,16]

Setting: N_users users, each with at most k examples, example-level Poisson
sampling with rate q per example, T steps, δ < 1/N_users. For each k it prints

* at the σ calibrated for example-level ε = --epsilon: the user-level ε of the
  same run by the mixture-of-Gaussians accountant (ELS; tight) and by group
  privacy from the example-level guarantee (the classical bound);
* the σ ELS needs for user-level ε = --epsilon, its ratio to the
  example-level σ, and the σ group privacy would need;
* the wall time of each (the user-level PLD of one σ takes seconds to a minute
  to build at discretization 1e-4).
"""

from __future__ import annotations

import time

from absl import app, flags

from dpjax.privacy import accounting

_KS = flags.DEFINE_list("ks", ["1", "2", "4", "8", "16"], "Examples per user (k) to compare.")
_USERS = flags.DEFINE_integer("users", 10_000, "Number of users N_users.")
_Q = flags.DEFINE_float("sampling_prob", 0.01, "Example-level sampling rate q.")
_STEPS = flags.DEFINE_integer("steps", 1000, "Training steps T.")
_DELTA = flags.DEFINE_float("delta", 1e-6, "δ (below 1/N_users).")
_EPSILON = flags.DEFINE_float("epsilon", 8.0, "The target ε (example-level, then user-level).")


def _group_sigma(target, delta, q, steps, k):
  """A σ whose group-privacy ε for groups of k is in [0.99·target, target].

  The same tolerance as ``calibrate_noise``, so the two σ columns compare.
  """
  eps = lambda s: accounting.group_privacy_epsilon(accounting.Segment(q, s, steps), k, delta)
  lo, hi = 0.2, 1.0
  while eps(hi) > target:
    lo, hi = hi, hi * 2
  while eps(hi) < 0.99 * target and hi / lo > 1.0001:
    mid = (lo * hi) ** 0.5
    lo, hi = (mid, hi) if eps(mid) > target else (lo, mid)
  return hi


def main(argv):
  del argv
  q, steps, delta, target, users = (
    _Q.value,
    _STEPS.value,
    _DELTA.value,
    _EPSILON.value,
    _USERS.value,
  )
  start = time.perf_counter()
  sigma = accounting.calibrate_noise(target, delta, q, steps)
  print(
    f"N_users={users:,}  q={q:g}  T={steps}  δ={delta:g}: example-level σ={sigma:.4f} for "
    f"ε={target:g} ({time.perf_counter() - start:.1f} s)\n"
  )
  header = (
    f"{'k':>3}  {'ELS ε at that σ':>16}  {'group ε':>9}  {'σ_ELS for target':>16}  "
    f"{'σ_ELS/σ':>7}  {'σ_group':>8}  {'seconds':>7}"
  )
  print(header)
  for k in (int(v) for v in _KS.value):
    start = time.perf_counter()
    els = accounting.compute_epsilon(
      sigma, q, steps, delta, dataset_size=users, max_examples_per_user=k
    )
    group = accounting.group_privacy_epsilon(accounting.Segment(q, sigma, steps), k, delta)
    sigma_els = accounting.calibrate_noise(
      target, delta, q, steps, dataset_size=users, max_examples_per_user=k
    )
    sigma_group = _group_sigma(target, delta, q, steps, k)
    print(
      f"{k:>3}  {els:>16.3f}  {group:>9.3f}  {sigma_els:>16.4f}  {sigma_els / sigma:>7.2f}  "
      f"{sigma_group:>8.4f}  {time.perf_counter() - start:>7.1f}",
      flush=True,
    )


if __name__ == "__main__":
  app.run(main)
