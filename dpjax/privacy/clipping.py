"""Clip rules: per-example norms -> per-example scale factors, and their sensitivity.

Every rule maps the per-example squared norms of the gradient leaves to a scale
factor per example and leaf, such that the scaled per-example gradient c_i * g_i
has L2 norm at most ``rule.sensitivity``. Under the add/remove-one neighbouring
relation the clipped sum ``sum_i c_i g_i`` then changes by at most
``rule.sensitivity`` in L2 when one example is added or removed, which is the
quantity the Gaussian noise must be scaled by.

The rules see only squared norms, never the gradients, so the same rule serves
the reference backend (norms of materialized per-example gradients) and fast
backends (norms computed without materializing them).

Rules:
  * :class:`FlatClip` (Abadi et al. 2016): c_i = min(1, C / ||g_i||); Δ = C.
  * :class:`PerLayerClip` (McMahan et al. 2018; He et al. 2022): the leaves are
    split into groups k with bounds C_k; c_ik = min(1, C_k / ||g_ik||);
    Δ = sqrt(sum_k C_k^2).
  * :class:`AutomaticClip` (Bu et al. 2023, "AUTO-S"): c_i = 1 / (||g_i|| + γ);
    Δ = 1 (the learning rate absorbs the scale).
"""

from __future__ import annotations

import abc
import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from dpjax import _validation

PyTree = Any


class ClipFactors(NamedTuple):
  """What a clip rule decides for a batch of examples.

  Attributes:
    per_leaf: a pytree shaped like the gradient whose leaves are [B] factors.
    norms: [B] L2 norm of each example's unclipped gradient (all leaves).
    clipped: [B] bool, True where the example's gradient was scaled down.
  """

  per_leaf: PyTree
  norms: jax.Array
  clipped: jax.Array


def path_to_str(path: Sequence[Any]) -> str:
  """Renders a pytree key path as ``"a/b/c"`` (dict keys, attributes, indices)."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


class ClipRule(abc.ABC):
  """A per-example clipping rule with a known L2 sensitivity."""

  @property
  @abc.abstractmethod
  def sensitivity(self) -> float:
    """Max L2 norm of one example's clipped contribution to the sum."""

  @abc.abstractmethod
  def factors(self, sq_norms: PyTree) -> ClipFactors:
    """Maps per-leaf squared norms (leaves of shape [B]) to scale factors."""


def _sum_leaves(sq_norms: PyTree) -> jax.Array:
  """Σ over the leaves ([B] each) as one [B, L] x [L] matrix product, in full float32.

  A chain of adds would be elementwise, and XLA's CPU backend fuses such a chain into
  each of its consumers: the clip factors reach every weighted sum's [B, T, d] operand,
  where all L terms were then recomputed for every element (a 24-layer model spent
  2.5x its whole gradient there). A product is not fused into its consumers, so the
  sum is formed once.
  """
  leaves = jax.tree_util.tree_leaves(sq_norms)
  if len(leaves) == 1:
    return leaves[0]
  stacked = jnp.stack([jnp.asarray(x, jnp.float32) for x in leaves], axis=-1)
  ones = jnp.ones(stacked.shape[-1], jnp.float32)
  return jnp.matmul(stacked, ones, precision=jax.lax.Precision.HIGHEST)


def total_norm(sq_norms: PyTree) -> jax.Array:
  """||g|| = sqrt(Σ_leaves ||g_leaf||²) per row, from per-leaf squared norms ([B] each)."""
  return jnp.sqrt(_sum_leaves(sq_norms))


@dataclasses.dataclass(frozen=True)
class FlatClip(ClipRule):
  """Global L2 clipping: g_i -> g_i * min(1, C / ||g_i||_2).

  Attributes:
    clip_norm: the bound C > 0 on each example's gradient norm; Δ = C.
  """

  clip_norm: float

  def __post_init__(self):
    _validation.require_positive("clip_norm", self.clip_norm)

  @property
  def sensitivity(self) -> float:
    return float(self.clip_norm)

  def factors(self, sq_norms: PyTree) -> ClipFactors:
    norms = total_norm(sq_norms)
    # C / max(||g||, C) == min(1, C / ||g||) and is finite at ||g|| = 0.
    factor = self.clip_norm / jnp.maximum(norms, self.clip_norm)
    return ClipFactors(
      jax.tree_util.tree_map(lambda _: factor, sq_norms), norms, norms > self.clip_norm
    )


