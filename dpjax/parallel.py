"""Devices, meshes and shardings: data-parallel and FSDP DP training with ``jax.jit``.

The mesh has two axes, ``("data", "fsdp")``. Examples are split over BOTH axes
(every device holds different examples); parameters and optimizer state are
split along ``"fsdp"`` (ZeRO-3 / DP-ZeRO style: each device stores 1/fsdp of
them and they are gathered for the forward/backward), or replicated.

What keeps the privacy guarantee independent of the device count:

* per-example clipping runs in ``shard_map`` on each device's own examples, so
  every example is clipped exactly as on one device;
* the per-device clipped sums are added by ONE ``psum``: the global sum is the
  same function of the batch as on one device, with the same sensitivity Δ;
* the privatizer runs once, outside ``shard_map``, on the global sum; its noise
  is a function of (key, step, coordinate) only (see
  :func:`dpjax.privacy.noise.noise_for_step`), so it is identical for 1 or 1000
  devices and is never drawn per device;
* the Poisson sample is decided from the shared secret key on every process; each
  process then loads only the rows of its own devices (:func:`global_rows`).

Multi-host: :func:`initialize_distributed` wraps ``jax.distributed.initialize``
(explicit coordinator flags, or auto-detection on SLURM and TPU pods).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dpjax.privacy import bookkeeping, clipping, per_example

PyTree = Any
AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")  # the example axis is split over the whole mesh
DEFAULT_FSDP_MIN_SIZE = 2**14
Rule = tuple[str, P]

#: XLA flags that per-layer FSDP needs on the CPU backend (``XLA_FLAGS``, set before
#: JAX starts): keep remat's optimization barriers through CSE (else the backward
#: pass's gathers are merged with the forward pass's, and every gathered weight
#: lives through both), and schedule for memory rather than concurrency (else
#: every gather is issued before the first layer runs). GPU/TPU need neither.
CPU_PER_LAYER_XLA_FLAGS = (
  "--xla_disable_hlo_passes=cse_barrier_expander "
  "--xla_cpu_enable_concurrency_optimized_scheduler=false"
)


class ParallelError(ValueError):
  """A mesh or sharding setting does not fit the devices or the parameters."""


# ----------------------------------------------------------------------------- processes


def initialize_distributed(
  coordinator_address: str = "", num_processes: int = 0, process_id: int = -1
) -> bool:
  """Starts ``jax.distributed`` when the run spans several processes.

  Explicit flags win (all three are needed). Without them, a SLURM job with more
  than one task, or a TPU pod slice with more than one worker, is detected from
  its environment and ``jax.distributed.initialize()`` reads the rest. A single
  process needs nothing.

  Returns:
    True when ``jax.distributed`` was initialized.
  """
  given = [bool(coordinator_address), num_processes > 0, process_id >= 0]
  if any(given):
    if not all(given):
      raise ParallelError(
        "--coordinator_address, --num_processes and --process_id must be given together"
      )
    if not 0 <= process_id < num_processes:
      raise ParallelError(f"--process_id must be in [0, {num_processes - 1}] (got {process_id})")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return True
  if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 and os.environ.get("SLURM_JOB_ID"):
    jax.distributed.initialize()
    return True
  if "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
    jax.distributed.initialize()
    return True
  return False


def is_main_process() -> bool:
  """Process 0 writes metrics, summaries and config files; the others only compute."""
  return jax.process_index() == 0


def sync(name: str) -> None:
  """A barrier across processes (a no-op for one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
  """True on every process when ``flag`` is True on any (e.g. one process got SIGTERM)."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


def broadcast_bytes(value: bytes) -> bytes:
  """Process 0's ``value`` on every process (e.g. the run secret: one draw for all)."""
  if jax.process_count() == 1:
    return value
  array = np.frombuffer(value, np.uint8)
  return bytes(np.asarray(multihost_utils.broadcast_one_to_all(array), np.uint8))


# ----------------------------------------------------------------------------- mesh


def mesh_shape(num_devices: int, data: int | None = None, fsdp: int | None = 1) -> tuple[int, int]:
  """Resolves (data, fsdp) for ``num_devices``; at most one may be None (= the rest)."""
  for name, value in (("data", data), ("fsdp", fsdp)):
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
      raise ParallelError(f"{name} must be None or an integer >= 1 (got {value!r})")
  if data is None and fsdp is None:
    raise ParallelError("fsdp must be an integer >= 1 when data is None (got None)")
  if data is None or fsdp is None:
    known = fsdp if data is None else data
    if num_devices % known:
      raise ParallelError(
        f"{'fsdp' if data is None else 'data'} must divide the {num_devices} devices (got {known})"
      )
    rest = num_devices // known
    return (rest, fsdp) if data is None else (data, rest)
  if data * fsdp != num_devices:
    raise ParallelError(
      f"data must be {num_devices} // fsdp so that data * fsdp is the {num_devices} devices "
      f"(got data={data}, fsdp={fsdp})"
    )
  return data, fsdp


def make_mesh(
  data: int | None = None, fsdp: int | None = 1, devices: Sequence[Any] | None = None
) -> Mesh:
  """A ``("data", "fsdp")`` mesh over ``devices`` (default: all devices of all processes)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(len(devices), data, fsdp)
  return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2, devices=devices)


def batch_size_multiple(mesh: Mesh) -> int:
  """Rows per logical batch group must be a multiple of this (one block per device)."""
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


# ----------------------------------------------------------------------------- sharding rules


def parse_spec(text: str) -> P:
  """``"fsdp,None"`` -> ``P("fsdp", None)``; entries are mesh axis names or None/empty."""
  entries = []
  for part in text.split(","):
    part = part.strip()
    if part in ("", "None", "none"):
      entries.append(None)
    elif part in AXES:
      entries.append(part)
    else:
      raise ParallelError(f"sharding spec {text!r}: {part!r} is not a mesh axis {AXES} or None")
  return P(*entries)


def parse_rules(rules: Sequence[str | Rule]) -> list[Rule]:
  """Rules as ``(regex, PartitionSpec)`` pairs, or strings ``"regex=spec"`` (config form)."""
  parsed = []
  for rule in rules:
    if isinstance(rule, str):
      if "=" not in rule:
        raise ParallelError(
          f"rules entry {rule!r} must look like 'REGEX=SPEC', e.g. 'word_embeddings=fsdp,None'"
        )
      regex, spec = rule.rsplit("=", 1)
      rule = (regex, parse_spec(spec))
    regex, spec = rule
    try:
      re.compile(regex)
    except re.error as err:
      raise ParallelError(f"rules entry has a bad regex {regex!r} ({err})") from None
    parsed.append((regex, spec))
  return parsed


def spec_for(
  name: str,
  shape: tuple[int, ...],
  mesh: Mesh,
  rules: Sequence[Rule] = (),
  min_size: int = DEFAULT_FSDP_MIN_SIZE,
) -> P:
  """The PartitionSpec of one array.

  The first rule whose regex matches ``name`` (``re.search``) decides. Without a
  match, arrays of at least ``min_size`` elements are split along ``"fsdp"`` on
  their largest dimension that the fsdp size divides; everything else is
  replicated. Optimizer moments have their parameter's path as a suffix and
  its shape, so they follow their parameter.
  """
  for regex, spec in rules:
    if re.search(regex, name):
      if len(spec) > len(shape):
        raise ParallelError(f"sharding rule {regex!r} gives {spec} to {name} of shape {shape}")
      for dim, axis in zip(shape, spec):
        size = (
          1
          if axis is None
          else math.prod(mesh.shape[a] for a in ((axis,) if isinstance(axis, str) else axis))
        )
        if dim % size:
          raise ParallelError(
            f"sharding rule {regex!r}: {name} of shape {shape} cannot be split "
            f"{size} ways as {spec}"
          )
      return spec
  fsdp = mesh.shape["fsdp"]
  if fsdp == 1 or math.prod(shape) < min_size:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp == 0:
      return P(*([None] * dim + ["fsdp"]))
  return P()


def shardings(
  tree: PyTree, mesh: Mesh, rules: Sequence[Rule] = (), min_size: int = DEFAULT_FSDP_MIN_SIZE
) -> PyTree:
  """A NamedSharding for every leaf of ``tree`` (arrays or ShapeDtypeStructs)."""

  def one(path, leaf):
    return NamedSharding(
      mesh, spec_for(clipping.path_to_str(path), tuple(np.shape(leaf)), mesh, rules, min_size)
    )

  return jax.tree_util.tree_map_with_path(one, tree)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (example) axis split over every device of the mesh."""
  return NamedSharding(mesh, P(BATCH_AXES))


# ----------------------------------------------------------------------------- placing data


def put(tree: PyTree, sharding_tree: PyTree) -> PyTree:
  """Host values (the same on every process) -> global arrays with the given shardings.

  Each process copies only the pieces its own devices hold.
  """

  def one(x, sharding):
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  return jax.tree_util.tree_map(one, tree, sharding_tree)


def to_host(tree: PyTree) -> PyTree:
  """Global arrays -> full numpy arrays on every process (gathers across processes)."""
  if jax.process_count() == 1:
    return jax.tree_util.tree_map(np.asarray, tree)
  return multihost_utils.process_allgather(tree, tiled=True)


def global_rows(
  load: Callable[[np.ndarray], Mapping[str, np.ndarray]],
  positions: np.ndarray,
  mask: np.ndarray,
  sharding: NamedSharding,
) -> tuple[dict[str, jax.Array], jax.Array]:
  """A batch of ``positions`` as global arrays split along examples.

  Every process knows the whole sample (``positions``, ``mask``: cheap, from the
  shared seed) but ``load`` is called only for the row blocks of this process's
  devices: each host reads and tokenizes only its own slice of the data.
  """
  size = len(positions)
  blocks: dict[tuple[int, int], Mapping[str, np.ndarray]] = {}

  def rows(index) -> Mapping[str, np.ndarray]:
    start, stop, _ = index[0].indices(size)
    if (start, stop) not in blocks:
      blocks[(start, stop)] = load(positions[start:stop])
    return blocks[(start, stop)]

  local = sharding.addressable_devices_indices_map((size,))
  first = rows(next(iter(local.values())))
  batch = {}
  for name, value in first.items():
    shape = (size,) + value.shape[1:]
    batch[name] = jax.make_array_from_callback(
      shape, sharding, lambda index, name=name: rows(index)[name]
    )
  # [size], or [units, k] (k rows per unit): split along its first axis like the rows.
  mask_array = jax.make_array_from_callback(mask.shape, sharding, lambda index: mask[index])
  return batch, mask_array


# ----------------------------------------------------------------------------- the gradient


def _aux_specs(sensitivity: float) -> per_example.ClippedGradAux:
  """out_specs for a ClippedGradAux: per-example fields split, totals replicated."""
  return per_example.ClippedGradAux.by_kind(P(BATCH_AXES), P(), sensitivity)


class FsdpLayout:
  """Trainable parameters split along ``"fsdp"`` inside ``shard_map`` (per-layer FSDP).

  ``dims`` holds, per leaf, the dimension split ``size`` ways (-1: replicated).
  Implements :class:`dpjax.privacy.per_example.ParamLayout`: ``gather`` is one
  tiled ``all_gather`` per split leaf, named so the book-keeping backend
  recomputes it in the backward pass instead of keeping it; ``scatter_sum`` is
  one ``psum_scatter`` per split leaf (a device ends with the sum over the fsdp
  group of its own slice); replicated leaves pass through both unchanged.
  """

  def __init__(self, dims: PyTree, size: int):
    self.dims = dims
    self.size = size

  @classmethod
  def of(cls, shardings_tree: PyTree, mesh: Mesh) -> FsdpLayout | None:
    """The layout of parameters placed with ``shardings_tree``, or None if none is split.

    Only splits along ``"fsdp"`` alone, on one dimension, take part; a tree with
    any other split (a rule naming ``"data"``) gets None: gathered whole instead.
    """
    if mesh.shape["fsdp"] == 1:
      return None

    def dim_of(sharding) -> int | None:
      spec = tuple(getattr(sharding, "spec", sharding))
      used = [(d, a) for d, a in enumerate(spec) if a is not None]
      if not used:
        return -1
      if len(used) == 1 and used[0][1] in ("fsdp", ("fsdp",)):
        return used[0][0]
      return None

    is_spec = lambda x: isinstance(x, (NamedSharding, P))
    dims = jax.tree_util.tree_map(dim_of, shardings_tree, is_leaf=is_spec)
    flat = jax.tree_util.tree_leaves(dims, is_leaf=lambda x: x is None)
    if any(d is None for d in flat) or all(d == -1 for d in flat):
      return None
    return cls(dims, mesh.shape["fsdp"])

  def specs(self) -> PyTree:
    """The PartitionSpec of every leaf (``shard_map`` in/out specs)."""
    return jax.tree_util.tree_map(
      lambda d: P() if d < 0 else P(*([None] * d + ["fsdp"])), self.dims
    )

  def gather(self, params: PyTree) -> PyTree:
    def one(x, dim):
      if dim < 0:
        return x
      if dim == 0:
        whole = jax.lax.all_gather(x, "fsdp", axis=0, tiled=True)
      else:
        # Gathered along its leading axis, each device's slice lands as one contiguous
        # block; moved back, the result is a logical transpose that the dots using it
        # absorb. Gathered along `dim` itself, XLA would gather the same way and then
        # copy the whole leaf into row-major order: two whole copies live at once
        # (e.g. a tied [50257, H] embedding, whose rows do not split 8 ways).
        moved = jax.lax.all_gather(jnp.moveaxis(x, dim, 0), "fsdp", axis=0, tiled=True)
        whole = jnp.moveaxis(moved, 0, dim)
      return checkpoint_name(whole, bookkeeping.GATHERED)

    return jax.tree_util.tree_map(one, params, self.dims)

  def scatter_sum(self, grads: PyTree) -> PyTree:
    """This device's slice of each leaf's sum over ``"fsdp"``: one ``psum_scatter`` per
    split leaf, or, for a :class:`~dpjax.privacy.bookkeeping.BlockedSum`, a ring
    reduce-scatter that forms one block at a time (:meth:`_ring_scatter_sum`)."""
    blocked = lambda x: isinstance(x, bookkeeping.BlockedSum)

    def one(g, dim):
      if blocked(g):
        if dim < 0:
          return g.block(0, 0, 1)
        return self._ring_scatter_sum(g, dim)
      if dim < 0:
        return g
      if dim == 0:
        return jax.lax.psum_scatter(g, "fsdp", scatter_dimension=0, tiled=True)
      # As in `gather`: scattered along the leading axis, which XLA would do anyway.
      moved = jax.lax.psum_scatter(jnp.moveaxis(g, dim, 0), "fsdp", scatter_dimension=0, tiled=True)
      return jnp.moveaxis(moved, 0, dim)

    return jax.tree_util.tree_map(one, grads, self.dims, is_leaf=blocked)

  def _ring_scatter_sum(self, blocked: bookkeeping.BlockedSum, dim: int) -> jax.Array:
    """Σ over the fsdp group of block k of a whole-shaped sum, on the device with fsdp
    index k, holding at most three blocks at a time (never the whole sum).

    Ring order: at step s device k adds its own block (k - s - 1) mod n to the partial
    sum received from device k - 1 and passes it on to device k + 1; after n - 1
    steps the partial sum it holds is block k summed over all n devices. It moves
    the same (n - 1)/n of the leaf per device as ``psum_scatter``.
    """
    n = self.size
    me = jax.lax.axis_index("fsdp")
    right = [(i, (i + 1) % n) for i in range(n)]
    # A loop, not n unrolled steps: unrolled, XLA computes every block up front.
    step = lambda s, total: (
      jax.lax.ppermute(total, "fsdp", right) + blocked.block(dim, (me - s - 1) % n, n)
    )
    return jax.lax.fori_loop(1, n, step, blocked.block(dim, (me - 1) % n, n))

  def whole_shapes(self, params: PyTree) -> PyTree:
    def one(x, dim):
      shape = list(np.shape(x))
      if dim >= 0:
        shape[dim] *= self.size
      return jax.ShapeDtypeStruct(tuple(shape), x.dtype)

    return jax.tree_util.tree_map(one, params, self.dims)

  def any_device(self, flag: jax.Array) -> jax.Array:
    return jax.lax.psum(flag.astype(jnp.int32), BATCH_AXES) > 0

  def total(self, grads: PyTree) -> PyTree:
    """Sums over the devices that still hold partial sums: split leaves are already
    summed over ``"fsdp"`` (by ``scatter_sum``), replicated ones over nothing."""
    return jax.tree_util.tree_map(
      lambda g, d: jax.lax.psum(g, "data" if d >= 0 else BATCH_AXES), grads, self.dims
    )


def sharded_grad_fn(
  grad_fn: Callable, mesh: Mesh, param_shardings: PyTree | None = None
) -> Callable:
  """Runs a clipped- (or plain) gradient-sum function where the examples live.

  ``grad_fn(params, batch, mask) -> (sum over the rows, ClippedGradAux)`` runs in
  ``shard_map`` on each device's block of rows, and the per-device sums are
  added over the mesh. (``check_vma`` is off: the microbatch scan's padding skip
  is a ``lax.cond`` whose skip branch returns device-invariant zeros.) The
  result is the sum over the whole batch, exactly what ``grad_fn`` returns on
  one device (up to float reassociation), with the same sensitivity: noise is
  added once to it afterwards, by the privatizer.

  Parameters enter ``shard_map`` whole (one gather per step) unless
  ``param_shardings`` (the parameters' shardings) splits some of them along
  ``"fsdp"`` and ``grad_fn`` takes a layout (a
  :class:`~dpjax.privacy.per_example.ClippedGradFn`): then they enter as the
  slices each device holds, the book-keeping backend gathers one layer's
  weights at a time (:func:`dpjax.privacy.bookkeeping.clipped_sum`), and the
  sum comes back split like the parameters, each slice summed by one
  reduce-scatter over ``"fsdp"`` and one ``psum`` over ``"data"``.
  """
  sensitivity = float(getattr(grad_fn, "sensitivity", 0.0))
  aux_specs = _aux_specs(sensitivity)
  layout = None
  if param_shardings is not None and hasattr(grad_fn, "with_layout"):
    layout = FsdpLayout.of(param_shardings, mesh)
  param_specs = P() if layout is None else layout.specs()

  def local(params, batch, mask, clip_norm=None):
    fn = grad_fn if clip_norm is None else grad_fn.with_clip_norm(clip_norm)
    if layout is not None:
      fn = fn.with_layout(layout)
    grads, aux = fn(params, batch, mask)
    if layout is None:
      grads = jax.lax.psum(grads, BATCH_AXES)
    else:
      grads = layout.total(grads)
    num = jax.lax.psum(aux.num_examples, BATCH_AXES)
    clipped = jax.lax.psum(aux.clipped_fraction * aux.num_examples, BATCH_AXES)
    aux = aux.replace(
      num_examples=num,
      clipped_fraction=clipped / jnp.maximum(num, 1),
      nonfinite_count=jax.lax.psum(aux.nonfinite_count, BATCH_AXES),
    )
    return grads, aux

  def fn(params, batch, mask):
    mapped = jax.shard_map(
      local,
      mesh=mesh,
      in_specs=(param_specs, P(BATCH_AXES), P(BATCH_AXES)),
      out_specs=(param_specs, aux_specs),
      check_vma=False,
    )
    return mapped(params, batch, mask)

  def with_clip_norm(clip_norm):
    """The same, clipping with an adaptive rule's bound (replicated into ``shard_map``)."""

    def bounded(params, batch, mask):
      mapped = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(param_specs, P(BATCH_AXES), P(BATCH_AXES), P()),
        out_specs=(param_specs, aux_specs),
        check_vma=False,
      )
      return mapped(params, batch, mask, jnp.asarray(clip_norm, jnp.float32))

    bounded.sensitivity = sensitivity
    return bounded

  fn.sensitivity = sensitivity
  fn.with_clip_norm = with_clip_norm
  fn.layout = layout
  return fn
