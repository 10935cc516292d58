"""Benchmark: DP train-step throughput and memory, dpjax backends vs non-private (and peers).

    python -m experiments.benchmarks.throughput [--model=minilm] [--batch=32] [--seq=64]
        [--train=all] [--modes=nonprivate,vmap:8,vmap:32,bookkeeping] [--peers] [--json=FILE]
    python -m experiments.benchmarks.throughput \
        --modes=nonprivate,bookkeeping,nonprivate@bf16,bookkeeping@bf16

Each row is one configuration run in a fresh subprocess (so its peak memory is
its own): ``--steps`` timed train steps after ``--warmup`` untimed ones (which
include compilation), on one fixed batch of random token ids with every
position real. A dpjax step is the whole update: clipped gradient sum, Gaussian
noise, division by the expected batch size and AdamW (non-private: mean
gradient and AdamW). Columns: median step seconds, examples per second, peak
memory of the process (max RSS on CPU; the device's peak bytes in use on a
GPU), and the ratios of step time and memory to dpjax's non-private row.

``--peers`` adds Opacus (hooks, ghost clipping) and jax_privacy's clipped
gradient on the same model shape and data (``pip install .[bench]``), BERT-type
models only. Weights are random with the real shapes (speed does not depend on
their values); ``gpt2-small`` / ``gpt2-medium`` are the GPT-2 124M / 355M shapes
with the LM loss, ``roberta-base`` / ``roberta-large`` RoBERTa's shapes with a
classification head (``common.MODELS``). ``--tiny`` shrinks the shape to 2 layers
of width 64 (a check of the machinery, not a measurement).

Each dpjax row also reports its compile seconds and XLA's own account of the
compiled step's memory (``xla_step_memory_mb``: arguments, outputs and
temporaries of the step's buffer assignment), which needs no fresh process.
``experiments.benchmarks.gpu_suite`` runs a grid of these rows on a GPU.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import statistics
import sys
import threading
import time

import psutil
from absl import app, flags

from experiments.benchmarks import common

MODELS = tuple(common.MODELS)
_MODEL = flags.DEFINE_enum("model", "minilm", MODELS, "Model shape (random weights).")
_TINY = flags.DEFINE_bool(
  "tiny", False, "Shrink the model to 2 layers, hidden 64 (machinery checks, e.g. on a CPU)."
)
_BATCH = flags.DEFINE_integer("batch", 32, "Examples per step.")
_SEQ = flags.DEFINE_integer("seq", 64, "Tokens per example.")
_TRAIN = flags.DEFINE_string("train", "all", "What trains: all, lora, head (or a regex).")
_MODES = flags.DEFINE_list(
  "modes",
  ["nonprivate", "vmap:8", "vmap:32", "bookkeeping"],
  "dpjax modes: nonprivate[:mb], vmap:MB, bookkeeping[:MB]; @bf16 after any of them: "
  "bfloat16 compute (model.dtype), float32 weights, norms and noise.",
)
#: Mode suffix -> compute dtype (``bookkeeping@bf16``).
DTYPES = {"": "float32", "bf16": "bfloat16"}
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per row.")
_WARMUP = flags.DEFINE_integer(
  "warmup", 2, "Untimed steps first (compilation included).", lower_bound=1
)
_PEERS = flags.DEFINE_bool("peers", False, "Also run Opacus and jax_privacy if installed.")
_NOISE = flags.DEFINE_bool(
  "noise",
  True,
  "Privatize dpjax's DP rows (secret Gaussian noise on the clipped sum); --nonoise times "
  "their clipped sum + AdamW alone, so the noise's share is the difference of two runs.",
)
_JSON = flags.DEFINE_string("json", None, "Write the rows to this JSON file.")
_WORKER = flags.DEFINE_string("worker", None, "Internal: run one row and print it as JSON.")

CLIP_NORM, NOISE_MULTIPLIER = common.CLIP_NORM, common.NOISE_MULTIPLIER
SST2_TRAIN_SIZE = 67349  # N of the plan (it sets only δ here; the batch is fixed)
make_batch = common.make_batch


def _release_free_heap() -> None:
  """Returns freed heap pages to the OS (glibc ``malloc_trim``), so RSS counts live memory.

  Compilation allocates and frees hundreds of MB; without this the allocator
  keeps them resident and RSS would measure the compiler, not the step.
  """
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):
    pass


class MemoryWatch:
  """Peak resident memory of this process while steps run (sampled every 5 ms).

  ``start()`` is called after the warm-up steps and first hands the heap that
  compilation freed back to the OS, so compilation is not counted;
  ``process_peak_mb`` is the lifetime max RSS including it. On a GPU the
  device's peak bytes in use.
  """

  def __init__(self):
    self._peak = self._start = 0
    self._stop = threading.Event()
    self._thread = None

  def _sample(self):
    process = psutil.Process()
    while not self._stop.is_set():
      self._peak = max(self._peak, process.memory_info().rss)
      time.sleep(0.005)

  def start(self) -> None:
    _release_free_heap()
    self._start = self._peak = psutil.Process().memory_info().rss
    self._thread = threading.Thread(target=self._sample, daemon=True)
    self._thread.start()

  def stop(self) -> dict[str, float]:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    # A torch-only row (a peer) never imported jax: do not start its backend now.
    if "jax" in sys.modules:
      import jax  # pylint: disable=import-outside-toplevel

      device = jax.devices()[0]
      stats = (device.memory_stats() or {}) if device.platform != "cpu" else {}
      if "peak_bytes_in_use" in stats:  # The process's peak on the device (PJRT allocator).
        return {
          "peak_memory_mb": stats["peak_bytes_in_use"] / 2**20,
          "memory_source": f"{device.platform} peak_bytes_in_use",
        }
    return {
      "peak_memory_mb": self._peak / 2**20,
      "memory_source": "process RSS",
      "rss_before_steps_mb": self._start / 2**20,
      "process_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


WATCH = MemoryWatch()


def model_shape() -> tuple[str, dict]:
  """The family and architecture of ``--model`` (shrunk with ``--tiny``)."""
  family, shape = common.MODELS[_MODEL.value]
  return family, common.tiny_shape(_MODEL.value) if _TINY.value else shape


def split_precision(mode: str) -> tuple[str, str]:
  """``"bookkeeping@bf16"`` -> ``("bookkeeping", "bfloat16")``; no suffix is float32."""
  base_mode, _, precision = mode.partition("@")
  if precision not in DTYPES:
    raise ValueError(f"mode {mode!r}: the suffix after @ must be one of {sorted(DTYPES)}")
  return base_mode, DTYPES[precision]


def hardware() -> dict:
  """The JAX device this process runs on, and the library versions."""
  # pylint: disable=import-outside-toplevel
  import jax
  import jaxlib

  device = jax.devices()[0]
  info = {
    "platform": device.platform,
    "device_kind": device.device_kind,
    "device_count": jax.device_count(),
    "jax": jax.__version__,
    "jaxlib": jaxlib.__version__,
  }
  try:  # e.g. "cuda 12080" on a GPU (the CUDA the plugin was built against)
    info["platform_version"] = str(device.client.platform_version)
  except Exception:  # pylint: disable=broad-except  # Not every backend reports one.
    pass
  stats = device.memory_stats() or {}
  if "bytes_limit" in stats:
    info["memory_limit_gb"] = round(stats["bytes_limit"] / 2**30, 1)
  return info


def _memory_analysis(compiled) -> dict:
  """XLA's buffer assignment of the compiled step: arguments + outputs - donated + temporaries.

  (Not ``peak_memory_in_bytes``: on jaxlib 0.10's CPU backend it is below the
  temporaries alone.)
  """
  try:
    stats = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  # Not every backend implements it.
    return {}
  if stats is None:
    return {}
  total = (
    stats.argument_size_in_bytes
    + stats.output_size_in_bytes
    - stats.alias_size_in_bytes
    + stats.temp_size_in_bytes
  )
  return {"xla_step_memory_mb": total / 2**20, "xla_temp_mb": stats.temp_size_in_bytes / 2**20}


def _dpjax_row(mode: str) -> dict:
  """Times one dpjax configuration in this process."""
  # pylint: disable=import-outside-toplevel
  import jax
  import jax.numpy as jnp
  import optax

  from dpjax import privacy
  from dpjax.models import bert, gpt2, heads, layers, lora
  from dpjax.privacy.secret import RunSecret
  from dpjax.train import step as step_lib

  base_mode, dtype = split_precision(mode)
  name, _, micro = base_mode.partition(":")
  micro = int(micro) if micro else None
  batch_size, seq = _BATCH.value, _SEQ.value
  family, shape = model_shape()
  lora_cfg = None
  if _TRAIN.value == "lora":
    lora_cfg = layers.LoraConfig(8, 16.0, lora.LORA_TARGETS[family])
  if family == "gpt2":
    cfg = gpt2.GPT2Config(**shape, dtype=dtype)
    model = gpt2.GPT2LMHeadModel(cfg, lora_cfg)
    data = make_batch(batch_size, seq, cfg.vocab_size)
    data = {k: data[k] for k in ("input_ids", "attention_mask")}
    params = jax.jit(lambda r: model.init(r, data["input_ids"], data["attention_mask"])["params"])(
      jax.random.PRNGKey(0)
    )
    make_loss = heads.lm_loss
  else:
    cfg = bert.BertConfig(**shape, dtype=dtype)
    model = heads.SequenceClassifier(cfg, 2, "cls", lora_cfg)
    data = make_batch(batch_size, seq, cfg.vocab_size)
    params = jax.jit(lambda r: model.init(r, data)["params"])(jax.random.PRNGKey(0))
    make_loss = heads.classification_loss
  trainable, frozen = lora.partition(params, lora.trainable_mask(params, _TRAIN.value))
  loss_fn = make_loss(model, frozen)
  adam = optax.adamw(1e-4)
  # The loop's own path: the mechanism hands out the gradient function and the privatizer.
  spec = privacy.MechanismSpec(
    private=name != "nonprivate",
    clip=privacy.FlatClip(CLIP_NORM),
    noise_multiplier=NOISE_MULTIPLIER,
    backend="auto" if name == "nonprivate" else name,
    microbatch_size=micro,
  )
  mechanism = privacy.make_mechanism(
    spec, dataset_size=SST2_TRAIN_SIZE, expected_batch_size=batch_size, steps=1
  ).keyed(RunSecret.fresh())
  grad_fn = mechanism.grad_fn(loss_fn)
  tx = optax.chain(mechanism.privatizer(), adam) if _NOISE.value else adam
  state = step_lib.TrainState(jnp.zeros([], jnp.int32), trainable, tx.init(trainable))
  batches = ({k: jnp.asarray(v) for k, v in data.items()},)
  masks = (jnp.ones([batch_size], bool),)
  # Compiled ahead of the steps, so its seconds and XLA's memory account are reported.
  start = time.perf_counter()
  step = (
    jax.jit(
      lambda s, b, m: step_lib.train_step(s, b, m, grad_fn=grad_fn, tx=tx),
      donate_argnums=0,
    )
    .lower(state, batches, masks)
    .compile()
  )
  compile_seconds = time.perf_counter() - start
  state, metrics, _ = common.time_steps(step, state, (batches, masks), _WARMUP.value, 0)
  WATCH.start()
  state, metrics, times = common.time_steps(step, state, (batches, masks), 0, _STEPS.value)
  median = statistics.median(times)
  return {
    "system": "dpjax",
    "mode": mode,
    "median_step_seconds": median,
    "examples_per_second": batch_size / median,
    "step_seconds": times,
    "compile_seconds": compile_seconds,
    **_memory_analysis(step),
    "device": jax.devices()[0].device_kind,
    "hardware": hardware(),
    "loss": float(metrics["loss"]),
  }


def _peer_row(mode: str) -> dict:
  from experiments.benchmarks import peers  # pylint: disable=import-outside-toplevel

  system, _, peer_mode = mode.partition("/")
  peer_mode, dtype = split_precision(peer_mode)
  family, shape = model_shape()
  if family != "bert":
    raise ValueError(f"the peers run BERT-type models only, not {_MODEL.value}")
  data = make_batch(_BATCH.value, _SEQ.value, shape["vocab_size"])
  row = peers.run_peer(
    system,
    peer_mode,
    batch=data,
    config=shape,
    dtype=dtype,
    steps=_STEPS.value,
    warmup=_WARMUP.value,
    clip_norm=CLIP_NORM,
    noise_multiplier=NOISE_MULTIPLIER,
    seed=0,
    on_timed_start=WATCH.start,
  )
  return {"system": system, "mode": mode.partition("/")[2], **row}


def _worker(mode: str) -> None:
  row = _peer_row(mode) if "/" in mode else _dpjax_row(mode)
  for key, value in WATCH.stop().items():  # A peer may have measured its own device memory.
    row.setdefault(key, value)
  print("ROW " + json.dumps(row), flush=True)


def _run_isolated(mode: str) -> dict:
  """Runs one row in a fresh Python process and parses its result."""
  argv = [a for a in sys.argv[1:] if not a.startswith(("--worker", "--json", "--peers"))]
  row = common.run_worker("experiments.benchmarks.throughput", f"--worker={mode}", argv)
  if isinstance(row, dict):
    return row
  system, _, rest = mode.partition("/") if "/" in mode else ("dpjax", "", mode)
  return {"system": system, "mode": rest, "error": row}


_COLUMNS = [
  ("system", "<12", "", lambda r: r["system"]),
  ("mode", "<18", "", lambda r: r["mode"]),
  ("step s", ">8", ".3f", lambda r: r["median_step_seconds"]),
  ("ex/s", ">8", ".1f", lambda r: r["examples_per_second"]),
  ("peak MB", ">9", ".0f", lambda r: r["peak_memory_mb"]),
  ("time x", ">7", ".2f", lambda r: r.get("ratio_vs_nonprivate")),
  ("mem x", ">6", ".2f", lambda r: r.get("memory_ratio_vs_nonprivate")),
]


def main(argv):
  del argv
  if _WORKER.value:
    _worker(_WORKER.value)
    return
  modes = list(_MODES.value)
  if _PEERS.value:
    if common.MODELS[_MODEL.value][0] != "bert":
      print(f"--peers compares BERT-type models only; skipping peers for {_MODEL.value}")
    else:
      from experiments.benchmarks import peers  # pylint: disable=import-outside-toplevel

      for system, peer_mode in peers.PEERS:
        reason = peers.available(system)
        if reason:
          print(f"skipping {system}: {reason}")
        else:
          modes.append(f"{system}/{peer_mode}")
  print(
    f"model={_MODEL.value}{' (tiny)' if _TINY.value else ''} batch={_BATCH.value} "
    f"seq={_SEQ.value} train={_TRAIN.value} noise={_NOISE.value} "
    f"steps={_STEPS.value} (median) warmup={_WARMUP.value} "
    f"cpus={os.cpu_count()}",
    flush=True,
  )
  rows = []
  for mode in modes:
    rows.append(_run_isolated(mode))
    print(f"  done {mode}", flush=True)
  base = next(
    (
      r
      for r in rows
      if r["system"] == "dpjax" and r["mode"].startswith("nonprivate") and "error" not in r
    ),
    None,
  )
  for r in rows:
    if base is not None and "error" not in r:
      r["ratio_vs_nonprivate"] = r["median_step_seconds"] / base["median_step_seconds"]
      r["memory_ratio_vs_nonprivate"] = r["peak_memory_mb"] / base["peak_memory_mb"]
    r.update(
      model=_MODEL.value, batch=_BATCH.value, seq=_SEQ.value, train=_TRAIN.value, noise=_NOISE.value
    )
  common.print_table(rows, _COLUMNS, key_columns=2)
  if _JSON.value:
    with open(_JSON.value, "w", encoding="utf-8") as f:
      json.dump(rows, f, indent=1)
    print(f"wrote {_JSON.value}")


if __name__ == "__main__":
  app.run(main)
