"""GPU suite: DP train-step throughput and peak device memory over a grid, in a time budget.

    bash experiments/benchmarks/gpu_suite.sh            # on the GPU box (see "Wheels")
    python -m experiments.benchmarks.gpu_suite [--budget_s=480] [--out_dir=.]
    python -m experiments.benchmarks.gpu_suite --dry_run  # tiny shapes on a CPU, ~1 min

The grid: models {gpt2-small, roberta-base, bert-base, roberta-large, gpt2-medium}
(random weights of the real shapes, ``common.MODELS``) x T in {256, 128} x
{fp32, bf16} x dpjax modes {non-private, book-keeping, vmap with a microbatch},
plus, on the BERT-type models, the peers (PyTorch non-private, Opacus ghost
clipping, jax_privacy's ``clipped_grad`` with dpjax's vmap microbatch) where
they are installed. Each row is one ``experiments.benchmarks.throughput`` worker
in a fresh process (its peak memory is its own; an out-of-memory or any other
failure is that row's result): ``--steps`` timed steps after ``--warmup``
untimed ones, batch ``--batch`` (32) unless ``--batch_overrides`` says otherwise.

Order: first the rows the targets are about (gpt2-small and roberta-base, T=256,
non-private then book-keeping, fp32 then bf16), then non-private and book-keeping
for every other (model, T, dtype), then the vmap rows, then the peers. A row
starts only while the budget lasts and its estimated seconds (from the rows
already run, scaled by layers) fit in what is left; it is killed when the
budget runs out. Rows not run are reported as skipped, with the reason.

Outputs (``--out_dir``): ``gpu_suite.json`` (every row, the hardware: device
kind and JAX's platform version from a worker, driver and CUDA from
``nvidia-smi``, library versions; rewritten after each row) and
``gpu_suite.md`` (the README table: step time, examples/s, peak memory, and time
and memory ratios to the dpjax non-private row of the same model, T, dtype and
batch; a line saying whether the targets hold). Targets, on a GPU: book-keeping
DP at most 1.10x the non-private step time and 1.15x its peak memory for the
gpt2-small and roberta-base shapes at B >= 32, T = 256. ``--dry_run`` writes
``gpu_suite_dry_run.{json,md}``: the same grid and code path with the shapes
shrunk to 2 layers of width 64, 1 warm-up and 1 timed step, a 60 s budget.

Peak memory: on a GPU the worker's ``peak_bytes_in_use`` of JAX's device
allocator (``torch.cuda.max_memory_allocated()`` for PyTorch rows); on a CPU
the process's peak RSS during the timed steps. Each dpjax row also has XLA's
account of the compiled step (``xla_step_memory_mb``) and its compile seconds.

Wheels. A GPU box with jax[cuda], flax, optax, orbax, torch and transformers
but no internet needs, for this suite, only a few more small wheels
(Python 3.12, x86-64). ``import dpjax.privacy`` needs dp-accounting (and attrs);
ml-collections, tensorflow-datasets, array-record, prv-accountant and tokenizers
are not imported by the benchmark path. On a machine with internet, from the
repository root::

    DL="python3 -m pip download --only-binary=:all: --python-version 3.12 \\
      --implementation cp --platform manylinux_2_28_x86_64 \\
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \\
      --platform any -d .whl"
    $DL --no-deps dp-accounting==0.6.0 attrs==23.2.0       # dpjax rows (attrs if absent)
    $DL --no-deps opacus==1.6.0                            # Opacus rows
    $DL --no-deps jax-privacy==2.0.0 chex toolz            # jax_privacy rows
    $DL pydantic==2.11.7   # jax_privacy imports it; with its deps (pydantic-core, ...)
    # Only for the rest of dpjax (training, data; tensorflow-datasets needs more), not here:
    $DL --no-deps ml-collections==1.1.0 prv-accountant==0.2.0 array-record==0.8.6 \\
      tensorflow-datasets==4.9.10

(``echo /.whl/ >> .git/info/exclude`` keeps them out of git.) Copy the checkout
with ``.whl/`` to the box and run ``bash experiments/benchmarks/gpu_suite.sh``:
it installs the wheels into /tmp/site (``--no-index --no-deps``), puts the
checkout on PYTHONPATH and runs this module, writing into ``${OUT:-.}``.
``JAX_COMPILATION_CACHE_DIR=DIR`` makes a second run on the same box skip
most compilation.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

from absl import app, flags

from experiments.benchmarks import common, peers

FLAGS = flags.FLAGS

DEFAULT_MODELS = ["gpt2-small", "roberta-base", "bert-base", "roberta-large", "gpt2-medium"]
TARGET_MODELS = ("gpt2-small", "roberta-base")
TARGET_SEQ, TARGET_MIN_BATCH = 256, 32
TARGET_TIME, TARGET_MEMORY = 1.10, 1.15
#: Suite dtype name -> the throughput worker's mode suffix.
DTYPE_SUFFIX = {"fp32": "", "bf16": "@bf16"}
#: Rough cost of a row relative to non-private (compile + steps), for the budget's estimates.
KIND_COST = {"nonprivate": 1.0, "bookkeeping": 1.3, "vmap": 1.6, "peer": 1.3}
#: A row never starts with less than this many seconds of the budget left.
MIN_ROW_SECONDS = 10.0


@dataclasses.dataclass(frozen=True)
class Row:
  """One configuration of the grid."""

  model: str
  seq: int
  dtype: str  # "fp32" or "bf16"
  batch: int
  system: str  # "dpjax" or a peer system
  mode: str  # throughput's dpjax mode ("vmap:8"), or the peer's mode ("ghost")
  layers: int  # transformer layers of the shape run (for cost estimates)
  tier: int = 0  # run order: 0 the target rows, 1 the other non-private/book-keeping, ...

  @property
  def kind(self) -> str:
    return "peer" if self.system != "dpjax" else self.mode.partition(":")[0]

  @property
  def group(self) -> tuple[str, int, str, int]:
    """Rows of one group share a non-private baseline."""
    return (self.model, self.seq, self.dtype, self.batch)

  @property
  def worker_mode(self) -> str:
    """The ``--worker`` value of the throughput benchmark."""
    mode = self.mode + DTYPE_SUFFIX[self.dtype]
    return mode if self.system == "dpjax" else f"{self.system}/{mode}"

  @property
  def label(self) -> str:
    return f"{self.model} T={self.seq} {self.dtype} B={self.batch} {self.system} {self.mode}"


def parse_batch_overrides(entries: Iterable[str]) -> dict[tuple[str, int | None], int]:
  """``["roberta-large=16", "gpt2-medium:256=8"]`` -> ``{("roberta-large", None): 16, ...}``."""
  out = {}
  for entry in entries:
    key, sep, value = entry.partition("=")
    model, _, seq = key.partition(":")
    if not sep or model not in common.MODELS:
      raise ValueError(f"--batch_overrides entry {entry!r}: want MODEL=B or MODEL:T=B")
    out[(model, int(seq) if seq else None)] = int(value)
  return out


def build_grid(
  models: list[str],
  seqs: list[int],
  dtypes: list[str],
  modes: list[str],
  peer_rows: list[str],
  *,
  batch: int,
  batch_overrides: dict[tuple[str, int | None], int] | None = None,
  vmap_microbatch: int = 8,
  layers: Callable[[str], int] = common.num_layers,
) -> list[Row]:
  """Every row of the grid, most important first (see the module docstring).

  Groups (model, T, dtype) run in this order: the target groups (TARGET_MODELS
  at T=TARGET_SEQ, fp32 before bf16), then by T in the order given, dtype, model.
  Within a tier, each group's non-private row comes before its other rows.
  """
  overrides = batch_overrides or {}
  for dtype in dtypes:
    if dtype not in DTYPE_SUFFIX:
      raise ValueError(f"dtype {dtype!r}: want one of {sorted(DTYPE_SUFFIX)}")
  groups = [
    (model, seq, dtype)
    for dtype in dtypes
    for model in models
    for seq in seqs
    if model in TARGET_MODELS and seq == TARGET_SEQ
  ]
  groups += [
    (model, seq, dtype)
    for seq in seqs
    for dtype in dtypes
    for model in models
    if (model, seq, dtype) not in groups
  ]
  dp_modes = [f"vmap:{vmap_microbatch}" if m == "vmap" else m for m in modes]
  dp_modes.sort(key=lambda m: not m.startswith("nonprivate"))
  rows = []
  for model, seq, dtype in groups:
    size = overrides.get((model, seq), overrides.get((model, None), batch))
    common_fields = dict(model=model, seq=seq, dtype=dtype, batch=size, layers=layers(model))
    target = model in TARGET_MODELS and seq == TARGET_SEQ
    for mode in dp_modes:
      if mode.startswith("vmap"):
        tier = 2
      else:
        tier = 0 if target else 1
      rows.append(Row(system="dpjax", mode=mode, tier=tier, **common_fields))
    if common.MODELS[model][0] == "bert":
      for peer in peer_rows:
        system, _, mode = peer.partition("/")
        mode = mode.replace("MB", str(vmap_microbatch))
        if not peers.known(system, mode):
          raise ValueError(f"unknown peer row {peer!r}")
        rows.append(Row(system=system, mode=mode, tier=3, **common_fields))
  return sorted(rows, key=lambda r: r.tier)  # stable: the group order stays within a tier


def estimate_seconds(row: Row, done: list[tuple[Row, float]]) -> float | None:
  """Wall seconds ``row`` will likely take, from the (row, seconds) already run; None: no idea.

  The mean of the same model and kind if run; else the same model's rows scaled
  by :data:`KIND_COST`; else every row, per layer and cost, times the row's.
  """
  same = [w for r, w in done if r.model == row.model and r.kind == row.kind]
  if same:
    return statistics.mean(same)
  cost = KIND_COST.get(row.kind, 1.5)
  model_rows = [w * cost / KIND_COST.get(r.kind, 1.5) for r, w in done if r.model == row.model]
  if model_rows:
    return statistics.mean(model_rows)
  if done:
    return (
      statistics.mean(w / r.layers / KIND_COST.get(r.kind, 1.5) for r, w in done)
      * row.layers
      * cost
    )
  return None


def _status(out: dict[str, Any] | str) -> tuple[str, str | None]:
  """(status, reason) of a worker's answer: ok, oom, timeout or error."""
  error = out if isinstance(out, str) else out.get("error")
  if error is None:
    return "ok", None
  if any(marker in error for marker in common.OOM_MARKERS):
    return "oom", error
  if error.startswith("timeout"):
    return "timeout", error
  return "error", error


