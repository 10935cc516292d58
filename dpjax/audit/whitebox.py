"""White-box audit of one DP step: canary gradients through the real clip -> noise path.

Nasr et al. 2023 ("Tight auditing of differentially private machine
learning") audit DP-SGD where the adversary controls the gradients: it
inserts a canary gradient or not, by a fair coin, observes the privatized
update and guesses the coin. Every guess the mechanism allows is bounded by
its (ε, δ); guesses better than that are a bug.

One trial here is one step t of the mechanism under audit, run exactly as a
training step runs it. The parameters are two arrays, ``canary`` and ``other``
(``dim`` entries each). The batch holds ``background`` examples whose gradient
is -C·v (norm C; v the first coordinate of ``canary``) and the canary,
gradient ``canary_scale``·C·v (norm > C, so clipping must act), masked in or
out by the coin; the mechanism's own ``grad_fn`` clips and sums it (masking,
microbatching and all) and its own privatizer, its state carried from trial
to trial by ``lax.scan``, adds the step's noise and divides. The per-example
gradient of the audit's loss Σ p·x is the row x itself, so the rows are the
gradients.

Two attacks score the update u times the claimed denominator B, in units of
σΔ (Δ the clip sensitivity): ``projection`` = (uB)·v, and ``difference`` =
((uB)·v - (uB)·w)/√2 with w the first coordinate of ``other``, which no
gradient touches (noise shared between coordinates or arrays cancels in it).
The adversary also knows every PUBLIC key (``public_keys``; by default the
insecure fixed seeds 0-7): if one of them reproduces a trial's noise to within
the snap grid, it subtracts that noise first. A secret key defeats this; a
public one makes the guess exact.

The claim audited is one step of the Gaussian mechanism, no subsampling (the
coin is the neighbouring relation): ε(δ) of μ-GDP with μ = 1/σ. The audit
fails when a bound exceeds it (``violated``; four bounds, two attacks by two
threshold choices, each at α/4) or when the projection attack proves less
than half of μ (``inconclusive``: the coin did not reach the update as it
should, e.g. a mask that is ignored). Its
background rows pull the realized count into the update, so a mechanism that
divides by the realized batch size instead of B leaks the coin through the
mean (μ becomes 2·background/(background + 1)/σ, ~2/σ); clipping switched off
scales μ by ``canary_scale``; half the noise doubles it; a noise draw reused
across steps or a public key separate the coins perfectly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dpjax.audit import statistics
from dpjax.privacy import noise as noise_lib
from dpjax.privacy.mechanism import Mechanism
from dpjax.privacy.secret import RunSecret

#: A trial's noise matches a public key when the residual is within this many σΔ.
_KEY_MATCH_TOLERANCE = 1e-3


def default_public_keys(seeds: int = 8, attempts: int = 2) -> list[np.ndarray]:
  """Keys an adversary can compute: the insecure fixed seeds' noise keys, and the zero key."""
  keys = [np.zeros(8, np.uint32)]
  for seed in range(seeds):
    secret = RunSecret.insecure_fixed(seed)
    keys += [secret.noise_key(attempt) for attempt in range(attempts)]
  return keys


def _audit_loss(params: dict[str, jax.Array], example: dict[str, jax.Array]) -> jax.Array:
  """Σ p·x over the arrays: its gradient with respect to p is the example's row x."""
  return sum(jnp.dot(params[k], example[k]) for k in sorted(params))


#: The attacks of the audit, in the order their scores are computed.
ATTACKS = ("projection", "difference")


