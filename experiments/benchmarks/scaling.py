"""Benchmark: DP train-step time and examples/s on 1, 2, 4, 8 devices (data and FSDP meshes).

    python -m experiments.benchmarks.scaling [--devices=1,2,4,8] [--model=minilm]
        [--batch=64] [--seq=64] [--backend=bookkeeping] [--microbatch=16] [--fsdp=1]
        [--weak] [--json=FILE]

Each row runs in a fresh subprocess. On CPU it gets D virtual devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=D``; they share the
machine's cores, so the table measures the cost of sharding rather than a
speed-up); on GPUs/TPUs it uses the first D real devices. The step is the one
``dpjax.main`` runs: each device clips its own block of examples
(``parallel.sharded_grad_fn``), one psum, Gaussian noise once on the global
sum, division by the expected batch size, AdamW; parameters and Adam state are
sharded by the FSDP rules when ``--fsdp`` > 1.

Strong scaling (default): the logical batch ``--batch`` is fixed, so a DP run
means the same thing at every device count; efficiency = speed-up / D. With
``--weak`` the batch is ``--batch`` per device; efficiency = (examples/s at D)
/ (D x examples/s at 1 device). Weights are random with the real common.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys

from absl import app, flags

from experiments.benchmarks import common

_DEVICES = flags.DEFINE_list("devices", ["1", "2", "4", "8"], "Device counts to time.")
_MODEL = flags.DEFINE_enum(
  "model",
  "minilm",
  ("minilm", "bert-base", "tiny"),
  "Model shape (random weights); tiny = 2 layers, hidden 32.",
)
_BATCH = flags.DEFINE_integer("batch", 64, "Logical batch (per device with --weak).")
_SEQ = flags.DEFINE_integer("seq", 64, "Tokens per example.")
_BACKEND = flags.DEFINE_enum(
  "backend", "bookkeeping", ("bookkeeping", "vmap"), "Per-example gradient backend."
)
_MICROBATCH = flags.DEFINE_integer(
  "microbatch", 16, "Examples per microbatch on each device (reduced to divide its rows)."
)
_FSDP = flags.DEFINE_integer("fsdp", 1, "Size of the fsdp mesh axis (must divide each D).")
_WEAK = flags.DEFINE_bool("weak", False, "Batch per device instead of a fixed logical batch.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per row.")
_WARMUP = flags.DEFINE_integer(
  "warmup", 2, "Untimed steps first (compilation included).", lower_bound=1
)
_JSON = flags.DEFINE_string("json", None, "Write the rows to this JSON file.")
_WORKER = flags.DEFINE_integer("worker", None, "Internal: time D devices, print one row.")


def _row(num_devices: int) -> dict:
  """Times the DP step on the first ``num_devices`` devices, in this process."""
  # pylint: disable=import-outside-toplevel
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  from dpjax import parallel, privacy
  from dpjax.models import bert, heads, lora
  from dpjax.privacy.secret import RunSecret
  from dpjax.train import step as step_lib

  devices = jax.devices()[:num_devices]
  if len(devices) < num_devices:
    raise ValueError(f"--devices asks for {num_devices} devices; {len(devices)} present")
  mesh = parallel.make_mesh(None, _FSDP.value, devices)
  shape = {"minilm": common.MINILM, "bert-base": common.BERT_BASE, "tiny": common.TINY}
  cfg = bert.BertConfig(**shape[_MODEL.value])
  model = heads.SequenceClassifier(cfg, 2, "mean")
  batch_size = _BATCH.value * (num_devices if _WEAK.value else 1)
  data = common.make_batch(batch_size, _SEQ.value, cfg.vocab_size)
  params = jax.jit(lambda r: model.init(r, data)["params"])(jax.random.PRNGKey(0))
  params, frozen = lora.partition(
    jax.tree_util.tree_map(np.asarray, params), lora.trainable_mask(params, "all")
  )

  per_device = batch_size // mesh.size
  if per_device * mesh.size != batch_size:
    raise ValueError(f"--batch={batch_size} must be a multiple of the {mesh.size} devices")
  microbatch = math.gcd(_MICROBATCH.value, per_device)  # divides each device's block
  grad_fn = privacy.clipped_grad(
    heads.classification_loss(model, frozen),
    common.CLIP_NORM,
    backend=_BACKEND.value,
    microbatch_size=microbatch,
    has_aux=True,
  )
  tx = optax.chain(
    privacy.gaussian_privatizer(
      common.NOISE_MULTIPLIER, grad_fn.sensitivity, batch_size, RunSecret.fresh().noise_key()
    ),
    optax.adamw(1e-4),
  )
  grad_fn = parallel.sharded_grad_fn(grad_fn, mesh)
  state = step_lib.TrainState(
    np.zeros([], np.int32), params, jax.tree_util.tree_map(np.asarray, tx.init(params))
  )
  state_shardings = parallel.shardings(state, mesh)
  state = parallel.put(state, state_shardings)
  rows = parallel.batch_sharding(mesh)
  batches = (parallel.put(data, {k: rows for k in data}),)
  masks = (parallel.put(np.ones([batch_size], bool), rows),)
  step = jax.jit(
    lambda s, b, m: step_lib.train_step(s, b, m, grad_fn=grad_fn, tx=tx),
    donate_argnums=0,
    out_shardings=(state_shardings, parallel.replicated(mesh)),
  )
  state, metrics, times = common.time_steps(
    step, state, (batches, masks), _WARMUP.value, _STEPS.value
  )
  median = statistics.median(times)
  return {
    "devices": num_devices,
    "mesh": dict(mesh.shape),
    "batch": batch_size,
    "microbatch": microbatch,
    "median_step_seconds": median,
    "examples_per_second": batch_size / median,
    "step_seconds": times,
    "loss": float(jnp.asarray(metrics["loss"])),
    "device_kind": devices[0].device_kind,
    "platform": devices[0].platform,
  }


def _run_isolated(num_devices: int) -> dict:
  argv = [a for a in sys.argv[1:] if not a.startswith(("--worker", "--json", "--devices"))]
  env = dict(os.environ)
  if not _has_accelerator():
    flag = f"--xla_force_host_platform_device_count={num_devices}"
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flag}".strip()
  row = common.run_worker("experiments.benchmarks.scaling", f"--worker={num_devices}", argv, env)
  return row if isinstance(row, dict) else {"devices": num_devices, "error": row}


def _has_accelerator() -> bool:
  import jax  # pylint: disable=import-outside-toplevel

  return jax.default_backend() != "cpu"


_COLUMNS = [
  ("devices", ">7", "", lambda r: r["devices"]),
  ("mesh (data x fsdp)", ">18", "", lambda r: f"{r['mesh']['data']} x {r['mesh']['fsdp']}"),
  ("batch", ">6", "", lambda r: r["batch"]),
  ("step s", ">8", ".3f", lambda r: r["median_step_seconds"]),
  ("ex/s", ">8", ".1f", lambda r: r["examples_per_second"]),
  ("speed-up", ">8", ".2f", lambda r: r.get("speedup")),
  ("efficiency", ">10", ".2f", lambda r: r.get("efficiency")),
]


def main(argv):
  del argv
  if _WORKER.value:
    print("ROW " + json.dumps(_row(_WORKER.value)), flush=True)
    return
  counts = [int(d) for d in _DEVICES.value]
  print(
    f"model={_MODEL.value} batch={_BATCH.value}{' per device' if _WEAK.value else ''} "
    f"seq={_SEQ.value} backend={_BACKEND.value} microbatch={_MICROBATCH.value} "
    f"fsdp={_FSDP.value} steps={_STEPS.value} (median) cpus={os.cpu_count()}",
    flush=True,
  )
  rows = []
  for count in counts:
    rows.append(_run_isolated(count))
    print(f"  done {count} device(s)", flush=True)
  base = next((r for r in rows if r["devices"] == min(counts) and "error" not in r), None)
  for r in rows:
    if base is not None and "error" not in r:
      # Throughput ratio; for strong scaling it is also the step-time ratio.
      r["speedup"] = r["examples_per_second"] / base["examples_per_second"]
      r["efficiency"] = r["speedup"] / (r["devices"] / base["devices"])
  common.print_table(rows, _COLUMNS)
  if rows and "platform" in rows[0] and rows[0]["platform"] == "cpu":
    print(
      "(virtual CPU devices share this machine's cores: the table shows the cost of "
      "sharding, not a speed-up)"
    )
  if _JSON.value:
    with open(_JSON.value, "w", encoding="utf-8") as f:
      json.dump(rows, f, indent=1)
    print(f"wrote {_JSON.value}")


if __name__ == "__main__":
  app.run(main)
