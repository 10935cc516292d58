"""White-box audit of one DP step: canary gradients through the real clip -> noise path.

Nasr et al. 2023 ("Tight auditing of differentially private machine
learning") audit DP-SGD where the adversary controls the gradients: it
inserts a canary gradient or not, by a fair coin, observes the privatized
update and guesses the coin. Every guess the mechanism allows is bounded by
its (ε, δ); guesses better than that are a bug.

One trial here is one step t of the mechanism under audit, run exactly as a
training step runs it: the batch holds ``background`` examples whose gradient
is -C·v (norm C) and the canary, gradient ``canary_scale``·C·v (norm > C, so
clipping must act), masked in or out by the coin; the mechanism's own
``grad_fn`` clips and sums it (masking, microbatching and all) and its own
privatizer, its state carried from trial to trial by ``lax.scan``, adds the
step's noise and divides. The per-example gradient of the audit's loss
``p·x["g"]`` is the row ``x["g"]`` itself, so the rows are the gradients.

The score is the projection of the update, times the claimed denominator B,
onto v, in units of σΔ (Δ the clip sensitivity). The adversary also knows every
PUBLIC key (``public_keys``; by default the insecure fixed seeds 0-7): if one of
them reproduces the noise of a trial to within the snap grid, it subtracts that
noise first. A secret key defeats this; a public one makes the guess exact.

The claim audited is one step of the Gaussian mechanism, no subsampling (the
coin is the neighbouring relation): ε(δ) of μ-GDP with μ = 1/σ. Its
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


def _audit_loss(params: jax.Array, example: dict[str, jax.Array]) -> jax.Array:
  """p·g: its gradient with respect to p is the example's row g."""
  return jnp.dot(params, example["g"])


@dataclasses.dataclass(frozen=True)
class StepAudit:
  """The outcome of :func:`audit_step`.

  Attributes:
    claimed_epsilon: ε(δ) the mechanism claims for one step (μ-GDP, μ = 1/σ).
    claimed_mu: 1/σ.
    delta: the δ the claim is audited at.
    significance: α; each lower bound holds with probability >= 1 - α.
    trials_in: trials with the canary in.
    trials_out: trials with the canary out.
    epsilon_lb: Clopper–Pearson ε lower bound over all thresholds (Bonferroni).
    epsilon_lb_split: the same with the threshold chosen on half the trials.
    mu_lb: the GDP fit: the μ the scores prove.
    epsilon_gdp: ε(δ) of μ_lb-GDP (a lower bound if the mechanism is Gaussian-like).
    auroc: area under the ROC curve of the attack.
    public_key_matches: trials whose noise a public key reproduced.
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

  @property
  def violated(self) -> bool:
    """True if a Clopper–Pearson bound exceeds the claim: the mechanism is not what it says."""
    return max(self.epsilon_lb, self.epsilon_lb_split) > self.claimed_epsilon

  def to_dict(self) -> dict[str, Any]:
    return {**dataclasses.asdict(self), "violated": self.violated}


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
    dim: dimension of the audited parameter vector.
    background: examples besides the canary in every batch (gradient -C·v each).
    canary_scale: the canary's gradient norm over C (> 1: clipping must act).
    delta: the δ at which the claimed ε(δ) is audited.
    significance: α of the lower bounds.
    public_keys: noise keys the adversary tries (None: :func:`default_public_keys`).
    seed: seed of the auditor's coins (None: OS entropy). The coins are the
      auditor's, not the mechanism's: they only need to be independent of it.
    grad_fn: the clipped-gradient function to audit, built for ``loss(p, x) = p·x["g"]``
      (None: ``mechanism.grad_fn``); replace it to audit another implementation.
    privatizer: the optax privatizer to audit (None: ``mechanism.privatizer()``); it
      receives ``num_examples=`` (the realized count) as every privatizer does.

  Returns:
    A :class:`StepAudit`; ``violated`` is True when the observed guesses are
    impossible for the claimed mechanism (at significance α).
  """
  if not mechanism.private:
    raise ValueError("the white-box audit needs a private mechanism (dp.enabled=True)")
  if mechanism.noise_multiplier <= 0:
    raise ValueError("the white-box audit needs noise_multiplier > 0")
  if trials < 100:
    raise ValueError(f"trials must be >= 100 (got {trials!r})")
  if dim < 1 or background < 0 or canary_scale <= 0:
    raise ValueError("dim must be >= 1, background >= 0 and canary_scale > 0")
  sigma, clip = mechanism.noise_multiplier, mechanism.sensitivity
  denom = mechanism.expected_batch_size
  scale = sigma * clip
  direction = np.zeros(dim, np.float32)
  direction[0] = 1.0
  rows = np.concatenate(
    [canary_scale * clip * direction[None], np.repeat(-clip * direction[None], background, 0)]
  ).astype(np.float32)
  params = jnp.zeros(dim, jnp.float32)
  grad_fn = grad_fn or mechanism.grad_fn(_audit_loss, has_aux=False)
  privatizer = privatizer or mechanism.privatizer()
  coins = np.random.default_rng(seed).random(trials) < 0.5
  keys = jnp.asarray(np.stack(list(default_public_keys() if public_keys is None else public_keys)))
  # The clipped sums the adversary expects with the canary out and in (it knows C).
  out_sum = -background * clip * direction
  in_sum = out_sum + clip * direction

  def trial(state, xs):
    step, coin = xs
    mask = jnp.concatenate([coin[None], jnp.ones(background, bool)])
    grad_sum, _ = grad_fn(params, {"g": jnp.asarray(rows)}, mask)
    update, state = privatizer.update(
      grad_sum, state, params, num_examples=jnp.sum(mask).astype(jnp.int32)
    )
    observed = update * denom
    guesses = jax.vmap(lambda k: noise_lib.noise_for_step(k, step, observed, scale))(keys)
    residual = observed[None] - guesses
    fit = jnp.minimum(
      jnp.linalg.norm(residual - out_sum, axis=1), jnp.linalg.norm(residual - in_sum, axis=1)
    )
    best = jnp.argmin(fit)
    matched = fit[best] < _KEY_MATCH_TOLERANCE * scale * np.sqrt(dim)
    known_noise = jnp.where(matched, guesses[best], jnp.zeros_like(observed))
    score = jnp.dot(observed - known_noise, jnp.asarray(direction)) / scale
    return state, (score, matched)

  run = jax.jit(lambda state, xs: jax.lax.scan(trial, state, xs))
  _, (scores, matched) = run(
    privatizer.init(params), (jnp.arange(trials, dtype=jnp.int32), jnp.asarray(coins))
  )
  scores = np.asarray(scores, np.float64)
  if not np.all(np.isfinite(scores)):
    raise FloatingPointError("the audited mechanism produced non-finite updates")
  audit = statistics.ScoreAudit(scores[coins], scores[~coins])
  mu_lb = audit.gdp_mu(significance)
  return StepAudit(
    claimed_epsilon=statistics.gaussian_epsilon(1.0 / sigma, delta),
    claimed_mu=1.0 / sigma,
    delta=delta,
    significance=significance,
    trials_in=audit.num_in,
    trials_out=audit.num_out,
    epsilon_lb=audit.epsilon_clopper_pearson(significance, delta)[0],
    epsilon_lb_split=audit.epsilon_clopper_pearson(significance, delta, "split")[0],
    mu_lb=mu_lb,
    epsilon_gdp=statistics.gaussian_epsilon(mu_lb, delta),
    auroc=audit.auroc(),
    public_key_matches=int(np.sum(np.asarray(matched))),
  )
