"""``train_and_evaluate(config, workdir)``: DP fine-tuning from a config, resumable.

The loop, as in the algorithm box of DP-SGD:

    plan: N, B, steps, δ -> σ (calibrated for the target ε)
    restore the latest checkpoint (state + ledger) if the workdir has one
    for step t until the plan or the privacy budget ends:
        indices, mask = PoissonSampler(seed).sample(t)          # rate q = B/N
        state = train_step(state, batch(indices), mask)         # clip, sum, noise once, / B
        ledger = ledger.record(one step of (q, σ))
        every k steps: metrics, eval on the held-out split, checkpoint (state + ledger)
    write summary.json with ε from the ledger, δ, σ, accuracy and a hash of the params
"""

from __future__ import annotations

import functools
import hashlib
import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import optax

from dpjax import parallel, privacy
from dpjax.models import heads, lora
from dpjax.train import builders, checkpoint, config as config_lib, metrics as metrics_lib, step as step_lib

PyTree = Any


def params_sha256(params: PyTree) -> str:
  """sha256 of the parameters' bytes in tree order: equal hashes = identical models."""
  digest = hashlib.sha256()
  for leaf in jax.tree_util.tree_leaves(params):
    digest.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
  return digest.hexdigest()


def _prepare_workdir(workdir: Path, c: ml_collections.ConfigDict) -> None:
  """Checks the workdir is writable and holds no run of a different config.

  Every process checks; only process 0 writes ``config.json``.
  """
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / f".write_test_{jax.process_index()}"
    probe.write_text("")
    probe.unlink()
  except OSError as err:
    raise config_lib.ConfigError(f"workdir {workdir} is not writable ({err.strerror})") from None
  saved = workdir / "config.json"
  new = json.loads(c.to_json())
  if saved.exists():
    changed = config_lib.differences(json.loads(saved.read_text()), new)
    if changed and c.resume != "allow_changes":
      raise config_lib.ConfigError(
          f"workdir {workdir} holds a run with a different config ({', '.join(changed[:6])}); "
          "use a new workdir, or --config.resume=allow_changes to continue it with this config")
  if not parallel.is_main_process():
    return
  tmp = saved.with_suffix(".tmp")
  tmp.write_text(json.dumps(new, indent=2, sort_keys=True))
  tmp.replace(saved)


class _StopFlag:
  """Set by SIGTERM (preemption): the loop checkpoints after the current step and returns."""

  def __init__(self):
    self.event = threading.Event()
    self.previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self.previous = signal.signal(signal.SIGTERM, lambda *_: self.event.set())
    return self

  def __exit__(self, *exc):
    if self.previous is not None:
      signal.signal(signal.SIGTERM, self.previous)


def evaluate(params: PyTree, model, split: builders.Split, batch_size: int) -> dict[str, float]:
  """Accuracy and mean loss over a split, in fixed-size padded batches.

  Examples are visited shortest first, so each batch is padded to the bucket of
  its own longest example rather than of the split's (the sums do not depend on
  the order).
  """
  if len(split) == 0:
    return {"accuracy": float("nan"), "loss": float("nan"), "count": 0}
  fn = jax.jit(functools.partial(step_lib.eval_step, model=model))
  totals = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
  by_length = np.argsort(split.encoded.lengths[split.indices], kind="stable")
  for start in range(0, len(split), batch_size):
    positions = by_length[start:start + batch_size]
    mask = np.zeros(batch_size, bool)
    mask[:len(positions)] = True
    # Padding rows repeat the batch's first (shortest) example: they never lengthen it.
    padded = np.concatenate([positions, np.full(batch_size - len(positions), positions[0])])
    out = fn(params, split.batch(padded), mask)
    for key in totals:
      totals[key] += float(out[key])
  return {"accuracy": totals["correct"] / totals["count"],
          "loss": totals["loss_sum"] / totals["count"], "count": int(totals["count"])}


def _progress(step: int, total: int, row: dict[str, Any]) -> None:
  eps = row.get("epsilon")
  eps_text = f" eps {eps:.3f}" if isinstance(eps, float) else ""
  print(f"step {step}/{total} loss {row['loss']:.4f} acc {row['accuracy']:.3f}{eps_text} "
        f"{row['examples_per_second']:.1f} ex/s", flush=True)


