"""``train_and_evaluate(config, workdir)``: DP fine-tuning from a config, resumable.

The loop, as in the algorithm box of DP-SGD:

    mechanism = make_mechanism(config.dp, N, B, steps)      # δ, σ (calibrated), budget
    restore the latest checkpoint (state, ledger, secret) if the workdir has one
    mechanism = mechanism.keyed(secret, attempt)             # the journal picks the attempt
    for step t until the plan or the budget ends:
        sample = mechanism.sampler().sample(t)               # Poisson, rate q = B/N
        groups = static_batches.pad(sample)                  # per length bucket, masked
        state = train_step(state, groups)                    # clipped sum -> noise once, / B
        ledger = mechanism.record(ledger)
        every k steps: public metrics, eval on the held-out split, checkpoint
    write summary.json: ε from the ledger, the mechanism's public facts, eval, params hash

The non-private baseline runs the same lines with a non-private mechanism.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import hmac
import json
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from absl import logging

from dpjax import batching, parallel, privacy
from dpjax.models import lora
from dpjax.privacy import histogram, quantile
from dpjax.privacy.secret import RunSecret
from dpjax.train import checkpoint, generation_eval, integrity, optimizer, splits
from dpjax.train import config as config_lib
from dpjax.train import features as features_lib
from dpjax.train import journal as privacy_journal
from dpjax.train import metrics as metrics_lib
from dpjax.train import progress as progress_lib
from dpjax.train import step as step_lib
from dpjax.train import task as task_lib

PyTree = Any


def params_sha256(params: PyTree) -> str:
  """sha256 of the parameters' bytes in tree order: equal hashes = identical models."""
  digest = hashlib.sha256()
  for leaf in jax.tree_util.tree_leaves(params):
    digest.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
  return digest.hexdigest()


