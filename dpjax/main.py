"""Fine-tune with differential privacy from a config file.

    python -m dpjax.main --config=experiments/sst2.py:quick --workdir=/tmp/sst2 \
        [--config.dp.epsilon=3] [--config.train.epochs=2]
    [--coordinator_address=HOST:PORT --num_processes=N --process_id=I]
    python -m dpjax.main --config=experiments/sst2.py:quick --dry_run [--config.KEY=...]
    python -m dpjax.main --config_keys [--config=FILE.py[:variant]]

``--dry_run`` prints the run's plan in seconds (N, B, q, steps, σ, δ, the ε the
planned run spends, parameters and the memory of weights and optimizer state)
without reading the model's weights, training or writing anything; no
``--workdir`` is needed (see :mod:`dpjax.train.dry_run`).

``--config_keys`` lists every ``--config.KEY`` with its value (the config's, or the
defaults) and what it means. Values are Python literals: strings as is
(``--config.dp.unit=user``), tuples in parentheses (``--config.data.buckets='(32,64)'``,
``--config.data.label_names='("neg","pos")'``), None as ``None``.

Exit codes (for schedulers):

* 0: finished (all planned steps, or as many as the epsilon budget allows; the
  summary's ``stopped_by_budget`` says which).
* 2: a user mistake (bad config values, missing files, a workdir of another run
  or in use, a spent budget, a checkpoint that cannot be trusted): one line on
  stderr, and nothing is overwritten.
* 75 (EX_TEMPFAIL): preempted by SIGTERM after saving a checkpoint; run the
  same command again to continue.
* 1: a bug (a traceback).
"""

from __future__ import annotations

import ast
import json
import os
import sys

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from dpjax import parallel
from dpjax.data import DataError
from dpjax.models.pretrained import PretrainedError
from dpjax.train import config as config_lib
from dpjax.train.config import ConfigError
from dpjax.train.loop import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:variant].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, summary.")
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address",
  "",
  "host:port of process 0, for a multi-process run (with "
  "--num_processes and --process_id). Not needed on SLURM or TPU pods: detected there.",
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Number of processes of the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "This process's index in [0, num_processes).")
_CONFIG_KEYS = flags.DEFINE_boolean(
  "config_keys", False, "List every --config.KEY, its value and its meaning, and exit."
)
_DRY_RUN = flags.DEFINE_boolean(
  "dry_run", False, "Print the run's plan (data, sampling, σ, ε, model size) and exit."
)
EXIT_PREEMPTED = getattr(os, "EX_TEMPFAIL", 75)
USER_ERRORS = (
  ConfigError,
  DataError,
  PretrainedError,
  ValueError,
  TypeError,
  KeyError,
  AttributeError,
  FileNotFoundError,
)


def fail(message: str) -> None:
  """One line on stderr and exit 2, without the teardown noise of background threads."""
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(2)  # pylint: disable=protected-access


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing whose errors (unknown key, wrong type, a broken config file) are one
  line + exit 2."""
  try:
    return flags.FLAGS(argv)
  except SyntaxError as err:  # the config file is Python: its own mistakes are user mistakes
    fail(f"--config: {err.msg} ({err.filename}, line {err.lineno})")
  except (flags.Error, ImportError, NameError, OSError, *USER_ERRORS) as err:
    text = str(err)
    if len(text) > 1 and text[0] == text[-1] == "'":  # absl quotes a KeyError's repr
      try:
        key, *hint = ast.literal_eval(text).splitlines()
        text = "; ".join([f"unknown config key {key}", *hint])
      except (ValueError, SyntaxError, AttributeError):
        pass
    fail(" ".join(text.split()) if text else type(err).__name__)
  return []


def load_config() -> ml_collections.ConfigDict:
  """The --config value; a file that could not be loaded is one line + exit 2."""
  config = _CONFIG.value
  try:
    config.keys()  # a file that failed to load raises here (ml_collections defers the error)
  except OSError as err:
    cause = str(err.__cause__ or err).strip().splitlines()
    fail(f"--config cannot be loaded: {cause[-1].strip() if cause else err}")
  return config


def print_config_keys(config: ml_collections.ConfigDict) -> None:
  """One line per key: ``--config.KEY=VALUE (type)``, then its comment, indented."""
  for key, comment in config_lib.documented_keys():
    value = config
    for part in key.split("."):
      value = value[part]
    kind = type(value).__name__ if value is not None else "optional"
    print(f"--config.{key}={value!r} ({kind})")
    if comment:
      print(f"    {comment}")


def main(argv: list[str]) -> None:
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Library INFO logs (checkpointing) off by default.
  if len(argv) > 1:
    fail(f"unexpected arguments {argv[1:]}")
  if _CONFIG_KEYS.value:
    print_config_keys(config_lib.default_config() if _CONFIG.value is None else load_config())
    return
  if _DRY_RUN.value:
    if _CONFIG.value is None:
      fail("--dry_run needs --config=FILE.py[:variant]")
    from dpjax.train import dry_run  # pylint: disable=import-outside-toplevel

    try:
      print(dry_run.describe(dry_run.plan(load_config())), flush=True)
    except (ConfigError, DataError, PretrainedError) as err:
      fail(str(err))
    return
  if _CONFIG.value is None or not _WORKDIR.value:
    fail("--config=FILE.py[:variant] and --workdir=DIR are required")
  try:
    parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    summary = train_and_evaluate(load_config(), _WORKDIR.value)
  except (ConfigError, DataError, PretrainedError, parallel.ParallelError) as err:
    fail(str(err))
  if not parallel.is_main_process():
    sys.exit(EXIT_PREEMPTED if summary["preempted"] else 0)
  result = summary["eval"]
  # Classifiers report dev accuracy; causal LMs dev perplexity (and BLEU etc. when asked).
  metric = "accuracy" if "accuracy" in result else "perplexity"
  eps = summary["epsilon"]
  eps_text = f"{eps:.3f}" if isinstance(eps, float) else str(eps)  # "inf" when sigma = 0
  guarantee = (
    f"epsilon={eps_text} delta={summary['delta']:.3g}"
    if summary["dp"]
    else "no privacy (epsilon=inf)"
  )
  attacker = summary.get("attacker", {}).get("max_tpr_at_fpr", {})
  if summary["dp"] and isinstance(attacker.get("0.01"), float):
    # The same guarantee as an attacker's power: at 1% false positives, at most this TPR.
    guarantee += f" (a membership test at FPR 1% has TPR <= {attacker['0.01']:.3f})"
  print(
    json.dumps(
      {
        "epsilon": eps,
        "delta": summary["delta"],
        f"eval_{metric}": result[metric],
        **{f"eval_{k}": result[k] for k in ("bleu", "rouge_l") if k in result},
        "steps": summary["steps"],
      }
    )
  )
  if summary["preempted"]:
    print(
      f"preempted: checkpoint saved at step {summary['steps']} ({guarantee} so far); run the "
      "same command again to continue",
      flush=True,
    )
    sys.exit(EXIT_PREEMPTED)
  stopped = " (stopped by the epsilon budget)" if summary["stopped_by_budget"] else ""
  print(
    f"done{stopped}: {guarantee} dev {metric}={result[metric]:.4f}; "
    f"summary, checkpoints and metrics in {summary['workdir']} "
    f"(plots: python -m dpjax.report --workdir {summary['workdir']})"
  )


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
