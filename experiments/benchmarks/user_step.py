"""Benchmark: the cost of per-user clipping (ULS) against per-example clipping, same rows.

    python -m experiments.benchmarks.user_step [--batch=32] [--seq=64] [--ks=1,2,4,8]

One DP train step (clipped sum -> Gaussian noise once -> AdamW) of a MiniLM-shaped
encoder (random weights; --train=all or lora) on a batch of --batch rows of --seq
tokens. k = 1 is example-level clipping; k > 1 groups every k consecutive rows as
one user whose summed gradient is clipped as a whole (``clipped_grad(unit_size=k)``).
With the book-keeping backend a user's norm is a ghost norm over the union of its
k·T tokens (or a per-user [m, n] gradient where that is cheaper), so the cost grows
with k only in the norm terms. All modes are compiled first, then timed in
interleaved rounds (the machine is shared: the ratios are what to read).
"""

from __future__ import annotations

import statistics
import time

from absl import app, flags

from experiments.benchmarks import common

_BATCH = flags.DEFINE_integer("batch", 32, "Rows per step (the same for every k).")
_SEQ = flags.DEFINE_integer("seq", 64, "Tokens per row.")
_KS = flags.DEFINE_list("ks", ["1", "2", "4", "8"], "Rows per clipping unit (1: examples).")
_BACKEND = flags.DEFINE_enum("backend", "bookkeeping", ["bookkeeping", "vmap"], "Backend.")
_TRAIN = flags.DEFINE_enum("train", "all", ["all", "lora"], "Trained parameters.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Timed rounds (one step of every mode per round).")
_MICRO = flags.DEFINE_integer("microbatch", 0, "Rows per scan iteration (0: whole batch).")


def main(argv):
  del argv
  # pylint: disable=import-outside-toplevel
  import jax
  import jax.numpy as jnp
  import optax

  from dpjax import privacy
  from dpjax.models import bert, heads, layers, lora
  from dpjax.privacy.secret import RunSecret
  from dpjax.train import step as step_lib

  cfg = bert.BertConfig(**common.MINILM)
  lora_cfg = (
    layers.LoraConfig(8, 16.0, lora.LORA_TARGETS["bert"]) if _TRAIN.value == "lora" else None
  )
  model = heads.SequenceClassifier(cfg, 2, "cls", lora_cfg)
  rows = _BATCH.value
  data = common.make_batch(rows, _SEQ.value, cfg.vocab_size)
  params = jax.jit(lambda r: model.init(r, data)["params"])(jax.random.PRNGKey(0))
  trainable, frozen = lora.partition(params, lora.trainable_mask(params, _TRAIN.value))
  loss_fn = heads.classification_loss(model, frozen)
  batches = ({k: jnp.asarray(v) for k, v in data.items()},)
  masks = (jnp.ones([rows], bool),)
  key = RunSecret.fresh().noise_key()
  steps, states = {}, {}
  for k in (int(v) for v in _KS.value):
    grad_fn = privacy.clipped_grad(
      loss_fn,
      common.CLIP_NORM,
      backend=_BACKEND.value,
      microbatch_size=_MICRO.value or None,
      has_aux=True,
      unit_size=k,
    )
    tx = optax.chain(
      privacy.gaussian_privatizer(common.NOISE_MULTIPLIER, common.CLIP_NORM, rows / k, key),
      optax.adamw(1e-4),
    )
    fn = jax.jit(lambda s, b, m, g=grad_fn, t=tx: step_lib.train_step(s, b, m, grad_fn=g, tx=t))
    state = step_lib.TrainState(jnp.zeros([], jnp.int32), trainable, tx.init(trainable))
    start = time.perf_counter()
    state, _, _ = common.time_steps(fn, state, (batches, masks), 2, 0)
    print(f"k={k}: compiled and warmed up in {time.perf_counter() - start:.1f} s", flush=True)
    steps[k], states[k] = fn, state
  times = {k: [] for k in steps}
  for _ in range(_ROUNDS.value):
    for k, fn in steps.items():
      states[k], _, t = common.time_steps(fn, states[k], (batches, masks), 0, 1)
      times[k] += t
  base = statistics.median(times[min(times)])
  print(
    f"\n{jax.devices()[0].device_kind}, MiniLM shape, train={_TRAIN.value}, "
    f"backend={_BACKEND.value}, {rows} rows x {_SEQ.value} tokens, median of "
    f"{_ROUNDS.value} interleaved rounds"
  )
  table = [
    {
      "k": k,
      "units": rows // k,
      "median": statistics.median(t),
      "ratio": statistics.median(t) / base,
    }
    for k, t in times.items()
  ]
  common.print_table(
    table,
    [
      ("rows/unit k", ">11", "d", lambda r: r["k"]),
      ("units", ">6", "d", lambda r: r["units"]),
      ("step s", ">8", ".3f", lambda r: r["median"]),
      ("vs k=1", ">7", ".2f", lambda r: r["ratio"]),
    ],
  )


if __name__ == "__main__":
  app.run(main)