GroupBy = str | Sequence[str] | Callable[[str], str]


@dataclasses.dataclass(frozen=True)
class PerLayerClip(ClipRule):
  """Group-wise clipping: each group k of leaves is clipped to its own bound C_k.

  The per-example contribution then has norm <= sqrt(sum_k C_k^2) = Δ.

  The bounds come from exactly one of:
    * ``clip_norm`` C with ``weights=None``: an equal split C_k = C / sqrt(K)
      over the K groups present, so Δ = C.
    * ``clip_norm`` C with ``weights`` {group: w_k}: C_k = C * sqrt(w_k / sum w),
      so Δ = C; every group present must have a weight.
    * ``bounds`` {group: C_k} given explicitly; Δ = sqrt(sum_k C_k^2) over the
      groups listed, and every group present must be listed.

  Attributes:
    clip_norm: total bound C, split across groups (unless ``bounds`` is given).
    group_by: how leaves form groups, by their path ``"a/b/kernel"``:
      ``"layer"`` (the leaf's parent module: a Dense kernel and its bias share a
      group), ``"leaf"`` (each leaf alone), a sequence of regular expressions
      (a leaf joins the first pattern it matches; the group is named by the
      pattern), or a callable ``path -> group name``.
    weights: optional split weights per group name.
    bounds: optional explicit bound per group name.
  """

  clip_norm: float | None = None
  group_by: GroupBy = "layer"
  weights: Mapping[str, float] | None = None
  bounds: Mapping[str, float] | None = None

  def __post_init__(self):
    if (self.clip_norm is None) == (self.bounds is None):
      raise ValueError(
        "PerLayerClip needs exactly one of clip_norm (a total bound to split) "
        "or bounds (a bound per group)"
      )
    if self.clip_norm is not None:
      _validation.require_positive("clip_norm", self.clip_norm)
    if self.bounds is not None and self.weights is not None:
      raise ValueError("PerLayerClip takes weights only with clip_norm, not with bounds")
    for field in ("weights", "bounds"):
      value = getattr(self, field)
      if value is not None:
        for group, w in value.items():
          _validation.require_positive(f"{field}[{group!r}]", w)
        # Freeze to a hashable, ordered form so the rule can be a static jit argument.
        object.__setattr__(self, field, tuple(sorted(value.items())))
    if isinstance(self.group_by, str) and self.group_by not in ("layer", "leaf"):
      raise ValueError(
        f"group_by must be 'layer', 'leaf', a sequence of regular expressions "
        f"or a callable (got {self.group_by!r})"
      )
    if not isinstance(self.group_by, str) and not callable(self.group_by):
      object.__setattr__(self, "group_by", tuple(self.group_by))

  @property
  def sensitivity(self) -> float:
    if self.bounds is not None:
      return math.sqrt(sum(c * c for _, c in self.bounds))
    return float(self.clip_norm)

  def group_of(self, path: str) -> str:
    """The group name of the leaf at ``path``."""
    if self.group_by == "leaf":
      return path
    if self.group_by == "layer":
      return path.rsplit("/", 1)[0] if "/" in path else path
    if callable(self.group_by):
      return str(self.group_by(path))
    for pattern in self.group_by:
      if re.search(pattern, path):
        return pattern
    raise ValueError(
      f"parameter {path!r} matches none of the PerLayerClip group patterns {list(self.group_by)}"
    )

  def group_bounds(self, groups: Sequence[str]) -> dict[str, float]:
    """The bound C_k of each group, for the groups present in a gradient tree."""
    present = sorted(set(groups))
    table = dict(self.bounds or self.weights or ())
    if self.bounds is not None or self.weights is not None:
      missing = [g for g in present if g not in table]
      if missing:
        name = "bounds" if self.bounds is not None else "weights"
        raise ValueError(f"PerLayerClip.{name} has no entry for groups {missing}")
    if self.bounds is not None:
      return {g: float(table[g]) for g in present}
    if self.weights is None:
      return {g: self.clip_norm / math.sqrt(len(present)) for g in present}
    total = sum(table[g] for g in present)
    return {g: self.clip_norm * math.sqrt(table[g] / total) for g in present}

  def factors(self, sq_norms: PyTree) -> ClipFactors:
    paths_and_leaves, treedef = jax.tree_util.tree_flatten_with_path(sq_norms)
    groups = [self.group_of(path_to_str(p)) for p, _ in paths_and_leaves]
    bounds = self.group_bounds(groups)
    group_sq = {g: 0.0 for g in bounds}
    for g, (_, leaf) in zip(groups, paths_and_leaves):
      group_sq[g] = group_sq[g] + leaf
    group_factor, clipped = {}, None
    for g, sq in group_sq.items():
      norm = jnp.sqrt(sq)
      group_factor[g] = bounds[g] / jnp.maximum(norm, bounds[g])
      over = norm > bounds[g]
      clipped = over if clipped is None else clipped | over
    per_leaf = jax.tree_util.tree_unflatten(treedef, [group_factor[g] for g in groups])
    return ClipFactors(per_leaf, total_norm(sq_norms), clipped)