def run_grid(
  rows: list[Row],
  budget_s: float,
  run_row: Callable[[Row, float], dict[str, Any] | str],
  *,
  unavailable: dict[str, str] | None = None,
  clock: Callable[[], float] = time.monotonic,
  on_result: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
  """Runs ``rows`` in order within ``budget_s`` seconds; one result per row, skipped ones too.

  Args:
    rows: the grid, in run order.
    budget_s: wall seconds for all rows.
    run_row: ``run_row(row, timeout_s)`` -> the worker's row dict, or an error string.
    unavailable: peer system -> why it cannot run (its rows are skipped).
    clock: seconds (a fake in tests).
    on_result: called with each result as it is decided (e.g. to save progress).

  Returns:
    Per row: its fields, ``status`` (ok, oom, timeout, error, skipped), ``reason``
    (unless ok), ``wall_seconds`` (if run) and the worker's measurements.
  """
  unavailable = dict(unavailable or {})
  start = clock()
  done: list[tuple[Row, float]] = []
  results = []
  for row in rows:
    left = budget_s - (clock() - start)
    result: dict[str, Any] = dataclasses.asdict(row)
    estimate = estimate_seconds(row, done)
    if row.system in unavailable:
      result.update(status="skipped", reason=unavailable[row.system])
    elif left < MIN_ROW_SECONDS:
      result.update(status="skipped", reason=f"budget: {max(left, 0):.0f} s left")
    elif estimate is not None and estimate > left:
      result.update(status="skipped", reason=f"budget: needs ~{estimate:.0f} s, {left:.0f} s left")
    else:
      began = clock()
      out = run_row(row, left)
      wall = clock() - began
      done.append((row, wall))
      status, reason = _status(out)
      if isinstance(out, dict) and status == "ok":
        result.update({k: v for k, v in out.items() if k not in ("system", "mode")})
      result.update(status=status, wall_seconds=wall)
      if reason is not None:
        result["reason"] = reason
        if row.system != "dpjax" and ("not installed" in reason or "fails to import" in reason):
          unavailable[row.system] = reason
    results.append(result)
    if on_result is not None:
      on_result(result)
  return results


def add_ratios(results: list[dict[str, Any]]) -> None:
  """Adds time and memory ratios to the dpjax non-private row of the same group, in place."""
  key = lambda r: (r["model"], r["seq"], r["dtype"], r["batch"])
  base = {
    key(r): r
    for r in results
    if r["system"] == "dpjax" and r["mode"].startswith("nonprivate") and r["status"] == "ok"
  }
  for r in results:
    b = base.get(key(r))
    if r["status"] != "ok" or b is None:
      continue
    r["time_ratio"] = r["median_step_seconds"] / b["median_step_seconds"]
    if r.get("peak_memory_mb") and b.get("peak_memory_mb"):
      r["memory_ratio"] = r["peak_memory_mb"] / b["peak_memory_mb"]
    if r.get("xla_step_memory_mb") and b.get("xla_step_memory_mb"):
      r["xla_memory_ratio"] = r["xla_step_memory_mb"] / b["xla_step_memory_mb"]


def check_targets(results: list[dict[str, Any]], platform: str | None) -> dict[str, Any]:
  """Whether book-keeping meets the time and memory targets on the target rows.

  Returns ``{"verdict", "line", "rows"}``: verdict "met", "met where measured", "not
  met" or "not measured" on a GPU; "not evaluated" when the rows ran elsewhere (the
  targets are a GPU's; the line still gives the ratios).
  """
  checked = []
  for r in results:
    if not (
      r["system"] == "dpjax"
      and r["mode"] == "bookkeeping"
      and r["model"] in TARGET_MODELS
      and r["seq"] == TARGET_SEQ
      and r["batch"] >= TARGET_MIN_BATCH
    ):
      continue
    name = f"{r['model']} {r['dtype']} B={r['batch']}"
    if "time_ratio" in r and "memory_ratio" in r:
      met = r["time_ratio"] <= TARGET_TIME and r["memory_ratio"] <= TARGET_MEMORY
      checked.append(
        {
          "row": name,
          "met": met,
          "time_ratio": r["time_ratio"],
          "memory_ratio": r["memory_ratio"],
        }
      )
    else:
      checked.append({"row": name, "met": None, "why": r.get("reason", "no non-private row")})
  measured = [c for c in checked if c["met"] is not None]
  if not measured:
    verdict = "not measured"
  elif all(c["met"] for c in measured):
    verdict = "met" if len(measured) == len(checked) else "met where measured"
  else:
    verdict = "not met"
  if platform != "gpu":
    verdict = "not evaluated"
  parts = [
    f"{c['row']}: {c['time_ratio']:.2f}x time, {c['memory_ratio']:.2f}x memory"
    if c["met"] is not None
    else f"{c['row']}: not measured ({c['why']})"
    for c in checked
  ]
  line = (
    f"Targets (book-keeping <= {TARGET_TIME:.2f}x non-private time and <= "
    f"{TARGET_MEMORY:.2f}x peak memory, {' and '.join(TARGET_MODELS)}, T={TARGET_SEQ}, "
    f"B>={TARGET_MIN_BATCH}): {verdict.upper()}"
  )
  if platform != "gpu":
    line += f" (these rows ran on {platform or 'no device'}; the targets are for a GPU)"
  if parts:
    line += " - " + "; ".join(parts)
  return {"verdict": verdict, "line": line, "rows": checked}


def _fmt(value: Any, spec: str) -> str:
  return "" if value is None else format(value, spec)


def markdown_table(results: list[dict[str, Any]]) -> str:
  """The README table: one line per row, skipped and failed ones with their reason."""
  lines = [
    "| model | T | dtype | B | system | mode | step s | ex/s | peak MiB | XLA step MiB "
    "| compile s | time vs non-private | memory vs non-private | note |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in results:
    ok = r["status"] == "ok"
    note = "" if ok else f"{r['status']}: {r.get('reason', '')}".replace("|", "/")
    lines.append(
      "| "
      + " | ".join(
        [
          r["model"],
          str(r["seq"]),
          r["dtype"],
          str(r["batch"]),
          r["system"],
          r["mode"],
          _fmt(r.get("median_step_seconds"), ".4f"),
          _fmt(r.get("examples_per_second"), ".1f"),
          _fmt(r.get("peak_memory_mb"), ".0f"),
          _fmt(r.get("xla_step_memory_mb"), ".0f"),
          _fmt(r.get("compile_seconds"), ".1f"),
          _fmt(r.get("time_ratio"), ".2f"),
          _fmt(r.get("memory_ratio"), ".2f"),
          note[:160],
        ]
      )
      + " |"
    )
  return "\n".join(lines)


def nvidia_smi() -> dict[str, str]:
  """GPU name, driver, memory and CUDA version from ``nvidia-smi`` (empty without one)."""
  if shutil.which("nvidia-smi") is None:
    return {}
  info = {}
  try:
    query = subprocess.run(
      [
        "nvidia-smi",
        "--query-gpu=name,driver_version,memory.total",
        "--format=csv,noheader",
      ],
      capture_output=True,
      text=True,
      timeout=20,
      check=False,
    ).stdout.strip()
    if query:
      name, driver, memory = (query.splitlines()[0].split(", ") + ["", "", ""])[:3]
      info.update(gpu=name, driver=driver, memory=memory, gpus=str(len(query.splitlines())))
    header = subprocess.run(
      ["nvidia-smi"], capture_output=True, text=True, timeout=20, check=False
    ).stdout
    if "CUDA Version:" in header:
      info["cuda_driver_api"] = header.split("CUDA Version:")[1].split()[0]
  except (OSError, subprocess.SubprocessError):
    pass
  return info


def package_versions() -> dict[str, str]:
  """Installed versions of the libraries that matter here (read without importing them)."""
  names = [
    "jax",
    "jaxlib",
    "jax-cuda12-plugin",
    "jax-cuda12-pjrt",
    "jax-cuda13-plugin",
    "jax-cuda13-pjrt",
    "flax",
    "optax",
    "dp-accounting",
    "torch",
    "transformers",
    "opacus",
    "jax-privacy",
  ]
  out = {}
  for name in names:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return out


def render_markdown(report: dict[str, Any]) -> str:
  """The markdown file: a title, the hardware, the settings, the table and the targets' line."""
  settings, results = report["settings"], report["rows"]
  hw, smi = report.get("hardware") or {}, report.get("nvidia_smi") or {}
  statuses = sorted({r["status"] for r in results})
  counts = ", ".join(f"{sum(r['status'] == s for r in results)} {s}" for s in statuses)
  title = "# GPU suite"
  if settings["dry_run"]:
    title += " (DRY RUN: tiny shapes, 1 step; the numbers measure nothing)"
  device = (
    f"Device: {hw.get('device_kind', '?')} x{hw.get('device_count', '?')} "
    f"({hw.get('platform', '?')}, {hw.get('platform_version', '?')})"
  )
  if smi:
    device += (
      f"; driver {smi.get('driver')}, CUDA {smi.get('cuda_driver_api')}, {smi.get('memory')}"
    )
  packages = ", ".join(f"{k} {v}" for k, v in report.get("packages", {}).items())
  lines = [
    title,
    "",
    f"{device}; {packages}.",
    f"Steps: median of {settings['steps']} after {settings['warmup']} warm-up; budget "
    f"{settings['budget_s']:.0f} s, took {report.get('wall_seconds', 0):.0f} s; rows: {counts}.",
    "",
    markdown_table(results),
    "",
    report["targets"]["line"],
    "",
  ]
  return "\n".join(lines)


def _settings(dry_run: bool) -> dict[str, Any]:
  budget = FLAGS.budget_s if FLAGS["budget_s"].present or not dry_run else 60.0
  return {
    "dry_run": dry_run,
    "budget_s": budget,
    "steps": 1 if dry_run else FLAGS.steps,
    "warmup": 1 if dry_run else FLAGS.warmup,
    "batch": FLAGS.batch,
    "vmap_microbatch": FLAGS.vmap_microbatch,
    "shapes": "tiny (2 layers, width 64, 2048 tokens)" if dry_run else "full",
    "python": sys.version.split()[0],
    "cpus": os.cpu_count(),
  }


def _define_flags() -> None:
  """The command line (defined only when run, so importing this module defines no flags)."""
  flags.DEFINE_list("models", DEFAULT_MODELS, f"Of {', '.join(common.MODELS)}.")
  flags.DEFINE_list("seqs", ["256", "128"], "Sequence lengths T.")
  flags.DEFINE_list("dtypes", ["fp32", "bf16"], "Compute dtypes: fp32, bf16.")
  flags.DEFINE_list(
    "modes",
    ["nonprivate", "bookkeeping", "vmap"],
    "dpjax modes (throughput's names; a bare 'vmap' takes --vmap_microbatch).",
  )
  flags.DEFINE_integer(
    "vmap_microbatch", 8, "Examples per vmap microbatch (and jax_privacy's microbatch)."
  )
  flags.DEFINE_list(
    "peers",
    ["pytorch/nonprivate", "opacus/ghost", "jax_privacy/microbatch=MB"],
    "Peer rows for BERT-type models, SYSTEM/MODE (MB: --vmap_microbatch); empty for none.",
  )
  flags.DEFINE_integer("batch", 32, "Examples per step.")
  flags.DEFINE_list("batch_overrides", [], "MODEL=B or MODEL:T=B, e.g. roberta-large:256=16.")
  flags.DEFINE_integer("steps", 5, "Timed steps per row (median reported).")
  flags.DEFINE_integer("warmup", 2, "Untimed steps first.", lower_bound=1)
  flags.DEFINE_float("budget_s", 480, "Wall-clock budget of the whole grid (seconds).")
  flags.DEFINE_string("out_dir", ".", "Where the JSON and markdown files go.")
  flags.DEFINE_bool(
    "dry_run",
    False,
    "Tiny shapes (2 layers, width 64), 1 warm-up + 1 timed step, --budget_s 60 unless given: "
    "checks the machinery on a CPU.",
  )


def main(argv):
  del argv
  dry_run = FLAGS.dry_run
  settings = _settings(dry_run)
  rows = build_grid(
    list(FLAGS.models),
    [int(s) for s in FLAGS.seqs],
    list(FLAGS.dtypes),
    list(FLAGS.modes),
    list(FLAGS.peers),
    batch=FLAGS.batch,
    batch_overrides=parse_batch_overrides(FLAGS.batch_overrides),
    vmap_microbatch=FLAGS.vmap_microbatch,
    layers=(lambda model: 2) if dry_run else common.num_layers,
  )
  # Peers whose libraries are absent are skipped without starting a process (found
  # without importing them: this process must not start a device backend).
  unavailable = {}
  for system in sorted({r.system for r in rows} - {"dpjax"}):
    reason = peers.missing(system)
    if reason:
      unavailable[system] = reason
  stem = "gpu_suite_dry_run" if dry_run else "gpu_suite"
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  json_path = os.path.join(FLAGS.out_dir, f"{stem}.json")
  md_path = os.path.join(FLAGS.out_dir, f"{stem}.md")
  report: dict[str, Any] = {
    "suite": "experiments.benchmarks.gpu_suite",
    "settings": settings,
    "nvidia_smi": nvidia_smi(),
    "packages": package_versions(),
    "hardware": None,
    "rows": [],
  }
  print(
    f"{len(rows)} rows, budget {settings['budget_s']:.0f} s"
    f"{' (dry run: tiny shapes)' if dry_run else ''}; "
    f"gpu: {report['nvidia_smi'].get('gpu', 'none seen by nvidia-smi')}; "
    f"unavailable peers: {unavailable or 'none'}",
    flush=True,
  )
  worker_argv = [
    f"--steps={settings['steps']}",
    f"--warmup={settings['warmup']}",
    "--train=all",
    *(["--tiny"] if dry_run else []),
  ]

  def run_row(row: Row, timeout: float) -> dict[str, Any] | str:
    argv = [f"--model={row.model}", f"--batch={row.batch}", f"--seq={row.seq}", *worker_argv]
    return common.run_worker(
      "experiments.benchmarks.throughput", f"--worker={row.worker_mode}", argv, timeout=timeout
    )

  def save(result: dict[str, Any]) -> None:
    hardware = result.pop("hardware", None)
    if hardware and report["hardware"] is None:
      report["hardware"] = hardware
    report["rows"].append(result)
    shown = (
      f"{result['median_step_seconds']:.4f} s/step, {result.get('peak_memory_mb', 0):.0f} MiB"
      if result["status"] == "ok"
      else f"{result['status']}: {result.get('reason', '')}"
    )
    wall = f" [{result['wall_seconds']:.0f} s]" if "wall_seconds" in result else ""
    print(
      f"  {Row(**{f.name: result[f.name] for f in dataclasses.fields(Row)}).label}: {shown}{wall}",
      flush=True,
    )
    with open(json_path, "w", encoding="utf-8") as f:
      json.dump(report, f, indent=1)

  start = time.monotonic()
  results = run_grid(rows, settings["budget_s"], run_row, unavailable=unavailable, on_result=save)
  report["wall_seconds"] = time.monotonic() - start
  add_ratios(results)
  platform = (report["hardware"] or {}).get("platform")
  report["targets"] = check_targets(results, platform)
  report["rows"] = results
  markdown = render_markdown(report)
  with open(json_path, "w", encoding="utf-8") as f:
    json.dump(report, f, indent=1)
  with open(md_path, "w", encoding="utf-8") as f:
    f.write(markdown)
  print()
  print(markdown)
  print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
