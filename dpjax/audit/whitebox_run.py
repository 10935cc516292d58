"""White-box audit of a whole run in one run: m gradient canaries through every step.

:mod:`dpjax.audit.whitebox` audits one step, many times. This audits what the
ledger claims for the whole run, Poisson sampling and composition included, in a
single run (Steinke, Nasr, Jagielski 2023, white-box setting): the adversary
controls m canary examples whose gradients are Dirac directions, each canary is
in the training set by an independent fair coin, and after the run it guesses
the coins from the released parameters.

The run: the mechanism's own Poisson sampler draws, at every step t < T, a
sample of its N rows (q = B/N); rows 0..m-1 are the canaries, the others are
background rows (gradient -C·w, w a coordinate no canary uses, so the realized
count reaches the update). Canary i's gradient is ``canary_scale``·C·e_i
(clipping must act); it is masked out, i.e. absent from the data, when its coin
is tails. The mechanism's ``grad_fn`` clips and sums the sampled rows, its
privatizer adds the step's noise and divides by B, and the parameters move by
the update (SGD, learning rate 1). The score of canary i is its coordinate of
the final parameters times B, in units of σC: about (number of times it was
sampled) + N(0, T) when in, N(0, T) when out.

The one-run bounds (:meth:`statistics.ScoreAudit.epsilon_one_run` and its f-DP
version) turn the guesses into an ε lower bound for the claim ε(δ) of the
ledger (T steps at q and σ): a bound above the claim means the mechanism is not
what it says (a sampling rate higher than claimed, a realized-batch divisor, too
little noise, noise reused across steps). Unlike the one-step audit it cannot
reach the claim: with m canaries the one-run bound saturates (Steinke et al.),
so it is a check of the whole run's path, not a tight estimate.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dpjax import batching
from dpjax.audit import statistics
from dpjax.privacy.mechanism import Mechanism


def _audit_loss(params: dict[str, jax.Array], example: dict[str, jax.Array]) -> jax.Array:
  """Σ p·x: the per-example gradient is the example's row x itself."""
  return sum(jnp.dot(params[k], example[k]) for k in sorted(params))


@dataclasses.dataclass(frozen=True)
class RunAudit:
  """The outcome of :func:`audit_run`.

  Attributes:
    claimed_epsilon: ε(δ) the ledger claims for the audited steps (q, σ, T).
    delta: the δ of the claim and of the bounds.
    significance: α of each bound.
    canaries: m; ``canaries_in`` of them had heads.
    steps: T, the steps run.
    epsilon_lb: the one-run bound (Steinke et al. 2023).
    epsilon_lb_fdp: the f-DP one-run bound (Mahloujifar et al. 2024).
    auroc: Mann–Whitney AUROC of the in scores against the out scores.
  """

  claimed_epsilon: float
  delta: float
  significance: float
  canaries: int
  canaries_in: int
  steps: int
  epsilon_lb: float
  epsilon_lb_fdp: float
  auroc: float

  @property
  def violated(self) -> bool:
    """A bound above the claim: the run's mechanism is not the one the ledger describes."""
    return max(self.epsilon_lb, self.epsilon_lb_fdp) > self.claimed_epsilon

  def to_dict(self) -> dict[str, Any]:
    return {**dataclasses.asdict(self), "violated": self.violated}


