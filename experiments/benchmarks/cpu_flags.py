"""Benchmark: what XLA's CPU options buy the train step (the CPU gap to PyTorch).

    python -m experiments.benchmarks.cpu_flags [--variants=default,onednn,...]
        [--modes=nonprivate,bookkeeping] [--rounds=2] [--model=minilm] [--batch=32]
        [--seq=64] [--steps=5] [--json=FILE]

Runs :mod:`experiments.benchmarks.throughput` rows (one fresh process each, the
same fixed batch and random weights) under several ``XLA_FLAGS`` variants, the
variants interleaved round by round so that a busy spell of a shared machine
touches all of them alike. Reports per variant and mode the median over rounds
of the median step time, and its ratio to the ``default`` variant's.

Variants (:data:`VARIANTS`) name XLA CPU options of the installed jaxlib: the
oneDNN and XNNPACK library paths for dots and fusions, the thunk runtime's
scheduler, fast math, matmul tiling. An option that the jaxlib does not know
makes its row fail; the table shows the error.
"""

from __future__ import annotations

import json
import os
import statistics
import sys

from absl import app, flags

from experiments.benchmarks import common

VARIANTS = {
  "default": "",
  "onednn": "--xla_cpu_use_onednn=true",
  "onednn_custom_call": "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_custom_call=true",
  "xnnpack": "--xla_cpu_use_xnnpack=true",
  "no_xnnpack": "--xla_cpu_use_xnnpack=false",
  "fast_math": "--xla_cpu_enable_fast_math=true",
  "no_concurrency_scheduler": "--xla_cpu_enable_concurrency_optimized_scheduler=false",
  "no_eigen_threads": "--xla_cpu_multi_thread_eigen=false",
}

_VARIANTS = flags.DEFINE_list(
  "variants", list(VARIANTS), f"Among {list(VARIANTS)}; join with + to combine (a+b)."
)
_PYTORCH = flags.DEFINE_bool(
  "pytorch", False, "Also time PyTorch's non-private step once per round (needs torch)."
)
_MODES = flags.DEFINE_list("modes", ["nonprivate", "bookkeeping"], "throughput.py modes.")
_ROUNDS = flags.DEFINE_integer("rounds", 2, "Rows per (variant, mode), interleaved.")
_MODEL = flags.DEFINE_string("model", "minilm", "throughput.py --model.")
_BATCH = flags.DEFINE_integer("batch", 32, "Examples per step.")
_SEQ = flags.DEFINE_integer("seq", 64, "Tokens per example.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per row.")
_JSON = flags.DEFINE_string("json", None, "Write every row to this JSON file.")


def xla_flags(variant: str) -> str:
  """The XLA_FLAGS of a variant name (``a+b`` combines a and b)."""
  return " ".join(VARIANTS[part] for part in variant.split("+")).strip()


def _row(variant: str, mode: str) -> dict:
  env = dict(os.environ)
  if variant != "pytorch":
    env["XLA_FLAGS"] = " ".join([env.get("XLA_FLAGS", ""), xla_flags(variant)]).strip()
  argv = [
    f"--model={_MODEL.value}",
    f"--batch={_BATCH.value}",
    f"--seq={_SEQ.value}",
    f"--steps={_STEPS.value}",
    "--warmup=1",
  ]
  row = common.run_worker("experiments.benchmarks.throughput", f"--worker={mode}", argv, env)
  if not isinstance(row, dict):
    row = {"error": row}
  return {**row, "variant": variant, "mode": mode}


def main(argv):
  del argv
  unknown = [p for v in _VARIANTS.value for p in v.split("+") if p not in VARIANTS]
  if unknown:
    print(f"--variants: unknown {unknown}; choose among {list(VARIANTS)}", file=sys.stderr)
    sys.exit(2)
  if _ROUNDS.value < 1:
    print(f"--rounds: must be >= 1 (got {_ROUNDS.value})", file=sys.stderr)
    sys.exit(2)
  variants = ["default"] + [v for v in _VARIANTS.value if v != "default"]
  modes = list(_MODES.value)
  rows = []
  for round_ in range(_ROUNDS.value):
    order = variants if round_ % 2 == 0 else variants[::-1]
    runs = [(v, m) for v in order for m in modes]
    if _PYTORCH.value:
      runs.insert(len(runs) // 2, ("pytorch", "pytorch/nonprivate"))
    for variant, mode in runs:
      rows.append(_row(variant, mode))
      status = rows[-1].get("error") or f"{rows[-1]['median_step_seconds']:.3f} s"
      print(f"  round {round_ + 1}: {variant} {mode}: {status}", flush=True)

  def median(variant: str, mode: str) -> float | None:
    times = [
      r["median_step_seconds"]
      for r in rows
      if r["variant"] == variant and r["mode"] == mode and "error" not in r
    ]
    return statistics.median(times) if times else None

  print(f"| variant | XLA_FLAGS | {' | '.join(f'{m} step s (x default)' for m in _MODES.value)} |")
  print(f"|---|---|{'---|' * len(_MODES.value)}")
  if _PYTORCH.value:
    torch = median("pytorch", "pytorch/nonprivate")
    print(f"PyTorch non-private: {torch} s" if torch else "PyTorch non-private: failed")
  for variant in variants:
    cells = []
    for mode in _MODES.value:
      value, base = median(variant, mode), median("default", mode)
      if value is None:
        error = next(r["error"] for r in rows if r["variant"] == variant and r["mode"] == mode)
        cells.append(f"failed: {str(error)[:60]}")
      else:
        cells.append(f"{value:.3f} ({value / base:.2f})" if base else f"{value:.3f}")
    print(f"| {variant} | `{xla_flags(variant) or '(none)'}` | {' | '.join(cells)} |")
  if _JSON.value:
    with open(_JSON.value, "w", encoding="utf-8") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  app.run(main)
