"""Runs that cannot lie: what happens when a workdir is edited, damaged, shared or misused.

Each test starts from a private copy of the one shared finished tiny run and
checks the outcome the README's "What happens when ..." table promises: a
one-line refusal that changes nothing, or a fallback that never lowers ε.
"""

import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest

from dpjax import evaluate
from dpjax import trained as trained_lib
from dpjax.privacy.secret import RunSecret
from dpjax.train import integrity, loop
from dpjax.train.config import ConfigError
from tests.train.runs import SHARED_RUN, copy_run, tiny


def _files(workdir: Path) -> dict[str, bytes]:
  """Every file of a workdir (but the lock) and its bytes: 'nothing changed' compares these."""
  return {
    str(p.relative_to(workdir)): p.read_bytes()
    for p in sorted(workdir.rglob("*"))
    if p.is_file() and p.name != integrity.LOCK_FILE
  }


def _refused(workdir: Path, c, match: str) -> None:
  """Training ``c`` in ``workdir`` is refused with ``match`` and leaves every file as it was."""
  before = _files(workdir)
  with pytest.raises(ConfigError, match=match):
    loop.train_and_evaluate(c, workdir)
  assert _files(workdir) == before


@pytest.fixture
def run(trained, tmp_path):
  """(copy of the shared 16-step run, its config) for a test to change."""
  workdir, _ = trained
  copy = copy_run(workdir, tmp_path / "run")
  return copy, tiny(str(workdir.parent / "token_cache"), **SHARED_RUN)


def _meta_file(workdir: Path, step: int) -> Path:
  return workdir / "checkpoints" / str(step) / "meta" / "metadata"


def test_an_edited_ledger_is_refused_sealed_or_not(run):
  workdir, c = run
  meta_file = _meta_file(workdir, 16)
  meta = json.loads(meta_file.read_text())
  meta["ledger"]["segments"][0]["steps"] = 1  # "steps": 16 -> 1 would report ε ≈ 4 not 8.
  meta_file.write_text(json.dumps(meta))
  _refused(workdir, c, "does not match its seal")
  # Re-sealed with the secret from the same file: the ledger is still below the 16 steps that
  # the state and the privacy journal show were executed.
  key = RunSecret.from_checkpoint(meta["secret"]).derive(integrity.SEAL_PURPOSE)
  meta["seal"] = integrity.seal(meta, key)
  meta_file.write_text(json.dumps(meta))
  _refused(workdir, c, "ledger holds 1 steps but at least 16 were executed")
  # Re-sealed with the right step count but a larger σ (ε 8 -> far less): the journal records
  # the plan each step ran under, and no step ran under this one.
  meta["ledger"]["segments"][0].update(steps=16, noise_multiplier=5.0)
  meta["seal"] = integrity.seal(meta, key)
  meta_file.write_text(json.dumps(meta))
  _refused(workdir, c, "ledger records 0 steps of the plan .* 16 executed")
  with pytest.raises(ConfigError, match="ledger records 0 steps of the plan"):
    trained_lib.load_trained(workdir)  # evaluate and export refuse it too


def test_flipped_bits_in_the_state_fall_back_to_the_previous_checkpoint(run):
  workdir, c = run
  data_files = [p for p in (workdir / "checkpoints" / "16" / "state").rglob("*") if p.is_file()]
  biggest = max(data_files, key=lambda p: p.stat().st_size)
  blob = bytearray(biggest.read_bytes())
  middle = len(blob) // 2
  blob[middle : middle + 16] = bytes(b ^ 0xFF for b in blob[middle : middle + 16])
  biggest.write_bytes(bytes(blob))
  c.resume = "allow_changes"
  c.dp.noise_multiplier = 0.7  # σ given: no budget, so the charged steps can be retrained
  summary = loop.train_and_evaluate(c, workdir)
  # Checkpoint 16 set aside; from 12, steps 13-16 were executed before: charged, re-keyed.
  assert (workdir / "checkpoints_unreadable" / "16").is_dir()
  assert summary["steps"] == 16 and summary["ledger_steps"] == 20
  assert math.isfinite(summary["params_global_norm"])
  assert json.loads((workdir / "summary.json").read_text())["ledger_steps"] == 20


def test_a_second_run_on_a_busy_workdir_is_refused(run):
  workdir, c = run
  lock = integrity.WorkdirLock(workdir)  # Another run, alive.
  try:
    _refused(workdir, c, r"is in use by another run \(pid \d+ on ")
  finally:
    lock.release()
  loop.train_and_evaluate(c, workdir)  # Released (or its holder died): the workdir is usable.


def test_deleted_checkpoints_are_not_a_silent_restart(run):
  workdir, c = run
  shutil.rmtree(workdir / "checkpoints")
  _refused(workdir, c, "records 16 executed steps")


def test_a_change_of_the_state_structure_is_refused_up_front(run):
  workdir, c = run
  for key, value, match in (
    ("train.optimizer", "sgd", "a change of config.train.optimizer cannot restore"),
    ("dp.enabled", False, "a change of config.dp.enabled cannot restore"),
    # Any other change of the saved arrays' shapes: caught from the checkpoint's own metadata.
    ("model.tiny_hidden", 64, "holds a train state of another shape"),
    ("model.tiny_layers", 3, "holds a train state of another shape"),
  ):
    changed = tiny(c.data.cache_dir, **SHARED_RUN, **{key: value, "resume": "allow_changes"})
    _refused(workdir, changed, match)
  assert not (workdir / "checkpoints_unreadable").exists()