@dataclasses.dataclass(frozen=True)
class AutomaticClip(ClipRule):
  """Automatic (normalized) clipping of Bu et al. 2023: g_i -> g_i / (||g_i|| + γ).

  Every contribution has norm ||g_i|| / (||g_i|| + γ) < 1, so Δ = 1 with no clip
  norm to tune; the learning rate takes its role.

  Attributes:
    stability: γ > 0, keeps small gradients from being blown up (0.01 in the paper).
  """

  stability: float = 0.01

  def __post_init__(self):
    _validation.require_positive("stability", self.stability)

  @property
  def sensitivity(self) -> float:
    return 1.0

  def factors(self, sq_norms: PyTree) -> ClipFactors:
    norms = total_norm(sq_norms)
    factor = 1.0 / (norms + self.stability)
    return ClipFactors(
      jax.tree_util.tree_map(lambda _: factor, sq_norms), norms, norms + self.stability > 1.0
    )


def as_clip_rule(clip: float | ClipRule) -> ClipRule:
  """A float C means :class:`FlatClip` (C); a rule is returned as is."""
  if isinstance(clip, ClipRule):
    return clip
  if isinstance(clip, (int, float)) and not isinstance(clip, bool):
    return FlatClip(float(clip))
  raise ValueError(f"clip must be a positive float or a ClipRule (got {clip!r})")


class ClippedSum(NamedTuple):
  """The clipped sum of a batch of per-example gradients and what clipping saw.

  Attributes:
    grads: sum over kept examples of c_i * g_i, float32, shaped like one gradient.
    norms: [B] unclipped per-example gradient norms (0 for padding rows).
    clipped: [B] bool, True where an example was scaled down.
    kept: [B] bool, True where the example counted (real and finite).
    nonfinite: [B] bool, True for real examples whose loss or gradient was NaN/inf;
      they are dropped from the sum so the sensitivity bound still holds.
  """

  grads: PyTree
  norms: jax.Array
  clipped: jax.Array
  kept: jax.Array
  nonfinite: jax.Array


def per_example_sq_norms(per_example_grads: PyTree) -> PyTree:
  """Squared L2 norm of each leaf per example, in float32: leaves [B, ...] -> [B]."""

  def sq(g):
    g = g.astype(jnp.float32)
    return jnp.sum(jnp.square(g), axis=tuple(range(1, g.ndim)))

  return jax.tree_util.tree_map(sq, per_example_grads)


