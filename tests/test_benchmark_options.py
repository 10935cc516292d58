"""The CPU-options and FSDP-memory benchmarks: their variants and their refusal of bad input."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_variants_combine_their_flags():
  # In a subprocess: the benchmark's absl flags must not meet other modules' in this one.
  code = (
    "from experiments.benchmarks import cpu_flags as c; "
    "print(repr(c.xla_flags('default'))); print(c.xla_flags('fast_math+no_eigen_threads'))"
  )
  done = subprocess.run(
    [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
  )
  assert done.returncode == 0, done.stderr
  default, combined = done.stdout.strip().splitlines()
  assert default == "''"
  assert combined.split() == [
    "--xla_cpu_enable_fast_math=true",
    "--xla_cpu_multi_thread_eigen=false",
  ]


@pytest.mark.parametrize(
  "module,arg,field",
  [
    ("cpu_flags", "--variants=default,turbo", "--variants"),
    ("cpu_flags", "--rounds=0", "--rounds"),
    ("fsdp_memory", "--models=125m,7b", "--models"),
  ],
)
def test_a_bad_option_is_one_line_and_exit_code_2(module, arg, field):
  done = subprocess.run(
    [sys.executable, "-m", f"experiments.benchmarks.{module}", arg],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert done.returncode == 2, done.stderr
  lines = done.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(field), lines
