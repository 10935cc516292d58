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
from tests.train import runs
from tests.train.runs import ROOT

K = 2  # the tiny variant's dp.max_examples_per_user


def tiny_users(token_cache, variant="tiny", **overrides):
  return runs.tiny(str(token_cache), sst2_users.get_config, variant, **overrides)


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
      "config.data.train must be a .tsv/.csv/.jsonl file or a tfds: split with a "
      "data.user_field column or feature",
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


@pytest.mark.parametrize("variant", sst2_users.VARIANTS)
def test_every_sst2_users_variant_is_valid(variant):
  from dpjax.train import config as config_lib

  c = sst2_users.get_config(variant)
  config_lib.validate(c)
  assert c.dp.unit == "user" and c.data.user_field == "user"
  if variant.startswith("quick"):  # the whole file, capped at k = 4: its docstring's numbers
    rows = [line.split("\t") for line in sst2_users.USERS_FILE.read_text().splitlines()[1:]]
    counts = collections.Counter(user for _, _, user in rows)
    kept = sum(min(v, c.dp.max_examples_per_user) for v in counts.values())
    assert (kept, len(counts)) == (8487, 4709)
    # The same steps and sampling rate whether rows (B = 250 of 8,487) or users are drawn.
    population = len(counts) if config_lib.samples_users(c) else kept
    assert config_lib.planned_steps(c, population) == 68
    assert c.train.batch_size / population == pytest.approx(250 / 8487, rel=0.01)


def test_the_group_privacy_sigma_of_the_quick_groupdp_variant():
  """σ = 1.099 meets user-level ε = 8 by group privacy over 4 rows; 1% less does not."""
  n, users, steps = 8487, 4709, 68
  delta = users**-1.1

  def epsilon(sigma):
    segment = privacy.Segment(250 / n, sigma, steps, dataset_size=n)
    return privacy.group_privacy_epsilon(segment, 4, delta)

  sigma = sst2_users.SIGMA_GROUP_PRIVACY_EPS_8
  assert sst2_users.get_config("quick_groupdp").dp.noise_multiplier == sigma
  assert 7.9 < epsilon(sigma) <= 8.0 < epsilon(0.99 * sigma)


@pytest.fixture(scope="module")
def uls_run(tmp_path_factory):
  """(workdir, summary) of one tiny run with user sampling (8 steps, σ = 2, k = 2, B = 32 users)."""

  def build(root):
    loop.train_and_evaluate(
      tiny_users(root / "token_cache", "tiny_uls", **{"train.steps": 8}), root / "run"
    )

  root = shared_once(tmp_path_factory, "tiny_uls_run", build)
  return root, json.loads((root / "run" / "summary.json").read_text())


def test_a_tiny_user_sampling_run_is_dp_sgd_over_users(uls_run):
  root, summary = uls_run
  c = tiny_users(root / "token_cache", "tiny_uls")
  train, _ = splits.training_split(c, minilm_tokenizer(), root / "token_cache")
  n_users = splits.count_users(train)
  assert summary["unit"] == "user" and summary["user_sampling"] == "uls"
  assert summary["user_contribution"] == "sum" and summary["num_users"] == n_users
  assert summary["sampling_prob"] == pytest.approx(32 / n_users)  # B counts users
  assert summary["delta"] == pytest.approx(n_users**-1.1)
  # One user is one unit of ordinary DP-SGD: the Poisson-subsampled Gaussian over N_u users.
  want = privacy.compute_epsilon(2.0, 32 / n_users, 8, summary["delta"], dataset_size=n_users)
  assert summary["epsilon"] == pytest.approx(want, rel=1e-9)
  ledger = privacy.PrivacyLedger.from_dict(summary["ledger"])
  assert not ledger.user_level and ledger.segments[0].dataset_size == n_users
  assert summary["epsilon_replace_one"] > summary["epsilon"]
  assert summary["neighboring_relation"] == "add_or_remove_one_user"
  assert summary["epsilon_interval"]["rdp_upper"] >= summary["epsilon"]
  assert summary["guarantee"].startswith("(epsilon, delta)-DP for add/remove of one user")


@pytest.mark.parametrize(
  "variant, overrides, message",
  [
    ("tiny", {"dp.user_sampling": "users"}, "config.dp.user_sampling must be one of"),
    ("tiny_uls", {"dp.user_contribution": "max"}, "config.dp.user_contribution must be one"),
    ("tiny_uls", {"train.batch_size": 450}, "under user sampling (it is the expected number"),
    ("tiny_uls", {"dp.clip": "quantile"}, "config.dp.clip must be flat, per_layer or automatic"),
  ],
)
def test_impossible_user_sampling_configs_are_one_line(tmp_path, variant, overrides, message):
  with pytest.raises(ConfigError) as err:
    loop.train_and_evaluate(tiny_users(tmp_path / "cache", variant, **overrides), tmp_path / "w")
  assert message in str(err.value) and "\n" not in str(err.value)
  assert not (tmp_path / "w").exists()


def test_user_sampling_takes_any_accountant():
  from dpjax.train import config as config_lib

  for accountant in ("rdp", "prv"):
    config_lib.validate(tiny_users("unused", "tiny_uls", **{"dp.accountant": accountant}))