class SafeFactors(NamedTuple):
  """Clip factors with padding and non-finite rows forced to zero.

  Attributes:
    per_leaf: pytree of [B] factors; exactly 0 on rows that are not ``kept``.
    norms: [B] unclipped norms (0 on rows that are not kept).
    clipped: [B] bool, kept rows that were scaled down.
    kept: [B] bool, real rows with a finite loss and gradient.
    nonfinite: [B] bool, real rows with a NaN/inf loss or gradient.
  """

  per_leaf: PyTree
  norms: jax.Array
  clipped: jax.Array
  kept: jax.Array
  nonfinite: jax.Array


CONTRIBUTIONS = ("sum", "mean")


def safe_clip_factors(
  sq_norms: PyTree,
  rule: ClipRule,
  mask: jax.Array | None = None,
  losses: jax.Array | None = None,
  unit_size: int = 1,
  contribution: str = "sum",
) -> SafeFactors:
  """``rule.factors`` on per-unit squared norms, after dropping bad rows; factors per row.

  A privacy unit is ``unit_size`` consecutive rows (1: one example; k: one user's
  at most k examples, padded). ``sq_norms`` has leaves [B / unit_size]: the
  squared norm of each unit's summed gradient. A unit counts (``kept``) when it
  has a real row (mask True) and its squared norms and its real rows' losses
  are finite; its norms are zeroed before the rule sees them otherwise, so a
  NaN unit cannot poison terms shared across units, and its factors are exactly 0.

  ``contribution="mean"`` clips the mean of a unit's n real rows instead of their
  sum: the rule sees ||Σ g||²/n² and every row's factor carries 1/n, so the unit
  adds c·(Σ g)/n with ||c·(Σ g)/n|| <= Δ. Either way one unit moves the clipped
  sum by at most Δ. Every backend computes its clip factors here.

  Returns:
    :class:`SafeFactors` with one entry per ROW ([B]): a unit's factor, norm
    and clipped flag repeated over its rows, 0 / False on padding rows.
  """
  leaves = jax.tree_util.tree_leaves(sq_norms)
  if not leaves:
    raise ValueError("sq_norms has no leaves")
  if contribution not in CONTRIBUTIONS:
    raise ValueError(f"contribution must be one of {CONTRIBUTIONS} (got {contribution!r})")
  units = leaves[0].shape[0]
  rows = units * unit_size
  real = jnp.ones([rows], bool) if mask is None else jnp.asarray(mask).astype(bool)
  if real.shape != (rows,):
    raise ValueError(f"mask must have {rows} rows ({units} units of {unit_size}), got {real.shape}")
  by_unit = lambda x: x.reshape(units, unit_size)
  per_row = lambda x: jnp.repeat(x, unit_size, axis=0)
  unit_real = jnp.any(by_unit(real), 1)
  finite = jnp.isfinite(_sum_leaves(leaves))
  if losses is not None:
    finite = finite & jnp.all(by_unit(jnp.isfinite(losses) | ~real), 1)
  kept = unit_real & finite
  sq_norms = jax.tree_util.tree_map(lambda s: jnp.where(kept, s, 0.0), sq_norms)
  scale = 1.0
  if contribution == "mean":
    count = jnp.maximum(jnp.sum(by_unit(real), 1), 1).astype(jnp.float32)
    sq_norms = jax.tree_util.tree_map(lambda s: s / jnp.square(count), sq_norms)
    scale = 1.0 / count
  factors = rule.factors(sq_norms)
  row_kept = per_row(kept) & real
  per_leaf = jax.tree_util.tree_map(
    lambda f: jnp.where(row_kept, per_row(f * scale), 0.0), factors.per_leaf
  )
  return SafeFactors(
    per_leaf,
    jnp.where(row_kept, per_row(factors.norms), 0.0),
    per_row(factors.clipped) & row_kept,
    row_kept,
    real & ~per_row(finite),
  )


