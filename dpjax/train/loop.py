"""``train_and_evaluate(config, workdir)``: DP fine-tuning from a config, resumable.

The loop, as in the algorithm box of DP-SGD:

    plan: N, B, steps, δ -> σ (calibrated for the target ε)
    restore the latest checkpoint (state + ledger) if the workdir has one
    for step t until the plan or the privacy budget ends:
        indices, mask = PoissonSampler(secret key).sample(t)    # rate q = B/N
        state = train_step(state, batch(indices), mask)         # clip, sum, noise once, / B
        ledger = ledger.record(one step of (q, σ))
        every k steps: metrics, eval on the held-out split, checkpoint (state + ledger)
    write summary.json with ε from the ledger, δ, σ, accuracy and a hash of the params
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import hmac
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
from absl import logging

from dpjax import parallel, privacy
from dpjax.models import heads, lora
from dpjax.privacy import noise as noise_lib
from dpjax.privacy.secret import RunSecret
from dpjax.train import builders, checkpoint
from dpjax.train import config as config_lib
from dpjax.train import journal as privacy_journal
from dpjax.train import metrics as metrics_lib
from dpjax.train import step as step_lib

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
        "use a new workdir, or --config.resume=allow_changes to continue it with this config"
      )
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
    positions = by_length[start : start + batch_size]
    mask = np.zeros(batch_size, bool)
    mask[: len(positions)] = True
    # Padding rows repeat the batch's first (shortest) example: they never lengthen it.
    padded = np.concatenate([positions, np.full(batch_size - len(positions), positions[0])])
    out = fn(params, split.batch(padded), mask)
    for key in totals:
      totals[key] += float(out[key])
  return {
    "accuracy": totals["correct"] / totals["count"],
    "loss": totals["loss_sum"] / totals["count"],
    "count": int(totals["count"]),
  }


def _progress(step: int, total: int, epsilon: float, private: dict[str, float] | None) -> None:
  """A progress line: public facts; the private batch statistics only when asked, labelled."""
  text = (
    f"step {step}/{total} eps {epsilon:.3f}" if np.isfinite(epsilon) else f"step {step}/{total}"
  )
  if private is not None:
    text += (
      f" | private, not covered by (eps, delta): loss {private['loss']:.4f} "
      f"acc {private['accuracy']:.3f} {private['examples_per_second']:.1f} ex/s"
    )
  print(text, flush=True)


def _new_secret(c: ml_collections.ConfigDict) -> RunSecret:
  """A fresh secret from OS entropy (process 0's, on every process), or the insecure fixed one."""
  if c.dp.insecure_fixed_noise_seed is not None:
    return RunSecret.insecure_fixed(c.dp.insecure_fixed_noise_seed)
  return RunSecret(parallel.broadcast_bytes(RunSecret.fresh().value))


# Keys that change what a run writes or when, but not what a step computes.
_BOOKKEEPING_KEYS = (
  "resume",
  "data.eval",
  "data.eval_limit",
  "data.cache_dir",
  "train.eval_every_steps",
  "train.eval_batch_size",
  "train.log_every_steps",
  "train.checkpoint_every_steps",
  "train.keep_checkpoints",
  "train.private_metrics",
)


def _fingerprint(run_secret: RunSecret, c: ml_collections.ConfigDict, train) -> str:
  """HMAC of what a step computes from: config, training rows, platform (keyed: the rows are
  private, and an unkeyed hash of them would tell who is in the data)."""
  config = json.loads(c.to_json())
  for key in _BOOKKEEPING_KEYS:
    node = config
    *parents, last = key.split(".")
    for part in parents:
      node = node.get(part, {})
    node.pop(last, None)
  device = jax.devices()[0]
  facts = json.dumps(
    {
      "config": config,
      "platform": device.platform,
      "device_kind": device.device_kind,
      "processes": jax.process_count(),
      "jax": jax.__version__,
    },
    sort_keys=True,
  ).encode()
  mac = hmac.new(run_secret.derive("fingerprint"), facts, hashlib.sha256)
  mac.update(builders.data_digest(train))
  return mac.hexdigest()


def _guarantee(c: ml_collections.ConfigDict, run_secret: RunSecret) -> str:
  if not c.dp.enabled:
    return "none (dp.enabled is False)"
  if not run_secret.secure:
    return "none (fixed noise seed)"
  return (
    "(epsilon, delta)-DP for add/remove of one training example, for everything "
    "computed from the released parameters"
  )


def _noise_facts(plan: builders.PrivacyPlan) -> dict[str, Any]:
  stddev = plan.noise_multiplier
  return {
    "generator": "ChaCha20 keystream, 96 bits per draw, inverse CDF",
    "max_abs_normal": noise_lib.MAX_ABS_NORMAL,
    "snap_grid_over_sigma_times_sensitivity": 2.0**-noise_lib.SNAP_BITS if stddev else 0,
    "tail_probability": noise_lib.tail_probability(stddev, plan.steps) if stddev else None,
  }


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
      "bucket (e.g. with GCS FUSE) and pass the mount point"
    )
  workdir = Path(workdir).resolve()
  _prepare_workdir(workdir, c)

  # Model and data.
  backbone, backbone_params, head_params, tokenizer = builders.backbone_for(c)
  cache = Path(c.data.cache_dir) if c.data.cache_dir else workdir / "token_cache"
  train = builders.load_split(
    c.data.train, tokenizer, c, cache, fraction=c.data.train_fraction, seed=c.seed
  )
  evals = builders.load_split(
    c.data.eval, tokenizer, c, cache, limit=c.data.eval_limit, seed=c.seed + 1
  )
  model = builders.task_model(c, backbone, train.encoded.label_word_ids)
  trainable, frozen_host = builders.init_params(
    c, model, train.batch(np.arange(1)), backbone_params, head_params
  )
  frozen_host = jax.tree_util.tree_map(np.asarray, frozen_host)
  trainable = jax.tree_util.tree_map(np.asarray, trainable)
  frozen = parallel.put(frozen_host, shardings_of(frozen_host))  # FSDP rules apply to it too

  # The privacy plan and the DP pieces, all from one clip rule.
  plan = builders.plan_privacy(c, len(train))
  loss_fn = heads.classification_loss(model, frozen)
  microbatch = c.dp.microbatch_size
  if c.dp.enabled:
    grad_fn = privacy.clipped_grad(
      loss_fn, builders.clip_rule(c), c.dp.backend, microbatch, has_aux=True
    )
    sensitivity = grad_fn.sensitivity
  else:
    grad_fn = step_lib.nonprivate_grad(loss_fn, microbatch)
    sensitivity = 1.0
  # Clipping where the examples live, one psum; the privatizer in tx then noises the global sum.
  grad_fn = parallel.sharded_grad_fn(grad_fn, mesh)
  grouped = builders.GroupedBatches(
    train, plan.sampling_prob, microbatch, parallel.batch_size_multiple(mesh)
  )
  rows_sharding = parallel.batch_sharding(mesh)

  # Restore (state + ledger + secret together) or start with a fresh secret.
  abstract = builders.abstract_state(c, trainable)
  state_shardings = shardings_of(abstract)
  ckpt = checkpoint.Checkpoints(workdir, c.train.keep_checkpoints)
  restored = ckpt.restore_latest(
    jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=s),
      abstract,
      state_shardings,
    )
  )
  journal = privacy_journal.PrivacyJournal(workdir, writer=main)
  ledger = privacy.PrivacyLedger(accountant=plan.accountant)
  examples_seen, trained_seconds = 0, 0.0
  if restored is not None:
    state, meta = restored
    ledger = privacy.PrivacyLedger.from_dict(meta["ledger"])
    examples_seen, trained_seconds = meta["examples_seen"], meta["train_seconds"]
    run_secret = RunSecret.from_checkpoint(meta["secret"])
  else:
    run_secret = _new_secret(c)
  fingerprint = _fingerprint(run_secret, c, train)  # hashes every training row: once
  if restored is not None:
    resume = journal.plan_resume(
      meta["step"], meta["attempt"], fingerprint, ckpt.skipped_after(meta["step"])
    )
  else:
    resume = journal.plan_resume(None, None, fingerprint, False)
  for segment_fields, steps in resume.charges:
    ledger = ledger.record(privacy.Segment(**{**segment_fields, "steps": steps}))
  attempt = resume.attempt
  tx = builders.transform(c, plan, sensitivity, run_secret.noise_key(attempt))
  if restored is None:
    state = step_lib.TrainState(
      np.zeros([], np.int32), trainable, jax.tree_util.tree_map(np.asarray, tx.init(trainable))
    )
  elif c.dp.enabled:  # the noise key of this attempt (the same one, unless re-keyed)
    key = np.asarray(run_secret.noise_key(attempt))
    state = state.replace(
      opt_state=jax.tree_util.tree_map(
        lambda s: s._replace(key=key) if isinstance(s, noise_lib.PrivatizerState) else s,
        state.opt_state,
        is_leaf=lambda s: isinstance(s, noise_lib.PrivatizerState),
      )
    )
  state = parallel.put(state, state_shardings)
  if restored is not None:
    say(f"resumed from step {meta['step']} (ledger: {ledger.steps} steps)")
  if resume.charges:
    say(
      f"steps {resume.charged_steps} executed past the restored checkpoint may have been "
      f"observed: they are charged to the ledger and the run continues with fresh noise "
      f"(attempt {attempt})"
    )
  if not run_secret.secure:
    logging.warning(
      "dp.insecure_fixed_noise_seed is set: noise and sampling are a public "
      "function of it, and this run has NO privacy guarantee"
    )
  sampler = privacy.PoissonSampler(
    len(train), plan.expected_batch_size, key=run_secret.sampling_key(attempt)
  )
  start_step = int(state.step)
  segment = sampler.segment(plan.noise_multiplier)
  journal_segment = dataclasses.asdict(dataclasses.replace(segment, steps=0))
  end_step = plan.steps
  stopped_by_budget = False
  if c.dp.enabled:
    allowed = builders.steps_within_budget(
      ledger, segment, plan.target_epsilon, plan.delta, plan.steps - start_step
    )
    if allowed == 0 and plan.steps > start_step:
      raise config_lib.ConfigError(
        f"target epsilon {plan.target_epsilon:g} is already spent "
        f"(ledger epsilon {ledger.epsilon(plan.delta):.4f} after {ledger.steps} steps)"
      )
    stopped_by_budget = start_step + allowed < plan.steps
    end_step = start_step + allowed
  say(
    f"plan: N={plan.dataset_size} B={plan.expected_batch_size:g} q={plan.sampling_prob:.5f} "
    f"steps={plan.steps} sigma={plan.noise_multiplier:.4f} delta={plan.delta:.3g} "
    f"target_eps={plan.target_epsilon:g} trainable={lora.count(trainable):,} params "
    f"devices={mesh.size} (data={mesh.shape['data']}, fsdp={mesh.shape['fsdp']}) "
    f"processes={jax.process_count()}"
  )

  jit_step = jax.jit(
    functools.partial(
      step_lib.train_step,
      grad_fn=grad_fn,
      tx=tx,
      mean_of_sum=not c.dp.enabled,
      dropout_seed=c.seed + 1 if c.model.dropout else None,
    ),
    donate_argnums=0,
    out_shardings=(state_shardings, parallel.replicated(mesh)),
  )
  writer = metrics_lib.MetricsWriter(workdir, start_step) if main else None
  write = writer.write if main else (lambda *args, **kwargs: None)
  # Evaluation runs on each process's first device from host copies of the parameters.
  full_params = lambda s: lora.combine(parallel.to_host(s.params), frozen_host)
  # Write-ahead: the journal learns of step t before anything computed at step t is written.
  ahead = lambda done: (
    journal.write_ahead(attempt, start_step, done, fingerprint, journal_segment)
    if c.dp.enabled
    else None
  )

  def place(sample: privacy.SampledBatch):
    placed = [
      parallel.global_rows(
        functools.partial(grouped.load, length=length), positions, mask, rows_sharding
      )
      for positions, mask, length in grouped.plan(sample)
    ]
    return tuple(b for b, _ in placed), tuple(m for _, m in placed)

  def save(step: int) -> None:
    ahead(step)
    ckpt.save(
      step,
      state,
      {
        "step": step,
        "ledger": ledger.to_dict(),
        "config": json.loads(c.to_json()),
        "noise_multiplier": plan.noise_multiplier,
        "examples_seen": examples_seen,
        "train_seconds": trained_seconds,
        "secret": run_secret.to_checkpoint(),
        "attempt": attempt,
      },
    )

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
        raise FloatingPointError(
          f"a non-finite loss at step {step}; lower config.train.learning_rate"
        )
      if c.dp.enabled:
        ledger = ledger.record(segment)
      examples_seen += sample.size
      window_examples += sample.size
      done = step + 1
      if done % c.train.log_every_steps == 0 or done == end_step:
        ahead(done)
        epsilon = ledger.epsilon(plan.delta) if c.dp.enabled else float("inf")
        write(done, "privacy", {"epsilon": epsilon})
        private_row = None
        if c.train.private_metrics:
          private_row = {k: float(v) for k, v in row.items()}
          private_row["examples_per_second"] = window_examples / max(
            time.time() - window_start, 1e-9
          )
          write(done, "train", private_row, private=True)
        window_examples, window_start = 0, time.time()
        if main:
          _progress(done, end_step, epsilon, private_row)
      if c.train.eval_every_steps and done % c.train.eval_every_steps == 0 and done < end_step:
        ahead(done)
        result = evaluate(full_params(state), model, evals, c.train.eval_batch_size)
        result["epsilon"] = ledger.epsilon(plan.delta) if c.dp.enabled else float("inf")
        write(done, "eval", result)
        say(f"eval step {done}: {json.dumps(result)}")
      # Every process must stop at the same step (the save is collective).
      stopping = parallel.any_process(stop.event.is_set())
      if stopping or (
        c.train.checkpoint_every_steps and done % c.train.checkpoint_every_steps == 0
      ):
        save(done)
      if stopping:
        preempted = True
        say(f"SIGTERM: saved checkpoint at step {done}; exiting")
        break

  final_step = int(state.step)
  ahead(final_step)
  if not preempted and final_step not in ckpt.steps():
    save(final_step)
  ckpt.close()
  params = full_params(state)
  result = evaluate(params, model, evals, c.train.eval_batch_size)
  epsilon = ledger.epsilon(plan.delta) if c.dp.enabled else float("inf")
  write(final_step, "eval", {**result, "epsilon": epsilon})
  if c.train.private_metrics:
    write(
      final_step,
      "run",
      {
        "examples_seen": examples_seen,
        "examples_per_second": examples_seen / max(trained_seconds, 1e-9),
        "wall_seconds": time.time() - start_time,
      },
      private=True,
    )
  if writer is not None:
    writer.close()
  summary = {
    "epsilon": epsilon,
    "delta": plan.delta,
    "epsilon_replace_one": ledger.epsilon_replace_one(plan.delta) if c.dp.enabled else float("inf"),
    "guarantee": _guarantee(c, run_secret),
    "neighboring_relation": privacy.accounting.NEIGHBORING_RELATION,
    "public": "N, the config and the plan (sigma, q, steps, delta) are treated as public",
    "noise_multiplier": plan.noise_multiplier,
    "sampling_prob": plan.sampling_prob,
    "steps": final_step,
    "planned_steps": plan.steps,
    "ledger_steps": ledger.steps,
    "accountant": plan.accountant if c.dp.enabled else None,
    "dp": bool(c.dp.enabled),
    "target_epsilon": plan.target_epsilon,
    "dataset_size": plan.dataset_size,
    "expected_batch_size": plan.expected_batch_size,
    "clip": c.dp.clip,
    "clip_norm": c.dp.clip_norm,
    "noise": _noise_facts(plan),
    "eval": result,
    "params_sha256": params_sha256(params),
    "params_global_norm": float(optax.tree.norm(params)),
    "stopped_by_budget": stopped_by_budget,
    "preempted": preempted,
    "model": c.model.name,
    "workdir": str(workdir),
    "devices": mesh.size,
    "mesh": dict(mesh.shape),
    "processes": jax.process_count(),
  }
  summary = {
    k: (v if not isinstance(v, float) or np.isfinite(v) else str(v)) for k, v in summary.items()
  }
  if main:
    tmp = workdir / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(workdir / "summary.json")
  parallel.sync("summary written")
  return summary
