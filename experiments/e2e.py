"""Table-to-text (E2E NLG) with DP GPT-2: Li et al. 2022's recipe, scored by BLEU / ROUGE-L.

    python -m dpjax.main --config=experiments/e2e.py:li2022 --workdir=DIR \
      --config.model.name=/path/to/gpt2 \
      --config.data.train=/path/to/e2e/trainset.csv --config.data.eval=/path/to/e2e/devset.csv

Data layout: the E2E NLG challenge CSV files as distributed (trainset.csv, devset.csv,
testset_w_refs.csv), header ``mr,ref``: one row per (meaning representation,
reference) pair, e.g. ``"name[The Eagle], eatType[pub], ...","The Eagle is a pub ..."``;
an mr with several references takes several rows. Each row trains as
``[bos] mr || ref [eos]`` with the loss on ``ref`` (and eos) only. After training
the model writes one text per distinct dev mr (beam search) and BLEU, chrF++ and
ROUGE-L are computed against all references of that mr (``summary.json`` ->
``eval``; the texts go to ``DIR/eval_generations.jsonl``). A JSONL file with
``prompt``/``completion`` fields works too (set ``data.prompt_field`` and
``data.text_field``).

Model: a Hugging Face GPT-2 directory (config.json, model.safetensors,
tokenizer.json; e.g. ``gpt2`` saved with ``save_pretrained`` plus its fast
tokenizer). None ships with dpjax.

Variants:
  li2022      Li et al. 2022, E2E (their released table2text script): full fine-tuning, expected
              batch 1024, lr 2e-3 constant, 10 epochs, clip 0.1, max length 100, AdamW,
              delta = N^-1.1 (8.2e-6 for E2E's 42,061 training rows; theirs 8e-6),
              ε = 8 (ε = 3: --config.dp.epsilon=3).
  nonprivate  `li2022` without DP (lr 5e-4).
  tiny        seconds on a CPU, no downloads: a tiny random-init GPT-2 on the 48-row sample
              experiments/data/e2e_sample.csv (hand-written in the E2E layout), greedy decoding;
              shows the pipeline, not the numbers.
"""

from __future__ import annotations

from pathlib import Path

import ml_collections

from dpjax.train.config import default_config

SAMPLE = str(Path(__file__).resolve().parent / "data" / "e2e_sample.csv")


def get_config(variant: str = "li2022") -> ml_collections.ConfigDict:
  c = default_config()
  c.model.task = "causal_lm"
  c.data.prompt_field = "mr"
  c.data.text_field = "ref"
  c.data.label_field = ""
  c.data.template = "{prompt} ||"
  c.data.max_length = 100
  c.data.buckets = (32, 64, 100)
  c.train.optimizer = "adamw"
  c.generate.strategy = "beam"
  c.generate.num_beams = 5
  c.generate.max_new_tokens = 64
  c.generate.batch_size = 16
  c.generate.eval_prompts = 100_000  # every distinct dev mr (547 in E2E's devset)
  if variant in ("li2022", "nonprivate"):
    c.model.name = "gpt2"  # a Hugging Face GPT-2 directory: pass --config.model.name=/path
    c.data.train = "e2e/trainset.csv"
    c.data.eval = "e2e/devset.csv"
    c.model.train = "all"
    c.train.batch_size = 1024
    c.train.epochs = 10.0
    c.train.learning_rate = 2e-3
    c.train.schedule = "constant"
    c.dp.clip_norm = 0.1
    c.dp.epsilon = 8.0
    c.dp.microbatch_size = 16
    c.train.eval_batch_size = 32
    c.train.log_every_steps = 10
    c.train.checkpoint_every_steps = 50
    if variant == "nonprivate":
      c.dp.enabled = False
      c.train.learning_rate = 5e-4
  elif variant == "tiny":
    c.model.name = "tiny"
    c.model.tiny_hidden = 32
    c.model.tiny_layers = 2
    c.data.train = SAMPLE
    c.data.eval = SAMPLE
    c.data.max_length = 100  # the sample's rows take 68-92 MiniLM tokens
    c.data.buckets = (64, 100)
    c.train.batch_size = 16
    c.train.steps = 4
    c.train.learning_rate = 3e-3
    c.dp.noise_multiplier = 1.0
    c.dp.microbatch_size = 16
    c.train.checkpoint_every_steps = 4
    c.train.log_every_steps = 2
    c.train.eval_every_steps = 0  # at the end only (tests read this run)
    c.generate.strategy = "greedy"
    c.generate.num_beams = 1
    c.generate.max_new_tokens = 12
    c.generate.batch_size = 8
    c.generate.eval_prompts = 8
  else:
    raise ValueError(f"unknown e2e variant {variant!r}: li2022, nonprivate or tiny")
  return c
