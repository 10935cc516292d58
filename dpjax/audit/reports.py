"""The audit reports of a trained run: membership inference, disparate impact, white-box step.

Each report is a JSON-able dict that states what it was computed from:

* ``membership``: the released parameters, the pretrained (initial) parameters,
  training rows (members) and held-out rows of the same file (non-members).
  It measures leakage for the data owner; it reads private rows, so the report
  itself is not a release covered by (ε, δ).
* ``groups``: released parameters (of the run and of a non-private reference
  run) and the public evaluation split only.
* ``canaries``: released and pretrained parameters and the run's synthetic
  canaries (one-run audit); no training row.
* ``whitebox``: no data at all: canary gradients through the run's mechanism
  (its clip rule and σ) with a fresh secret.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from dpjax import data as data_lib
from dpjax import privacy
from dpjax.audit import groups as groups_lib
from dpjax.audit import membership as membership_lib
from dpjax.audit import scoring, statistics, whitebox
from dpjax.models import heads
from dpjax.privacy.secret import RunSecret
from dpjax.train import config as config_lib
from dpjax.train import loop, splits
from dpjax.train.config import ConfigError
from dpjax.trained import Trained, load_trained, spent_ledger

#: Groups of the groups report: the label, a token-length quartile, or ``column:NAME`` (a
#: column of the eval file).
GROUP_BY = ("label", "length", "column:NAME")


def valid_group_by(group_by: str) -> bool:
  return group_by in ("label", "length") or (
    group_by.startswith("column:") and len(group_by) > len("column:")
  )


def _cache_dir(workdir: Path, trained: Trained) -> Path | None:
  if trained.config.data.cache_dir:
    return Path(trained.config.data.cache_dir)
  default = workdir / "token_cache"
  return default if default.is_dir() else None


def _subsample(split: splits.Split, limit: int | None, rng: np.random.Generator) -> splits.Split:
  if limit is None or len(split) <= limit:
    return split
  return splits.Split(split.encoded, np.sort(rng.choice(split.indices, limit, replace=False)))


def _privacy(workdir: Path, trained: Trained) -> tuple[privacy.PrivacyLedger, float, float]:
  """(ledger, ε, δ) as ``dpjax.evaluate`` reports them (every executed step counts)."""
  delta = trained.mechanism.get("delta")
  if delta is None:
    raise ConfigError("the run's checkpoint does not state its privacy plan (delta)")
  ledger, _ = spent_ledger(workdir, trained)
  return ledger, ledger.epsilon(delta), delta


def _json_number(x: float) -> float | str:
  return x if math.isfinite(x) else str(x)


def _train_shadows(
  workdir: Path,
  c,
  pool: np.ndarray,
  count: int,
  size: int,
  rng: np.random.Generator,
) -> list[Trained]:
  """``count`` shadow runs of the run's config, each on ``size`` random rows of ``pool``.

  ``pool`` holds indices of training-file rows that no target is among. Each
  shadow is a dpjax.main workdir under ``workdir/audit/shadows/``; a finished
  one is reused.
  """
  source = splits.source_for(c.data.train, c)
  trained = []
  for k in range(count):
    rows = np.sort(rng.choice(pool, min(size, len(pool)), replace=False))
    home = workdir / "audit" / "shadows" / f"shadow_{k}"
    home.mkdir(parents=True, exist_ok=True)
    data = home / "train.jsonl"
    lines = []
    for i in rows:
      example = source[int(i)]
      lines.append(json.dumps({c.data.text_field: example.text, c.data.label_field: example.label}))
    text = "\n".join(lines) + "\n"
    if data.is_file() and data.read_text() != text:
      shutil.rmtree(home / "run", ignore_errors=True)  # other rows (seed, --max_rows): retrain
    data.write_text(text)
    shadow = ml_collections.ConfigDict(c.to_dict())
    shadow.data.train = str(data)
    shadow.data.train_fraction = 1.0
    shadow.data.cache_dir = None
    shadow.audit.canaries = 0
    shadow.resume = "same_config"
    with (home / "train.log").open("w") as log, contextlib.redirect_stdout(log):
      summary = loop.train_and_evaluate(shadow, home / "run")
    print(
      f"shadow run {k + 1}/{count}: N={summary['dataset_size']} epsilon={summary['epsilon']} "
      f"({home / 'run'}; progress in train.log)",
      file=sys.stderr,
      flush=True,
    )
    trained.append(load_trained(home / "run"))
  return trained


def _classifier(trained: Trained, workdir: Path, report: str) -> Trained:
  """``trained``, if it is a classifier (the report scores labels).

  Raises:
    ConfigError: the run is a causal language model.
  """
  if trained.config.model.task == "causal_lm":
    raise ConfigError(
      f"--reports={report} scores a classifier; {workdir} is model.task=causal_lm "
      "(its white-box audit applies: --reports=whitebox)"
    )
  return trained


def membership(
  workdir: str | Path,
  *,
  max_rows: int = 2000,
  shadows: int = 0,
  bootstrap_samples: int = 2000,
  seed: int = 0,
  batch_size: int = 64,
) -> dict[str, Any]:
  """Membership attacks on members vs non-members of the run.

  Members are training rows; non-members are rows of the training file that
  ``data.train_fraction`` left out (same distribution), or the eval split when
  the run trained on the whole file (a different distribution can make the
  attack look stronger than it is; the report says which). Attacks: loss
  threshold, the loss drop from the pretrained model, and with ``shadows`` > 0
  offline LiRA against that many shadow runs trained on other left-out rows
  (never on a target).
  """
  workdir = Path(workdir)
  trained = _classifier(load_trained(workdir), workdir, "membership")
  c = trained.config
  rng = np.random.default_rng(seed)
  cache = _cache_dir(workdir, trained)
  train = splits.load_split(
    c.data.train, trained.tokenizer, c, cache, fraction=c.data.train_fraction, seed=c.seed
  )
  left_out = rng.permutation(np.setdiff1d(np.arange(len(train.encoded)), train.indices))
  # Shadows train on left-out rows that are not targets, by content: a duplicate of a
  # non-member target (or of a member) in a shadow's data would make it "in" there.
  row_key = lambda i: (train.encoded.token_ids(int(i)).tobytes(), int(train.encoded.labels[i]))
  targets = {row_key(i) for i in np.concatenate([train.indices, left_out[:max_rows]])}
  shadow_pool = np.array([i for i in left_out[max_rows:] if row_key(i) not in targets], np.int64)
  if len(left_out) >= 2:
    outside = splits.Split(train.encoded, np.sort(left_out[:max_rows]))
    source = f"rows of {c.data.train} outside the training subset (data.train_fraction)"
  elif c.data.eval == c.data.train:
    raise ConfigError(
      f"{workdir} trained on every row of {c.data.train}, which is also its eval split: no "
      "held-out rows to use as non-members"
    )
  else:
    outside = splits.load_split(c.data.eval, trained.tokenizer, c, cache, seed=c.seed + 1)
    source = f"{c.data.eval} (another split: the attack may look stronger than it is)"
  if shadows and len(shadow_pool) < 2:
    raise ConfigError(
      "--shadows needs rows of the training file outside the training subset and the "
      f"{max_rows} non-member targets (config.data.train_fraction < 1, or a lower --max_rows)"
    )
  members, non_members = _subsample(train, max_rows, rng), _subsample(outside, max_rows, rng)
  stats = {
    name: scoring.example_stats(trained.params, trained.model, split, batch_size)
    for name, split in (("members", members), ("non_members", non_members))
  }
  scores = {}
  for name, split in (("members", members), ("non_members", non_members)):
    start = scoring.example_stats(trained.initial, trained.model, split, batch_size)
    scores[name] = {
      "loss": membership_lib.loss_scores(stats[name]["loss"]),
      "loss_vs_pretrained": start["loss"] - stats[name]["loss"],
    }
  names = ["loss", "loss_vs_pretrained"]
  if shadows:
    models = _train_shadows(workdir, c, shadow_pool, shadows, len(train), rng)
    targets = np.concatenate(
      [stats["members"]["label_probability"], stats["non_members"]["label_probability"]]
    )
    shadow_phi = np.stack(
      [
        membership_lib.logit_confidence(
          np.concatenate(
            [
              scoring.example_stats(m.params, m.model, split, batch_size)["label_probability"]
              for split in (members, non_members)
            ]
          )
        )
        for m in models
      ]
    )
    lira = membership_lib.lira_offline_scores(membership_lib.logit_confidence(targets), shadow_phi)
    scores["members"]["lira_offline"] = lira[: len(members)]
    scores["non_members"]["lira_offline"] = lira[len(members) :]
    names.append("lira_offline")
  ledger, epsilon, delta = _privacy(workdir, trained)
  labels = {
    name: split.encoded.labels[split.indices]
    for name, split in (("members", members), ("non_members", non_members))
  }
  attacks = []
  for attack in names:
    result = membership_lib.evaluate_attack(
      attack,
      scores["members"][attack],
      scores["non_members"][attack],
      ledger,
      bootstrap_samples=bootstrap_samples,
      seed=seed,
    ).to_dict()
    # The empirical privacy cost per group: the attack's AUROC within each label.
    result["auroc_by_label"] = {}
    for y in np.unique(labels["members"]):
      inside, outside = (
        scores[name][attack][labels[name] == y] for name in ("members", "non_members")
      )
      if inside.size and outside.size:
        result["auroc_by_label"][f"label {y}"] = statistics.mann_whitney_auroc(inside, outside)
    attacks.append(result)
  return {
    "report": "membership",
    "workdir": str(workdir),
    "step": trained.step,
    "epsilon": _json_number(epsilon),
    "delta": delta,
    "ledger": trained.ledger,
    "members": f"{len(members)} rows of the training subset",
    "non_members": f"{len(non_members)} {source}",
    "shadows": shadows,
    "computed_from": (
      "released and pretrained parameters, training rows and held-out rows: a leakage "
      "measurement for the data owner, not itself a release covered by (epsilon, delta)"
    ),
    "attacks": attacks,
  }


def groups(
  workdir: str | Path,
  *,
  reference: str | Path | None = None,
  group_by: str = "label",
  bootstrap_samples: int = 500,
  seed: int = 0,
  batch_size: int = 64,
) -> dict[str, Any]:
  """Per-group accuracy of the run (and of a non-private reference run) on the eval split."""
  if not valid_group_by(group_by):
    raise ConfigError(f"--group_by must be one of {GROUP_BY} (got {group_by!r})")
  workdir = Path(workdir)
  trained = _classifier(load_trained(workdir), workdir, "groups")
  c = trained.config
  evals = splits.load_split(
    c.data.eval,
    trained.tokenizer,
    c,
    _cache_dir(workdir, trained),
    limit=c.data.eval_limit,
    seed=c.seed + 1,
  )
  stats = scoring.example_stats(trained.params, trained.model, evals, batch_size)
  reference_correct = None
  if reference is not None:
    other = load_trained(reference)
    if (other.config.data.eval, other.config.data.eval_limit, other.config.seed) != (
      c.data.eval,
      c.data.eval_limit,
      c.seed,
    ) or other.config.data.max_length != c.data.max_length:
      raise ConfigError(
        f"--reference={reference} evaluates on other rows (data.eval, data.eval_limit, seed "
        "or data.max_length differ): it cannot be compared group by group"
      )
    reference_correct = scoring.example_stats(other.params, other.model, evals, batch_size)[
      "correct"
    ]
  loss = heads.classification_loss(trained.model, trained.frozen)
  norms = scoring.gradient_norms(trained.trainable, loss, evals, batch_size)
  if group_by == "label":
    labels = [f"label {y}" for y in evals.encoded.labels[evals.indices]]
  elif group_by == "length":
    labels = groups_lib.length_bins(evals.encoded.lengths[evals.indices])
  else:
    labels = _column_values(c, group_by.removeprefix("column:"), evals.indices)
  report = groups_lib.group_report(
    labels,
    stats["correct"],
    reference_correct,
    norms,
    # Only flat clipping compares the whole gradient's norm with one bound.
    clip_norm=c.dp.clip_norm if c.dp.enabled and c.dp.clip == "flat" else None,
    bootstrap_samples=bootstrap_samples,
    seed=seed,
  )
  _, epsilon, delta = _privacy(workdir, trained)
  return {
    "report": "groups",
    "workdir": str(workdir),
    "reference_workdir": None if reference is None else str(reference),
    "group_by": group_by,
    "eval": f"{len(evals)} rows of {c.data.eval}",
    "epsilon": _json_number(epsilon),
    "delta": delta,
    "epsilon_per_group": (
      "the same (epsilon, delta) for every example in every group; it does not bound what "
      "several examples of one group reveal together"
    ),
    "computed_from": (
      "released parameters and the public evaluation split only"
      if c.data.eval != c.data.train
      else f"released parameters and {c.data.eval}, which is also the TRAINING file: this "
      "report reads training rows and is not public"
    ),
    **report,
  }


def _column_values(c, column: str, indices: np.ndarray) -> list[str]:
  """The eval file's ``column`` (a tfds: split's feature) at each of ``indices`` (rows in
  file order, as encoded)."""
  if c.data.eval.startswith("sst2:"):
    raise ConfigError(
      f"--group_by=column:{column} needs an eval file with that column (data.eval is "
      f"{c.data.eval}, which has only sentence and label)"
    )
  if data_lib.TfdsSpec.matches(c.data.eval):
    try:
      source = splits.source_for(c.data.eval, c, column, key="config.data.eval")
    except ConfigError as err:
      raise ConfigError(f"--group_by=column:{column}: {err}") from None
    return [source[int(i)].user_id for i in indices]
  try:
    source = data_lib.TextFileSource(
      c.data.eval,
      text_field=c.data.text_field,
      label_field=c.data.label_field,
      user_field=column,
      num_labels=c.data.num_labels,
      skip_bad_rows=c.data.skip_bad_rows,
    )
  except data_lib.DataError as err:
    raise ConfigError(f"--group_by=column:{column}: {err}") from None
  return [source[int(i)].user_id for i in indices]


def whitebox_report(
  workdir: str | Path, *, trials: int = 100_000, seed: int | None = None
) -> dict[str, Any]:
  """The white-box step audit of the run's mechanism: its clip rule and σ, a fresh secret."""
  workdir = Path(workdir)
  trained = load_trained(workdir)
  c = trained.config
  base = {
    "report": "whitebox",
    "workdir": str(workdir),
    "computed_from": "no data: canary gradients through the run's clip rule and noise",
  }
  sigma = trained.mechanism.get("noise_multiplier") or 0.0
  if not c.dp.enabled or sigma <= 0:
    return {**base, "applicable": False, "why": "the run claims no privacy (dp.enabled=False)"}
  spec = dataclasses.replace(
    config_lib.mechanism_spec(c),
    noise_multiplier=float(sigma),
    target_epsilon=None,
    epsilon_budget=None,
    backend="vmap",
    microbatch_size=8,
    max_examples_per_user=None,  # one step's clip and noise: the same at either unit
  )
  background = 31
  plan = privacy.make_mechanism(
    spec, dataset_size=max(trained.mechanism["dataset_size"], 64), expected_batch_size=32.0, steps=1
  ).keyed(RunSecret.fresh())
  result = whitebox.audit_step(plan, trials=trials, background=background, seed=seed)
  return {
    **base,
    "applicable": True,
    "noise_multiplier": sigma,
    "clip_rule": repr(spec.clip),
    "claim": "one step of the Gaussian mechanism, no subsampling: (1/sigma)-GDP",
    **result.to_dict(),
  }


