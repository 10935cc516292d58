"""Fine-tune with differential privacy from a config file.

    python -m dpjax.main --config=experiments/sst2.py:quick --workdir=/tmp/sst2 \
        [--config.dp.epsilon=3] [--config.train.epochs=2]
    [--coordinator_address=HOST:PORT --num_processes=N --process_id=I]

User mistakes (bad config values, missing files, a workdir of another run, a
spent budget) end with one line on stderr and exit code 2; nothing is overwritten.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from dpjax import parallel
from dpjax.data import DataError
from dpjax.models.pretrained import PretrainedError
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
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing whose errors (unknown key, wrong type) are one line + exit 2."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, *USER_ERRORS) as err:
    fail(str(err).splitlines()[0] if str(err) else type(err).__name__)
  return []


def main(argv: list[str]) -> None:
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Library INFO logs (checkpointing) off by default.
  if len(argv) > 1:
    fail(f"unexpected arguments {argv[1:]}")
  if _CONFIG.value is None or not _WORKDIR.value:
    fail("--config=FILE.py[:variant] and --workdir=DIR are required")
  try:
    parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    summary = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (ConfigError, DataError, PretrainedError, parallel.ParallelError) as err:
    fail(str(err))
  if not parallel.is_main_process():
    return
  accuracy = summary["eval"]["accuracy"]
  eps = summary["epsilon"]
  guarantee = (
    f"epsilon={eps:.3f} delta={summary['delta']:.3g}"
    if summary["dp"]
    else "no privacy (epsilon=inf)"
  )
  print(
    json.dumps(
      {
        "epsilon": eps,
        "delta": summary["delta"],
        "eval_accuracy": accuracy,
        "steps": summary["steps"],
      }
    )
  )
  print(
    f"done: {guarantee} dev accuracy={accuracy:.4f}; "
    f"summary, checkpoints and metrics in {summary['workdir']} "
    f"(plots: python -m dpjax.report --workdir {summary['workdir']})"
  )


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
