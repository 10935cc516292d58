"""User-level DP from the runner: the users file, the per-user cap, the plan and the summary."""

from __future__ import annotations

import collections
import json
import subprocess
import sys
import time

import pytest
import tokenizers

from dpjax import privacy
from dpjax.data import DataError
from dpjax.models import pretrained
from dpjax.train import loop, splits
from dpjax.train.config import ConfigError
from experiments import sst2_users
from experiments.data import make_sst2_users
from tests.shared_fixtures import shared_once
from tests.train.runs import ROOT

K = 2  # the tiny variant's dp.max_examples_per_user


def tiny_users(token_cache, **overrides):
  c = sst2_users.get_config("tiny")
  c.data.cache_dir = str(token_cache)
  c.data.eval_limit = 64
  for key, value in overrides.items():
    node = c
    *path, leaf = key.split(".")
    for part in path:
      node = node[part]
    node[leaf] = value
  return c


def minilm_tokenizer():
  return tokenizers.Tokenizer.from_file(str(pretrained.resolve("minilm") / "tokenizer.json"))


@pytest.fixture(scope="module")
def user_run(tmp_path_factory):
  """(workdir, summary, seconds) of one tiny user-level run (8 steps, σ = 2, k = 2)."""

  def build(root):
    start = time.time()
    c = tiny_users(root / "token_cache", **{"train.steps": 8})
    loop.train_and_evaluate(c, root / "run")
    (root / "seconds").write_text(f"{time.time() - start:.1f}")

  root = shared_once(tmp_path_factory, "tiny_user_level_run", build)
  summary = json.loads((root / "run" / "summary.json").read_text())
  return root, summary, float((root / "seconds").read_text())


def test_the_users_file_is_reproduced_by_its_script(tmp_path):
  facts = make_sst2_users.make(tmp_path / "users.tsv")
  assert (tmp_path / "users.tsv").read_bytes() == sst2_users.USERS_FILE.read_bytes()
  assert facts["rows"] == 20_000 and facts["users"] == 4709
  assert facts["max_rows_of_a_user"] == 400 and 0.55 < facts["users_with_one_row"] < 0.65


def test_the_training_split_keeps_each_users_first_k_rows(tmp_path):
  c = tiny_users(tmp_path / "cache")
  train, canaries = splits.training_split(c, minilm_tokenizer(), None)
  users = train.encoded.user_ids[train.indices]
  counts = collections.Counter(users.tolist())
  assert canaries == 0 and max(counts.values()) == K and splits.count_users(train) == len(counts)
  # The first k in file order, among the rows data.train_fraction keeps.
  everything = splits.load_split(
    c.data.train, minilm_tokenizer(), c, None, fraction=c.data.train_fraction, user_field="user"
  )
  seen, want = collections.Counter(), []
  for i in everything.indices:
    user = everything.encoded.user_ids[i]
    seen[user] += 1
    if seen[user] <= K:
      want.append(int(i))
  assert train.indices.tolist() == want and len(want) < len(everything)


def test_the_cap_is_local_to_each_user(tmp_path):
  """Removing one user's rows from the file removes only that user's kept rows."""
  lines = sst2_users.USERS_FILE.read_text().splitlines()[:1500]
  user = collections.Counter(line.split("\t")[2] for line in lines[1:]).most_common(1)[0][0]
  full, without = tmp_path / "full.tsv", tmp_path / "without.tsv"
  full.write_text("\n".join(lines) + "\n")
  without.write_text("\n".join(x for x in lines if not x.endswith("\t" + user)) + "\n")

  def kept(path):
    c = tiny_users(tmp_path / "cache", **{"data.train": str(path), "data.train_fraction": 0.5})
    train, _ = splits.training_split(c, minilm_tokenizer(), None)
    return collections.Counter(
      (tuple(train.encoded.token_ids(int(i)).tolist()), str(train.encoded.user_ids[i]))
      for i in train.indices
    )

  a, b = kept(full), kept(without)
  difference = a - b
  assert not (b - a) and 0 < sum(difference.values()) <= K
  assert {u for _, u in difference} == {user}


