"""Shared by the benchmarks: model shapes (random weights), a synthetic batch, step timing,
and one row per fresh subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

CLIP_NORM = 1.0
NOISE_MULTIPLIER = 0.6
MINILM = dict(
  vocab_size=30522,
  hidden_size=384,
  num_hidden_layers=6,
  num_attention_heads=12,
  intermediate_size=1536,
  max_position_embeddings=512,
  type_vocab_size=2,
  layer_norm_eps=1e-12,
  hidden_act="gelu",
)
BERT_BASE = dict(MINILM, hidden_size=768, num_hidden_layers=12, intermediate_size=3072)
TINY = dict(
  MINILM, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
)


def make_batch(batch: int, seq: int, vocab_size: int, seed: int = 0) -> dict[str, np.ndarray]:
  """Random token ids after [CLS], every position real, binary labels."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(1000, vocab_size, (batch, seq)).astype(np.int32)
  ids[:, 0] = 101  # [CLS]
  return {
    "input_ids": ids,
    "attention_mask": np.ones((batch, seq), np.int32),
    "label": rng.integers(0, 2, batch).astype(np.int32),
  }


def time_steps(
  step: Callable, state: Any, args: tuple, warmup: int, steps: int
) -> tuple[Any, Any, list[float]]:
  """Runs ``state, metrics = step(state, *args)`` ``warmup`` times, then times ``steps`` calls.

  Returns the last (state, metrics) and the wall seconds of each timed call
  (each ends with ``block_until_ready``).
  """
  import jax  # pylint: disable=import-outside-toplevel

  metrics = None
  for _ in range(warmup):
    state, metrics = step(state, *args)
  jax.block_until_ready((state, metrics))
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = step(state, *args)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - start)
  return state, metrics, times


def run_worker(
  module: str, worker_flag: str, argv: list[str], env: dict[str, str] | None = None
) -> dict[str, Any] | str:
  """Runs ``python -m module worker_flag *argv`` and returns its ``ROW {json}`` line as a dict.

  A fresh process per row, so compile caches and peak memory are its own. On
  failure returns the last line of its output (a string) instead.
  """
  command = [sys.executable, "-m", module, worker_flag, *argv]
  done = subprocess.run(
    command,
    capture_output=True,
    text=True,
    check=False,
    env={**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"},
  )
  for line in done.stdout.splitlines():
    if line.startswith("ROW "):
      return json.loads(line[4:])
  return ((done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"])[0][:200]


#: A table column: (title, alignment and width such as ">8", number format such as ".3f",
#: the row's value, or None for an empty cell).
Column = tuple[str, str, str, Callable[[dict], Any]]


def print_table(rows: list[dict], columns: list[Column], key_columns: int = 1) -> None:
  """Prints rows under a header; a row with an "error" shows its key columns and the error."""
  header = " ".join(f"{title:{width}}" for title, width, _, _ in columns)
  print(header)
  print("-" * len(header))
  for r in rows:
    if "error" in r:
      keys = " ".join(f"{value(r):{width}}" for _, width, _, value in columns[:key_columns])
      print(f"{keys} error: {r['error']}")
      continue
    cells = []
    for _, width, number_format, value in columns:
      v = value(r)
      cells.append(f"{'' if v is None else format(v, number_format):{width}}")
    print(" ".join(cells))
