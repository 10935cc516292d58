"""The randomness of a run is secret: fresh per run, only in checkpoints.

A resume that may repeat a step's noise on other gradients re-keys it.
"""

import base64
import json
from pathlib import Path

import numpy as np
import pytest

from dpjax.privacy.secret import RunSecret
from dpjax.train import journal as journal_lib
from dpjax.train import loop, splits
from dpjax.train import task as task_lib
from experiments import sst2
from tests.shared_fixtures import shared_once

RUN_NAMES = (("fresh_a", None), ("fresh_b", None), ("fixed_a", 3), ("fixed_b", 3))


def _four_runs(root: Path) -> None:
  cache = str(root / "token_cache")
  for name, fixed in RUN_NAMES:
    c = sst2.get_config("tiny")
    c.data.cache_dir = cache
    c.data.eval_limit = 32
    c.train.steps = 4
    c.train.checkpoint_every_steps = 2
    c.dp.insecure_fixed_noise_seed = fixed
    loop.train_and_evaluate(c, root / name)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Two fresh runs and two fixed-seed runs of the same tiny config (4 steps each)."""
  root = shared_once(tmp_path_factory, "secret_runs", _four_runs)
  return {
    name: (root / name, json.loads((root / name / "summary.json").read_text()))
    for name, _ in RUN_NAMES
  }


def test_two_fresh_runs_of_one_config_release_different_models(runs):
  """Re-running the public pipeline on the same data must not reproduce the released model."""
  (_, a), (_, b) = runs["fresh_a"], runs["fresh_b"]
  assert a["params_sha256"] != b["params_sha256"]
  assert a["guarantee"].startswith("(epsilon, delta)-DP")


def test_fixed_noise_seed_is_reproducible_and_says_there_is_no_guarantee(runs):
  (_, a), (_, b) = runs["fixed_a"], runs["fixed_b"]
  assert a["params_sha256"] == b["params_sha256"]
  assert a["guarantee"] == b["guarantee"] == "none (fixed noise seed)"


def _forms(secret: RunSecret) -> list[bytes]:
  """The secret and the keys derived from it, in the forms a leak would take."""
  values = [secret.value, secret.noise_key(0).tobytes(), secret.sampling_key(0)]
  forms = []
  for value in values:
    forms += [
      value,
      value.hex().encode(),
      value.hex().upper().encode(),
      str(int.from_bytes(value, "little")).encode(),
      str(int.from_bytes(value, "big")).encode(),
      base64.b64encode(value),
    ]
  forms += [str(int(w)).encode() for w in secret.noise_key(0)]  # each 32-bit word
  return forms


def test_secret_is_in_checkpoints_only(runs):
  workdir, _ = runs["fresh_a"]
  meta = json.loads((workdir / "checkpoints" / "4" / "meta" / "metadata").read_text())
  secret = RunSecret.from_checkpoint(meta["secret"])
  assert secret.secure and len(secret.value) == 32
  forms = _forms(secret)
  scanned = 0
  for path in workdir.rglob("*"):
    if not path.is_file() or "checkpoints" in path.relative_to(workdir).parts[:1]:
      continue
    data = path.read_bytes()
    scanned += 1
    for form in forms:
      assert form not in data, f"{path} holds a form of the run secret"
  assert scanned >= 5  # config.json, summary.json, metrics, journal, tensorboard, token cache
  # The checkpoint does hold it (needed for an exact resume).
  assert (
    secret.value.hex().encode()
    in (workdir / "checkpoints" / "4" / "meta" / "metadata").read_bytes()
  )


def test_exported_model_has_no_secret_and_no_private_statistic(runs, tmp_path):
  from dpjax import export  # pylint: disable=import-outside-toplevel

  workdir, _ = runs["fresh_a"]
  meta = json.loads((workdir / "checkpoints" / "4" / "meta" / "metadata").read_text())
  forms = _forms(RunSecret.from_checkpoint(meta["secret"]))
  out = export.export(workdir, tmp_path / "release")
  for path in out.rglob("*"):
    if path.is_file():
      data = path.read_bytes()
      assert not any(form in data for form in forms), path
      for word in (b"examples_seen", b"examples_per_second", b"wall_seconds"):
        assert word not in data, (path, word)


def test_subset_of_a_file_changes_by_at_most_the_removed_row(tmp_path):
  words = "good bad film plot actor scene slow fast dull bright".split()
  rng = np.random.default_rng(0)
  rows = [" ".join(rng.choice(words, 6)) + f" {i}" for i in range(1000)]
  c = sst2.get_config("tiny")
  _, _, _, tokenizer = task_lib.backbone_for(c)

  def kept(lines):
    path = tmp_path / "rows.tsv"
    path.write_text("sentence\tlabel\n" + "".join(f"{r}\t{len(r) % 2}\n" for r in lines))
    split = splits.load_split(str(path), tokenizer, c, None, fraction=0.3, seed=0)
    return {split.encoded.token_ids(int(i)).tobytes() for i in split.indices}

  full = kept(rows)
  assert 240 < len(full) < 360
  removed_kept = 0
  for removed in range(0, 1000, 37):
    smaller = kept(rows[:removed] + rows[removed + 1 :])
    assert smaller <= full and len(full - smaller) <= 1  # at most the removed row leaves
    removed_kept += len(full - smaller)
  assert removed_kept > 0  # some removed rows were in the subset (the check is not vacuous)


def _record(attempt, start, step, fingerprint="f"):
  return {
    "attempt": attempt,
    "start": start,
    "step": step,
    "fingerprint": fingerprint,
    "segment": {
      "sampling_prob": 0.1,
      "noise_multiplier": 1.0,
      "dataset_size": 100,
      "max_batch_size": None,
      "steps": 0,
    },
  }


def _journal(tmp_path, records):
  path = Path(tmp_path) / journal_lib.FILENAME
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return journal_lib.PrivacyJournal(tmp_path)


def test_resume_replays_identical_steps_and_charges_and_rekeys_everything_else(tmp_path):
  j = _journal(tmp_path, [_record(0, 0, 4), _record(0, 0, 8)])
  # Killed after step 8, checkpoint at 4, same computation: an exact replay, nothing charged.
  plan = j.plan_resume(4, 0, "f", skipped_checkpoint=False)
  assert (plan.attempt, plan.replay, plan.charged_steps) == (0, True, 0)
  # The computation changed (config, data or platform): new keys, steps 5-8 charged.
  plan = j.plan_resume(4, 0, "other", skipped_checkpoint=False)
  assert (plan.attempt, plan.replay, plan.charged_steps) == (1, False, 4)
  # A newer checkpoint was unreadable: new keys, steps 5-8 charged.
  plan = j.plan_resume(4, 0, "f", skipped_checkpoint=True)
  assert (plan.attempt, plan.charged_steps) == (1, 4)
  # Nothing executed past the checkpoint: continue, nothing to charge.
  assert j.plan_resume(8, 0, "f", False).charged_steps == 0
  # No checkpoint left at all: everything on record is charged, a new attempt starts.
  plan = j.plan_resume(None, None, "", False)
  assert (plan.attempt, plan.charged_steps) == (1, 8)
  # Restoring a checkpoint older than a later attempt: that attempt's steps are charged too.
  j = _journal(tmp_path, [_record(0, 0, 8), _record(1, 4, 10), _record(1, 4, 12)])
  plan = j.plan_resume(4, 0, "f", skipped_checkpoint=True)
  assert plan.attempt == 2 and plan.charged_steps == 4 + 8


def test_write_ahead_survives_a_torn_last_line(tmp_path):
  j = journal_lib.PrivacyJournal(tmp_path)
  j.write_ahead(0, 0, 4, "f", _record(0, 0, 0)["segment"])
  j.write_ahead(0, 0, 4, "f", _record(0, 0, 0)["segment"])  # idempotent
  with j.path.open("a") as f:
    f.write('{"attempt": 0, "sta')  # a crash in the middle of a write
  assert [r["step"] for r in j.records()] == [4]


def test_ledger_floor_counts_every_execution_on_record(tmp_path):
  # Attempt 0 ran steps 1-16; attempt 1 resumed from checkpoint 12 (steps 13-16 charged).
  j = _journal(tmp_path, [_record(0, 0, 8), _record(0, 0, 16), _record(1, 12, 20)])
  assert j.ledger_floor(0, 12) == 12  # a checkpoint of attempt 0 at step 12
  assert j.ledger_floor(1, 20) == 16 + 8  # all of attempt 0, then 12 -> 20
  # A replay of attempt 0 from checkpoint 8 (records start 8) adds nothing new.
  j = _journal(tmp_path, [_record(0, 0, 16), _record(0, 8, 16)])
  assert j.ledger_floor(0, 16) == 16
  assert journal_lib.PrivacyJournal(tmp_path / "none").ledger_floor(0, 4) == 0