def _check_workdir(workdir: Path, c: ml_collections.ConfigDict) -> None:
  """Checks the workdir is writable and holds no run of a different config.

  Leaves the file system as it found it: a workdir that does not exist yet is
  not created (a probe directory in its nearest existing ancestor is made and
  removed), so a run refused later leaves nothing behind.
  """
  existing = workdir
  while not existing.exists() and existing != existing.parent:
    existing = existing.parent
  if not existing.is_dir():
    raise config_lib.ConfigError(
      f"workdir {workdir} is not a directory path ({existing} is a file)"
    )
  try:
    probe = existing / f".dpjax-write-test-{os.getpid()}-{jax.process_index()}"
    probe.mkdir()
    probe.rmdir()
  except OSError as err:
    raise config_lib.ConfigError(f"workdir {workdir} is not writable ({err.strerror})") from None
  saved = workdir / "config.json"
  if saved.exists():
    try:
      previous = config_lib.with_defaults(json.loads(saved.read_text()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
      raise config_lib.ConfigError(
        f"{saved} is not a readable config (edited or damaged); restore it or use a new workdir"
      ) from None
    new = json.loads(c.to_json())
    structural = integrity.structure_changes(previous, new)
    if structural and (workdir / "checkpoints").is_dir():
      raise config_lib.ConfigError(
        f"workdir {workdir} holds checkpoints whose state a change of "
        f"{', '.join('config.' + k for k in structural)} cannot restore (not even with "
        "resume=allow_changes); use a new workdir"
      )
    changed = config_lib.differences(previous, new)
    if changed and c.resume != "allow_changes":
      raise config_lib.ConfigError(
        f"workdir {workdir} holds a run with a different config ({', '.join(changed[:6])}); "
        "use a new workdir, or --config.resume=allow_changes to continue it with this config"
      )


def _write_config(workdir: Path, c: ml_collections.ConfigDict) -> None:
  """Writes ``config.json`` (process 0), once the run's plan is known to be valid."""
  if not parallel.is_main_process():
    return
  workdir.mkdir(parents=True, exist_ok=True)
  saved = workdir / "config.json"
  tmp = saved.with_suffix(".tmp")
  tmp.write_text(json.dumps(json.loads(c.to_json()), indent=2, sort_keys=True))
  tmp.replace(saved)


@contextlib.contextmanager
def _token_cache(c: ml_collections.ConfigDict, workdir: Path) -> Iterator[Path]:
  """The token cache directory: ``data.cache_dir``, else ``<workdir>/token_cache``.

  A new workdir gets its cache only once the run is accepted: until the body
  finishes, the cache is built in a private temporary directory (mode 0700),
  which a refused run deletes, so the workdir stays as it was.
  """
  default = workdir / "token_cache"
  if c.data.cache_dir or default.is_dir():
    yield Path(c.data.cache_dir) if c.data.cache_dir else default
    return
  staging = Path(tempfile.mkdtemp(prefix="dpjax-token-cache-"))
  try:
    yield staging
    if parallel.is_main_process() and not default.exists():
      shutil.move(str(staging), default)
  finally:
    shutil.rmtree(staging, ignore_errors=True)


def plan_mechanism(
  c: ml_collections.ConfigDict, dataset_size: int, num_users: int | None = None
) -> privacy.Mechanism:
  """The run's calibrated mechanism (no secret yet); a bad value is one ConfigError.

  ``num_users``: N_u of a user-level run (``dp.unit = user``), else None.
  """
  try:
    releases = ()
    if c.dp.enabled and c.dp.label_histogram_noise:
      releases = (histogram.segment(float(c.dp.label_histogram_noise), dataset_size),)
    return privacy.make_mechanism(
      config_lib.mechanism_spec(c),
      dataset_size=dataset_size,
      expected_batch_size=float(c.train.batch_size),
      steps=config_lib.planned_steps(c, num_users if config_lib.samples_users(c) else dataset_size),
      releases=releases,
      num_users=num_users,
    )
  except ValueError as err:
    raise config_lib.config_error(err) from None


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
  "data.label_names",
  "data.cache_dir",
  "data.tfds_dir",  # where: the training rows themselves are in the data digest
  "train.eval_every_steps",
  "train.eval_batch_size",
  "train.log_every_steps",
  "train.checkpoint_every_steps",
  "train.keep_checkpoints",
  "train.private_metrics",
  "model.cache_features",  # the same head loss, on features computed once
  "generate",  # decoding: the generation eval after training, dpjax.generate/synthesize
)


def _fingerprint(run_secret: RunSecret, c: ml_collections.ConfigDict, data_digest: bytes) -> str:
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
  mac.update(data_digest)
  return mac.hexdigest()


def _data_facts(run_secret: RunSecret, dataset_size: int, data_digest: bytes) -> dict[str, Any]:
  """N and a keyed digest of the training rows (keyed: an unkeyed hash would tell who is in)."""
  mac = hmac.new(run_secret.derive("training data"), data_digest, hashlib.sha256)
  return {"dataset_size": dataset_size, "digest": mac.hexdigest()}


def _check_state_structure(ckpt: checkpoint.Checkpoints, abstract: Any) -> None:
  """Refuses, before any restore, checkpoints whose arrays this config's state cannot take.

  (A changed model size, optimizer or trainable set under resume=allow_changes.)
  Restoring would fail on every checkpoint and set them all aside.
  """
  steps = ckpt.steps()
  saved = ckpt.saved_shapes(steps[-1]) if steps else None
  if saved is None:
    return  # no checkpoint, or unreadable metadata: restore_latest decides
  now = sorted(
    (tuple(np.shape(x)), str(np.asarray(x).dtype)) for x in jax.tree_util.tree_leaves(abstract)
  )
  if saved != now:
    detail = (
      f"{len(saved)} arrays saved, {len(now)} built"
      if len(saved) != len(now)
      else "arrays of other sizes"
    )
    raise checkpoint.CheckpointError(
      f"checkpoint {steps[-1]} holds a train state of another shape than this config builds "
      f"({detail}): a changed model, optimizer or trainable set cannot resume it; use a new "
      "workdir"
    )


def _check_orphan_outputs(
  workdir: Path, ckpt: checkpoint.Checkpoints, journal: privacy_journal.PrivacyJournal
) -> None:
  """Refuses a workdir with an earlier run's outputs but neither checkpoints nor a journal."""
  if ckpt.steps() or journal.path.exists():
    return
  metrics = workdir / "metrics.jsonl"
  leftovers = [p.name for p in (workdir / "summary.json", metrics) if p.is_file()]
  if (workdir / "summary.json").is_file() or (metrics.is_file() and metrics.stat().st_size):
    raise config_lib.ConfigError(
      f"workdir {workdir} holds an earlier run's outputs ({', '.join(leftovers)}) but no "
      f"checkpoint and no {journal.path.name}: what it spent cannot be known; use a new workdir"
    )


def _verify_checkpoint(
  state: Any,
  meta: dict[str, Any],
  *,
  c: ml_collections.ConfigDict,
  journal: privacy_journal.PrivacyJournal,
  data: tuple[int, bytes],
) -> None:
  """Refuses (CheckpointError) a checkpoint whose privacy record cannot be trusted.

  A state that does not match its digest is a ValueError: unreadable, the
  previous checkpoint is tried.
  """
  step = meta["step"]
  integrity.verify_record(state, meta, journal)
  secret = RunSecret.from_checkpoint(meta["secret"])
  if meta.get("data") != _data_facts(secret, *data) and c.resume != "allow_changes":
    raise checkpoint.CheckpointError(
      f"the training data changed since checkpoint {step} (N was "
      f"{meta.get('data', {}).get('dataset_size')}, now {data[0]}, or the rows differ); use a "
      "new workdir, or --config.resume=allow_changes to continue on the new data (the ledger "
      "records it as a new segment)"
    )


def train_and_evaluate(c: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
  """Trains, evaluates and checkpoints; returns (and writes) the run summary.

  Runs on every device of every process (``jax.distributed`` already
  initialized for several processes); the mesh comes from ``config.parallel``.
  Only process 0 writes metrics, ``summary.json`` and progress lines, and it
  holds the workdir's lock (one run per workdir) from the moment the run is
  accepted until it returns.
  """
  with contextlib.ExitStack() as cleanup:
    return _run(c, workdir, cleanup)


def _lock(workdir: Path, cleanup: contextlib.ExitStack) -> None:
  """Takes the workdir's lock (process 0) until ``cleanup`` closes; refuses a busy workdir."""
  if not parallel.is_main_process():
    return
  workdir.mkdir(parents=True, exist_ok=True)
  try:
    lock = integrity.WorkdirLock(workdir)
  except integrity.WorkdirBusy as busy:
    raise config_lib.ConfigError(
      f"workdir {workdir} is in use by another run ({busy.holder}); wait for it to finish "
      "or use another workdir"
    ) from None
  cleanup.callback(lock.release)


def _run(
  c: ml_collections.ConfigDict, workdir: str | Path, cleanup: contextlib.ExitStack
) -> dict[str, Any]:
  start_time = time.time()
  config_lib.validate(c)
  try:
    mesh = parallel.make_mesh(c.parallel.data, c.parallel.fsdp)
  except parallel.ParallelError as err:
    raise config_lib.config_error(err) from None
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
  _check_workdir(workdir, c)

  # The task (model and parameters), the data, and the mechanism calibrated for them.
  task = task_lib.build(c)
  task_lib.check_fresh_heads(c, task)
  with _token_cache(c, workdir) as cache:
    train, num_canaries = splits.training_split(c, task.tokenizer, cache)
    evals = splits.load_split(
      c.data.eval,
      task.tokenizer,
      c,
      cache,
      limit=c.data.eval_limit,
      seed=c.seed + 1,
      key="config.data.eval",
    )
    num_users = splits.count_users(train) if c.dp.unit == "user" else None
    if num_users is not None and c.dp.enabled and c.dp.noise_multiplier is None:
      say(
        f"calibrating sigma for user-level DP ({num_users} users, at most "
        f"{c.dp.max_examples_per_user} rows each): seconds to minutes"
      )
    mechanism = plan_mechanism(c, len(train), num_users)
    if c.generate.eval_prompts:  # refused now, not after training
      generation_eval.check_fits(c, task.tokenizer, task.model.config.n_positions)
    _lock(workdir, cleanup)
    _check_workdir(workdir, c)  # again, under the lock: another run may have just finished
  frozen_host = jax.tree_util.tree_map(np.asarray, task.frozen)
  trainable = jax.tree_util.tree_map(np.asarray, task.trainable)
  frozen = parallel.put(frozen_host, shardings_of(frozen_host))  # FSDP rules apply to it too
  # Clipping where the examples live, one psum; the privatizer in tx then noises the global sum.
  # Head-only classifiers train on features the frozen backbone computes once (features.py).
  cache_features = features_lib.applies(c)
  # Other frozen bottoms of the encoder: the input of the first trained layer, once per row.
  prefix = 0 if cache_features else features_lib.prefix_layers(c, task.model, trainable)
  if prefix:
    need = features_lib.hidden_bytes(train, task.model.backbone.hidden_size)
    have = features_lib.memory_bytes()
    # Every process must build the same step: one host short of memory turns it off for all.
    if parallel.any_process(have is not None and need > have // 4):
      say(
        f"not caching the frozen layers' output: it would take {need / 2**30:.1f} GiB "
        "(over a quarter of a host's memory); every step runs the whole model"
      )
      prefix = 0
  if cache_features:
    loss = features_lib.head_loss(task.model)
  elif prefix:
    loss = features_lib.prefix_loss(task.model, prefix, frozen)
  else:
    loss = task.loss(frozen)

  # Restore (state + ledger + secret together) or start with a fresh secret.
  abstract = optimizer.abstract_state(mechanism.spec, c, trainable)
  state_shardings = shardings_of(abstract)
  # With fsdp > 1 the book-keeping backend gathers one layer's weights at a time.
  grad_fn = parallel.sharded_grad_fn(mechanism.grad_fn(loss), mesh, state_shardings.params)
  ckpt = checkpoint.Checkpoints(workdir, c.train.keep_checkpoints)
  cleanup.callback(ckpt.close)  # also when the run ends in an error
  _check_state_structure(ckpt, abstract)
  journal = privacy_journal.PrivacyJournal(workdir, writer=main)
  _check_orphan_outputs(workdir, ckpt, journal)
  data_digest = splits.data_digest(train)  # hashes every training row: once
  restored = ckpt.restore_latest(
    jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=s),
      abstract,
      state_shardings,
    ),
    verify=functools.partial(
      _verify_checkpoint, c=c, journal=journal, data=(len(train), data_digest)
    ),
  )
  ledger = mechanism.empty_ledger()
  if restored is not None:
    state, meta = restored
    ledger = privacy.PrivacyLedger.from_dict(meta["ledger"])
    run_secret = RunSecret.from_checkpoint(meta["secret"])
  else:
    run_secret = _new_secret(c)
  fingerprint = _fingerprint(run_secret, c, data_digest)
  data_facts = _data_facts(run_secret, len(train), data_digest)
  if restored is not None:
    resume = journal.plan_resume(
      meta["step"], meta["attempt"], fingerprint, ckpt.skipped_after(meta["step"])
    )
  else:
    resume = journal.plan_resume(None, None, fingerprint, False)
    if resume.charges and c.resume != "allow_changes":
      raise config_lib.ConfigError(
        f"workdir {workdir} has no checkpoint but its {journal.path.name} records "
        f"{resume.charged_steps} executed steps (checkpoints deleted, or a crash before the "
        "first one); use a new workdir, or --config.resume=allow_changes to start over with "
        "those steps charged to the new ledger"
      )
  for segment_fields, steps in resume.charges:
    ledger = ledger.record(privacy.Segment(**{**segment_fields, "steps": steps}))
  releases = dict(meta.get("releases", {})) if restored is not None else {}
  charged = list(meta.get("releases_charged", [])) if restored is not None else []
  ledger = _release_label_histogram(
    c, mechanism, train, run_secret, ledger, releases, charged, journal
  )
  attempt = resume.attempt
  mechanism = mechanism.keyed(run_secret, attempt)
  tx = optimizer.transform(mechanism.privatizer(), c, mechanism.steps)
  if restored is None:
    state = step_lib.TrainState(
      np.zeros([], np.int32), trainable, jax.tree_util.tree_map(np.asarray, tx.init(trainable))
    )
  else:  # the noise key of this attempt (the same one, unless re-keyed)
    state = state.replace(opt_state=mechanism.with_noise_key(state.opt_state))
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
  sampler = mechanism.sampler()
  start_step = int(state.step)
  journal_segment = mechanism.segment(0).to_dict()
  allowed = mechanism.steps_within_budget(ledger, mechanism.steps - start_step)
  if allowed == 0 and mechanism.steps > start_step:
    raise config_lib.ConfigError(
      f"the epsilon budget {mechanism.epsilon_budget:g} is already spent "
      f"(ledger epsilon {mechanism.epsilon(ledger):.4f} after {ledger.steps} steps)"
    )
  if mechanism.epsilon_budget is not None and mechanism.epsilon(ledger) > mechanism.epsilon_budget:
    raise config_lib.ConfigError(
      f"the ledger already spent epsilon {mechanism.epsilon(ledger):.4f} ({ledger.steps} "
      f"steps), above the epsilon budget {mechanism.epsilon_budget:g}; a budget cannot be "
      "lowered below what was spent"
    )
  end_step = start_step + allowed
  stopped_by_budget = end_step < mechanism.steps
  _write_config(workdir, c)  # accepted: every refusal above left config.json as it was
  if main and (workdir / "summary.json").exists() and end_step > start_step:
    # It describes a model this run is about to replace; the new one is written at the end.
    (workdir / "summary.json").unlink()
  privacy_plan = (
    f"sigma={mechanism.noise_multiplier:.4f} delta={mechanism.delta:.3g} "
    f"budget_eps={mechanism.epsilon_budget}"
    if mechanism.private
    else "no privacy (dp.enabled=False)"
  )
  users_text = (
    f"(users={mechanism.num_users}, k={mechanism.spec.max_examples_per_user}, "
    f"sampling={mechanism.spec.user_sampling}"
    f"{': B counts users' if mechanism.spec.samples_users else ''}) "
    if mechanism.user_level
    else ""
  )
  say(
    f"plan: N={mechanism.dataset_size} {users_text}"
    f"B={mechanism.expected_batch_size:g} "
    f"q={mechanism.sampling_prob:.5f} steps={mechanism.steps} "
    f"{f'(with {num_canaries} audit canaries) ' if num_canaries else ''}"
    f"{privacy_plan} trainable={lora.count(trainable):,} params "
    f"devices={mesh.size} (data={mesh.shape['data']}, fsdp={mesh.shape['fsdp']}) "
    f"processes={jax.process_count()}"
  )

  jit_step = jax.jit(
    functools.partial(
      step_lib.train_step,
      grad_fn=grad_fn,
      tx=tx,
      dropout_seed=c.seed + 1 if c.model.dropout else None,
    ),
    donate_argnums=0,
    out_shardings=(state_shardings, parallel.replicated(mesh)),
  )
  # One static shape per token-length bucket (the scan skips microbatches of pure padding).
  # Under user sampling the sampled units are users: a user's group is its longest row's
  # bucket, and each padded group of users expands to k rows per user.
  # Users are grouped by their row count too (padded to 1, 2, 4, ..., k rows), so that a
  # user with one row is not computed as k.
  row_groups = train.length_groups()
  rows_of = lambda bucket: functools.partial(train.batch, length=train.encoded.buckets[bucket])
  if cache_features and end_step > start_step:
    started = time.time()
    cached = features_lib.compute(
      task.model, lora.combine(trainable, frozen_host), train, c.train.eval_batch_size
    )
    say(
      f"model.train=head: the frozen backbone's features of the {len(train):,} training rows "
      f"were computed once ({time.time() - started:.1f} s); every step runs the head alone"
    )
    row_groups = np.zeros_like(row_groups)  # features have no length: one shape
    rows_of = lambda bucket: cached.batch
  if prefix and end_step > start_step:
    started = time.time()
    hidden = features_lib.compute_hidden(
      task.model, lora.combine(trainable, frozen_host), train, prefix, c.train.eval_batch_size
    )
    say(
      f"the embeddings and the encoder layers below layer {prefix} are frozen: their output "
      f"for the {len(train):,} training rows was computed once "
      f"({time.time() - started:.1f} s); every step runs layers {prefix}.. and the head"
    )
    rows_of = lambda bucket: functools.partial(hidden.batch, length=train.encoded.buckets[bucket])
  users, unit_sizes = None, (1,)
  if mechanism.spec.samples_users:
    users = batching.user_table(
      train.encoded.user_ids[train.indices], mechanism.spec.max_examples_per_user
    )
    row_groups, unit_sizes = batching.user_groups(users, row_groups)
  static_batches = mechanism.static_batches(
    row_groups, parallel.batch_size_multiple(mesh), quantiles=batching.SINGLE_SHAPE
  )
  rows_sharding = parallel.batch_sharding(mesh)
  writer = metrics_lib.MetricsWriter(workdir, start_step) if main else None
  write = writer.write if main else (lambda *args, **kwargs: None)
  # Evaluation runs on each process's first device from host copies of the parameters.
  full_params = lambda s: lora.combine(parallel.to_host(s.params), frozen_host)
  # Write-ahead: the journal learns of step t before anything computed at step t is written.
  ahead = lambda done: journal.write_ahead(attempt, start_step, done, fingerprint, journal_segment)

  def place(sample: np.ndarray):
    placed, rows = [], 0
    for group in static_batches.pad(sample):
      bucket, positions, mask = group.group, group.indices, group.mask
      if users is not None:
        bucket, per_user = batching.user_group_shape(group.group, unit_sizes)
        positions, mask = batching.expand_users(users, group, per_user)
      rows += int(mask.sum())
      placed.append(
        parallel.global_rows(
          rows_of(bucket),
          positions,
          mask,
          rows_sharding,
        )
      )
    return tuple(b for b, _ in placed), tuple(m for _, m in placed), rows

  def save(step: int) -> None:
    ahead(step)
    meta = {
      "step": step,
      "ledger": ledger.to_dict(),
      "mechanism": mechanism.public_facts(),
      "config": json.loads(c.to_json()),
      "secret": run_secret.to_checkpoint(),
      "attempt": attempt,
      "data": data_facts,
      "releases": releases,
      "releases_charged": charged,
      "state_sha256": integrity.state_digest(parallel.to_host(state)),
    }
    meta["seal"] = integrity.seal(meta, run_secret.derive(integrity.SEAL_PURPOSE))
    ckpt.save(step, state, meta)

  preempted = False
  examples_seen, window_examples, window_start = 0, 0, time.time()
  log_every = c.train.log_every_steps or max(1, round(mechanism.steps / 20))
  eval_every = c.train.eval_every_steps
  if eval_every is None:  # about 5 evaluations per run (the last one at the end)
    eval_every = max(1, round(mechanism.steps / 5))
  if end_step > start_step:
    say(
      f"compiling the train step ({len(static_batches.shapes)} batch shape(s)); the first "
      "step waits for it (seconds to minutes on a CPU)"
    )
  progress = progress_lib.Progress(start_step, end_step, log_every, enabled=main)
  cleanup.callback(progress.close)
  with _StopFlag() as stop:
    for step in range(start_step, end_step):
      sample = sampler.sample(step)
      batches, masks, rows = place(sample)
      state, row = jit_step(state, batches, masks)
      row = jax.device_get(row)
      if int(row["nonfinite"]):
        raise config_lib.ConfigError(
          f"a non-finite loss at step {step + 1}; lower config.train.learning_rate (the "
          f"checkpoints before step {step + 1} are kept)"
        )
      ledger = mechanism.record(ledger)
      examples_seen += rows
      window_examples += rows
      done = step + 1
      if done % log_every == 0 or done == end_step:
        ahead(done)
        epsilon = mechanism.epsilon(ledger)
        public = {"epsilon": epsilon}
        if "clip_norm" in row:  # adaptive clipping's C_t: computed from released noisy counts
          public["clip_norm"] = float(row["clip_norm"])
        write(done, "privacy", public)
        private_row = None
        if c.train.private_metrics:
          private_row = {k: float(v) for k, v in row.items()}
          private_row["examples_per_second"] = window_examples / max(
            time.time() - window_start, 1e-9
          )
          write(done, "train", private_row, private=True)
        window_examples, window_start = 0, time.time()
        progress.step(done, epsilon, private_row)
      else:
        progress.step(done, None, None)
      if eval_every and done % eval_every == 0 and done < end_step:
        ahead(done)
        result = task.evaluate(full_params(state), evals, c.train.eval_batch_size)
        result["epsilon"] = mechanism.epsilon(ledger)
        write(done, "eval", result)
        progress.evaluated(done, result)
      # Every process must stop at the same step (the save is collective).
      stopping = parallel.any_process(stop.event.is_set())
      if stopping or (
        c.train.checkpoint_every_steps and done % c.train.checkpoint_every_steps == 0
      ):
        save(done)
      if stopping:
        preempted = True
        progress.say(f"SIGTERM: saved checkpoint at step {done}; exiting")
        break
  progress.close()

  final_step = int(state.step)
  ahead(final_step)
  if not preempted and final_step not in ckpt.steps():
    save(final_step)
  ckpt.close()
  params = full_params(state)
  result = task.evaluate(params, evals, c.train.eval_batch_size)
  if c.generate.eval_prompts and main:
    generated = generation_eval.generation_eval(
      c, task.model, params, task.tokenizer, int(c.generate.eval_prompts), workdir
    )
    result.update({key: generated[key] for key in generation_eval.HEADLINE})
    result["generation"] = generated
  epsilon = mechanism.epsilon(ledger)
  if final_step > start_step:  # a rerun of a finished run adds no duplicate row
    write(final_step, "eval", {**result, "epsilon": epsilon})
  if c.train.private_metrics:
    write(
      final_step,
      "run",
      {"examples_seen": examples_seen, "wall_seconds": time.time() - start_time},
      private=True,
    )
  if writer is not None:
    writer.close()
  summary = {
    "epsilon": epsilon,
    # None for user-level DP (accounted for adding/removing one user only).
    "epsilon_replace_one": mechanism.epsilon_replace_one(ledger),
    # The true ε bracketed by PLD and PRV, and the guarantee as a membership attacker's power.
    **(ledger.statement(mechanism.delta) if mechanism.private else {}),
    **mechanism.public_facts(),
    "public": (
      "N, the config and the plan (sigma, q, steps, delta) are treated as public"
      + (", and so is the number of users" if mechanism.user_level else "")
    ),
    "steps": final_step,
    "ledger_steps": ledger.steps,
    "ledger": ledger.to_dict(),  # every segment; the plan above is the last one
    "clip": c.dp.clip,
    "clip_norm": c.dp.clip_norm,
    **_final_clip_norm(state),
    "eval": result,
    "params_sha256": params_sha256(params),
    "params_global_norm": float(optax.tree.norm(params)),
    "audit_canaries": num_canaries,  # canaries in the training set (config audit.canaries)
    "releases": releases,  # one-off DP releases (in the ledger), e.g. the label histogram
    "stopped_by_budget": stopped_by_budget,
    "preempted": preempted,
    "model": c.model.name,
    "workdir": str(workdir),
    "devices": mesh.size,
    "mesh": dict(mesh.shape),
    "processes": jax.process_count(),
  }
  summary = _finite_or_text(summary)
  if main:
    tmp = workdir / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(workdir / "summary.json")
  parallel.sync("summary written")
  return summary


def _release_label_histogram(
  c: ml_collections.ConfigDict,
  mechanism: privacy.Mechanism,
  train: splits.Split,
  secret: RunSecret,
  ledger: privacy.PrivacyLedger,
  releases: dict[str, Any],
  charged: list[int],
  journal: privacy_journal.PrivacyJournal,
) -> privacy.PrivacyLedger:
  """Charges every release on record, then releases the label histogram if the run has none.

  ``dp.label_histogram_noise``: drawn once per run before the first step, kept in
  every checkpoint's (sealed) metadata so a resumed run reuses it. Each draw is
  written to the journal before it is made and keyed by its index there; every
  draw on record enters the ledger (``charged`` lists those this ledger holds), so
  a histogram whose checkpoint was lost still counts when another is drawn. A
  non-private run keeps the exact counts (ε is infinite anyway). Returns the ledger.
  """
  for record in journal.releases():
    if record["index"] not in charged:
      ledger = ledger.record(privacy.Segment(**record["segment"]))
      charged.append(record["index"])
  sigma = c.dp.label_histogram_noise
  if not sigma or "label_histogram" in releases:
    return ledger
  labels = train.encoded.labels
  if labels is None:
    raise config_lib.ConfigError(
      "config.dp.label_histogram_noise needs labelled training rows (data.label_field)"
    )
  labels = labels[train.indices]
  k = int(c.data.num_labels)
  index = None
  if mechanism.private:
    segment = histogram.segment(float(sigma), len(train))
    index = journal.next_release_index()
    parallel.sync("release index read")  # every process keys the draw alike
    journal.write_release("label_histogram", index, segment.to_dict())
    counts = histogram.release(labels, k, float(sigma), secret, index)
    ledger = ledger.record(segment)
    charged.append(index)
  else:
    counts = [float(v) for v in np.bincount(labels, minlength=k)]
  releases["label_histogram"] = {
    "counts": counts,
    "noise_multiplier": float(sigma) if mechanism.private else 0.0,
    "draw": index,
    "mechanism": (
      "Gaussian, L2 sensitivity 1 (add/remove one row), in the ledger"
      if mechanism.private
      else "exact counts (no privacy)"
    ),
  }
  return ledger


def _final_clip_norm(state: step_lib.TrainState) -> dict[str, float]:
  """Adaptive clipping's bound after the last step (public: a function of noisy counts)."""
  bound = quantile.current_clip_norm(state.opt_state)
  return {} if bound is None else {"final_clip_norm": float(parallel.to_host(bound))}


def _finite_or_text(tree: Any) -> Any:
  """JSON-safe: inf/nan floats (anywhere in dicts) become the strings "inf"/"nan"."""
  if isinstance(tree, dict):
    return {k: _finite_or_text(v) for k, v in tree.items()}
  if isinstance(tree, float) and not np.isfinite(tree):
    return str(tree)
  return tree
