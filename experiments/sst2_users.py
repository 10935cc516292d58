"""User-level DP on SST-2 with synthetic users: example-level sampling (ELS).

    python -m dpjax.main --config=experiments/sst2_users.py:VARIANT --workdir=DIR

The data is ``experiments/data/sst2_users.tsv``: 20,000 SST-2 training rows handed
out to 4,709 synthetic users with a Zipf-skewed number of rows each (61% have one
row, five have 400; ``python experiments/data/make_sst2_users.py`` rewrites it,
see there). With ``dp.unit = "user"`` training keeps each user's first k =
``dp.max_examples_per_user`` rows (in file order), samples and clips rows as
usual (Poisson, q = B/N over the N kept rows), and accounts each step as the
mixture of Gaussians with sensitivities 0..k (Charles et al. 2024): ε and
δ = N_u^-1.1 protect one user and all of their (at most k) rows. Only the PLD
accountant composes it, and building one step's PLD takes 10-90 s per σ, so a
calibrated σ (dp.epsilon as the target) takes tens of seconds to minutes before the
first step.

Variants:
  tiny   seconds on a CPU: a tiny random-init encoder on ~3% of the file (472 rows of 406
         users after the cap), k = 2, a given σ = 2 (ε is reported, not calibrated): for
         tests and smoke runs.
  quick  the CPU demo: MiniLM with LoRA on the top 3 layers + head (as sst2.py:quick), the
         whole file capped at k = 4 rows per user (8,487 rows of 4,709 users), B = 250,
         2 epochs (68 steps), σ calibrated to a user-level ε = 8.
         Measured on a 2-core x86 CPU: calibration 30 s (σ = 0.936; example-level DP at
         ε = 8 would need σ = 0.521), ε = 7.993 per user (δ = 9.1e-5), dev accuracy 0.743
         (one run), 2 min 40 s in all. The tiny variant's run of 8 steps: 27 s, 8 s of it
         building the user-level PLD.
"""

from __future__ import annotations

from pathlib import Path

import ml_collections

from dpjax.train.config import default_config

USERS_FILE = Path(__file__).resolve().parent / "data" / "sst2_users.tsv"


def get_config(variant: str = "quick") -> ml_collections.ConfigDict:
  c = default_config()
  c.data.train = str(USERS_FILE)
  c.data.user_field = "user"
  c.dp.unit = "user"
  if variant == "tiny":
    c.model.name = "tiny"
    c.data.train_fraction = 0.03  # ~600 rows of 20,000 before the cap
    c.data.eval_limit = 128
    c.data.max_length = 32
    c.data.buckets = (16, 32)
    c.dp.max_examples_per_user = 2
    c.dp.noise_multiplier = 2.0
    c.train.batch_size = 64
    c.train.epochs = 2.0
    c.train.learning_rate = 3e-3
    c.dp.microbatch_size = 16
    c.train.checkpoint_every_steps = 4
    c.train.log_every_steps = 4
    c.train.eval_batch_size = 64
  elif variant == "quick":
    c.model.train = "lora"
    c.model.lora_targets = ("layer_[345]/.*(query|key|value|dense)",)
    c.data.max_length = 64
    c.data.buckets = (8, 16, 32, 64)
    c.dp.max_examples_per_user = 4
    c.dp.epsilon = 8.0
    c.train.batch_size = 250
    c.train.epochs = 2.0
    c.train.learning_rate = 2e-2
    c.train.warmup_steps = 5
    c.dp.clip_norm = 1.0
    c.dp.microbatch_size = 25
    c.train.log_every_steps = 10
    c.train.checkpoint_every_steps = 20
  else:
    raise ValueError(f"unknown sst2_users variant {variant!r}: tiny or quick")
  return c
