"""DP synthetic SST-2: a GPT-2-shaped generator DP fine-tuned with label control codes.

    python -m dpjax.main --config=experiments/synthetic_sst2.py:VARIANT --workdir=DIR

Each training row is written as ``[bos] sentiment: <negative|positive> : <sentence> [eos]``
and only the sentence (and eos) carries the loss, so the generator learns
p(sentence | label); sampling it with each label's control code gives labelled
synthetic text. No pretrained GPT-2 weights are installable offline: the shipped
variants train a small GPT-2-shaped decoder from random initialization with
MiniLM's (public) WordPiece tokenizer. With a Hugging Face GPT-2 directory, pass
``--config.model.name=/path/to/gpt2`` (its tokenizer then replaces MiniLM's;
byte-level BPE wants the label words with a leading space, e.g. " positive").

Variants:
  tiny        seconds on a CPU: 2 layers, hidden 32, ~500 rows, 6 steps (tests, smoke runs).
  quick       the CPU demo: 2 layers, hidden 128, 30% of SST-2 train (~20k rows), B = 512,
              3 epochs, ε = 8 (label histogram included). Then
                python -m dpjax.synthesize --workdir=DIR --out=OUT --num=6000 --seed=0 \
                  --distance --downstream_config=experiments/synthetic_sst2.py:downstream
              Measured (2-core CPU, 23 min + 6 min): ε 7.989, dev perplexity 1441, downstream
              dev accuracy 0.477, Fréchet distance 0.376 (real half vs half 0.206).
  nonprivate  `quick` without DP (the baseline): perplexity 945, downstream 0.482, distance
              0.283; with --config.train.batch_size=64 --config.train.learning_rate=1e-3 (943
              steps, 33 min): perplexity 482, downstream 0.556, distance 0.230. Generators
              from random init are too weak to carry the label well: the pipeline works end
              to end; useful synthetic text needs a pretrained GPT-2.
  downstream  the classifier `dpjax.synthesize --downstream_config` trains on the synthetic
              text (non-privately: post-processing), scored on the real SST-2 dev set;
              `downstream_tiny` its seconds-long twin for tests.
"""

from __future__ import annotations

import ml_collections

from dpjax.train.config import default_config


def get_config(variant: str = "quick") -> ml_collections.ConfigDict:
  c = default_config()
  c.model.task = "causal_lm"
  c.model.name = "tiny"  # random init (no generative weights ship); or a GPT-2 directory
  c.data.template = "sentiment: {label} :"  # the control code; the sentence follows it
  c.data.label_words = ("negative", "positive")
  c.data.max_length = 48  # 98.9% of SST-2 train sentences fit with their prompt
  c.data.buckets = (16, 32, 48)
  # The label proportions synthesis samples in: a Gaussian release (σ = 10 counts) inside ε.
  c.dp.label_histogram_noise = 10.0
  c.train.optimizer = "adamw"
  c.train.schedule = "linear"
  if variant == "tiny":
    c.model.tiny_hidden = 32
    c.model.tiny_layers = 2
    c.data.train_fraction = 0.0076  # ~500 rows of 67,349
    c.data.eval_limit = 64
    c.train.batch_size = 64
    c.train.steps = 6
    c.train.learning_rate = 3e-3
    c.dp.microbatch_size = 16
    c.train.checkpoint_every_steps = 3
    c.train.log_every_steps = 3
    c.train.eval_every_steps = 0  # at the end only (tests read this run)
  elif variant in ("quick", "nonprivate"):
    # Sized for a 2-core CPU: the 30,522-token output layer dominates the cost.
    c.model.tiny_hidden = 128
    c.model.tiny_layers = 2
    c.data.train_fraction = 0.3  # ~20k rows of 67,349
    c.data.eval_limit = None  # all 872 dev sentences
    c.train.batch_size = 512
    c.train.epochs = 3.0
    c.train.learning_rate = 3e-3
    c.train.warmup_steps = 5
    c.dp.clip_norm = 1.0
    c.dp.microbatch_size = 64
    c.train.log_every_steps = 10
    c.train.checkpoint_every_steps = 40
    if variant == "nonprivate":
      c.dp.enabled = False
  elif variant in ("downstream", "downstream_tiny"):
    # The classifier trained (non-privately) on the synthetic file by dpjax.synthesize
    # --downstream_config: sst2.py's quick recipe (MiniLM, LoRA on the top 3 layers), scored on
    # the real SST-2 dev set. data.train is set by dpjax.synthesize.
    from experiments import sst2  # pylint: disable=import-outside-toplevel

    c = sst2.get_config("tiny" if variant == "downstream_tiny" else "nonprivate")
    c.data.train_fraction = 1.0
    if variant == "downstream":
      c.train.epochs = 2.0
      c.train.batch_size = 128
  else:
    raise ValueError(
      f"unknown synthetic_sst2 variant {variant!r}: tiny, quick, nonprivate, downstream or "
      "downstream_tiny"
    )
  return c
