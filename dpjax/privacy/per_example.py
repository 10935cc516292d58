"""Clipped sums of per-example gradients, by the ``vmap`` or ``bookkeeping`` backend.

``clipped_grad(loss_fn, clip)`` turns a loss of ONE example into a function of a
batch that returns

    sum_i mask_i * c_i * grad loss_fn(params, example_i),   ||c_i g_i|| <= Δ,

together with per-example statistics. The batch is processed in microbatches
with ``lax.scan``: per-example gradients exist for one microbatch at a time, so
memory is bounded by ``microbatch_size``, not by the (logical) batch size. This
is also how gradient accumulation works: a logical batch of 1024 examples with
``microbatch_size=32`` is 32 scan iterations whose clipped sums add up, and
the result is privatized once.

Backends: ``"vmap"`` forms per-example gradients with ``jax.vmap(jax.grad)``
(the reference; any loss); ``"bookkeeping"`` never forms them (one batched
forward + backward, see :mod:`dpjax.privacy.bookkeeping`; models built from
:mod:`dpjax.models.layers`); ``"auto"`` picks book-keeping when the loss
supports it and vmap otherwise.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, ClassVar, Protocol, runtime_checkable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from dpjax import _validation
from dpjax.privacy import bookkeeping, clipping

PyTree = Any
BACKENDS = ("auto", "vmap", "bookkeeping")


@runtime_checkable
class ParamLayout(Protocol):
  """How the parameters a clipped-gradient function receives are split across devices.

  Inside ``shard_map`` a device may hold only a slice of some parameters (FSDP).
  ``gather`` returns the whole arrays (the book-keeping backend calls it inside
  a rematerialized forward pass, so a layer's whole weights exist only while
  that layer runs); ``scatter_sum`` turns a whole-shaped sum into this device's
  slice of its sum over the devices that share the slices (a leaf may also be a
  :class:`~dpjax.privacy.bookkeeping.BlockedSum`, offered block by block);
  ``whole_shapes`` gives the whole shapes without communicating; ``any_device``
  is a flag's OR over the devices that communicate (all of them must take the
  same branch around a gather).
  """

  def gather(self, params: PyTree) -> PyTree: ...

  def scatter_sum(self, grads: PyTree) -> PyTree: ...

  def whole_shapes(self, params: PyTree) -> PyTree: ...

  def any_device(self, flag: jax.Array) -> jax.Array: ...


@flax.struct.dataclass
class ClippedGradAux:
  """Per-example statistics of one call of a clipped-gradient function.

  Attributes:
    losses: [B] per-example loss (0 for padding rows).
    norms: [B] unclipped per-example gradient L2 norms (0 for padding rows).
    clipped: [B] bool, True where the gradient was scaled down.
    mask: [B] bool, the real (non-padding) rows.
    num_examples: number of examples in the clipped sum.
    clipped_fraction: fraction of counted examples that were scaled down.
    nonfinite_count: real rows dropped because their loss or gradient was NaN/inf.
    loss_aux: per-example auxiliary outputs of ``loss_fn`` when ``has_aux``.
    sensitivity: L2 sensitivity Δ of the clipped sum (a static Python float).
  """

  losses: jax.Array
  norms: jax.Array
  clipped: jax.Array
  mask: jax.Array
  num_examples: jax.Array
  clipped_fraction: jax.Array
  nonfinite_count: jax.Array
  loss_aux: Any = None
  sensitivity: float = flax.struct.field(pytree_node=False, default=0.0)

  #: The fields with one row per example; the others (except ``sensitivity``) are totals.
  PER_EXAMPLE_FIELDS: ClassVar[tuple[str, ...]] = ("losses", "norms", "clipped", "mask", "loss_aux")

  @classmethod
  def by_kind(cls, per_example: Any, total: Any, sensitivity: float) -> ClippedGradAux:
    """An aux holding ``per_example`` in the per-example fields, ``total`` in the others.

    E.g. ``shard_map`` out_specs: rows split over the batch axis, totals replicated.
    """
    values = {
      f.name: per_example if f.name in cls.PER_EXAMPLE_FIELDS else total
      for f in dataclasses.fields(cls)
      if f.name != "sensitivity"
    }
    return cls(**values, sensitivity=sensitivity)

  @property
  def mean_loss(self) -> jax.Array:
    """Mean loss over the real rows."""
    return jnp.sum(jnp.where(self.mask, self.losses, 0.0)) / jnp.maximum(self.num_examples, 1)


def check_finite(aux: ClippedGradAux, step: int | None = None) -> None:
  """Raises ``FloatingPointError`` if any real example had a NaN/inf loss or gradient.

  Inside ``jit`` non-finite examples are dropped from the clipped sum (so the DP
  bound still holds) and counted in ``aux.nonfinite_count``; call this on the
  host after the step so a diverging run stops instead of training on.
  """
  count = int(aux.nonfinite_count)
  if count:
    where = "" if step is None else f" at step {step}"
    raise FloatingPointError(
      f"{count} example(s) had a non-finite loss or gradient{where}; they were left out of "
      "the clipped sum. Lower the learning rate or check the inputs."
    )


class ClippedGradFn:
  """``(params, batch, mask) -> (clipped_sum, ClippedGradAux)``; knows its sensitivity.

  Built by :func:`clipped_grad`. The clipped sum is float32 and has L2
  sensitivity ``self.sensitivity`` under add/remove-one of an example; pass it
  to :func:`dpjax.privacy.gaussian_privatizer` so noise matches clipping.
  """

  def __init__(
    self,
    loss_fn: Callable[..., Any],
    rule: clipping.ClipRule,
    backend: str,
    microbatch_size: int | None,
    has_aux: bool,
    unit_size: int = 1,
    contribution: str = "sum",
    layout: ParamLayout | None = None,
  ):
    self.loss_fn = loss_fn
    self.clip_rule = rule
    self.backend = backend
    self.microbatch_size = microbatch_size
    self.has_aux = has_aux
    self.unit_size = unit_size
    self.contribution = contribution
    self.layout = layout

  @property
  def sensitivity(self) -> float:
    return self.clip_rule.sensitivity

  def with_clip_norm(self, clip_norm: Any) -> ClippedGradFn:
    """This function clipping with an adaptive rule's current bound (e.g. a traced C_t).

    Raises:
      ValueError: the rule has no adjustable bound (only adaptive rules have).
    """
    if not hasattr(self.clip_rule, "with_clip_norm"):
      raise ValueError(f"{type(self.clip_rule).__name__} has no adjustable clip bound")
    return self._replace(rule=self.clip_rule.with_clip_norm(clip_norm))

  def with_layout(self, layout: ParamLayout) -> ClippedGradFn:
    """This function for parameters split as ``layout`` says (inside ``shard_map``).

    The result is this device's slice of the clipped sum over its own rows, summed
    over the devices that share the slices (``layout.scatter_sum``). The
    book-keeping backend gathers each layer's weights where the layer runs, in
    the forward pass and again in the backward pass (never all at once); the
    vmap backend, which differentiates every example through the weights,
    gathers them all once.
    """
    return self._replace(layout=layout)

  def _replace(self, **changes: Any) -> ClippedGradFn:
    fields = dict(
      loss_fn=self.loss_fn,
      rule=self.clip_rule,
      backend=self.backend,
      microbatch_size=self.microbatch_size,
      has_aux=self.has_aux,
      unit_size=self.unit_size,
      contribution=self.contribution,
      layout=self.layout,
    )
    return ClippedGradFn(**(fields | changes))

  def resolved_backend(self, params: PyTree, batch: PyTree, rows: int | None = None) -> str:
    """The backend that runs for these shapes ("auto" resolved).

    Raises:
      ValueError: backend="bookkeeping" with a loss or model it cannot handle.
    """
    if self.backend == "vmap":
      return "vmap"
    micro = rows or self.microbatch_size or jax.tree_util.tree_leaves(batch)[0].shape[0]
    sample = jax.tree_util.tree_map(lambda x: x[:micro], batch)
    reason = bookkeeping.unsupported_reason(self.loss_fn, params, sample)
    if reason is None:
      return "bookkeeping"
    if self.backend == "bookkeeping":
      raise ValueError(f"backend='bookkeeping' cannot run this loss: {reason}")
    return "vmap"

  def _microbatch(
    self,
    params: PyTree,
    batch: PyTree,
    mask: jax.Array,
    backend: str,
    unit: int,
    layout: ParamLayout | None = None,
  ):
    """Clipped sum and statistics of one microbatch (units of ``unit`` rows)."""
    if backend == "bookkeeping":
      return bookkeeping.clipped_sum(
        self.loss_fn,
        params,
        batch,
        mask,
        self.clip_rule,
        self.has_aux,
        unit,
        self.contribution,
        layout,
      )
    grad_fn = jax.value_and_grad(self.loss_fn, has_aux=self.has_aux)

    def one(example):
      out, grads = grad_fn(params, example)
      loss, loss_aux = out if self.has_aux else (out, None)
      return loss, loss_aux, grads

    losses, loss_aux, grads = jax.vmap(one)(batch)
    result = clipping.clip_and_sum(grads, self.clip_rule, mask, losses, unit, self.contribution)
    losses = jnp.where(result.kept, losses, 0.0)
    return result.grads, (
      losses,
      result.norms,
      result.clipped,
      result.kept,
      result.nonfinite,
      loss_aux,
    )

  def __call__(
    self, params: PyTree, batch: PyTree, mask: jax.Array | None = None
  ) -> tuple[PyTree, ClippedGradAux]:
    leaves = jax.tree_util.tree_leaves(batch)
    if not leaves:
      raise ValueError("batch has no arrays")
    size = leaves[0].shape[0]
    for leaf in leaves:
      if leaf.shape[:1] != (size,):
        raise ValueError(
          f"every batch array needs the same leading batch size {size} (got shape {leaf.shape})"
        )
    mask, unit, micro = units_of(mask, size, self.unit_size, self.microbatch_size)
    layout = self.layout
    whole = params if layout is None else layout.whole_shapes(params)
    backend = self.resolved_backend(whole, batch, micro)
    per_layer = layout if backend == "bookkeeping" else None
    if layout is not None and per_layer is None:
      params = layout.gather(params)  # vmap differentiates through whole weights
    if micro == size:
      grads, stats = self._microbatch(params, batch, mask, backend, unit, per_layer)
    else:
      # The running sum has the shape of the parameters this device holds.
      init = jax.tree_util.tree_map(lambda p: jnp.zeros(np.shape(p), jnp.float32), params)
      grads, stats = scan_microbatches(
        lambda b, m: self._microbatch(params, b, m, backend, unit, per_layer),
        batch,
        mask,
        micro,
        init,
        None if per_layer is None else per_layer.any_device,
      )
    if layout is not None and per_layer is None:
      grads = layout.scatter_sum(grads)
    losses, norms, clipped, kept, nonfinite, loss_aux = stats
    num = jnp.sum(kept)
    aux = ClippedGradAux(
      losses=losses,
      norms=norms,
      clipped=clipped,
      mask=mask,
      num_examples=num,
      clipped_fraction=jnp.sum(clipped) / jnp.maximum(num, 1),
      nonfinite_count=jnp.sum(nonfinite),
      loss_aux=loss_aux,
      sensitivity=self.sensitivity,
    )
    if not isinstance(aux.nonfinite_count, jax.core.Tracer):
      check_finite(aux)  # Called eagerly: fail right here.
    return grads, aux


def summed_grad(
  loss_fn: Callable[..., Any], microbatch_size: int | None = None, has_aux: bool = False
) -> Callable[..., tuple[PyTree, ClippedGradAux]]:
  """``(params, batch, mask) -> (gradient SUM, aux)`` without clipping: the non-private baseline.

  One batched backward pass per microbatch (no per-example gradients). The aux
  has the fields of :func:`clipped_grad`'s: ``norms`` are not computed (zeros),
  nothing is clipped, and ``sensitivity`` is inf (an unclipped sum has no bound).
  """
  if not callable(loss_fn):
    raise ValueError(f"loss_fn must be callable (got {loss_fn!r})")

  def total_loss(params, batch, mask):
    out = jax.vmap(lambda ex: loss_fn(params, ex))(batch)
    losses, loss_aux = out if has_aux else (out, None)
    losses = jnp.where(mask, losses, 0.0)
    return jnp.sum(losses), (losses, loss_aux)

  grad_total = jax.grad(total_loss, has_aux=True)

  def fn(params, batch, mask=None):
    size = jax.tree_util.tree_leaves(batch)[0].shape[0]
    mask, _, micro = units_of(mask, size, 1, microbatch_size)
    zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(np.shape(p), jnp.float32), params)
    total, (losses, loss_aux) = scan_microbatches(
      lambda b, m: grad_total(params, b, m), batch, mask, micro, zeros
    )
    aux = ClippedGradAux(
      losses=losses,
      norms=jnp.zeros([size]),
      clipped=jnp.zeros([size], bool),
      mask=mask,
      num_examples=jnp.sum(mask),
      clipped_fraction=jnp.zeros([]),
      nonfinite_count=jnp.sum(mask & ~jnp.isfinite(losses)),
      loss_aux=loss_aux,
      sensitivity=math.inf,
    )
    return total, aux

  fn.sensitivity = math.inf
  return fn


def units_of(
  mask: jax.Array | None, size: int, unit_size: int, microbatch_size: int | None
) -> tuple[jax.Array, int, int]:
  """(the [size] row mask, rows per unit, rows per microbatch) of a batch of ``size`` rows.

  The mask is [size] (units of ``unit_size`` rows) or [size / k, k]: a 2-D mask says
  that every k consecutive rows are one unit (one user's rows, masked where the
  user has fewer), whatever ``unit_size`` is; this is how batches of users with
  different row counts are clipped by one function. ``microbatch_size`` counts
  units (examples when a unit is one row); None: the whole batch at once.
  """
  if mask is None:
    mask = jnp.ones([size], bool)
  mask = jnp.asarray(mask).astype(bool)
  unit = unit_size
  if mask.ndim == 2:
    unit = mask.shape[1]
    mask = mask.reshape(-1)
  if mask.shape != (size,):
    raise ValueError(
      f"mask must have shape ({size},) or (units, rows per unit) with {size} entries "
      f"(got {mask.shape})"
    )
  if size % unit:
    raise ValueError(f"unit_size={unit} must divide the batch size {size}")
  units = size // unit
  micro = microbatch_size or units
  if units % micro:
    what = "the batch size" if unit == 1 else f"the number of units (of {unit} rows)"
    raise ValueError(f"microbatch_size must divide {what} {units} (got microbatch_size={micro})")
  return mask, unit, micro * unit


def scan_microbatches(
  fn: Callable[[PyTree, jax.Array], tuple[PyTree, PyTree]],
  batch: PyTree,
  mask: jax.Array,
  microbatch_size: int,
  init: PyTree,
  any_device: Callable[[jax.Array], jax.Array] | None = None,
) -> tuple[PyTree, PyTree]:
  """Sums ``fn(batch_i, mask_i)[0]`` over microbatches with ``lax.scan``.

  ``fn`` returns (a tree to add up, per-example statistics with a leading
  microbatch axis); the statistics come back concatenated to the full batch.
  Microbatches of pure padding skip ``fn`` (``lax.cond``) and add zeros, so
  padding a batch to a static shape costs almost nothing.

  Args:
    fn: ``(microbatch, mask) -> (summand, per-example stats)``.
    batch: pytree with leading batch axis B; ``microbatch_size`` must divide B.
    mask: [B] bool, False on padding rows.
    microbatch_size: rows per scan iteration.
    init: zeros shaped like the summand.
    any_device: when ``fn`` communicates across devices (a parameter layout's
      gathers), every device must run the same microbatches: a microbatch is
      skipped only where ``any_device(has real rows)`` is False.
  """
  size = mask.shape[0]
  split = lambda x: x.reshape((size // microbatch_size, microbatch_size) + x.shape[1:])
  batch_mb, mask_mb = jax.tree_util.tree_map(split, batch), split(mask)
  stats_shape = jax.eval_shape(
    lambda b, m: fn(b, m)[1], jax.tree_util.tree_map(lambda x: x[0], batch_mb), mask_mb[0]
  )

  def body(total, xs):
    def skip(_):
      return (
        jax.tree_util.tree_map(jnp.zeros_like, total),
        jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), stats_shape),
      )

    real = jnp.any(xs[1])
    if any_device is not None:
      real = any_device(real)
    summand, stats = jax.lax.cond(real, lambda _: fn(*xs), skip, None)
    return jax.tree_util.tree_map(jnp.add, total, summand), stats

  total, stats = jax.lax.scan(body, init, (batch_mb, mask_mb))
  merge = lambda x: x.reshape((size,) + x.shape[2:])
  return total, jax.tree_util.tree_map(merge, stats)


def clipped_grad(
  loss_fn: Callable[..., Any],
  clip: float | clipping.ClipRule,
  backend: str = "auto",
  microbatch_size: int | None = None,
  has_aux: bool = False,
  unit_size: int = 1,
  contribution: str = "sum",
) -> ClippedGradFn:
  """Builds the clipped-sum-of-per-example-gradients function for ``loss_fn``.

  Args:
    loss_fn: ``loss_fn(params, example) -> scalar`` for ONE example (or
      ``(scalar, aux)`` with ``has_aux``); ``example`` is one row of the batch
      pytree, without the batch axis. Parameters that must not be trained (and
      so neither clipped nor noised) belong in the closure, not in ``params``.
    clip: a :class:`~dpjax.privacy.clipping.ClipRule` or a float for flat clipping.
    backend: ``"vmap"``: per-example gradients with ``jax.vmap(jax.grad)``;
      ``"bookkeeping"``: per-example norms and the clipped sum from one batched
      forward/backward (``loss_fn`` must be a
      :class:`~dpjax.privacy.bookkeeping.TappedLoss`); ``"auto"`` (default):
      book-keeping when possible, else vmap. All give the same result up to
      float32 rounding.
    microbatch_size: examples (units, with ``unit_size`` > 1) per scan iteration;
      must divide the batch size (number of units). ``None`` processes the whole
      batch at once.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``; the per-example aux
      values come back stacked in ``ClippedGradAux.loss_aux``.
    unit_size: rows per privacy unit. 1 (default): every example is clipped on its
      own. k > 1 (user-level DP by user sampling): every k consecutive rows are one
      user's examples (padded with masked rows) and the user's summed gradient is
      clipped as a whole, so removing a user moves the sum by <= Δ. A 2-D mask
      [units, k'] passed to the function sets the unit to its k' rows instead
      (groups of users with fewer rows need less padding).
    contribution: ``"sum"`` or ``"mean"``: clip the sum or the mean of a unit's rows.

  Returns:
    A :class:`ClippedGradFn` ``f(params, batch, mask=None)`` returning the float32
    clipped sum and a :class:`ClippedGradAux`; ``f.sensitivity`` is Δ.
  """
  if not callable(loss_fn):
    raise ValueError(f"loss_fn must be callable (got {loss_fn!r})")
  rule = clipping.as_clip_rule(clip)
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS} (got {backend!r})")
  if microbatch_size is not None and (
    isinstance(microbatch_size, bool) or not isinstance(microbatch_size, int) or microbatch_size < 1
  ):
    raise ValueError(
      f"microbatch_size must be a positive integer or None (got {microbatch_size!r})"
    )
  _validation.require_int_in("unit_size", unit_size, 1)
  if contribution not in clipping.CONTRIBUTIONS:
    raise ValueError(f"contribution must be one of {clipping.CONTRIBUTIONS} (got {contribution!r})")
  return ClippedGradFn(loss_fn, rule, backend, microbatch_size, has_aux, unit_size, contribution)