def unit_sums(per_example: PyTree, mask: jax.Array, unit_size: int) -> PyTree:
  """Leaves [B, ...] -> [B / unit_size, ...]: the sum of each unit's real rows."""

  def one(g):
    real = mask.reshape((-1,) + (1,) * (g.ndim - 1))
    g = jnp.where(real, g.astype(jnp.float32), 0.0)
    return g.reshape((g.shape[0] // unit_size, unit_size) + g.shape[1:]).sum(1)

  return jax.tree_util.tree_map(one, per_example)


def clip_and_sum(
  per_example_grads: PyTree,
  rule: ClipRule,
  mask: jax.Array | None = None,
  losses: jax.Array | None = None,
  unit_size: int = 1,
  contribution: str = "sum",
) -> ClippedSum:
  """Clips each unit's gradient with ``rule`` and sums over the batch.

  A unit is one example (``unit_size=1``) or ``unit_size`` consecutive rows (one
  user's examples, padded): the unit's gradient is the sum (or, with
  ``contribution="mean"``, the mean) of its real rows' gradients, and it is that
  which is clipped (see :func:`safe_clip_factors`). Padding rows (mask False)
  and units with a non-finite loss or gradient add exactly zero: their
  gradients are zeroed (not multiplied, so NaN cannot leak).

  Args:
    per_example_grads: pytree whose leaves have a leading batch axis [B, ...].
    rule: the clip rule.
    mask: optional [B] bool/0-1 array; False marks padding.
    losses: optional [B] per-example losses, checked for finiteness.
    unit_size: rows per privacy unit; must divide B.
    contribution: ``"sum"`` or ``"mean"`` of a unit's rows (only matters for units of > 1 row).

  Returns:
    A :class:`ClippedSum` with [B] statistics; ``grads`` has norm change <=
    rule.sensitivity when one unit is added or removed.
  """
  leaves = jax.tree_util.tree_leaves(per_example_grads)
  if not leaves:
    raise ValueError("per_example_grads has no leaves")
  batch = leaves[0].shape[0]
  if batch % unit_size:
    raise ValueError(f"unit_size={unit_size} must divide the batch size {batch}")
  real = jnp.ones([batch], bool) if mask is None else jnp.asarray(mask).astype(bool)
  units = per_example_grads if unit_size == 1 else unit_sums(per_example_grads, real, unit_size)
  safe = safe_clip_factors(per_example_sq_norms(units), rule, real, losses, unit_size, contribution)

  def weighted_sum(g, f):
    g = jnp.where(safe.kept.reshape((batch,) + (1,) * (g.ndim - 1)), g.astype(jnp.float32), 0.0)
    return jnp.tensordot(f, g, axes=1)

  grads = jax.tree_util.tree_map(weighted_sum, per_example_grads, safe.per_leaf)
  return ClippedSum(grads, safe.norms, safe.clipped, safe.kept, safe.nonfinite)


class ClipPerExampleState(NamedTuple):
  """Statistics of the last call, for logging."""

  clipped_fraction: jax.Array
  mean_norm: jax.Array


def clip_per_example(clip: float | ClipRule) -> optax.GradientTransformationExtraArgs:
  """An optax transform: per-example gradients [B, ...] -> their clipped sum.

  Put it first in a chain, followed by :func:`dpjax.privacy.gaussian_privatizer`
  with ``sensitivity=rule.sensitivity``::

      rule = FlatClip(1.0)
      tx = optax.chain(clip_per_example(rule),
                       gaussian_privatizer(sigma, rule.sensitivity, B, key),
                       optax.adam(1e-3))
      per_example = jax.vmap(jax.grad(loss), in_axes=(None, 0))(params, batch)
      updates, state = tx.update(per_example, state, params, mask=mask)

  Args:
    clip: a clip rule, or a float for :class:`FlatClip`.

  Returns:
    A transform whose ``update`` accepts an optional ``mask`` keyword ([B], False
    for padding rows, which then contribute zero).
  """
  rule = as_clip_rule(clip)

  def init_fn(params):
    del params
    return ClipPerExampleState(jnp.zeros([], jnp.float32), jnp.zeros([], jnp.float32))

  def update_fn(updates, state, params=None, *, mask=None, **extra_args):
    del state, params, extra_args
    result = clip_and_sum(updates, rule, mask)
    count = jnp.maximum(jnp.sum(result.kept), 1)
    new_state = ClipPerExampleState(
      jnp.sum(result.clipped) / count, jnp.sum(jnp.where(result.kept, result.norms, 0.0)) / count
    )
    return result.grads, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
