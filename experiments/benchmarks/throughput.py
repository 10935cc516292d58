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
their values); ``gpt2-small`` is the GPT-2 124M shape with the LM loss.
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

MODELS = ("minilm", "bert-base", "gpt2-small")
_MODEL = flags.DEFINE_enum("model", "minilm", MODELS, "Model shape (random weights).")
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
_JSON = flags.DEFINE_string("json", None, "Write the rows to this JSON file.")
_WORKER = flags.DEFINE_string("worker", None, "Internal: run one row and print it as JSON.")

CLIP_NORM, NOISE_MULTIPLIER = common.CLIP_NORM, common.NOISE_MULTIPLIER
SST2_TRAIN_SIZE = 67349  # N of the plan (it sets only δ here; the batch is fixed)
MINILM, BERT_BASE, make_batch = common.MINILM, common.BERT_BASE, common.make_batch


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
    import jax  # pylint: disable=import-outside-toplevel

    device = jax.devices()[0]
    if device.platform != "cpu":
      stats = device.memory_stats() or {}
      return {"peak_memory_mb": stats.get("peak_bytes_in_use", 0) / 2**20}
    return {
      "peak_memory_mb": self._peak / 2**20,
      "rss_before_steps_mb": self._start / 2**20,
      "process_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


WATCH = MemoryWatch()


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

  base_mode, _, precision = mode.partition("@")
  if precision not in DTYPES:
    raise ValueError(f"mode {mode!r}: the suffix after @ must be one of {sorted(DTYPES)}")
  dtype = DTYPES[precision]
  name, _, micro = base_mode.partition(":")
  micro = int(micro) if micro else None
  batch_size, seq = _BATCH.value, _SEQ.value
  lora_cfg = None
  if _TRAIN.value == "lora":
    lora_cfg = layers.LoraConfig(
      8, 16.0, lora.LORA_TARGETS["gpt2" if _MODEL.value == "gpt2-small" else "bert"]
    )
  if _MODEL.value == "gpt2-small":
    cfg = gpt2.GPT2Config(dtype=dtype)
    model = gpt2.GPT2LMHeadModel(cfg, lora_cfg)
    data = make_batch(batch_size, seq, cfg.vocab_size)
    data = {k: data[k] for k in ("input_ids", "attention_mask")}
    params = jax.jit(lambda r: model.init(r, data["input_ids"], data["attention_mask"])["params"])(
      jax.random.PRNGKey(0)
    )
    make_loss = heads.lm_loss
  else:
    shape = MINILM if _MODEL.value == "minilm" else BERT_BASE
    cfg = bert.BertConfig(**shape, dtype=dtype)
    model = heads.SequenceClassifier(cfg, 2, "cls", lora_cfg)
    data = make_batch(batch_size, seq, cfg.vocab_size)
    params = jax.jit(lambda r: model.init(r, data)["params"])(jax.random.PRNGKey(0))
  if _MODEL.value != "gpt2-small":
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
  tx = optax.chain(mechanism.privatizer(), adam)
  state = step_lib.TrainState(jnp.zeros([], jnp.int32), trainable, tx.init(trainable))
  batches = ({k: jnp.asarray(v) for k, v in data.items()},)
  masks = (jnp.ones([batch_size], bool),)
  step = jax.jit(
    lambda s, b, m: step_lib.train_step(s, b, m, grad_fn=grad_fn, tx=tx),
    donate_argnums=0,
  )
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
    "device": jax.devices()[0].device_kind,
    "loss": float(metrics["loss"]),
  }


def _peer_row(mode: str) -> dict:
  from experiments.benchmarks import peers  # pylint: disable=import-outside-toplevel

  system, _, peer_mode = mode.partition("/")
  shape = MINILM if _MODEL.value == "minilm" else BERT_BASE
  data = make_batch(_BATCH.value, _SEQ.value, shape["vocab_size"])
  row = peers.run_peer(
    system,
    peer_mode,
    batch=data,
    config=shape,
    steps=_STEPS.value,
    warmup=_WARMUP.value,
    clip_norm=CLIP_NORM,
    noise_multiplier=NOISE_MULTIPLIER,
    seed=0,
    on_timed_start=WATCH.start,
  )
  return {"system": system, "mode": peer_mode, **row}


def _worker(mode: str) -> None:
  row = _peer_row(mode) if "/" in mode else _dpjax_row(mode)
  row.update(WATCH.stop())
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
    if _MODEL.value == "gpt2-small":
      print("--peers compares BERT-type models only; skipping peers for gpt2-small")
    else:
      from experiments.benchmarks import peers  # pylint: disable=import-outside-toplevel

      for system, peer_mode in peers.PEERS:
        reason = peers.available(system)
        if reason:
          print(f"skipping {system}: {reason}")
        else:
          modes.append(f"{system}/{peer_mode}")
  print(
    f"model={_MODEL.value} batch={_BATCH.value} seq={_SEQ.value} train={_TRAIN.value} "
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
    r.update(model=_MODEL.value, batch=_BATCH.value, seq=_SEQ.value, train=_TRAIN.value)
  common.print_table(rows, _COLUMNS, key_columns=2)
  if _JSON.value:
    with open(_JSON.value, "w", encoding="utf-8") as f:
      json.dump(rows, f, indent=1)
    print(f"wrote {_JSON.value}")


if __name__ == "__main__":
  app.run(main)
