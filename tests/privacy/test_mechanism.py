"""The mechanism object: one calibration, every piece consistent, the same shape without DP."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpjax import privacy
from dpjax.privacy import mechanism as mechanism_lib
from dpjax.privacy.secret import RunSecret
from dpjax.train import config as config_lib

N, B, STEPS = 5000, 100, 50
SECRET = RunSecret.insecure_fixed(3)


def make(**spec_fields) -> privacy.Mechanism:
  spec = privacy.MechanismSpec(**{"clip": privacy.FlatClip(0.5), **spec_fields})
  return privacy.make_mechanism(spec, dataset_size=N, expected_batch_size=B, steps=STEPS)


def test_calibrated_sigma_spends_the_target_and_the_target_is_the_default_budget():
  m = make(target_epsilon=3.0)
  delta = N**-1.1
  assert m.delta == pytest.approx(delta)
  assert m.noise_multiplier == privacy.calibrate_noise(
    3.0, delta, B / N, STEPS, "pld", dataset_size=N
  )
  assert 3.0 * 0.99 <= m.planned_epsilon() <= 3.0
  assert m.epsilon_budget == 3.0 and m.calibrated
  facts = m.public_facts()
  assert facts["target_epsilon"] == 3.0 and facts["sigma_from"] == "calibrated to target_epsilon"


def test_a_given_sigma_is_reported_not_targeted_and_has_no_default_budget():
  m = make(target_epsilon=3.0, noise_multiplier=0.6)
  assert m.noise_multiplier == 0.6 and m.epsilon_budget is None and not m.calibrated
  ledger = m.record(m.empty_ledger(), 10_000)
  assert m.epsilon(ledger) > 3.0  # far past the unused target: nothing stops it
  assert m.steps_within_budget(m.empty_ledger(), 10_000) == 10_000
  assert m.planned_epsilon() == pytest.approx(
    privacy.compute_epsilon(0.6, B / N, STEPS, m.delta), rel=1e-12
  )
  assert m.public_facts()["target_epsilon"] is None


def test_an_explicit_budget_stops_at_the_last_step_within_it():
  m = make(noise_multiplier=0.8, epsilon_budget=2.0)
  ledger = m.record(m.empty_ledger(), 7)
  k = m.steps_within_budget(ledger, 10_000)
  assert 0 < k < 10_000
  assert m.epsilon(m.record(ledger, k)) <= 2.0 < m.epsilon(m.record(ledger, k + 1))


def test_the_sampler_and_the_ledger_use_the_same_rate_and_noise():
  m = make(target_epsilon=2.0).keyed(SECRET)
  sampler = m.sampler()
  assert sampler.sampling_prob == m.sampling_prob == B / N
  assert m.static_batches().sampling_prob == m.sampling_prob
  segment = m.segment(4)
  assert (segment.sampling_prob, segment.noise_multiplier, segment.steps) == (
    B / N,
    m.noise_multiplier,
    4,
  )
  assert m.grad_fn(lambda p, x: jnp.sum(p * x)).sensitivity == 0.5 == m.sensitivity


def test_the_private_denominator_ignores_the_realized_count():
  m = make(noise_multiplier=1.0).keyed(SECRET)
  tx = m.privatizer()
  grads = {"w": jnp.ones(3)}
  state = tx.init(grads)
  a, _ = tx.update(grads, state, None, num_examples=1)
  b, _ = tx.update(grads, state, None, num_examples=500)
  np.testing.assert_array_equal(a["w"], b["w"])


def test_the_nonprivate_mechanism_has_the_same_shape():
  m = make(private=False)
  assert m.noise_multiplier == 0.0 and m.epsilon_budget is None and m.sensitivity == np.inf
  m = m.keyed(SECRET)
  # The gradient: the plain, unclipped sum over the real rows.
  loss = lambda p, x: jnp.sum(p * x["x"])
  batch = {"x": jnp.arange(12.0).reshape(4, 3) * 10}
  total, aux = m.grad_fn(loss, has_aux=False)(jnp.ones(3), batch, jnp.array([1, 1, 1, 0], bool))
  np.testing.assert_allclose(total, np.sum(np.asarray(batch["x"])[:3], 0))
  assert int(aux.num_examples) == 3
  # The privatizer: the mean over the realized examples.
  tx = m.privatizer()
  out, _ = tx.update({"w": jnp.full(2, 6.0)}, tx.init(None), None, num_examples=3)
  np.testing.assert_allclose(out["w"], 2.0)
  # The ledger: sigma 0 steps, infinite epsilon.
  assert m.epsilon(m.record(m.empty_ledger(), 1)) == np.inf
  assert m.guarantee.startswith("none")


def test_keys_come_only_from_the_secret_and_the_attempt():
  m = make(noise_multiplier=1.0)
  with pytest.raises(ValueError, match="no secret yet"):
    m.sampler()
  with pytest.raises(ValueError, match="no secret yet"):
    m.privatizer()
  a, b = m.keyed(SECRET, 0), m.keyed(SECRET, 1)
  assert not np.array_equal(a.sampler().sample(0), b.sampler().sample(0))
  state_a = a.privatizer().init({"w": jnp.zeros(2)})
  state_b = b.privatizer().init({"w": jnp.zeros(2)})
  assert not np.array_equal(state_a.key, state_b.key)
  rekeyed = b.with_noise_key(state_a)
  np.testing.assert_array_equal(rekeyed.key, state_b.key)
  assert SECRET.value.hex() not in repr(a) and SECRET.value.hex()[:16] not in str(a.public_facts())


def test_the_template_privatizer_state_has_the_real_structure():
  for private in (True, False):
    m = make(private=private, noise_multiplier=1.0).keyed(SECRET)
    params = {"w": jnp.zeros((2, 3)), "b": jnp.zeros(3)}
    real = jax.tree_util.tree_structure(m.privatizer().init(params))
    template = mechanism_lib.privatizer_template(m.spec).init(params)
    assert jax.tree_util.tree_structure(template) == real


@pytest.mark.parametrize(
  "changes, message, key",
  [
    ({"batch": N + 1}, "batch_size must be in (0, dataset_size=5000]", "train.batch_size"),
    ({"delta": 1 / N}, "delta must be < 1/dataset_size", "dp.delta"),
    ({"noise_multiplier": 0.1}, "too small for the noise generator's tails", "dp.noise_multiplier"),
    ({"target_epsilon": 500.0}, "target_epsilon must be in (0, 100]", "dp.epsilon"),
    (
      {"epsilon_budget": -1.0, "noise_multiplier": 1.0},
      "epsilon_budget must be",
      "dp.epsilon_budget",
    ),
  ],
)
def test_bad_values_are_one_line_errors_that_name_the_config_key(changes, message, key):
  batch = changes.pop("batch", B)
  spec = privacy.MechanismSpec(**changes)
  with pytest.raises(ValueError) as err:
    privacy.make_mechanism(spec, dataset_size=N, expected_batch_size=batch, steps=STEPS)
  assert message in str(err.value) and "\n" not in str(err.value)
  assert str(config_lib.config_error(err.value)).startswith(f"config.{key}")


def test_the_config_maps_onto_the_spec():
  c = config_lib.default_config()
  assert config_lib.mechanism_spec(c).noise_multiplier is None
  c.dp.noise_multiplier = 0.9
  c.dp.clip = "per_layer"
  c.dp.clip_norm = 2.0
  spec = config_lib.mechanism_spec(c)
  assert spec.noise_multiplier == 0.9 and spec.clip.sensitivity == 2.0
  m = privacy.make_mechanism(spec, dataset_size=N, expected_batch_size=B, steps=STEPS)
  assert m.epsilon_budget is None  # dp.epsilon is only a calibration target
  c.dp.enabled = False
  assert not config_lib.mechanism_spec(c).private


def test_steps_for_epochs_rounds_halves_up():
  assert privacy.steps_for_epochs(1.0, 250, 100.0) == 3  # 2.5 -> 3 (round() would say 2)
  assert privacy.steps_for_epochs(2.0, 1000, 100.0) == 20
  assert privacy.steps_for_epochs(0.01, 1000, 100.0) == 1
  assert privacy.steps_per_epoch(250, 100.0) == 3


# User-level DP by example-level sampling: N examples of N_u users, at most k each.
N_USERS, K = 2000, 3


def make_user_level(**spec_fields) -> privacy.Mechanism:
  spec = privacy.MechanismSpec(
    **{"clip": privacy.FlatClip(0.5), "max_examples_per_user": K, **spec_fields}
  )
  return privacy.make_mechanism(
    spec, dataset_size=N, expected_batch_size=B, steps=STEPS, num_users=N_USERS
  )


def test_a_user_level_mechanism_samples_examples_and_accounts_users():
  m = make_user_level(noise_multiplier=3.0)
  assert m.user_level and m.num_users == N_USERS and m.privacy_units == N_USERS
  # Sampling is over the N examples at q = B/N; the noise and clipping are unchanged.
  assert m.sampling_prob == B / N and m.keyed(SECRET).sampler().dataset_size == N
  assert m.delta == pytest.approx(N_USERS**-1.1)
  # The ledger records the mixture-of-Gaussians step with the users as its dataset.
  segment = m.segment(7)
  assert segment == privacy.Segment(B / N, 3.0, 7, N_USERS, max_examples_per_user=K)
  assert m.record(m.empty_ledger(), 7).user_level
  assert m.epsilon_replace_one(m.empty_ledger()) is None
  assert m.guarantee.startswith(
    "(epsilon, delta)-DP for add/remove of one user (all of their at most 3 training examples)"
  )
  facts = m.public_facts()
  assert facts["unit"] == "user" and facts["max_examples_per_user"] == K
  assert facts["num_users"] == N_USERS and facts["dataset_size"] == N
  example = make(noise_multiplier=3.0).public_facts()
  assert example["unit"] == "example" and "num_users" not in example


def test_user_level_calibration_passes_k_and_the_number_of_users(monkeypatch):
  seen = {}

  def fake_calibrate(*args, **kwargs):
    seen.update(kwargs, args=args)
    return 2.5

  monkeypatch.setattr(privacy.accounting, "calibrate_noise", fake_calibrate)
  m = make_user_level(target_epsilon=4.0)
  assert m.noise_multiplier == 2.5 and m.epsilon_budget == 4.0
  assert seen["max_examples_per_user"] == K and seen["dataset_size"] == N_USERS
  assert seen["args"][:3] == (4.0, pytest.approx(N_USERS**-1.1), B / N)


@pytest.mark.parametrize(
  "changes, num_users, message, key",
  [
    ({}, None, "num_users must be given for user-level DP", None),
    ({}, 1000, "dataset_size=5000 exceeds max_examples_per_user=3 times num_users=1000", None),
    ({"accountant": "rdp"}, N_USERS, "accountant must be 'pld' for user-level DP", "dp.accountant"),
    ({"delta": 1 / N_USERS}, N_USERS, "delta must be < 1/num_users = 0.0005", "dp.delta"),
    ({"max_examples_per_user": 0}, N_USERS, "max_examples_per_user must be an integer", None),
    ({"max_examples_per_user": None}, N_USERS, "num_users is for user-level DP only", None),
  ],
)
def test_user_level_refusals_are_one_line(changes, num_users, message, key):
  spec = privacy.MechanismSpec(
    **{"noise_multiplier": 3.0, "max_examples_per_user": K, "accountant": "pld", **changes}
  )
  with pytest.raises(ValueError) as err:
    privacy.make_mechanism(
      spec, dataset_size=N, expected_batch_size=B, steps=STEPS, num_users=num_users
    )
  assert message in str(err.value) and "\n" not in str(err.value)
  if key is not None:
    assert str(config_lib.config_error(err.value)).startswith(f"config.{key}")


def test_the_config_maps_the_unit_onto_the_spec():
  c = config_lib.default_config()
  assert config_lib.mechanism_spec(c).max_examples_per_user is None
  c.dp.unit = "user"
  c.dp.max_examples_per_user = 4
  assert config_lib.mechanism_spec(c).max_examples_per_user == 4
  c.dp.enabled = False  # the baseline keeps the unit (its data are capped alike)
  assert config_lib.mechanism_spec(c).user_level
