"""Clipped sums of per-example gradients without per-example gradients (book-keeping).

One forward and one backward pass over the whole batch give, for every trained
layer, its input and the gradient of the summed loss w.r.t. its output. Rows of
those arrays belong to single examples, so every per-example quantity is a
function of them:

* Linear use, G_i = P_iᵀ Q_i with P_i [T, m], Q_i [T, n] (a Dense kernel:
  P = input, Q = output gradient; a tied output layer E [V, H]: P = logit
  gradient, Q = its input). The squared norm is either the *ghost norm*
  ||G_i||² = Σ_{t,s} (P_t·P_s)(Q_t·Q_s) at O(T²(m+n)) (Li et al. 2022,
  Goodfellow 2015) or the norm of the materialized [m, n] per-example gradient
  at O(T·m·n), whichever is cheaper for that layer.
* Row use, G_i = Σ_u onehot(r_u)ᵀ v_u (an embedding lookup; label-word rows of
  a tied decoder): rows are merged per example (sort + segment sum, so repeated
  tokens add up before squaring) and the norm is that of the merged rows.
  A table used both ways (tied embeddings) gets the norm of the SUM of its uses:
  ||R + L||² = ||R||² + ||L||² + 2⟨R, L⟩, the cross term from the same arrays.
* Direct use: LayerNorm scale/bias and Dense biases have small per-example
  gradients (Σ_t ∂L/∂y_t ⊙ x̂_t, Σ_t ∂L/∂y_t) that are formed outright.

The clip rule maps the squared norms to factors c_i (any rule, per-layer
included), and each clipped sum Σ_i c_i G_i is ONE contraction per use with c
folded into P (Bu et al. 2022, "book-keeping"): there is no second backward pass
and no [B, m, n] tensor for layers where the ghost norm is cheaper.

Norms and sums are computed in float32 whatever the compute dtype. A model
supports this backend when its layers report through the schema of
:mod:`dpjax.privacy.taps` (as those of :mod:`dpjax.models.layers` do) and its
loss implements :class:`TappedLoss`. Each layer kind is one entry of
:data:`LAYER_KINDS`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
from flax import traverse_util

from dpjax.privacy import clipping, taps

PyTree = Any

#: The name (``jax.ad_checkpoint.checkpoint_name``) a parameter layout gives the
#: whole weights it gathers: the book-keeping pass recomputes them, never keeps them.
GATHERED = "dpjax_gathered_weight"


class BlockedSum(NamedTuple):
  """A whole-shaped clipped sum offered block by block, for a parameter layout to
  reduce-scatter without forming it whole (:meth:`dpjax.parallel.FsdpLayout.scatter_sum`).

  ``block(dim, index, count)`` is block ``index`` (possibly traced) of ``count``
  equal blocks of the sum along axis ``dim``.
  """

  block: Callable[[int, jax.Array, int], jax.Array]


#: Primitives whose outputs the per-layer remat policy recomputes instead of keeping:
#: the gather itself; layout changes and casts, which are how a gathered weight reaches
#: its use (``x · Eᵀ`` transposes the tied [V, H] table: kept, that transpose would hold
#: a whole copy of the table from the forward pass to the backward pass); and elementwise
#: arithmetic, cheap to redo from the kept dot products (kept, GELU's and the softmax's
#: intermediates would hold about three times the activations plain AD keeps).
_RECOMPUTED = frozenset(
  "all_gather transpose convert_element_type reshape broadcast_in_dim squeeze expand_dims "
  "add sub mul div neg abs sign max min select_n exp log tanh logistic erf sqrt rsqrt "
  "integer_pow pow".split()
)


def _keep_all_but_gathered(prim: Any, *_: Any, **params: Any) -> bool:
  """Remat policy: intermediates are kept (dot products, reductions, lookups, taps)
  except gathered weights and the cheap primitives of :data:`_RECOMPUTED`, which the
  backward pass recomputes."""
  if prim.name in _RECOMPUTED:
    return False
  return not (prim.name == "name" and params["name"] == GATHERED)


@runtime_checkable
class TappedLoss(Protocol):
  """A per-example loss whose model can run a whole batch and report its layers.

  ``__call__(params, example)`` is the loss of ONE example (the contract of the
  vmap backend). ``batched(params, batch, perturbations)`` runs the model once on
  the batch with the given output perturbations and returns ``(losses [B],
  aux or None, taps, full_params)``: ``taps`` is the model's ``"taps"``
  collection and ``full_params`` the parameters including frozen ones.
  ``perturbation_shapes(params, batch)`` is the tree of every tapped output
  (``model.init(...)["perturbations"]`` under ``jax.eval_shape``).
  """

  def __call__(self, params: PyTree, example: Mapping[str, jax.Array]) -> Any: ...

  def batched(
    self, params: PyTree, batch: Mapping[str, jax.Array], perturbations: PyTree
  ) -> tuple[jax.Array, Any, PyTree, PyTree]: ...

  def perturbation_shapes(self, params: PyTree, batch: Mapping[str, jax.Array]) -> PyTree: ...


def _f32(x: jax.Array) -> jax.Array:
  return x.astype(jnp.float32)


def _rows_2d(x: jax.Array) -> jax.Array:
  """[B, ..., d] -> [B, T, d] (T = product of the middle axes; 1 if none)."""
  return x.reshape((x.shape[0], -1, x.shape[-1]))


def _zero_rows(x: jax.Array, kept: jax.Array) -> jax.Array:
  return jnp.where(kept.reshape((-1,) + (1,) * (x.ndim - 1)), x, jnp.zeros_like(x))


def _by_unit(x: jax.Array, real: jax.Array, unit_size: int) -> jax.Array:
  """[B, T, d] -> [B / k, k·T, d] with non-real rows zeroed: a unit's rows as one sequence."""
  x = _zero_rows(x, real)
  return x.reshape((x.shape[0] // unit_size, unit_size * x.shape[1]) + x.shape[2:])


def ghost_is_cheaper(tokens: int, m: int, n: int) -> bool:
  """Ghost norm O(T²(m+n)) vs materialized per-example gradient O(T·m·n)."""
  return tokens * (m + n) < m * n


class LinearGrad:
  """Per-example G_i = P_iᵀ Q_i for P [B, T, m], Q [B, T, n]."""

  def __init__(self, p: jax.Array, q: jax.Array):
    self.p, self.q = _f32(_rows_2d(p)), _f32(_rows_2d(q))
    tokens, m = self.p.shape[1:]
    self.ghost = ghost_is_cheaper(tokens, m, self.q.shape[-1])
    self._per_example = None

  def per_example(self) -> jax.Array:
    if self._per_example is None:
      self._per_example = jnp.einsum("btm,btn->bmn", self.p, self.q)
    return self._per_example

  def sq_norm(self) -> jax.Array:
    if self.ghost:
      if self.p.shape[1] == 1:
        return jnp.sum(jnp.square(self.p), (1, 2)) * jnp.sum(jnp.square(self.q), (1, 2))
      pp = jnp.einsum("btm,bsm->bts", self.p, self.p)
      qq = jnp.einsum("btn,bsn->bts", self.q, self.q)
      return jnp.sum(pp * qq, (1, 2))
    return jnp.sum(jnp.square(self.per_example()), (1, 2))

  def unit_sq_norm(self, unit_size: int, real: jax.Array) -> jax.Array:
    """||Σ_{i∈u} P_iᵀ Q_i||² per unit of ``unit_size`` rows: the norm of P_uᵀ Q_u over the
    union of the unit's tokens (ghost or materialized, whichever is cheaper at k·T)."""
    return LinearGrad(
      _by_unit(self.p, real, unit_size), _by_unit(self.q, real, unit_size)
    ).sq_norm()

  def weighted_sum(self, c: jax.Array, kept: jax.Array) -> jax.Array:
    if self.ghost:
      return jnp.einsum(
        "btm,btn->mn", _zero_rows(self.p, kept) * c[:, None, None], _zero_rows(self.q, kept)
      )
    return jnp.einsum("b,bmn->mn", c, _zero_rows(self.per_example(), kept))


class DirectGrad:
  """A materialized per-example gradient [B, *shape] (small parameters)."""

  def __init__(self, g: jax.Array):
    self.g = _f32(g)

  def sq_norm(self) -> jax.Array:
    return jnp.sum(jnp.square(self.g.reshape(self.g.shape[0], -1)), 1)

  def unit_sq_norm(self, unit_size: int, real: jax.Array) -> jax.Array:
    """||Σ_{i∈u} g_i||² per unit of ``unit_size`` rows."""
    g = _zero_rows(self.g, real)
    return DirectGrad(g.reshape((-1, unit_size) + g.shape[1:]).sum(1)).sq_norm()

  def weighted_sum(self, c: jax.Array, kept: jax.Array) -> jax.Array:
    return jnp.tensordot(c, _zero_rows(self.g, kept), axes=1)


class TableGrad:
  """Per-example gradient of a table [V, H]: Σ_u onehot(r_u)ᵀ v_u (+ Pᵀ Q when tied).

  Args:
    rows: [B, U] int row ids.
    values: [B, U, H] the row gradients.
    dense: optional :class:`LinearGrad` of a full-vocabulary tied use, P [B, S, V].
    num_rows: V.
  """

  def __init__(
    self, rows: jax.Array | None, values: jax.Array | None, dense: LinearGrad | None, num_rows: int
  ):
    self.rows = rows
    self.values = None if values is None else _f32(values)
    self.dense = dense
    self.num_rows = num_rows

  def _merged(self) -> tuple[jax.Array, jax.Array]:
    """Per example: the distinct rows [B, U] (padded with row 0) and their summed values."""
    size = self.rows.shape[1]

    def one(rows, values):
      ids, inverse = jnp.unique(rows, size=size, fill_value=0, return_inverse=True)
      merged = jax.ops.segment_sum(values, inverse.reshape(-1), num_segments=size)
      return ids, merged

    return jax.vmap(one)(self.rows, self.values)

  def sq_norm(self) -> jax.Array:
    total = 0.0
    if self.rows is not None:
      ids, merged = self._merged()
      total = jnp.sum(jnp.square(merged), (1, 2))
      if self.dense is not None:
        # ⟨Σ_u onehot(id_u)ᵀ m_u, PᵀQ⟩ = Σ_{u,s} P[s, id_u] (Q_s · m_u)
        p_at = jnp.take_along_axis(self.dense.p, ids[:, None, :], axis=2)  # [B, S, U]
        qm = jnp.einsum("bsh,buh->bsu", self.dense.q, merged)
        total = total + 2.0 * jnp.sum(p_at * qm, (1, 2))
    if self.dense is not None:
      total = total + self.dense.sq_norm()
    return total

  def unit_sq_norm(self, unit_size: int, real: jax.Array) -> jax.Array:
    """||Σ_{i∈u} G_i||² per unit: the unit's rows (and tied uses) merged as one example's."""
    grouped = lambda x: None if x is None else _by_unit(x, real, unit_size)
    rows = None
    if self.rows is not None:
      rows = self.rows.reshape((-1, unit_size * self.rows.shape[1]))
    dense = None
    if self.dense is not None:
      dense = LinearGrad(grouped(self.dense.p), grouped(self.dense.q))
    return TableGrad(rows, grouped(self.values), dense, self.num_rows).sq_norm()

  def weighted_sum(self, c: jax.Array, kept: jax.Array) -> jax.Array:
    # One [V, H] buffer: the tied dense part first (or zeros), the looked-up rows added into
    # it in place (adding a zeros-plus-scatter table to the dense one would hold three).
    hidden = (self.values if self.values is not None else self.dense.q).shape[-1]
    if self.dense is not None:
      out = self.dense.weighted_sum(c, kept).astype(jnp.float32)
    else:
      out = jnp.zeros((self.num_rows, hidden), jnp.float32)
    if self.rows is not None:
      scaled = _zero_rows(self.values, kept) * c[:, None, None]
      out = out.at[self.rows.reshape(-1)].add(scaled.reshape(-1, hidden))
    return out

  def weighted_sum_block(
    self, c: jax.Array, kept: jax.Array, dim: int, index: jax.Array, count: int
  ) -> jax.Array:
    """Block ``index`` of ``count`` of :meth:`weighted_sum` along ``dim`` (0: rows, 1:
    columns), computed from that block's share of the rows and values only."""
    hidden = (self.values if self.values is not None else self.dense.q).shape[-1]
    size = (self.num_rows if dim == 0 else hidden) // count
    start = index * size
    cut = lambda x: jax.lax.dynamic_slice_in_dim(x, start, size, axis=x.ndim - 1)
    shape = (size, hidden) if dim == 0 else (self.num_rows, size)
    if self.dense is not None:
      p = _zero_rows(self.dense.p, kept) * c[:, None, None]
      q = _zero_rows(self.dense.q, kept)
      p, q = (cut(p), q) if dim == 0 else (p, cut(q))
      out = jnp.einsum("btm,btn->mn", p, q).astype(jnp.float32)
    else:
      out = jnp.zeros(shape, jnp.float32)
    if self.rows is not None:
      scaled = (_zero_rows(self.values, kept) * c[:, None, None]).reshape(-1, hidden)
      rows = self.rows.reshape(-1)
      if dim == 0:  # rows outside the block go to index `size`, which is dropped
        local = rows - start
        rows = jnp.where((local >= 0) & (local < size), local, size)
      else:
        scaled = cut(scaled)
      out = out.at[rows].add(scaled, mode="drop")
    return out


class BookkeepingError(ValueError):
  """The model cannot run under the book-keeping backend (use ``backend="vmap"``)."""


def _one_use(sown: Mapping[str, Any], name: str, where: str):
  value = sown.get(name)
  if value is None:
    return None
  if len(value) != 1:
    raise BookkeepingError(
      f"layer {where!r} is applied {len(value)} times in one forward pass; "
      "the book-keeping backend needs one use per layer"
    )
  return value[0]


@dataclasses.dataclass(frozen=True)
class LayerUse:
  """What one layer left in a batched forward/backward pass.

  Attributes:
    where: the layer's module path, e.g. ``"backbone/encoder/layer_0/output/dense"``.
    params: its parameters (trained and frozen) by leaf name.
    taps: its sown values by tap name (one entry per use of the layer).
    douts: ∂L/∂(perturbed output) by output name.
    trained: the leaf names being trained.
  """

  where: str
  params: Mapping[str, jax.Array]
  taps: Mapping[str, Any]
  douts: Mapping[str, jax.Array]
  trained: frozenset[str]

  def tap(self, name: str):
    """The single use of tap ``name`` (None if absent); a layer used twice is refused."""
    return _one_use(self.taps, name, self.where)


def _dense_grads(use: LayerUse) -> dict[str, Any]:
  """Dense: kernel = xᵀ dy (linear), bias = Σ_t dy (direct), LoRA A and B (linear)."""
  out: dict[str, Any] = {}
  x, dy = use.tap(taps.DENSE_INPUT), use.douts[taps.OUTPUT]
  if "kernel" in use.trained:
    out["kernel"] = LinearGrad(x, dy)
  if "bias" in use.trained:
    out["bias"] = DirectGrad(jnp.sum(_f32(_rows_2d(dy)), 1))
  if "lora_a" in use.trained or "lora_b" in use.trained:
    scale = use.tap(taps.LORA_SCALE)
    a, b = _f32(use.params["lora_a"]), _f32(use.params["lora_b"])
    xf, dyf = _f32(x), _f32(dy)
    if "lora_a" in use.trained:  # ∂/∂A = s · xᵀ (dy Bᵀ)
      out["lora_a"] = LinearGrad(xf, scale * jnp.einsum("...o,ro->...r", dyf, b))
    if "lora_b" in use.trained:  # ∂/∂B = s · (x A)ᵀ dy
      out["lora_b"] = LinearGrad(scale * jnp.einsum("...i,ir->...r", xf, a), dyf)
  return out


def _layer_norm_grads(use: LayerUse) -> dict[str, Any]:
  """LayerNorm: scale = Σ_t dy ⊙ x̂, bias = Σ_t dy (both direct)."""
  out: dict[str, Any] = {}
  dy = _f32(_rows_2d(use.douts[taps.OUTPUT]))
  if "scale" in use.trained:
    out["scale"] = DirectGrad(jnp.sum(dy * _f32(_rows_2d(use.tap(taps.NORMALIZED))), 1))
  if "bias" in use.trained:
    out["bias"] = DirectGrad(jnp.sum(dy, 1))
  return out


def _embed_grads(use: LayerUse) -> dict[str, Any]:
  """Embed: lookup rows and/or a tied output layer, merged into one table gradient."""
  if "embedding" not in use.trained:
    return {}
  ids, attend_in = use.tap(taps.EMBED_IDS), use.tap(taps.ATTEND_INPUT)
  rows, values, dense = [], [], None
  if ids is not None:
    rows.append(ids.reshape(ids.shape[0], -1))
    values.append(_rows_2d(_f32(use.douts[taps.OUTPUT])))
  if attend_in is not None:
    dlogits = _f32(_rows_2d(use.douts[taps.ATTEND_OUTPUT]))
    x = _f32(_rows_2d(attend_in))
    chosen = use.tap(taps.ATTEND_ROWS)
    if chosen is None:
      dense = LinearGrad(dlogits, x)
    else:  # Row j of the restricted table gets Σ_s dlogits[s, j] x_s.
      rows.append(jnp.broadcast_to(chosen, (x.shape[0], chosen.shape[0])))
      values.append(jnp.einsum("bsk,bsh->bkh", dlogits, x))
  table_rows = use.params["embedding"].shape[0]
  return {
    "embedding": TableGrad(
      jnp.concatenate(rows, 1) if rows else None,
      jnp.concatenate(values, 1) if values else None,
      dense,
      table_rows,
    )
  }


def _output_bias_grads(use: LayerUse) -> dict[str, Any]:
  """The output bias of a decoder: Σ_t ∂L/∂logits_t, scattered to its rows if restricted."""
  if "bias" not in use.trained:
    return {}
  dlogits = jnp.sum(_f32(_rows_2d(use.douts[taps.LOGITS])), 1)  # [B, k or V]
  chosen = use.tap(taps.BIAS_ROWS)
  if chosen is not None:
    vocab = use.params["bias"].shape[0]
    dlogits = jnp.zeros((dlogits.shape[0], vocab), jnp.float32).at[:, chosen].add(dlogits)
  return {"bias": DirectGrad(dlogits)}


@dataclasses.dataclass(frozen=True)
class LayerKind:
  """A kind of tapped layer: the taps or outputs that mark it, and its gradient rule.

  Attributes:
    name: for messages.
    markers: tap or output names (:mod:`dpjax.privacy.taps`); a layer is of this
      kind if it left any of them.
    grads: ``LayerUse -> {trained leaf name: LinearGrad | DirectGrad | TableGrad}``.
  """

  name: str
  markers: tuple[str, ...]
  grads: Callable[[LayerUse], dict[str, Any]]

  def matches(self, use: LayerUse) -> bool:
    return any(m in use.taps or m in use.douts for m in self.markers)


#: Every layer kind the backend understands, tried in order (the first match wins).
LAYER_KINDS: tuple[LayerKind, ...] = (
  LayerKind("Dense", (taps.DENSE_INPUT,), _dense_grads),
  LayerKind("LayerNorm", (taps.NORMALIZED,), _layer_norm_grads),
  LayerKind("Embed", (taps.EMBED_IDS, taps.ATTEND_INPUT), _embed_grads),
  LayerKind("output bias", (taps.LOGITS,), _output_bias_grads),
)


def _layer_grads(use: LayerUse) -> dict[str, Any]:
  """The per-example gradient objects of the trained leaves of one layer ({} if untapped)."""
  for kind in LAYER_KINDS:
    if kind.matches(use):
      return kind.grads(use)
  return {}


def _leaves_by_layer(tree: PyTree) -> dict[str, dict[str, Any]]:
  """{"a/b": {leaf name: value}} for the non-dict entries of a nested dict."""
  layers: dict[str, dict[str, Any]] = {}
  for path, value in traverse_util.flatten_dict(tree, sep="/").items():
    where, _, name = path.rpartition("/")
    layers.setdefault(where, {})[name] = value
  return layers


def trained_perturbations(shapes: PyTree, params: PyTree) -> PyTree:
  """Zero perturbations for the layers that own a trained parameter (and no others).

  Backpropagation then stops below the lowest trained layer (e.g. at the head
  when only the head trains).
  """
  owners = set(_leaves_by_layer(params))
  flat = traverse_util.flatten_dict(shapes, sep="/")
  keep = {k: jnp.zeros(v.shape, v.dtype) for k, v in flat.items() if k.rpartition("/")[0] in owners}
  return traverse_util.unflatten_dict(keep, sep="/")


def clipped_sum(
  loss_fn: TappedLoss,
  params: PyTree,
  batch: Mapping[str, jax.Array],
  mask: jax.Array,
  rule: clipping.ClipRule,
  has_aux: bool,
  unit_size: int = 1,
  contribution: str = "sum",
  layout: Any = None,
) -> tuple[PyTree, tuple[Any, ...]]:
  """The clipped sum over one (micro)batch, as ``ClippedGradFn`` expects it.

  With ``unit_size = k > 1`` every k consecutive rows are one privacy unit (one
  user): the clipped quantity is the unit's summed (or mean) gradient, whose
  norm is taken over the union of the unit's tokens (a ghost norm over k·T
  tokens, or a [m, n] gradient per unit), so no per-user gradient of a large
  layer is ever formed either; the clipped sum is still one contraction per
  layer with the unit's factor on each of its rows.

  With a ``layout`` (a :class:`dpjax.privacy.per_example.ParamLayout`: ``params``
  are this device's slices, inside ``shard_map``), the forward pass gathers
  each weight where it is used and is rematerialized in the backward pass with
  every gathered weight recomputed (gathered again) rather than kept: at any
  time a device holds its slices plus the whole weights of the layers that are
  running (per-layer FSDP, DP-ZeRO). The whole-shaped clipped sum of each
  parameter is then reduce-scattered to the devices that own its slices
  (``layout.scatter_sum``). Per-example norms need only activations and output
  gradients, so they are exact whatever the split.

  Returns:
    (clipped sum shaped like ``params`` in float32, (losses, norms, clipped,
    kept, nonfinite, loss_aux)) with [B] statistics.

  Raises:
    BookkeepingError: when a trained parameter has no tapped use, or a layer is
      applied more than once.
  """
  whole = params if layout is None else layout.whole_shapes(params)
  perturbations = trained_perturbations(loss_fn.perturbation_shapes(whole, batch), params)

  def summed_loss(perturbations, params):
    used = params if layout is None else layout.gather(params)
    losses, aux, sown, full = loss_fn.batched(used, batch, perturbations)
    return jnp.sum(jnp.where(mask, losses, 0.0)), (losses, aux, sown, full)

  if layout is None:
    grad = jax.grad(summed_loss, has_aux=True)
  else:
    # Only values that depend on a differentiated input are rematerialized, so
    # the slices are differentiated too; their gradient is never used, and XLA
    # drops its computation.
    remat = jax.checkpoint(summed_loss, policy=_keep_all_but_gathered)
    both = jax.grad(remat, argnums=(0, 1), has_aux=True)
    grad = lambda *args: (lambda g, aux: (g[0], aux))(*both(*args))
  douts, (losses, loss_aux, sown, full) = grad(perturbations, params)
  if not has_aux:
    loss_aux = None
  trained = _leaves_by_layer(params)
  full_layers = _leaves_by_layer(full)
  tap_layers = _leaves_by_layer(sown)
  dout_layers = _leaves_by_layer(douts)
  grads: dict[str, Any] = {}
  for where, leaves in trained.items():
    found = _layer_grads(
      LayerUse(
        where,
        full_layers.get(where, {}),
        tap_layers.get(where, {}),
        dout_layers.get(where, {}),
        frozenset(leaves),
      )
    )
    for name in leaves:
      if name not in found:
        raise BookkeepingError(
          f"parameter {where + '/' + name!r} is not used through a tapped layer (Dense, Embed, "
          "LayerNorm of dpjax.models.layers); use backend='vmap' for this model"
        )
      grads[f"{where}/{name}" if where else name] = found[name]
  if unit_size == 1:
    sq_norms = {k: g.sq_norm() for k, g in grads.items()}
  else:
    real = jnp.asarray(mask).astype(bool)
    sq_norms = {k: g.unit_sq_norm(unit_size, real) for k, g in grads.items()}
  # The clip rule sees the same tree structure (and paths) as the parameters.
  sq_tree = traverse_util.unflatten_dict(sq_norms, sep="/")
  safe = clipping.safe_clip_factors(sq_tree, rule, mask, losses, unit_size, contribution)
  factors = traverse_util.flatten_dict(safe.per_leaf, sep="/")
  sums = {}
  for k, g in grads.items():
    if layout is not None and isinstance(g, TableGrad):
      # A [V, H] table (a tied 50k-row embedding is the largest leaf of a language
      # model) is reduce-scattered block by block, never formed whole.
      sums[k] = BlockedSum(functools.partial(g.weighted_sum_block, factors[k], safe.kept))
    else:
      sums[k] = g.weighted_sum(factors[k], safe.kept)
  summed = traverse_util.unflatten_dict(sums, sep="/")
  is_blocked = lambda x: isinstance(x, BlockedSum)
  summed = jax.tree_util.tree_map(
    lambda p, g: g if is_blocked(g) else g.reshape(p.shape), whole, summed, is_leaf=is_blocked
  )
  if layout is not None:
    summed = layout.scatter_sum(summed)
  losses = jnp.where(safe.kept, losses, 0.0)
  return summed, (losses, safe.norms, safe.clipped, safe.kept, safe.nonfinite, loss_aux)


def unsupported_reason(
  loss_fn: Callable[..., Any], params: PyTree, batch: Mapping[str, jax.Array]
) -> str | None:
  """Why ``loss_fn`` cannot use the book-keeping backend on this batch, or None if it can."""
  if not isinstance(loss_fn, TappedLoss):
    return (
      "the loss does not expose its model's layers (a TappedLoss such as "
      "dpjax.models.heads.classification_loss)"
    )
  mask = jnp.ones(jax.tree_util.tree_leaves(batch)[0].shape[:1], bool)
  try:
    jax.eval_shape(
      lambda p, b, m: clipped_sum(loss_fn, p, b, m, clipping.FlatClip(1.0), False),
      params,
      batch,
      mask,
    )
  except BookkeepingError as err:
    return str(err)
  return None
