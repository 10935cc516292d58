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
# RoBERTa: BertConfig with RoBERTa's vocabulary, 514 positions counted after the padding
# index (pad_token_id 1, position_offset 2, as BertConfig.from_hf reads a RoBERTa config),
# one token type and LayerNorm eps 1e-5.
ROBERTA_BASE = dict(
  BERT_BASE,
  vocab_size=50265,
  max_position_embeddings=514,
  type_vocab_size=1,
  layer_norm_eps=1e-5,
  pad_token_id=1,
  position_offset=2,
  model_type="roberta",
)
ROBERTA_LARGE = dict(
  ROBERTA_BASE,
  hidden_size=1024,
  num_hidden_layers=24,
  num_attention_heads=16,
  intermediate_size=4096,
)
GPT2_SMALL = dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12)
GPT2_MEDIUM = dict(GPT2_SMALL, n_embd=1024, n_layer=24, n_head=16)
#: Benchmark model name -> (family, architecture): "bert" shapes are ``bert.BertConfig``
#: fields (a sequence classifier), "gpt2" shapes ``gpt2.GPT2Config`` fields (the LM loss).
MODELS: dict[str, tuple[str, dict[str, Any]]] = {
  "minilm": ("bert", MINILM),
  "bert-base": ("bert", BERT_BASE),
  "roberta-base": ("bert", ROBERTA_BASE),
  "roberta-large": ("bert", ROBERTA_LARGE),
  "gpt2-small": ("gpt2", GPT2_SMALL),
  "gpt2-medium": ("gpt2", GPT2_MEDIUM),
}


def num_layers(model: str) -> int:
  """Transformer layers of a benchmark model shape."""
  family, shape = MODELS[model]
  return shape["n_layer"] if family == "gpt2" else shape["num_hidden_layers"]


def tiny_shape(model: str) -> dict[str, Any]:
  """The shape of ``model`` shrunk to 2 layers, hidden 64, 2 heads and 2,048 tokens.

  Position tables, token types and the RoBERTa position offset stay, so every
  code path and sequence length of the full shape runs, in seconds on a CPU
  (machinery checks, e.g. ``gpu_suite --dry_run``).
  """
  family, shape = MODELS[model]
  if family == "gpt2":
    return dict(shape, n_embd=64, n_layer=2, n_head=2, vocab_size=2048)
  return dict(
    shape,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=256,
    vocab_size=2048,
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


#: Words in a failed worker's error that mark the device running out of memory (JAX's
#: RESOURCE_EXHAUSTED, torch's OutOfMemoryError; not the allocator's "ran out of memory"
#: warnings, which successful runs print too).
OOM_MARKERS = ("RESOURCE_EXHAUSTED", "OutOfMemoryError", "CUDA out of memory")


def run_worker(
  module: str,
  worker_flag: str,
  argv: list[str],
  env: dict[str, str] | None = None,
  timeout: float | None = None,
) -> dict[str, Any] | str:
  """Runs ``python -m module worker_flag *argv`` and returns its ``ROW {json}`` line as a dict.

  A fresh process per row, so compile caches and peak memory are its own. On
  failure returns one line of its output (a string) instead: the last line
  that reports running out of memory (:data:`OOM_MARKERS`), else the last
  line. After ``timeout`` seconds the process is killed and the string says so.
  """
  command = [sys.executable, "-m", module, worker_flag, *argv]
  try:
    done = subprocess.run(
      command,
      capture_output=True,
      text=True,
      check=False,
      env={**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"},
      timeout=timeout,
    )
  except subprocess.TimeoutExpired:
    return f"timeout: killed after {timeout:.0f} s"
  for line in done.stdout.splitlines():
    if line.startswith("ROW "):
      return json.loads(line[4:])
  lines = (done.stderr or done.stdout).strip().splitlines()
  oom = [line for line in lines if any(m in line for m in OOM_MARKERS)]
  last = (oom or lines)[-1:] or [f"no output (exit status {done.returncode})"]
  return last[0].strip()[:300]


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
