"""The DP mechanism of a run, in one object: what is clipped, sampled, noised and counted.

DP-SGD with Poisson sampling is one mechanism with a few parameters that must
agree: the clip rule's sensitivity Δ, the sampling rate q = B/N, the noise
multiplier σ, δ, the accounting event and the secret that keys the noise and
the sampling. :func:`make_mechanism` derives all of them once, from a
:class:`MechanismSpec` (what the user chose) and the run's N, B and steps:

    δ  = spec.delta, or N^-1.1 (N_u^-1.1 for user-level DP)
    σ  = spec.noise_multiplier, or the smallest σ with ε(q, σ, steps; δ) <= target ε
    budget = spec.epsilon_budget, or the target ε when σ was calibrated (else none)

and :class:`Mechanism` hands out every piece a training loop needs:

    grad_fn(loss)      (params, batch, mask) -> (clipped sum, aux); Δ = clip sensitivity
    sampler()          Poisson sampling with rate q, keyed by the secret
    privatizer()       optax transform: + N(0, (σΔ)²) once, / B (chain the optimizer after it)
    record(ledger, k)  the ledger after k more steps of this mechanism
    epsilon(ledger)    ε(δ) of a ledger
    steps_within_budget(ledger, k)

A non-private mechanism (``spec.private = False``) has the same shape: its
gradient is the unclipped sum, its privatizer divides by the realized number of
examples, and it records σ = 0 steps, whose ε is infinite. A loop written
against :class:`Mechanism` has no private/non-private branch.

User-level DP (``spec.max_examples_per_user = k``; the data hold at most k
examples per user and N_u users; δ, ε and the guarantee are per user), two ways
(Charles et al. 2024):

* ELS, example-level sampling (``spec.user_sampling = "els"``): sampling,
  clipping and noise are unchanged (Poisson over the N examples, q = B/N,
  per-example clipping); only the accounting differs: each step is recorded as
  the mixture of Gaussians with sensitivities 0..k (see :class:`accounting.Segment`).
* ULS, user-level sampling (``"uls"``): Poisson over the N_u users, q = B/N_u
  (B is then the expected number of USERS per step); a sampled user's rows are
  clipped together (their summed, or mean, gradient has norm <= C; rows come in
  units of k, see :func:`dpjax.privacy.clipped_grad`'s ``unit_size``), noise
  σC is added once and the sum divided by B. One user is then exactly one
  example of ordinary DP-SGD: the accounting is the Poisson-subsampled Gaussian
  over N_u units (any accountant).

Adaptive clipping (``spec.clip`` a :class:`~dpjax.privacy.quantile.QuantileClip`):
the ledger records the same steps with the same σ (= z); the privatizer splits z
between the gradient noise (multiplier z_Δ > z, times the current bound C_t) and
the noisy unclipped count (σ_b), see :mod:`dpjax.privacy.quantile`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpjax import _validation, batching
from dpjax.privacy import accounting, clipping, noise, per_example, quantile, sampling
from dpjax.privacy.secret import RunSecret

PyTree = Any

#: How user-level DP samples: examples (ELS) or users (ULS).
USER_SAMPLINGS = ("els", "uls")

#: The generator's tail event (an output impossible for a neighbour) must stay below this
#: fraction of δ over the whole run (:func:`dpjax.privacy.noise.tail_probability`).
MAX_TAIL_FRACTION_OF_DELTA = 1e-3


@dataclasses.dataclass(frozen=True)
class MechanismSpec:
  """What the user chose, before the data is known.

  Attributes:
    private: False gives the non-private baseline (no clipping, no noise, ε = inf).
    clip: the per-example clip rule; its sensitivity Δ scales the noise.
    target_epsilon: calibrate σ so that the planned steps spend this ε (used
      when ``noise_multiplier`` is None).
    noise_multiplier: σ given instead of calibrated; ε is then reported, not targeted.
    epsilon_budget: a hard budget: training stops before ε(δ) would exceed it.
      None: the target ε when σ is calibrated, no budget when σ is given.
    delta: δ; None for N^-1.1 (Li et al. 2022). Must be < 1/N.
    accountant: ``"pld"``, ``"rdp"`` or ``"prv"`` (see :mod:`dpjax.privacy.accounting`).
    backend: per-example gradients by ``"vmap"``, ``"bookkeeping"`` or ``"auto"``.
    microbatch_size: examples per scan iteration of the gradient (None: all at once).
    max_batch_size: optional cap M of the sampled batch (accounted as truncated Poisson).
    max_examples_per_user: k for user-level DP (every user has at most k examples in the
      data; ε and δ are per user). None: example-level DP.
    user_sampling: how user-level DP samples: ``"els"`` (examples; accounted by PLD only)
      or ``"uls"`` (users, per-user clipping; any accountant).
    user_contribution: under ULS, what a user's clipped contribution is: ``"sum"`` or
      ``"mean"`` of their rows' gradients.
  """

  private: bool = True
  clip: clipping.ClipRule = dataclasses.field(default_factory=lambda: clipping.FlatClip(1.0))
  target_epsilon: float | None = 8.0
  noise_multiplier: float | None = None
  epsilon_budget: float | None = None
  delta: float | None = None
  accountant: str = "pld"
  backend: str = "auto"
  microbatch_size: int | None = None
  max_batch_size: int | None = None
  max_examples_per_user: int | None = None
  user_sampling: str = "els"
  user_contribution: str = "sum"

  @property
  def user_level(self) -> bool:
    """True if the guarantee is per user (``max_examples_per_user`` set)."""
    return self.max_examples_per_user is not None

  @property
  def samples_users(self) -> bool:
    """True for user-level sampling (ULS): Poisson over users, per-user clipping."""
    return self.user_level and self.user_sampling == "uls"

  @property
  def unit_size(self) -> int:
    """Rows per clipping unit: k under ULS (one user's rows), else 1."""
    return self.max_examples_per_user if self.samples_users else 1


class MeanOverExamplesState(NamedTuple):
  """No state: the non-private privatizer is a pure function of its inputs."""


def mean_over_examples() -> optax.GradientTransformationExtraArgs:
  """The non-private privatizer: a gradient sum divided by the realized number of examples.

  ``update(sum, state, params, num_examples=n)`` returns sum / max(n, 1). Only
  for baselines: dividing by the realized count is not private (rule 2).
  """

  def init_fn(params):
    del params
    return MeanOverExamplesState()

  def update_fn(updates, state, params=None, *, num_examples=None, **extra_args):
    del params, extra_args
    if num_examples is None:
      raise ValueError("the non-private privatizer needs num_examples= (the realized count)")
    count = jnp.maximum(jnp.asarray(num_examples, jnp.float32), 1.0)
    return jax.tree_util.tree_map(lambda g: g / count.astype(g.dtype), updates), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


@dataclasses.dataclass(frozen=True)
class Mechanism:
  """The calibrated mechanism of one run (build it with :func:`make_mechanism`).

  Attributes:
    spec: what the user chose.
    dataset_size: N, the number of examples.
    expected_batch_size: B; the sampling rate is q = B/N (B/N_u under ULS: B users).
    steps: the planned number of steps.
    delta: δ of every ε this mechanism reports.
    noise_multiplier: σ (0 for the non-private mechanism).
    epsilon_budget: the hard budget, or None.
    secret: the run's secret (keys noise and sampling; never printed), or None
      until :meth:`keyed` supplies it (the plan is calibrated before the
      secret is known: it comes from the checkpoint when a run resumes).
    attempt: the attempt number (a re-keyed resume uses fresh keys; see the journal).
    releases: one-off releases the run makes besides its steps (e.g. a DP label
      histogram, :mod:`dpjax.privacy.histogram`), recorded in the ledger before
      the first step; a calibrated σ leaves room for them in the target ε.
    num_users: N_u, the number of users in the data (user-level DP only, else None):
      the privacy units, the ledger's dataset size and the δ convention's N.
  """

  spec: MechanismSpec
  dataset_size: int
  expected_batch_size: float
  steps: int
  delta: float
  noise_multiplier: float
  epsilon_budget: float | None
  secret: RunSecret | None = dataclasses.field(default=None, repr=False, compare=False)
  attempt: int = 0
  releases: tuple[accounting.Segment, ...] = ()
  num_users: int | None = None

  @property
  def private(self) -> bool:
    return self.spec.private

  @property
  def user_level(self) -> bool:
    """True if ε and δ are per user (``spec.max_examples_per_user`` set)."""
    return self.spec.user_level

  @property
  def privacy_units(self) -> int:
    """The number of units the guarantee protects: N_u users, or N examples."""
    return self.num_users if self.user_level else self.dataset_size

  @property
  def population(self) -> int:
    """What the sampler draws from: the N_u users under ULS, else the N examples."""
    return self.num_users if self.spec.samples_users else self.dataset_size

  @property
  def sampling_prob(self) -> float:
    """q = B / N (B / N_u under ULS)."""
    return self.expected_batch_size / self.population

  @property
  def sensitivity(self) -> float:
    """Δ, the L2 sensitivity of the gradient sum (inf without clipping)."""
    return self.spec.clip.sensitivity if self.private else math.inf

  @property
  def adaptive_clipping(self) -> bool:
    """True if the clip bound is learned (``spec.clip`` is a QuantileClip)."""
    return self.private and isinstance(self.spec.clip, quantile.QuantileClip)

  @property
  def calibrated(self) -> bool:
    """True if σ was calibrated to the target ε (not given)."""
    return self.private and self.spec.noise_multiplier is None

  def keyed(self, secret: RunSecret, attempt: int = 0) -> Mechanism:
    """The same mechanism with the noise and sampling keys of ``secret`` and ``attempt``."""
    if not isinstance(secret, RunSecret):
      raise ValueError(f"secret must be a RunSecret (got {type(secret).__name__})")
    _validation.require_int_in("attempt", attempt, 0)
    return dataclasses.replace(self, secret=secret, attempt=attempt)

  def _secret(self) -> RunSecret:
    if self.secret is None:
      raise ValueError("the mechanism has no secret yet: call keyed(secret, attempt) first")
    return self.secret

  # The pieces of a step.

  def grad_fn(self, loss_fn: Callable[..., Any], has_aux: bool = True) -> Callable:
    """``(params, batch, mask) -> (gradient sum, ClippedGradAux)`` with ``.sensitivity``.

    Private: the sum of per-example gradients clipped by the spec's rule.
    Non-private: the plain sum (sensitivity inf).
    """
    # Under ULS the loop passes [users, k'] masks (k' <= k rows per user); microbatches
    # count users.
    micro = self.spec.microbatch_size
    if not self.private:
      return per_example.summed_grad(loss_fn, micro, has_aux=has_aux)
    return per_example.clipped_grad(
      loss_fn,
      self.spec.clip,
      self.spec.backend,
      micro,
      has_aux=has_aux,
      unit_size=self.spec.unit_size,
      contribution=self.spec.user_contribution,
    )

  def sampler(self) -> sampling.PoissonSampler:
    """Poisson sampling with rate q, keyed by this attempt's secret sampling key."""
    return sampling.PoissonSampler(
      self.population,
      self.expected_batch_size,
      key=self._secret().sampling_key(self.attempt),
      max_batch_size=self.spec.max_batch_size,
    )

  def static_batches(
    self,
    groups: np.ndarray | None = None,
    num_shards: int = 1,
    quantiles: Sequence[float] = batching.DEFAULT_QUANTILES,
  ) -> batching.StaticBatches:
    """The padding of this mechanism's samples into static shapes (see :mod:`dpjax.batching`).

    Sizes are multiples of ``microbatch_size * num_shards`` and never exceed
    ``max_batch_size``; padding rows are masked out and contribute zero. Under
    ULS the sampled units are users (``groups`` has one entry per user and the
    sizes count users; :func:`dpjax.batching.user_rows` expands them to rows).
    """
    return batching.StaticBatches(
      self.population,
      self.sampling_prob,
      groups=groups,
      microbatch_size=self.spec.microbatch_size or 1,
      num_shards=num_shards,
      quantiles=quantiles,
      max_batch_size=self.spec.max_batch_size,
    )

  def privatizer(self) -> optax.GradientTransformationExtraArgs:
    """The transform from a gradient sum to the update direction; chain the optimizer after it.

    Private: + N(0, (σΔ)²) drawn once with this attempt's secret noise key,
    snapped, / B. Non-private: / realized count (``num_examples=`` extra arg).
    """
    if not self.private:
      return mean_over_examples()
    if self.adaptive_clipping:  # + N(0, (z_Δ C_t)²), and the noisy count moves C_t
      return quantile.quantile_privatizer(
        self.noise_multiplier,
        self.spec.clip,
        self.expected_batch_size,
        key=self._secret().noise_key(self.attempt),
      )
    return optax.with_extra_args_support(
      noise.gaussian_privatizer(
        self.noise_multiplier,
        self.sensitivity,
        self.expected_batch_size,
        key=self._secret().noise_key(self.attempt),
      )
    )

  def with_noise_key(self, opt_state: PyTree) -> PyTree:
    """``opt_state`` (restored from a checkpoint) with this attempt's noise key."""
    key = self._secret().noise_key(self.attempt)
    is_state = lambda s: isinstance(s, (noise.PrivatizerState, quantile.QuantilePrivatizerState))
    return jax.tree_util.tree_map(
      lambda s: s._replace(key=key) if is_state(s) else s, opt_state, is_leaf=is_state
    )

  # Accounting and the budget.

  def segment(self, steps: int = 1) -> accounting.Segment:
    """``steps`` steps of this mechanism, as the ledger records them.

    User-level: the mixture-of-Gaussians step for k examples per user, with the
    number of users as the dataset size.
    """
    return accounting.Segment(
      sampling_prob=self.sampling_prob,
      noise_multiplier=self.noise_multiplier,
      steps=steps,
      dataset_size=self.privacy_units,
      max_batch_size=self.spec.max_batch_size,
      # ULS is the plain subsampled Gaussian over users; ELS the mixture over 0..k.
      max_examples_per_user=None if self.spec.samples_users else self.spec.max_examples_per_user,
    )

  def empty_ledger(self) -> accounting.PrivacyLedger:
    return accounting.PrivacyLedger(accountant=self.spec.accountant)

  def record(self, ledger: accounting.PrivacyLedger, steps: int = 1) -> accounting.PrivacyLedger:
    """The ledger after ``steps`` more steps of this mechanism."""
    return ledger.record(self.segment(steps))

  def epsilon(self, ledger: accounting.PrivacyLedger) -> float:
    """ε(δ) of everything ``ledger`` recorded (inf once a non-private step is in it)."""
    return ledger.epsilon(self.delta)

  def epsilon_replace_one(self, ledger: accounting.PrivacyLedger) -> float | None:
    """ε(δ) of ``ledger`` under replace-one neighbours (N fixed).

    None for ELS: the mixture-of-Gaussians accounting is for adding or removing
    one user; replacing one user's examples by another's is not accounted. Under
    ULS a user is one unit of ordinary DP-SGD, so replace-one-user is accounted.
    """
    if self.user_level and not self.spec.samples_users:
      return None
    return ledger.epsilon_replace_one(self.delta)

  def planned_epsilon(self) -> float:
    """ε(δ) of the releases and the planned steps, from an empty ledger."""
    ledger = self.empty_ledger()
    for release in self.releases:
      ledger = ledger.record(release)
    return self.epsilon(self.record(ledger, self.steps))

  def steps_within_budget(self, ledger: accounting.PrivacyLedger, wanted: int) -> int:
    """The largest k <= wanted with ε(ledger + k steps) <= the budget (wanted if no budget)."""
    wanted = max(int(wanted), 0)
    if self.epsilon_budget is None or wanted == 0:
      return wanted
    fits = lambda k: self.epsilon(self.record(ledger, k)) <= self.epsilon_budget
    if fits(wanted):
      return wanted
    lo, hi = 0, wanted  # not fits(hi); lo fits unless the ledger is already over
    if not fits(lo):
      return 0
    while hi - lo > 1:
      mid = (lo + hi) // 2
      lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo

  # What may be published about it.

  @property
  def guarantee(self) -> str:
    if not self.private:
      return "none (dp.enabled is False)"
    if self.secret is not None and not self.secret.secure:
      return "none (fixed noise seed)"
    if self.user_level:
      return (
        "(epsilon, delta)-DP for add/remove of one user (all of their at most "
        f"{self.spec.max_examples_per_user} training examples), for everything computed from "
        "the released parameters"
      )
    return (
      "(epsilon, delta)-DP for add/remove of one training example, for everything "
      "computed from the released parameters"
    )

  def public_facts(self) -> dict[str, Any]:
    """The plan, as ``summary.json`` and checkpoints state it (all public: no secret)."""
    stddev = self.noise_multiplier
    return {
      "dp": self.private,
      "guarantee": self.guarantee,
      # The ledger's relation, applied to the unit of the guarantee (a row or a user).
      "neighboring_relation": accounting.NEIGHBORING_RELATION
      + ("_user" if self.user_level else ""),
      "delta": self.delta,
      "noise_multiplier": self.noise_multiplier,
      "sampling_prob": self.sampling_prob,
      "dataset_size": self.dataset_size,
      "unit": "user" if self.user_level else "example",
      **(
        {
          "max_examples_per_user": self.spec.max_examples_per_user,
          "num_users": self.num_users,
          "user_sampling": self.spec.user_sampling,
          **({"user_contribution": self.spec.user_contribution} if self.spec.samples_users else {}),
        }
        if self.user_level
        else {}
      ),
      "expected_batch_size": self.expected_batch_size,
      "planned_steps": self.steps,
      "accountant": self.spec.accountant if self.private else None,
      "target_epsilon": self.spec.target_epsilon if self.calibrated else None,
      "epsilon_budget": self.epsilon_budget,
      "sigma_from": (
        "calibrated to target_epsilon" if self.calibrated else "given" if self.private else None
      ),
      "clip_rule": repr(self.spec.clip) if self.private else None,
      "sensitivity": self.sensitivity if self.private else None,
      **({"adaptive_clipping": self._adaptive_facts()} if self.adaptive_clipping else {}),
      "noise": {
        "generator": "ChaCha20 keystream, 96 bits per draw, inverse CDF",
        "max_abs_normal": noise.MAX_ABS_NORMAL,
        "snap_grid_over_sigma_times_sensitivity": 2.0**-noise.SNAP_BITS if stddev else 0,
        "tail_probability": self._tail_probability() if stddev else None,
      },
      **({"releases": [r.to_dict() for r in self.releases]} if self.releases else {}),
    }

  def _tail_probability(self) -> float:
    if self.adaptive_clipping:
      return quantile.tail_probability(
        self.noise_multiplier, self.spec.clip.count_noise, self.steps
      )
    return noise.tail_probability(self.noise_multiplier, self.steps)

  def _adaptive_facts(self) -> dict[str, Any]:
    """Adaptive clipping's public parameters (the bound's trajectory is public too)."""
    rule = self.spec.clip
    return {
      "rule": "quantile (Andrew et al. 2021)",
      "target_quantile": rule.target_quantile,
      "learning_rate": rule.learning_rate,
      "count_noise": rule.count_noise,
      "gradient_noise_multiplier": quantile.gradient_noise_multiplier(
        self.noise_multiplier, rule.count_noise
      ),
      "initial_clip_norm": rule.initial_clip_norm,
      "sensitivity": "the step's clip bound C_t (sensitivity above: C_0)",
    }


def make_mechanism(
  spec: MechanismSpec,
  *,
  dataset_size: int,
  expected_batch_size: float,
  steps: int,
  releases: tuple[accounting.Segment, ...] = (),
  num_users: int | None = None,
) -> Mechanism:
  """Calibrates the mechanism of a run: δ, σ and the budget, from ``spec`` and N, B, steps.

  The result has no secret yet; :meth:`Mechanism.keyed` adds it. ``releases``
  (one-off mechanisms besides the steps) count against a target ε.

  User-level DP (``spec.max_examples_per_user = k``) needs ``num_users`` (N_u,
  the users of the N examples, each with at most k of them); δ defaults to
  N_u^-1.1 and must be < 1/N_u. ELS: q stays B/N and σ is calibrated to a
  per-user target (building a user-level step's PLD takes 10-90 s per σ tried
  at the default discretization, so calibration takes tens of seconds to
  minutes). ULS: B counts users, q = B/N_u, and σ is calibrated as for
  example-level DP over N_u units. ``releases`` must then be user-level segments.

  Raises:
    ValueError: a value outside its range (the message names it), a target no σ
      reaches, or a σ too small for the noise generator's tails.
  """
  n = _validation.require_int_in("dataset_size", dataset_size, 2)
  b = _validation.require_positive("batch_size", expected_batch_size)
  if b > n:
    raise ValueError(f"batch_size must be in (0, dataset_size={n}] (got {expected_batch_size:g})")
  _validation.require_int_in("steps", steps, 1)
  if spec.user_sampling not in USER_SAMPLINGS:
    raise ValueError(f"user_sampling must be one of {USER_SAMPLINGS} (got {spec.user_sampling!r})")
  if spec.user_contribution not in clipping.CONTRIBUTIONS:
    raise ValueError(
      f"user_contribution must be one of {clipping.CONTRIBUTIONS} (got {spec.user_contribution!r})"
    )
  k = spec.max_examples_per_user
  if k is None:
    if num_users is not None:
      raise ValueError("num_users is for user-level DP only (spec.max_examples_per_user)")
    units = n
  else:
    _validation.require_int_in("max_examples_per_user", k, 1)
    if num_users is None:
      raise ValueError("num_users must be given for user-level DP (spec.max_examples_per_user)")
    units = _validation.require_int_in("num_users", num_users, 2, n)
    if n > k * units:
      raise ValueError(
        f"dataset_size={n} exceeds max_examples_per_user={k} times num_users={units}: "
        "some user has more than k examples"
      )
    if spec.samples_users and isinstance(spec.clip, quantile.QuantileClip):
      raise ValueError(
        "clip must not be a QuantileClip under user sampling: its noisy count counts rows, "
        "and a user's k rows would move it by up to k/2 (not accounted)"
      )
    if spec.samples_users and b > units:
      raise ValueError(
        f"batch_size must be in (0, num_users={units}] under user sampling (it is the "
        f"expected number of users per step; got {expected_batch_size:g})"
      )
  q = b / (units if spec.samples_users else n)
  if not spec.private:
    return Mechanism(
      spec, n, b, steps, accounting.default_delta(units), 0.0, None, num_users=num_users
    )
  if k is not None and not spec.samples_users and spec.accountant != "pld":
    raise ValueError(
      f"accountant must be 'pld' for user-level DP by example sampling (got "
      f"{spec.accountant!r}): only the PLD accountant composes its mixture-of-Gaussians steps"
    )
  if k is not None and spec.max_batch_size is not None:
    raise ValueError(
      "max_batch_size must be None for user-level DP: a truncated batch is not accounted "
      "at the user level"
    )
  releases = tuple(releases)
  delta = accounting.default_delta(units) if spec.delta is None else spec.delta
  _validation.require_delta(delta)
  if k is not None and delta >= 1.0 / units:
    raise ValueError(
      f"delta must be < 1/num_users = {1.0 / units:.3g} for user-level DP (got {delta!r}; "
      f"the usual choice is num_users**-1.1 = {units**-1.1:.3g})"
    )
  _validation.require_delta(delta, units)
  if spec.noise_multiplier is not None:
    sigma = _validation.require_non_negative("noise_multiplier", spec.noise_multiplier)
    budget = spec.epsilon_budget
  else:
    if spec.target_epsilon is None:
      raise ValueError("epsilon (the target) or noise_multiplier must be given")
    sigma = accounting.calibrate_noise(
      spec.target_epsilon,
      delta,
      q,
      steps,
      spec.accountant,
      dataset_size=units,
      max_batch_size=spec.max_batch_size,
      prior=releases,
      max_examples_per_user=None if spec.samples_users else k,
    )
    budget = spec.target_epsilon if spec.epsilon_budget is None else spec.epsilon_budget
  if budget is not None:
    _validation.require_positive("epsilon_budget", budget)
  if isinstance(spec.clip, quantile.QuantileClip):  # refuses z >= 2σ_b
    quantile.gradient_noise_multiplier(sigma, spec.clip.count_noise)
    tail = quantile.tail_probability(sigma, spec.clip.count_noise, steps)
  else:
    tail = noise.tail_probability(sigma, steps)
  if sigma > 0 and tail > MAX_TAIL_FRACTION_OF_DELTA * delta:
    raise ValueError(
      f"noise_multiplier={sigma:.4g} is too small for the noise generator's tails "
      f"(P(tail event) = {tail:.2g} over {steps} steps must be below "
      f"{MAX_TAIL_FRACTION_OF_DELTA:g}·delta = {MAX_TAIL_FRACTION_OF_DELTA * delta:.2g}); "
      "use σ >= 0.3"
    )
  return Mechanism(spec, n, b, steps, delta, sigma, budget, releases=releases, num_users=num_users)


def privatizer_template(spec: MechanismSpec) -> optax.GradientTransformationExtraArgs:
  """A privatizer whose state has the structure of ``spec``'s (to restore a checkpoint into).

  Its noise scale and key are placeholders: never train with it.
  """
  if not spec.private:
    return mean_over_examples()
  placeholder_key = np.zeros(8, np.uint32)  # a 256-bit ChaCha20 key
  if isinstance(spec.clip, quantile.QuantileClip):
    return quantile.quantile_privatizer(0.0, spec.clip, 1.0, key=placeholder_key)
  return optax.with_extra_args_support(
    noise.gaussian_privatizer(1.0, 1.0, 1.0, key=placeholder_key)
  )