def train_and_evaluate(c: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
  """Trains, evaluates and checkpoints; returns (and writes) the run summary.

  Runs on every device of every process (``jax.distributed`` already
  initialized for several processes); the mesh comes from ``config.parallel``.
  Only process 0 writes metrics, ``summary.json`` and progress lines.
  """
  start_time = time.time()
  config_lib.validate(c)
  try:
    mesh = parallel.make_mesh(c.parallel.data, c.parallel.fsdp)
  except parallel.ParallelError as err:
    raise config_lib.ConfigError(str(err)) from None
  rules = parallel.parse_rules(tuple(c.parallel.rules))
  shardings_of = lambda tree: parallel.shardings(tree, mesh, rules, c.parallel.fsdp_min_size)
  main = parallel.is_main_process()
  say = (lambda text: print(text, flush=True)) if main else (lambda text: None)
  if "://" in str(workdir):
    raise config_lib.ConfigError(
        f"workdir must be a directory path, not a URL (got {str(workdir)!r}); mount the "
        "bucket (e.g. with GCS FUSE) and pass the mount point")
  workdir = Path(workdir).resolve()
  _prepare_workdir(workdir, c)

  # Model and data.
  backbone, backbone_params, head_params, tokenizer = builders.backbone_for(c)
  cache = Path(c.data.cache_dir) if c.data.cache_dir else workdir / "token_cache"
  train = builders.load_split(c.data.train, c.data.train_limit, c.seed, tokenizer, c, cache)
  evals = builders.load_split(c.data.eval, c.data.eval_limit, c.seed + 1, tokenizer, c, cache)
  model = builders.task_model(c, backbone, train.encoded.label_word_ids)
  trainable, frozen_host = builders.init_params(c, model, train.batch(np.arange(1)),
                                                backbone_params, head_params)
  frozen_host = jax.tree_util.tree_map(np.asarray, frozen_host)
  trainable = jax.tree_util.tree_map(np.asarray, trainable)
  frozen = parallel.put(frozen_host, shardings_of(frozen_host))  # FSDP rules apply to it too

  # The privacy plan and the DP pieces, all from one clip rule.
  plan = builders.plan_privacy(c, len(train))
  loss_fn = heads.classification_loss(model, frozen)
  microbatch = c.dp.microbatch_size
  if c.dp.enabled:
    grad_fn = privacy.clipped_grad(loss_fn, builders.clip_rule(c), c.dp.backend, microbatch,
                                   has_aux=True)
    tx = builders.transform(c, plan, grad_fn.sensitivity)
  else:
    grad_fn = step_lib.nonprivate_grad(loss_fn, microbatch)
    tx = builders.transform(c, plan, 1.0)
  # Clipping where the examples live, one psum; the privatizer in tx then noises the global sum.
  grad_fn = parallel.sharded_grad_fn(grad_fn, mesh)
  sampler = privacy.PoissonSampler(len(train), plan.expected_batch_size, seed=c.seed)
  grouped = builders.GroupedBatches(train, plan.sampling_prob, microbatch,
                                    parallel.batch_size_multiple(mesh))
  rows_sharding = parallel.batch_sharding(mesh)

  # Restore (state + ledger together) or start.
  state = step_lib.TrainState(np.zeros([], np.int32), trainable,
                              jax.tree_util.tree_map(np.asarray, tx.init(trainable)))
  state_shardings = shardings_of(state)
  ledger = privacy.PrivacyLedger(accountant=plan.accountant)
  ckpt = checkpoint.Checkpoints(workdir, c.train.keep_checkpoints)
  restored = ckpt.restore_latest(jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=s),
      state, state_shardings))
  examples_seen, trained_seconds = 0, 0.0
  if restored is not None:
    state, meta = restored
    ledger = privacy.PrivacyLedger.from_dict(meta["ledger"])
    examples_seen, trained_seconds = meta["examples_seen"], meta["train_seconds"]
    say(f"resumed from step {meta['step']} (ledger: {ledger.steps} steps)")
  else:
    state = parallel.put(state, state_shardings)
  start_step = int(state.step)
  segment = sampler.segment(plan.noise_multiplier)
  end_step = plan.steps
  stopped_by_budget = False
  if c.dp.enabled:
    allowed = builders.steps_within_budget(ledger, segment, plan.target_epsilon, plan.delta,
                                           plan.steps - start_step)
    if allowed == 0 and plan.steps > start_step:
      raise config_lib.ConfigError(
          f"target epsilon {plan.target_epsilon:g} is already spent "
          f"(ledger epsilon {ledger.epsilon(plan.delta):.4f} after {ledger.steps} steps)")
    stopped_by_budget = start_step + allowed < plan.steps
    end_step = start_step + allowed
  say(f"plan: N={plan.dataset_size} B={plan.expected_batch_size:g} q={plan.sampling_prob:.5f} "
      f"steps={plan.steps} sigma={plan.noise_multiplier:.4f} delta={plan.delta:.3g} "
      f"target_eps={plan.target_epsilon:g} trainable={lora.count(trainable):,} params "
      f"devices={mesh.size} (data={mesh.shape['data']}, fsdp={mesh.shape['fsdp']}) "
      f"processes={jax.process_count()}")

  jit_step = jax.jit(functools.partial(
      step_lib.train_step, grad_fn=grad_fn, tx=tx, mean_of_sum=not c.dp.enabled,
      dropout_seed=c.seed + 1 if c.model.dropout else None), donate_argnums=0,
      out_shardings=(state_shardings, parallel.replicated(mesh)))
  writer = metrics_lib.MetricsWriter(workdir, start_step) if main else None
  write = writer.write if main else (lambda *args: None)
  # Evaluation runs on each process's first device from host copies of the parameters.
  full_params = lambda s: lora.combine(parallel.to_host(s.params), frozen_host)

  def place(sample: privacy.SampledBatch):
    placed = [parallel.global_rows(functools.partial(grouped.load, length=length), positions,
                                   mask, rows_sharding)
              for positions, mask, length in grouped.plan(sample)]
    return tuple(b for b, _ in placed), tuple(m for _, m in placed)

  def save(step: int) -> None:
    ckpt.save(step, state, {
        "step": step, "ledger": ledger.to_dict(), "config": json.loads(c.to_json()),
        "noise_multiplier": plan.noise_multiplier, "examples_seen": examples_seen,
        "train_seconds": trained_seconds})

  preempted = False
  window_examples, window_start = 0, time.time()
  with _StopFlag() as stop:
    for step in range(start_step, end_step):
      sample = sampler.sample(step)
      batches, masks = place(sample)
      tick = time.time()
      state, row = jit_step(state, batches, masks)
      row = jax.device_get(row)
      trained_seconds += time.time() - tick
      if int(row["nonfinite"]):
        raise FloatingPointError(f"{int(row['nonfinite'])} example(s) had a non-finite loss at "
                                 f"step {step}; lower config.train.learning_rate")
      if c.dp.enabled:
        ledger = ledger.record(segment)
      examples_seen += sample.size
      window_examples += sample.size
      done = step + 1
      if done % c.train.log_every_steps == 0 or done == end_step:
        row = {k: float(v) for k, v in row.items()}
        row["examples_per_second"] = window_examples / max(time.time() - window_start, 1e-9)
        if c.dp.enabled:
          row["epsilon"] = ledger.epsilon(plan.delta)
        window_examples, window_start = 0, time.time()
        write(done, "train", row)
        if main:
          _progress(done, end_step, row)
      if c.train.eval_every_steps and done % c.train.eval_every_steps == 0 and done < end_step:
        result = evaluate(full_params(state), model, evals, c.train.eval_batch_size)
        result["epsilon"] = ledger.epsilon(plan.delta) if c.dp.enabled else float("inf")
        write(done, "eval", result)
        say(f"eval step {done}: {json.dumps(result)}")
      # Every process must stop at the same step (the save is collective).
      stopping = parallel.any_process(stop.event.is_set())
      if stopping or (c.train.checkpoint_every_steps
                      and done % c.train.checkpoint_every_steps == 0):
        save(done)
      if stopping:
        preempted = True
        say(f"SIGTERM: saved checkpoint at step {done}; exiting")
        break

  final_step = int(state.step)
  if not preempted and final_step not in ckpt.steps():
    save(final_step)
  ckpt.close()
  params = full_params(state)
  result = evaluate(params, model, evals, c.train.eval_batch_size)
  epsilon = ledger.epsilon(plan.delta) if c.dp.enabled else float("inf")
  write(final_step, "eval", {**result, "epsilon": epsilon})
  if writer is not None:
    writer.close()
  summary = {
      "epsilon": epsilon, "delta": plan.delta, "noise_multiplier": plan.noise_multiplier,
      "sampling_prob": plan.sampling_prob, "steps": final_step, "planned_steps": plan.steps,
      "accountant": plan.accountant if c.dp.enabled else None, "dp": bool(c.dp.enabled),
      "target_epsilon": plan.target_epsilon, "dataset_size": plan.dataset_size,
      "expected_batch_size": plan.expected_batch_size,
      "clip": c.dp.clip, "clip_norm": c.dp.clip_norm, "neighboring_relation": "add_or_remove_one",
      "eval": result, "examples_seen": examples_seen,
      "examples_per_second": examples_seen / max(trained_seconds, 1e-9),
      "wall_seconds": time.time() - start_time,
      "params_sha256": params_sha256(params),
      "params_global_norm": float(optax.tree.norm(params)),
      "stopped_by_budget": stopped_by_budget, "preempted": preempted,
      "model": c.model.name, "workdir": str(workdir),
      "devices": mesh.size, "mesh": dict(mesh.shape), "processes": jax.process_count(),
  }
  summary = {k: (v if not isinstance(v, float) or np.isfinite(v) else str(v))
             for k, v in summary.items()}
  if main:
    tmp = workdir / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(workdir / "summary.json")
  parallel.sync("summary written")
  return summary