def test_a_tiny_user_level_run_reports_a_per_user_epsilon(user_run):
  root, summary, seconds = user_run
  c = tiny_users(root / "token_cache")
  train, _ = splits.training_split(c, minilm_tokenizer(), root / "token_cache")
  n, n_users = len(train), splits.count_users(train)
  assert summary["dataset_size"] == n and summary["num_users"] == n_users < n
  assert summary["unit"] == "user" and summary["max_examples_per_user"] == K
  assert summary["sampling_prob"] == pytest.approx(64 / n)
  assert summary["delta"] == pytest.approx(n_users**-1.1)
  assert summary["steps"] == 8 and summary["noise_multiplier"] == 2.0
  assert summary["epsilon"] == pytest.approx(
    privacy.compute_epsilon(
      2.0, 64 / n, 8, summary["delta"], dataset_size=n_users, max_examples_per_user=K
    ),
    rel=1e-9,
  )
  # k = 2 costs more ε than one example with the same steps, and less than group privacy.
  example = privacy.compute_epsilon(2.0, 64 / n, 8, summary["delta"])
  assert example < summary["epsilon"]
  ledger = privacy.PrivacyLedger.from_dict(summary["ledger"])
  assert ledger.user_level and ledger.segments[0].dataset_size == n_users
  assert summary["epsilon"] < privacy.group_privacy_epsilon(ledger, K, summary["delta"])
  assert summary["epsilon_replace_one"] is None
  assert summary["guarantee"].startswith(
    "(epsilon, delta)-DP for add/remove of one user (all of their at most 2 training examples)"
  )
  interval = summary["epsilon_interval"]
  assert interval["pld_optimistic_pessimistic"] == [None, summary["epsilon"]]
  assert interval["rdp_upper"] is None and interval["prv_lower_upper"] is None
  assert "number of users" in summary["public"]
  print(f"tiny user-level run (8 steps, fresh accounting caches): {seconds:.1f} s")


@pytest.mark.parametrize(
  "overrides, error, message",
  [
    ({"dp.accountant": "prv"}, ConfigError, "config.dp.accountant must be pld when dp.unit=user"),
    ({"audit.canaries": 10}, ConfigError, "config.audit.canaries must be 0 when dp.unit=user"),
    ({"dp.max_examples_per_user": 0}, ConfigError, "config.dp.max_examples_per_user must be an"),
    ({"data.user_field": "author"}, DataError, "missing column 'author'"),
    ({"dp.delta": 0.01}, ConfigError, "config.dp.delta must be < 1/num_users"),
  ],
)
def test_impossible_user_level_configs_are_one_line(tmp_path, overrides, error, message):
  with pytest.raises(error) as err:
    loop.train_and_evaluate(tiny_users(tmp_path / "cache", **overrides), tmp_path / "w")
  assert message in str(err.value) and "\n" not in str(err.value)
  assert not (tmp_path / "w").exists()


def test_a_row_without_a_user_is_refused(tmp_path):
  lines = sst2_users.USERS_FILE.read_text().splitlines()[:200]
  sentence, label, _ = lines[57].split("\t")
  lines[57] = f"{sentence}\t{label}\t "
  path = tmp_path / "users.tsv"
  path.write_text("\n".join(lines) + "\n")
  c = tiny_users(tmp_path / "cache", **{"data.train": str(path), "data.train_fraction": 1.0})
  with pytest.raises(DataError, match=r"users.tsv:58: empty user id in column 'user'$"):
    loop.train_and_evaluate(c, tmp_path / "w")


@pytest.mark.parametrize(
  "config, args, message",
  [
    (
      "sst2.py:tiny",
      ["--config.dp.unit=user", "--config.dp.max_examples_per_user=2"],
      "config.data.user_field must be a column/field name when dp.unit=user",
    ),
    (
      "sst2_users.py:tiny",
      ["--config.data.train=sst2:train"],
      "config.data.train must be a .tsv/.csv/.jsonl file with a data.user_field column",
    ),
    (
      "sst2_users.py:tiny",
      ["--config.dp.label_histogram_noise=1.0"],
      "config.dp.label_histogram_noise must be 0 when dp.unit=user",
    ),
  ],
)
def test_main_refuses_user_level_mistakes_with_exit_2(tmp_path, config, args, message):
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "dpjax.main",
      f"--config=experiments/{config}",
      f"--workdir={tmp_path / 'w'}",
      *args,
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 2, result.stderr[-1000:]
  lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(lines) == 1 and message in lines[0], result.stderr[-1000:]
  assert "Traceback" not in result.stderr and not (tmp_path / "w").exists()


@pytest.mark.parametrize("variant", ["tiny", "quick"])
def test_every_sst2_users_variant_is_valid(variant):
  from dpjax.train import config as config_lib

  c = sst2_users.get_config(variant)
  config_lib.validate(c)
  assert c.dp.unit == "user" and c.data.user_field == "user"
  if variant == "quick":  # the whole file, capped at k = 4: the numbers its docstring states
    rows = [line.split("\t") for line in sst2_users.USERS_FILE.read_text().splitlines()[1:]]
    counts = collections.Counter(user for _, _, user in rows)
    kept = sum(min(v, c.dp.max_examples_per_user) for v in counts.values())
    assert (kept, len(counts)) == (8487, 4709)
    assert config_lib.planned_steps(c, kept) == 68