@dataclasses.dataclass(frozen=True)
class StepAudit:
  """The outcome of :func:`audit_step`.

  Attributes:
    claimed_epsilon: ε(δ) the mechanism claims for one step (μ-GDP, μ = 1/σ).
    claimed_mu: 1/σ.
    delta: the δ the claim is audited at.
    significance: α; the four bounds together are wrong with probability <= α.
    trials_in: trials with the canary in.
    trials_out: trials with the canary out.
    epsilon_lb: the largest Clopper–Pearson ε lower bound over the attacks, threshold
      chosen over all hull thresholds (Bonferroni).
    epsilon_lb_split: the same with the threshold chosen on half of the trials.
    mu_lb: the projection attack's GDP fit: the μ its scores prove.
    epsilon_gdp: ε(δ) of μ_lb-GDP (a lower bound if the mechanism is Gaussian-like).
    auroc: area under the projection attack's ROC hull.
    public_key_matches: trials whose noise a public key reproduced.
    attacks: per attack, its ``epsilon_lb``, ``epsilon_lb_split``, ``mu_lb`` and ``auroc``.
  """

  claimed_epsilon: float
  claimed_mu: float
  delta: float
  significance: float
  trials_in: int
  trials_out: int
  epsilon_lb: float
  epsilon_lb_split: float
  mu_lb: float
  epsilon_gdp: float
  auroc: float
  public_key_matches: int
  attacks: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)

  @property
  def violated(self) -> bool:
    """True if a Clopper–Pearson bound exceeds the claim: the mechanism is not what it says."""
    return max(self.epsilon_lb, self.epsilon_lb_split) > self.claimed_epsilon

  @property
  def inconclusive(self) -> bool:
    """True if the canary's coin barely reached the update (μ_lb < claimed μ / 2)."""
    return self.mu_lb < 0.5 * self.claimed_mu

  @property
  def passed(self) -> bool:
    return not self.violated and not self.inconclusive

  def to_dict(self) -> dict[str, Any]:
    return {
      **dataclasses.asdict(self),
      "violated": self.violated,
      "inconclusive": self.inconclusive,
      "passed": self.passed,
    }


