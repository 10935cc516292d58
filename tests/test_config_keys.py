"""Every config key is documented, and ``python -m dpjax.main --config_keys`` lists them."""

import subprocess
import sys
from pathlib import Path

from flax import traverse_util

from dpjax.train import config as config_lib

ROOT = Path(__file__).resolve().parents[1]


def test_every_key_of_the_default_config_has_a_comment():
  keys = config_lib.documented_keys()
  flat = traverse_util.flatten_dict(config_lib.default_config().to_dict(), sep=".")
  assert sorted(k for k, _ in keys) == sorted(flat)
  assert [k for k, comment in keys if len(comment) < 10] == []


def test_config_keys_lists_the_values_of_the_given_config():
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "dpjax.main",
      "--config_keys",
      "--config=experiments/sst2_users.py:quick_uls",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  lines = result.stdout.splitlines()
  assert "--config.dp.user_sampling='uls' (str)" in lines
  assert "--config.train.batch_size=139 (int)" in lines
  assert sum(line.startswith("--config.") for line in lines) == len(config_lib.documented_keys())
  assert lines[lines.index("--config.dp.unit='user' (str)") + 1].startswith("    The privacy unit.")
