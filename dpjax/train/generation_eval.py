"""Generation quality of a causal-LM run on its (public) eval file: BLEU, chrF++, ROUGE-L.

For table-to-text (E2E, DART) every distinct eval prompt has several reference
completions: the model writes one completion per distinct prompt (decoded as
``config.generate`` says) and it is scored against all of that prompt's
completions (:mod:`dpjax.text_metrics`). The generations are written beside the
scores; they come from the released parameters and the public eval file only.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import ml_collections
import tokenizers
from absl import logging

from dpjax import generate, prompts, text_metrics
from dpjax.train import splits
from dpjax.train.config import ConfigError, generation_config

PyTree = Any
GENERATIONS_FILE = "eval_generations.jsonl"
HEADLINE = ("bleu", "chrf++", "rouge_l")  # also top-level keys of the eval row


def _eval_prompts(
  c: ml_collections.ConfigDict, fmt: prompts.RunFormat, limit: int | None
) -> tuple[list[tuple[str | None, int | None]], list[list[int]], list[list[str]]]:
  """(distinct (prompt, label) pairs, their token ids, their reference completions)."""
  source = splits.source_for(c.data.eval, c)
  rows = [source[i] for i in range(len(source))]
  keys = [json.dumps([r.prompt, r.label]) for r in rows]
  unique, references = text_metrics.group_references(keys, [r.text for r in rows])
  unique, references = unique[:limit], references[:limit]
  inputs = [tuple(json.loads(k)) for k in unique]
  return inputs, [fmt.prompt_ids(prompt, label) for prompt, label in inputs], references


def check_fits(c: ml_collections.ConfigDict, tokenizer: tokenizers.Tokenizer, n_positions: int):
  """Refuses (ConfigError) eval prompts that leave no room for ``generate.max_new_tokens``."""
  fmt = prompts.RunFormat(c, tokenizer)
  _, ids, _ = _eval_prompts(c, fmt, int(c.generate.eval_prompts))
  longest = max(len(i) for i in ids)
  if longest + c.generate.max_new_tokens > n_positions:
    raise ConfigError(
      f"config.generate.max_new_tokens must be <= {n_positions - longest} (the model's "
      f"{n_positions} positions minus the longest eval prompt, {longest} tokens) for "
      f"generate.eval_prompts (got {c.generate.max_new_tokens})"
    )


def generation_eval(
  c: ml_collections.ConfigDict,
  model,
  params: PyTree,
  tokenizer: tokenizers.Tokenizer,
  limit: int,
  out_dir: Path | None = None,
) -> dict[str, Any]:
  """Scores the model's completions of the first ``limit`` distinct eval prompts.

  Returns:
    ``bleu``, ``chrf++``, ``rouge_l`` (0-100), ``inputs``, ``references``, the metric
    signatures and the decoding settings. With ``out_dir``, the generations go to
    ``out_dir/eval_generations.jsonl`` (prompt, generation, references). When the eval
    file is the training file, the result says so (the texts are training rows then).
  """
  fmt = prompts.RunFormat(c, tokenizer)
  inputs, ids, references = _eval_prompts(c, fmt, limit)
  config = generation_config(c, eos_token_id=fmt.eos_id, pad_token_id=fmt.pad_id)
  rng = jax.random.PRNGKey(c.seed)  # public data and released parameters: no secret needed
  out = generate.generate_in_batches(model, params, ids, config, rng, int(c.generate.batch_size))
  texts = [fmt.decode(row) for row in out]
  scores = text_metrics.generation_scores(texts, references)
  same = c.data.eval == c.data.train
  if same:
    logging.warning(
      "generation eval: data.eval is the training file; %s holds training rows", GENERATIONS_FILE
    )
  if out_dir is not None:
    with open(Path(out_dir) / GENERATIONS_FILE, "w") as f:
      for (prompt, label), text, refs in zip(inputs, texts, references):
        row = {"prompt": prompt, "label": label, "generation": text, "references": refs}
        f.write(json.dumps(row) + "\n")
  return {**scores, "eval_is_training_file": same, "decoding": dataclasses.asdict(config)}