def summary_line(report: dict[str, Any]) -> str:
  """One line that states a report's result (what ``python -m dpjax.audit`` prints)."""
  if report["report"] == "membership":
    parts = [
      f"{a['attack']}: AUROC {a['auroc']:.3f}, TPR@1%FPR {a['tpr_at_fpr']['0.01']:.4f} "
      f"(bound {a['max_tpr_at_fpr']['0.01']:.4f})"
      for a in report["attacks"]
    ]
    return f"membership (epsilon {report['epsilon']}): " + "; ".join(parts)
  if report["report"] == "groups":
    dp = report["dp"]
    text = f"groups by {report['group_by']}: DP gap {dp['gap']:.3f}, worst {dp['worst_group']}"
    if report["reference"]:
      text += f" (non-private reference gap {report['reference']['gap']:.3f})"
    return text
  if report["report"] == "canaries":
    return (
      f"canaries ({report['canaries_in']} of {report['canaries']} in): one-run epsilon lower "
      f"bound {report['epsilon_one_run']:.3f} (f-DP {report['epsilon_one_run_fdp']:.3f}) "
      f"vs ledger epsilon {report['epsilon']}"
    )
  if not report["applicable"]:
    return f"whitebox: not applicable ({report['why']})"
  verdict = "VIOLATED" if report["violated"] else "consistent"
  return (
    f"whitebox: claimed epsilon {report['claimed_epsilon']:.3f} per step at delta "
    f"{report['delta']:g}; lower bound {report['epsilon_lb']:.3f} (GDP fit "
    f"{report['epsilon_gdp']:.3f}): {verdict}"
  )