def audit_run(
  mechanism: Mechanism,
  *,
  canaries: int = 1000,
  steps: int | None = None,
  canary_scale: float = 4.0,
  delta: float = 1e-5,
  significance: float = 0.05,
  seed: int | None = None,
  grad_fn: Any = None,
  privatizer: Any = None,
  sampler: Any = None,
) -> RunAudit:
  """Audits ``steps`` steps of ``mechanism`` (default: all it plans) with m gradient canaries.

  Args:
    mechanism: the keyed private mechanism: its N, q, σ, C and B are the claim.
    canaries: m, the first m of its N rows (m < N).
    steps: T (default ``mechanism.steps``).
    canary_scale: a canary's gradient norm over C (> 1: clipping must act).
    delta: δ of the claim and of the bounds.
    significance: α of each bound.
    seed: the auditor's coins (None: OS entropy); independent of the mechanism.
    grad_fn: the clipped-gradient function to audit, built for :func:`_audit_loss`
      (None: ``mechanism.grad_fn``).
    privatizer: the privatizer to audit (None: ``mechanism.privatizer()``).
    sampler: the batch sampler to audit (None: ``mechanism.sampler()``); ``sample(t)``
      returns the sorted row indices of step t.

  Raises:
    ValueError: a mechanism without noise, adaptive clipping, or m outside [2, N).
  """
  if not mechanism.private or mechanism.noise_multiplier <= 0:
    raise ValueError("the run audit needs a private mechanism with noise_multiplier > 0")
  if mechanism.adaptive_clipping:
    raise ValueError("the run audit needs a fixed clip bound (not dp.clip=quantile)")
  n = mechanism.dataset_size
  if not 2 <= canaries < n:
    raise ValueError(f"canaries must be in [2, N={n}) (got {canaries})")
  steps = mechanism.steps if steps is None else int(steps)
  sigma, clip, denom = (
    mechanism.noise_multiplier,
    mechanism.sensitivity,
    mechanism.expected_batch_size,
  )
  coins = np.random.default_rng(seed).random(canaries) < 0.5
  micro = max(mechanism.spec.microbatch_size or 1, 1)
  params = {"canary": jnp.zeros(canaries, jnp.float32), "other": jnp.zeros(1, jnp.float32)}
  grad_fn = grad_fn or mechanism.grad_fn(_audit_loss, has_aux=False)
  privatizer = privatizer or mechanism.privatizer()

  @jax.jit
  def step(state, total, index, real):
    # Row r of the sample: canary r (if r < m) or a background row.
    is_canary = index < canaries
    rows = {
      "canary": jnp.where(
        is_canary[:, None],
        canary_scale * clip * jax.nn.one_hot(index, canaries, dtype=jnp.float32),
        0.0,
      ),
      "other": jnp.where(is_canary[:, None], 0.0, -clip * jnp.ones((index.size, 1))),
    }
    grad_sum, _ = grad_fn(params, rows, real)
    update, state = privatizer.update(
      grad_sum, state, params, num_examples=jnp.sum(real).astype(jnp.int32)
    )
    return state, jax.tree_util.tree_map(lambda a, u: a + u * denom, total, update)

  sampler = sampler or mechanism.sampler()
  in_data = np.concatenate([coins, np.ones(n - canaries, bool)])
  samples = [sample[in_data[sample]] for sample in map(sampler.sample, range(steps))]
  # One static batch shape: the largest sample, padded (mask False) to the microbatch size.
  capacity = batching.round_up(max(len(sample) for sample in samples), micro)
  state, total = privatizer.init(params), jax.tree_util.tree_map(jnp.zeros_like, params)
  for sample in samples:  # a tails canary is not in the data: never in a sample
    index = np.zeros(capacity, np.int64)
    index[: sample.size] = sample
    real = np.arange(capacity) < sample.size
    state, total = step(state, total, jnp.asarray(index, jnp.int32), jnp.asarray(real))
  scores = np.asarray(total["canary"], np.float64) / (sigma * clip)
  if not np.all(np.isfinite(scores)):
    raise FloatingPointError("the audited mechanism produced non-finite updates")
  audit = statistics.ScoreAudit(scores[coins], scores[~coins])
  ledger = mechanism.record(mechanism.empty_ledger(), steps)
  return RunAudit(
    claimed_epsilon=float(ledger.epsilon(delta)),
    delta=delta,
    significance=significance,
    canaries=canaries,
    canaries_in=int(coins.sum()),
    steps=steps,
    epsilon_lb=audit.epsilon_one_run(significance, delta),
    epsilon_lb_fdp=audit.epsilon_one_run_fdp(significance, delta),
    auroc=statistics.mann_whitney_auroc(scores[coins], scores[~coins]),
  )


def main() -> None:
  """Prints the run audit of the shipped mechanism at a few claims, and of an oversampler."""
  from dpjax.privacy import clipping  # pylint: disable=import-outside-toplevel
  from dpjax.privacy import mechanism as mechanism_lib  # pylint: disable=import-outside-toplevel
  from dpjax.privacy.secret import RunSecret  # pylint: disable=import-outside-toplevel

  n, batch, steps, m = 2000, 200.0, 100, 1000

  def plan(epsilon: float, batch_size: float) -> Mechanism:
    spec = mechanism_lib.MechanismSpec(
      target_epsilon=epsilon, delta=1e-5, clip=clipping.FlatClip(1.0), backend="vmap"
    )
    made = mechanism_lib.make_mechanism(
      spec, dataset_size=n, expected_batch_size=batch_size, steps=steps
    )
    return made.keyed(RunSecret.fresh())

  print(f"N={n} B={batch:g} (q={batch / n:g}) T={steps} m={m} canaries, delta=1e-5, alpha=0.05")
  print("| run audited | claimed ε | ε_lb one-run | ε_lb f-DP | AUROC | verdict |")
  print("|---|---|---|---|---|---|")
  rows = [(f"shipped, σ for ε = {e:g}", plan(e, batch), None) for e in (1.0, 2.0, 8.0)]
  rows.append(("batches drawn at 8x q (σ for ε = 2)", plan(2.0, batch), plan(2.0, 8 * batch)))
  for name, claimed, actual in rows:
    sampler = None if actual is None else actual.sampler()
    r = audit_run(claimed, canaries=m, sampler=sampler)
    verdict = "violated" if r.violated else "passed"
    print(
      f"| {name} | {r.claimed_epsilon:.3f} | {r.epsilon_lb:.3f} | {r.epsilon_lb_fdp:.3f} | "
      f"{r.auroc:.3f} | {verdict} |"
    )


if __name__ == "__main__":
  main()
