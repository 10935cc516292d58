"""Clip rules: every per-example contribution respects the rule's sensitivity."""

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dpjax.privacy import (
  AutomaticClip,
  FlatClip,
  PerLayerClip,
  clip_and_sum,
  clip_per_example,
  gaussian_privatizer,
)
from dpjax.privacy.secret import RunSecret

# Per-example gradient entries from exactly zero to huge, in float32.
_ENTRIES = st.one_of(
  st.just(0.0),
  st.floats(-1e6, 1e6, allow_nan=False, width=32),
  st.floats(-(2.0**-20), 2.0**-20, allow_nan=False, width=32),
)


def _per_example_grads(draw_array):
  return {
    "dense": {"kernel": draw_array((4, 3, 2)), "bias": draw_array((4, 2))},
    "embed": {"embedding": draw_array((4, 5))},
  }


_RULES = [
  FlatClip(0.7),
  PerLayerClip(0.7),
  PerLayerClip(0.7, group_by="leaf"),
  PerLayerClip(bounds={"dense": 0.5, "embed": 0.2}),
  PerLayerClip(0.7, weights={"dense": 3.0, "embed": 1.0}),
  AutomaticClip(0.01),
]


@hypothesis.settings(deadline=None, max_examples=60)
@hypothesis.given(data=st.data(), rule_index=st.integers(0, len(_RULES) - 1))
def test_every_contribution_has_norm_at_most_sensitivity(data, rule_index):
  rule = _RULES[rule_index]
  draw = lambda shape: jnp.asarray(data.draw(hnp.arrays(np.float32, shape, elements=_ENTRIES)))
  grads = _per_example_grads(draw)
  for i in range(4):
    # The contribution of example i alone is the clipped sum of a batch where only i is real.
    mask = np.arange(4) == i
    result = clip_and_sum(grads, rule, mask)
    norm = float(jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree_util.tree_leaves(result.grads))))
    assert norm <= rule.sensitivity * (1 + 1e-5)
    unclipped = float(
      jnp.sqrt(
        sum(jnp.sum(x[i].astype(jnp.float32) ** 2) for x in jax.tree_util.tree_leaves(grads))
      )
    )
    np.testing.assert_allclose(float(result.norms[i]), unclipped, rtol=1e-5)


def test_flat_clip_is_min_one_c_over_norm():
  g = jnp.array([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]])  # norms 5, 0.5, 0
  result = clip_and_sum({"w": g}, FlatClip(1.0))
  np.testing.assert_allclose(result.grads["w"], [0.6 + 0.3, 0.8 + 0.4], rtol=1e-6)
  np.testing.assert_array_equal(result.clipped, [True, False, False])


def test_automatic_clip_normalizes():
  g = jnp.array([[3.0, 4.0]])
  result = clip_and_sum({"w": g}, AutomaticClip(0.01))
  np.testing.assert_allclose(result.grads["w"], [3 / 5.01, 4 / 5.01], rtol=1e-6)
  assert AutomaticClip().sensitivity == 1.0


def test_per_layer_split_and_groups():
  grads = {
    "a": {"kernel": jnp.ones((1, 4)), "bias": jnp.ones((1, 1))},
    "b": {"kernel": jnp.ones((1, 9))},
  }
  equal = PerLayerClip(1.0)
  assert equal.group_bounds(["a", "b"]) == pytest.approx({"a": 2**-0.5, "b": 2**-0.5})
  result = clip_and_sum(grads, equal)
  norm_a = float(
    jnp.sqrt(jnp.sum(result.grads["a"]["kernel"] ** 2) + jnp.sum(result.grads["a"]["bias"] ** 2))
  )
  assert norm_a == pytest.approx(2**-0.5, rel=1e-6)  # Kernel and bias clipped together.
  weighted = PerLayerClip(2.0, weights={"a": 1.0, "b": 3.0})
  assert weighted.group_bounds(["a", "b"]) == pytest.approx({"a": 1.0, "b": 3**0.5})
  assert weighted.sensitivity == 2.0


@pytest.mark.parametrize(
  "make, message",
  [
    (lambda: FlatClip(0.0), "clip_norm must be a finite number > 0"),
    (lambda: FlatClip(float("nan")), "clip_norm must be a finite number > 0"),
    (lambda: PerLayerClip(), "exactly one of clip_norm"),
    (lambda: PerLayerClip(1.0, group_by="module"), "group_by must be"),
    (lambda: PerLayerClip(bounds={"a": -1.0}), r"bounds\['a'\] must be a finite number > 0"),
    (lambda: AutomaticClip(0.0), "stability must be a finite number > 0"),
  ],
)
def test_bad_rules_raise(make, message):
  with pytest.raises(ValueError, match=message):
    make()


def test_per_layer_missing_group_is_an_error():
  rule = PerLayerClip(bounds={"a": 1.0})
  with pytest.raises(ValueError, match=r"bounds has no entry for groups \['b'\]"):
    clip_and_sum({"a": {"w": jnp.ones((2, 2))}, "b": {"w": jnp.ones((2, 2))}}, rule)
  with pytest.raises(ValueError, match="matches none of the PerLayerClip group patterns"):
    clip_and_sum({"c": {"w": jnp.ones((2, 2))}}, PerLayerClip(1.0, group_by=("^a",)))


def test_optax_chain_of_clip_privatizer_and_optimizer():
  """clip_per_example -> gaussian_privatizer(σ=0) -> sgd equals the hand-computed step."""
  params = {"w": jnp.zeros(2)}
  per_example = {"w": jnp.array([[3.0, 4.0], [0.3, 0.4], [9.0, 9.0]])}
  mask = np.array([True, True, False])
  rule = FlatClip(1.0)
  tx = optax.chain(
    clip_per_example(rule),
    gaussian_privatizer(0.0, rule.sensitivity, 4.0, RunSecret.insecure_fixed(0).noise_key()),
    optax.sgd(1.0),
  )
  state = tx.init(params)
  updates, state = jax.jit(tx.update)(per_example, state, params, mask=mask)
  np.testing.assert_allclose(updates["w"], -np.array([0.9, 1.2]) / 4.0, rtol=1e-6)
  assert float(state[0].clipped_fraction) == 0.5