def test_outputs_without_checkpoints_or_journal_are_not_overwritten(run):
  workdir, c = run
  shutil.rmtree(workdir / "checkpoints")
  (workdir / "privacy_journal.jsonl").unlink()
  _refused(workdir, c, "holds an earlier run's outputs .* no checkpoint")


def test_a_refused_plan_leaves_an_existing_workdir_as_it_was(run):
  workdir, c = run
  bad = tiny(c.data.cache_dir, **SHARED_RUN, **{"dp.delta": 0.5, "resume": "allow_changes"})
  _refused(workdir, bad, "delta")


def test_a_budget_cannot_be_lowered_below_what_was_spent(run):
  workdir, c = run
  lowered = tiny(c.data.cache_dir, **SHARED_RUN, **{"dp.epsilon": 3.0, "resume": "allow_changes"})
  _refused(workdir, lowered, r"already spent epsilon 7\.9\d+ .* above the epsilon")


def test_garbage_config_json_is_one_line(run):
  workdir, c = run
  (workdir / "config.json").write_text("{not json")
  with pytest.raises(ConfigError, match="config.json is not a readable config"):
    loop.train_and_evaluate(c, workdir)


def test_reading_a_run_moves_nothing_and_skips_a_damaged_checkpoint(run):
  workdir, _ = run
  for f in (workdir / "checkpoints" / "16" / "state").rglob("*"):
    if f.is_file():
      f.write_bytes(b"garbage")
  before = _files(workdir)
  result = trained_lib.load_trained(workdir)
  assert result.step == 12 and result.ledger["segments"][0]["steps"] == 12
  # The scored model is step 12's, but steps 13-16 ran and their outputs were released:
  # evaluate's ε is the whole run's, as summary.json says, not the older checkpoint's.
  scored = evaluate.evaluate_workdir(workdir, "sst2:validation")
  summary = json.loads((workdir / "summary.json").read_text())
  assert scored["step"] == 12 and scored["epsilon"] == pytest.approx(summary["epsilon"], rel=1e-9)
  assert "older than the run's last executed step" in scored["epsilon_note"]
  assert _files(workdir) == before and not (workdir / "checkpoints_unreadable").exists()
  # An edited ledger is never reported: refused, not skipped in favour of an older one.
  meta_file = _meta_file(workdir, 12)
  meta = json.loads(meta_file.read_text())
  meta["ledger"]["segments"][0]["steps"] = 1
  meta_file.write_text(json.dumps(meta))
  with pytest.raises(ConfigError, match="checkpoint 12's metadata does not match its seal"):
    trained_lib.load_trained(workdir)


def test_changed_training_data_is_refused_unless_allowed(tmp_path):
  rows = (Path(__file__).parents[2] / "third_party" / "sst2" / "train.tsv").read_text()
  header, *lines = rows.splitlines()
  data = tmp_path / "train.tsv"
  data.write_text("\n".join([header, *lines[:300]]) + "\n")
  cache = str(tmp_path / "cache")
  c = tiny(
    cache,
    **{
      "train.steps": 4,
      "data.train": str(data),
      "data.train_fraction": 1.0,
      "dp.noise_multiplier": 1.0,
    },
  )
  workdir = tmp_path / "run"
  first = loop.train_and_evaluate(c, workdir)
  assert first["dataset_size"] == 300
  data.write_text("\n".join([header, *lines[:290]]) + "\n")  # ten rows removed
  _refused(workdir, c, r"training data changed since checkpoint 4 \(N was 300")
  c.train.steps = 8
  c.resume = "allow_changes"
  summary = loop.train_and_evaluate(c, workdir)  # allowed: a new segment, on N = 290
  segments = summary["ledger"]["segments"]
  assert [(s["dataset_size"], s["steps"]) for s in segments] == [(300, 4), (290, 4)]
  assert summary["steps"] == 8 and summary["dataset_size"] == 290


@pytest.fixture
def small_disk(tmp_path):
  """A 6 MiB tmpfs (smaller than one tiny checkpoint); skipped where mounting is not allowed."""
  mount_point = tmp_path / "small"
  mount_point.mkdir()
  mounted = subprocess.run(
    ["mount", "-t", "tmpfs", "-o", "size=6M", "tmpfs", str(mount_point)], capture_output=True
  )
  if mounted.returncode != 0:
    pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()[:100]})")
  try:
    yield mount_point
  finally:
    subprocess.run(["umount", "--lazy", str(mount_point)], check=False)


def test_a_full_disk_is_one_line_and_leaves_no_partial_checkpoint(small_disk, token_cache):
  c = tiny(token_cache, **{"train.steps": 8})
  with pytest.raises(ConfigError, match="no space left writing checkpoint 4 in .*there is no"):
    loop.train_and_evaluate(c, small_disk / "run")
  assert list((small_disk / "run" / "checkpoints").iterdir()) == []
