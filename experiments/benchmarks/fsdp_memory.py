"""Benchmark: per-device memory of the FSDP clipped sum, whole gather vs per-layer gathers.

    python -m experiments.benchmarks.fsdp_memory [--models=125m,350m,1.3b] [--fsdp=8]
        [--seq=128] [--json=FILE]

For GPT-2-shaped models (random shapes only: nothing is allocated), compiles the
book-keeping clipped sum of one example per device on a ``("data", "fsdp")`` =
(1, F) mesh twice: with the parameters gathered whole once where ``shard_map``
begins, and with per-layer gathers (:class:`dpjax.parallel.FsdpLayout`: the
slices enter ``shard_map``, each weight is gathered where its layer runs and
again in the backward pass, each clipped sum is reduce-scattered). The numbers
are XLA's own account of the compiled program per device (``memory_analysis``):
``arguments`` (the parameter slices and the batch) and ``working`` (temporaries:
gathered weights, activations, whole-shaped sums). Adam's two moments add twice
the parameter slices in the train step; they are split like the parameters
and are listed from arithmetic, not compiled here.

The bound per device is the slices + Adam's moments + the largest layer gathered
whole (a block, or the tied embedding table) + the activations of one example,
taken as XLA's working memory for the plain (non-private) gradient of one example
on one device; the per-layer total should not exceed it.

On a CPU the script runs in a subprocess with F virtual devices and the XLA
flags per-layer FSDP needs there (:data:`dpjax.parallel.CPU_PER_LAYER_XLA_FLAGS`);
compile time grows with the model (about a minute for the 1.3B shape on 2 cores).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from absl import app, flags

SHAPES = {  # name: (layers, width, heads): GPT-2 small / medium, and the GPT-3 XL shape
  "125m": (12, 768, 12),
  "350m": (24, 1024, 16),
  "1.3b": (24, 2048, 16),
  "tiny": (4, 256, 4),
}

_MODELS = flags.DEFINE_list("models", ["125m", "350m", "1.3b"], f"Shapes among {list(SHAPES)}.")
_FSDP = flags.DEFINE_integer("fsdp", 8, "Devices the parameters are split over.")
_SEQ = flags.DEFINE_integer("seq", 128, "Tokens per example.")
_JSON = flags.DEFINE_string("json", None, "Also write the rows as JSON to this file.")
_WORKER = flags.DEFINE_string("worker", None, "Internal: measure one model in this process.")


def clipped_sum_memory(
  layers: int, width: int, heads: int, fsdp: int, seq: int, per_layer: bool, vocab: int = 50257
) -> dict[str, float]:
  """Compiles the book-keeping clipped sum and returns XLA's per-device account (bytes)."""
  import jax
  import jax.numpy as jnp

  from dpjax import parallel, privacy
  from dpjax.models import gpt2
  from dpjax.models import heads as heads_lib

  config = gpt2.GPT2Config(
    vocab_size=vocab, n_positions=seq, n_embd=width, n_layer=layers, n_head=heads
  )
  model = gpt2.GPT2LMHeadModel(config)
  mesh = parallel.make_mesh(1, fsdp, jax.devices()[:fsdp])
  rows = parallel.batch_sharding(mesh)
  shapes = jax.eval_shape(
    lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros([1, seq], jnp.int32), jnp.ones([1, seq], jnp.int32)
    )
  )["params"]
  shardings = parallel.shardings(shapes, mesh)
  grad_fn = privacy.clipped_grad(heads_lib.lm_loss(model), 1.0, "bookkeeping", 1, has_aux=True)
  sharded = parallel.sharded_grad_fn(grad_fn, mesh, shardings if per_layer else None)
  assert (sharded.layout is not None) == per_layer
  fn = jax.jit(lambda p, b, m: sharded(p, b, m)[0], out_shardings=shardings)
  params = jax.tree_util.tree_map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings
  )
  ids = jax.ShapeDtypeStruct((fsdp, seq), jnp.int32, sharding=rows)
  batch = {"input_ids": ids, "attention_mask": ids, "labels": ids}
  mask = jax.ShapeDtypeStruct((fsdp,), bool, sharding=rows)
  start = time.perf_counter()
  memory = fn.lower(params, batch, mask).compile().memory_analysis()
  size = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))
  return {
    "working": memory.temp_size_in_bytes,
    "arguments": memory.argument_size_in_bytes,
    "block": size(shapes["h_0"]),
    "params": size(shapes),
    "compile_s": time.perf_counter() - start,
  }


