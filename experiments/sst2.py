"""SST-2 sentiment: DP fine-tuning of all-MiniLM-L6-v2 (or a tiny random encoder).

    python -m dpjax.main --config=experiments/sst2.py:VARIANT --workdir=DIR

Variants:
  tiny        seconds on a CPU: a tiny random-init encoder on 512 SST-2 rows (tests, smoke runs).
  quick       MiniLM with LoRA (rank 8) on every Dense layer of its top 3 layers + head, a
              30% subset of SST-2 train (~20k rows), B = 500, 1 epoch (40 steps), lr 2e-2,
              ε = 8: about 2 min 30 s per run on a 2-core x86 CPU (the README's replication
              table, row `lora_flat`).
  nonprivate  `quick` without DP, lr 5e-3 (the baseline it is compared to): dev accuracy 0.846.
  demo        `make run`: `quick`'s adapters on all of SST-2 train (67,349 rows), B = 1500,
              1.5 epochs (67 steps), lr 1e-2, ε = 8. The embeddings and layers 0-2 are frozen,
              so their output is computed once per row (model.cache_features) and each step
              runs layers 3-5. Measured on a 2-core x86 CPU: see the README's `make run`
              section and replication table (dev accuracy 0.84, about 7 min 20 s).
  demo_nonprivate  `demo` without DP, lr 5e-3.
  demo_large  `demo` with B = 3000 for 3 epochs (the same 67 steps; σ/B is 0.6x demo's at
              ε = 8, 0.75x at ε = 1): about 15 min per run (the README's replication table).
  audit       `quick` with 1000 audit canaries (random words, random labels; each in by a fair
              coin), for the whole audit; `audit_nonprivate` is its non-private twin:
                python -m dpjax.main --config=experiments/sst2.py:audit --workdir=DIR_DP
                python -m dpjax.main --config=experiments/sst2.py:audit_nonprivate --workdir=DIR_NP
                python -m dpjax.audit --workdir=DIR_DP --reference=DIR_NP \
                  --reports=membership,groups,whitebox,canaries --shadows=2
                python -m dpjax.audit --workdir=DIR_NP --reports=membership,canaries --shadows=2
              Measured: see the README's audit table.
  lora        LoRA (rank 8) + head on all of SST-2, ε = 8.
  li2022      Li et al. 2022's recipe on all of SST-2: batch 1000, lr 5e-4 linear decay,
              3 epochs, clip 0.1, full fine-tuning, label-word objective; ε from --config.dp.epsilon
              (3 or 8). The objective needs the checkpoint's masked-LM head: give a model that
              has one (--config.model.name=DIR, e.g. roberta-base as in the paper); with
              all-MiniLM-L6-v2 (no MLM head) the run is refused unless
              --config.model.allow_fresh_mlm_head=True.
"""

from __future__ import annotations

import ml_collections

from dpjax.train.config import default_config


def get_config(variant: str = "quick") -> ml_collections.ConfigDict:
  c = default_config()
  if variant == "tiny":
    c.model.name = "tiny"
    c.data.train_fraction = 0.0076  # ~512 rows of 67,349
    c.data.eval_limit = 128
    c.data.max_length = 32
    c.data.buckets = (16, 32)
    c.train.batch_size = 64
    c.train.epochs = 2.0
    c.train.learning_rate = 3e-3
    c.dp.microbatch_size = 16
    c.train.checkpoint_every_steps = 4
    c.train.log_every_steps = 4
    c.train.eval_every_steps = 0  # at the end only (tests read many tiny runs)
    c.train.eval_batch_size = 64
  elif variant in (
    "quick",
    "nonprivate",
    "audit",
    "audit_nonprivate",
    "demo",
    "demo_nonprivate",
    "demo_large",
  ):
    c.model.train = "lora"
    # Adapters on every Dense layer of the top 3 of MiniLM's 6 layers: the backward pass
    # stops at layer 3, and these adapters matched q,v adapters on all 6 layers (0.812).
    c.model.lora_targets = ("layer_[345]/.*(query|key|value|dense)",)
    c.data.train_fraction = 0.3  # ~20k rows of 67,349
    c.data.max_length = 64
    c.data.buckets = (8, 16, 32, 64)
    c.train.batch_size = 500
    c.train.epochs = 1.0
    c.train.learning_rate = 2e-2
    c.train.warmup_steps = 5
    c.dp.clip_norm = 1.0
    c.dp.microbatch_size = 25
    c.train.eval_every_steps = 0  # at the end only: each evaluation costs ~10 s here
    c.train.checkpoint_every_steps = 20
    if variant in ("nonprivate", "audit_nonprivate", "demo_nonprivate"):
      c.dp.enabled = False
      c.train.learning_rate = 5e-3
    if variant.startswith("audit"):
      c.audit.canaries = 1000
    if variant.startswith("demo"):
      # More rows and a larger batch at the same ε: all 67k rows, B = 1500, 1.5 epochs = 67
      # steps (σ = 0.539: the noise per example σC/B is 2.8x smaller than quick's). lr 1e-2
      # (at B = 1000, 5e-3 gave 0.828 and 2e-2 diverged to the majority class).
      c.data.train_fraction = 1.0
      c.train.batch_size = 1500
      c.train.epochs = 1.5
      c.train.learning_rate = 5e-3 if variant == "demo_nonprivate" else 1e-2
      # Finer length buckets: SST-2's rows are short (median 10 tokens), and each row is
      # padded to the shortest bucket that holds it: 14% fewer padded tokens than
      # (8, 16, 32, 64), so each step (and the frozen-layer pass) is that much cheaper.
      c.data.buckets = (8, 12, 16, 24, 32, 48, 64)
    if variant == "demo_large":
      # Twice the batch for twice the epochs: the same 67 steps, σ = 0.645 at ε = 8, so the
      # noise relative to the batch, σ/B, is 0.6x demo's; each step costs twice as much.
      c.train.batch_size = 3000
      c.train.epochs = 3.0
  elif variant == "lora":
    c.model.train = "lora"
    c.train.batch_size = 1000
    c.train.epochs = 3.0
    c.train.learning_rate = 5e-3
    c.dp.microbatch_size = 25
    c.train.eval_every_steps = 50
  elif variant == "li2022":
    c.model.task = "label_words"
    c.data.template = "{text} It was [MASK] ."
    c.data.label_words = ("terrible", "great")
    c.model.train = "all"
    c.train.batch_size = 1000
    c.train.epochs = 3.0
    c.train.learning_rate = 5e-4
    c.train.schedule = "linear"
    c.dp.clip_norm = 0.1
    c.dp.epsilon = 8.0
    c.dp.microbatch_size = 20
    c.train.eval_every_steps = 20
  else:
    raise ValueError(
      f"unknown sst2 variant {variant!r}: tiny, quick, nonprivate, demo, demo_nonprivate, "
      "demo_large, audit, audit_nonprivate, lora or li2022"
    )
  return c