def canaries(
  workdir: str | Path, *, significance: float = 0.05, batch_size: int = 64
) -> dict[str, Any]:
  """The one-run audit: score the run's m canaries, bound ε from the guesses on their coins.

  Two scores (each at α/2): -loss, and the loss drop from the pretrained model.
  The bound is for the whole run; set it beside the ledger's ε at the run's δ.
  """
  workdir = Path(workdir)
  trained = load_trained(workdir)
  c = trained.config
  if not c.audit.canaries:
    raise ConfigError(
      f"{workdir} trained without canaries: set config.audit.canaries (e.g. 1000) for the "
      "one-run audit"
    )
  planted = splits.canaries_of(c, trained.tokenizer)
  encoded = splits.encode_canaries(c, trained.tokenizer, list(planted.examples))
  split = splits.Split(encoded, np.arange(len(encoded)))
  final = scoring.example_stats(trained.params, trained.model, split, batch_size)["loss"]
  start = scoring.example_stats(trained.initial, trained.model, split, batch_size)["loss"]
  ledger, epsilon, delta = _privacy(workdir, trained)
  coins = planted.included
  if coins.all() or not coins.any():
    raise ConfigError(
      f"all {len(coins)} canaries landed {'in' if coins.all() else 'out'}: nothing to compare; "
      "use more canaries (config.audit.canaries) or another audit.canary_seed"
    )
  attacks = []
  for name, score in (("loss", -final), ("loss_vs_pretrained", start - final)):
    audit = statistics.ScoreAudit(score[coins], score[~coins])
    attacks.append(
      {
        "attack": name,
        "epsilon_one_run": audit.epsilon_one_run(significance / 2, delta),
        "epsilon_one_run_fdp": audit.epsilon_one_run_fdp(significance / 2, delta),
        "auroc": audit.auroc(),
      }
    )
  return {
    "report": "canaries",
    "workdir": str(workdir),
    "step": trained.step,
    "epsilon": _json_number(epsilon),
    "delta": delta,
    "significance": significance,
    "canaries": len(planted),
    "canaries_in": int(coins.sum()),
    "epsilon_one_run": max(a["epsilon_one_run"] for a in attacks),
    "epsilon_one_run_fdp": max(a["epsilon_one_run_fdp"] for a in attacks),
    "computed_from": (
      "released and pretrained parameters and the synthetic canaries (public seed "
      "audit.canary_seed); no training row"
    ),
    "attacks": attacks,
  }