def activation_memory(layers: int, width: int, heads: int, seq: int, vocab: int = 50257) -> int:
  """XLA's working memory (bytes) for the plain, non-private gradient of one example on one
  device, parameters and gradient excluded: the activations the bound below allows."""
  import jax
  import jax.numpy as jnp

  from dpjax.models import gpt2
  from dpjax.models import heads as heads_lib

  config = gpt2.GPT2Config(
    vocab_size=vocab, n_positions=seq, n_embd=width, n_layer=layers, n_head=heads
  )
  model = gpt2.GPT2LMHeadModel(config)
  shapes = jax.eval_shape(
    lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros([1, seq], jnp.int32), jnp.ones([1, seq], jnp.int32)
    )
  )["params"]
  loss = heads_lib.lm_loss(model)
  ids = jax.ShapeDtypeStruct((seq,), jnp.int32)
  example = {"input_ids": ids, "attention_mask": ids, "labels": ids}
  grad = jax.jit(jax.grad(lambda p, e: loss(p, e)[0]))
  return grad.lower(shapes, example).compile().memory_analysis().temp_size_in_bytes


def largest_layer(layers: int, width: int, vocab: int = 50257) -> int:
  """Bytes of the largest layer gathered whole: a block (12 H² weights) or the tied table."""
  del layers
  return 4 * max(12 * width * width, vocab * width)


def _measure_in_subprocess(name: str) -> dict:
  from dpjax import parallel

  env = dict(os.environ)
  if env.get("JAX_PLATFORMS", "cpu") == "cpu":
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = " ".join(
      [
        env.get("XLA_FLAGS", ""),
        f"--xla_force_host_platform_device_count={_FSDP.value}",
        parallel.CPU_PER_LAYER_XLA_FLAGS,
      ]
    ).strip()
  command = [
    sys.executable,
    "-m",
    "experiments.benchmarks.fsdp_memory",
    f"--worker={name}",
    f"--fsdp={_FSDP.value}",
    f"--seq={_SEQ.value}",
  ]
  out = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
  if out.returncode:
    raise RuntimeError(f"{name}: worker failed:\n{out.stderr[-2000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv):
  del argv
  if _WORKER.value:
    layers, width, heads = SHAPES[_WORKER.value]
    row = {"model": _WORKER.value}
    for per_layer in (False, True):
      key = "per_layer" if per_layer else "whole"
      result = clipped_sum_memory(layers, width, heads, _FSDP.value, _SEQ.value, per_layer)
      row.update({k: result[k] for k in ("block", "params")})
      row[key] = {k: result[k] for k in ("working", "arguments", "compile_s")}
    row["activations"] = activation_memory(layers, width, heads, _SEQ.value)
    row["largest_layer"] = largest_layer(layers, width)
    print(json.dumps(row))
    return
  unknown = [m for m in _MODELS.value if m not in SHAPES]
  if unknown:
    print(f"--models: unknown {unknown}; choose among {list(SHAPES)}", file=sys.stderr)
    sys.exit(2)
  gib = lambda b: b / 2**30
  print(
    f"| model | params | fsdp | one block | slices (args) | Adam moments / {_FSDP.value} "
    "| working, whole gather | working, per-layer | per-device total, whole | "
    "per-device total, per-layer | largest layer | activations | bound |"
  )
  print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
  rows = []
  for name in _MODELS.value:
    row = _measure_in_subprocess(name)
    rows.append(row)
    adam = 2 * row["params"] / _FSDP.value
    totals = {k: row[k]["arguments"] + row[k]["working"] + adam for k in ("whole", "per_layer")}
    # The bound: this device's slices and Adam moments, one layer gathered whole (the
    # largest), and the activations plain AD needs for one example.
    bound = row["per_layer"]["arguments"] + adam + row["largest_layer"] + row["activations"]
    row["bound"] = bound
    print(
      f"| {name} | {row['params'] / 4 / 1e6:.0f}M | {_FSDP.value} | {gib(row['block']):.3f} GiB "
      f"| {gib(row['per_layer']['arguments']):.3f} GiB | {gib(adam):.3f} GiB "
      f"| {gib(row['whole']['working']):.3f} GiB | {gib(row['per_layer']['working']):.3f} GiB "
      f"| {gib(totals['whole']):.2f} GiB | {gib(totals['per_layer']):.3f} GiB "
      f"| {gib(row['largest_layer']):.3f} GiB | {gib(row['activations']):.3f} GiB "
      f"| {gib(bound):.3f} GiB |",
      flush=True,
    )
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  app.run(main)