def audit_step(
  mechanism: Mechanism,
  *,
  trials: int = 100_000,
  dim: int = 8,
  background: int = 31,
  canary_scale: float = 4.0,
  delta: float = 1e-3,
  significance: float = 0.01,
  public_keys: Sequence[np.ndarray] | None = None,
  seed: int | None = None,
  grad_fn: Any = None,
  privatizer: Any = None,
) -> StepAudit:
  """Audits ``trials`` steps of a private mechanism with one canary gradient per step.

  Args:
    mechanism: the keyed private mechanism (its σ, clip sensitivity Δ and B are the claim).
    trials: steps to run (the canary is in each by a fair coin).
    dim: entries of each of the two audited parameter arrays.
    background: examples besides the canary in every batch (gradient -C·v each);
      background + 1 must be a multiple of the mechanism's microbatch size.
    canary_scale: the canary's gradient norm over C (> 1: clipping must act).
    delta: the δ at which the claimed ε(δ) is audited.
    significance: α of the four bounds together.
    public_keys: noise keys the adversary tries (None: :func:`default_public_keys`).
    seed: seed of the auditor's coins (None: OS entropy). The coins are the
      auditor's, not the mechanism's: they only need to be independent of it.
    grad_fn: the clipped-gradient function to audit, built for :func:`_audit_loss`
      (None: ``mechanism.grad_fn``); replace it to audit another implementation.
    privatizer: the optax privatizer to audit (None: ``mechanism.privatizer()``); it
      receives ``num_examples=`` (the realized count) as every privatizer does.

  Returns:
    A :class:`StepAudit`; ``passed`` is False when the guesses are impossible
    for the claimed mechanism (``violated``) or the coin did not reach the
    update (``inconclusive``).
  """
  if not mechanism.private:
    raise ValueError("the white-box audit needs a private mechanism (dp.enabled=True)")
  if mechanism.noise_multiplier <= 0:
    raise ValueError("the white-box audit needs noise_multiplier > 0")
  if mechanism.adaptive_clipping:
    raise ValueError(
      "the white-box audit needs a fixed clip bound (dp.clip=quantile is not supported)"
    )
  if trials < 100:
    raise ValueError(f"trials must be >= 100 (got {trials!r})")
  if dim < 1 or background < 0 or canary_scale <= 0:
    raise ValueError("dim must be >= 1, background >= 0 and canary_scale > 0")
  micro = mechanism.spec.microbatch_size
  if micro and (background + 1) % micro:
    raise ValueError(
      f"background + 1 = {background + 1} rows must be a multiple of the mechanism's "
      f"microbatch_size={micro}"
    )
  sigma, clip = mechanism.noise_multiplier, mechanism.sensitivity
  denom = mechanism.expected_batch_size
  scale = sigma * clip
  v = np.zeros(dim, np.float32)
  v[0] = 1.0
  zeros = np.zeros((background + 1, dim), np.float32)
  rows = {
    "canary": np.concatenate(
      [canary_scale * clip * v[None], np.repeat(-clip * v[None], background, 0)]
    ),
    "other": zeros,
  }
  params = {"canary": jnp.zeros(dim, jnp.float32), "other": jnp.zeros(dim, jnp.float32)}
  grad_fn = grad_fn or mechanism.grad_fn(_audit_loss, has_aux=False)
  privatizer = privatizer or mechanism.privatizer()
  coins = np.random.default_rng(seed).random(trials) < 0.5
  keys = jnp.asarray(np.stack(list(default_public_keys() if public_keys is None else public_keys)))
  # The clipped sums the adversary expects with the canary out and in (it knows C).
  out_sum = np.concatenate([-background * clip * v, np.zeros(dim, np.float32)])
  in_sum = out_sum + np.concatenate([clip * v, np.zeros(dim, np.float32)])

  def trial(state, xs):
    step, coin = xs
    mask = jnp.concatenate([coin[None], jnp.ones(background, bool)])
    grad_sum, _ = grad_fn(params, {k: jnp.asarray(r) for k, r in rows.items()}, mask)
    update, state = privatizer.update(
      grad_sum, state, params, num_examples=jnp.sum(mask).astype(jnp.int32)
    )
    observed = jnp.concatenate([update["canary"], update["other"]]) * denom

    def guess(key):
      noise = noise_lib.noise_for_step(key, step, update, scale)
      return jnp.concatenate([noise["canary"], noise["other"]])

    guesses = jax.vmap(guess)(keys)
    residual = observed[None] - guesses
    fit = jnp.minimum(
      jnp.linalg.norm(residual - out_sum, axis=1), jnp.linalg.norm(residual - in_sum, axis=1)
    )
    best = jnp.argmin(fit)
    matched = fit[best] < _KEY_MATCH_TOLERANCE * scale * np.sqrt(2 * dim)
    seen = (observed - jnp.where(matched, guesses[best], 0.0)) / scale
    scores = jnp.stack([seen[0], (seen[0] - seen[dim]) / np.sqrt(2.0)])
    return state, (scores, matched)

  run = jax.jit(lambda state, xs: jax.lax.scan(trial, state, xs))
  _, (scores, matched) = run(
    privatizer.init(params), (jnp.arange(trials, dtype=jnp.int32), jnp.asarray(coins))
  )
  scores = np.asarray(scores, np.float64)
  if not np.all(np.isfinite(scores)):
    raise FloatingPointError("the audited mechanism produced non-finite updates")
  alpha = significance / (2 * len(ATTACKS))  # two attacks x two threshold choices
  attacks = {}
  for k, name in enumerate(ATTACKS):
    audit = statistics.ScoreAudit(scores[coins, k], scores[~coins, k])
    attacks[name] = {
      "epsilon_lb": audit.epsilon_clopper_pearson(alpha, delta)[0],
      "epsilon_lb_split": audit.epsilon_clopper_pearson(alpha, delta, "split")[0],
      "mu_lb": audit.gdp_mu(alpha),
      "auroc": audit.auroc(),
    }
  projection = attacks["projection"]
  return StepAudit(
    claimed_epsilon=statistics.gaussian_epsilon(1.0 / sigma, delta),
    claimed_mu=1.0 / sigma,
    delta=delta,
    significance=significance,
    trials_in=int(coins.sum()),
    trials_out=int((~coins).sum()),
    epsilon_lb=max(a["epsilon_lb"] for a in attacks.values()),
    epsilon_lb_split=max(a["epsilon_lb_split"] for a in attacks.values()),
    mu_lb=projection["mu_lb"],
    epsilon_gdp=statistics.gaussian_epsilon(projection["mu_lb"], delta),
    auroc=projection["auroc"],
    public_key_matches=int(np.sum(np.asarray(matched))),
    attacks=attacks,
  )
