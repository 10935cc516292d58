"""Peer DP libraries, timed on the same model shape and data as dpjax's throughput benchmark.

Each peer trains a BERT encoder + 2-way classification head (random init, seeded,
dropout 0, all parameters trained, Adam with a fixed learning rate) on ONE fixed
batch, and a step is a full DP-SGD update:

* ``("pytorch", "nonprivate")``: plain PyTorch + Hugging Face
  ``BertForSequenceClassification`` (forward, mean loss, backward, step); the
  non-private baseline.
* ``("opacus", "hooks")``: Opacus ``PrivacyEngine.make_private`` with
  ``grad_sample_mode="hooks"`` (per-example gradients materialized by module hooks,
  flat clipping, Gaussian noise).
* ``("opacus", "ghost")``: Opacus ghost clipping (``grad_sample_mode="ghost"``: a
  first backward pass for the per-example norms, a second for the clipped sum).
* ``("jax_privacy", "microbatch=1")`` / ``("jax_privacy", "no microbatching")``:
  ``jax_privacy.clipped_grad`` on dpjax's own Flax model and per-example loss,
  per-example gradients one example at a time (``microbatch_size=1``) or all
  examples vmapped at once; Gaussian noise of std ``noise_multiplier * clip_norm``
  is added to the clipped sum, which is divided by B and fed to ``optax.adam``.
  The whole step is one jitted function, compiled before any step is timed.

The PyTorch model uses BERT's pooler in its head (dpjax's uses the [CLS] state):
one extra H x H dense layer, which does not matter for throughput. Poisson sampling
is off everywhere: every step sees the same batch, so only compute is timed.

    python -m experiments.benchmarks.peers            # tiny smoke run of every peer
    python -m experiments.benchmarks.peers --minilm   # all-MiniLM-L6-v2 shape, B=32, T=64
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

PEERS: list[tuple[str, str]] = [
  ("pytorch", "nonprivate"),
  ("opacus", "hooks"),
  ("opacus", "ghost"),
  ("jax_privacy", "microbatch=1"),
  ("jax_privacy", "no microbatching"),
]
LEARNING_RATE = 1e-4
# The architecture keys both model builders take from ``config`` (Hugging Face names).
ARCH_KEYS = (
  "vocab_size",
  "hidden_size",
  "num_hidden_layers",
  "num_attention_heads",
  "intermediate_size",
  "max_position_embeddings",
  "type_vocab_size",
  "layer_norm_eps",
  "hidden_act",
)
_REQUIRES = {
  "pytorch": ("torch", "transformers"),
  "opacus": ("torch", "transformers", "opacus"),
  "jax_privacy": ("jax_privacy",),
}


def available(system: str) -> str | None:
  """Whether the peer ``system`` can run here.

  Args:
    system: "pytorch", "opacus" or "jax_privacy".

  Returns:
    None when its libraries import (and, for jax_privacy, provide ``clipped_grad``),
    else a one-line reason.
  """
  if system not in _REQUIRES:
    return f"unknown peer system {system!r} (known: {', '.join(_REQUIRES)})"
  for name in _REQUIRES[system]:
    try:
      importlib.import_module(name)
    except ModuleNotFoundError:
      return f"{name} is not installed: pip install .[bench]"
    except Exception as e:  # pylint: disable=broad-except  # A broken install, e.g. a jax clash.
      first_line = (str(e).splitlines() or [""])[0]
      return f"{name} fails to import ({type(e).__name__}: {first_line})"
  if system == "jax_privacy":
    import jax_privacy  # pylint: disable=import-outside-toplevel

    if not hasattr(jax_privacy, "clipped_grad"):
      return (
        f"jax_privacy {getattr(jax_privacy, '__version__', '?')} has no clipped_grad "
        "(needs jax-privacy>=2.0): pip install .[bench]"
      )
  return None


def _time_steps(
  step: Callable[[], None],
  steps: int,
  warmup: int,
  batch_size: int,
  on_timed_start: Callable[[], None] | None = None,
) -> dict:
  """Runs ``warmup`` untimed steps, then times ``steps`` steps one by one."""
  for _ in range(warmup):
    step()
  if on_timed_start is not None:
    on_timed_start()
  seconds = []
  for _ in range(steps):
    start = time.perf_counter()
    step()
    seconds.append(time.perf_counter() - start)
  median = statistics.median(seconds)
  return {
    "median_step_seconds": median,
    "examples_per_second": batch_size / median,
    "step_seconds": seconds,
  }


def _arch(config: dict) -> dict[str, Any]:
  return {k: config[k] for k in ARCH_KEYS if k in config}


def _torch_step(
  mode: str,
  batch: dict[str, np.ndarray],
  config: dict,
  clip_norm: float,
  noise_multiplier: float,
  seed: int,
) -> tuple[Callable[[], None], str]:
  """A PyTorch (optionally Opacus) train step on the fixed batch, and the library version."""
  # pylint: disable=import-outside-toplevel
  import torch
  import transformers

  torch.manual_seed(seed)
  hf_config = transformers.BertConfig(
    **_arch(config), num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
  )
  model = transformers.BertForSequenceClassification(hf_config)
  model.train()
  input_ids = torch.as_tensor(batch["input_ids"], dtype=torch.long)
  size, length = input_ids.shape
  # Explicit [B, T] position (and token-type) ids: HF's default position ids have
  # batch dimension 1, so Opacus's hooks would give the position embedding a
  # [1, ...] grad_sample and fail to stack the per-example norms.
  inputs = {
    "input_ids": input_ids,
    "attention_mask": torch.as_tensor(batch["attention_mask"], dtype=torch.long),
    "token_type_ids": torch.zeros_like(input_ids),
    "position_ids": torch.arange(length).expand(size, length).contiguous(),
  }
  labels = torch.as_tensor(batch["label"], dtype=torch.long)
  optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
  criterion = torch.nn.CrossEntropyLoss()
  version = f"torch {torch.__version__}, transformers {transformers.__version__}"

  if mode in ("hooks", "ghost"):
    import opacus

    loader = torch.utils.data.DataLoader(
      torch.utils.data.TensorDataset(input_ids, labels), batch_size=size
    )
    engine = opacus.PrivacyEngine()
    private = engine.make_private(
      module=model,
      optimizer=optimizer,
      criterion=criterion,
      data_loader=loader,
      noise_multiplier=noise_multiplier,
      max_grad_norm=clip_norm,
      poisson_sampling=False,
      grad_sample_mode=mode,
    )
    if mode == "ghost":  # Ghost clipping also wraps the loss (its backward runs twice).
      model, optimizer, criterion, _ = private
    else:
      model, optimizer, _ = private
    version = f"opacus {opacus.__version__}, {version}"
  elif mode != "nonprivate":
    raise ValueError(f"unknown mode {mode!r}")

  def step():
    logits = model(**inputs).logits
    loss = criterion(logits, labels)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

  return step, version


def _jax_privacy_step(
  mode: str,
  batch: dict[str, np.ndarray],
  config: dict,
  clip_norm: float,
  noise_multiplier: float,
  seed: int,
) -> tuple[Callable[[], None], str]:
  """A jitted jax_privacy DP-SGD step on dpjax's Flax model, and the library version."""
  # pylint: disable=import-outside-toplevel
  import jax
  import jax.numpy as jnp
  import jax_privacy
  import optax

  from dpjax.models import bert, heads

  if mode not in ("microbatch=1", "no microbatching"):
    raise ValueError(f"unknown mode {mode!r}")
  model = heads.SequenceClassifier(bert.BertConfig(**_arch(config)), 2, "cls")
  data = {k: jnp.asarray(v) for k, v in batch.items()}
  size = int(data["label"].shape[0])
  params = jax.jit(lambda key: model.init(key, data)["params"])(jax.random.PRNGKey(seed))
  task_loss = heads.classification_loss(model)
  # keep_batch_dim=False: the loss takes ONE example (no batch axis).
  clipped_sum = jax_privacy.clipped_grad(
    lambda p, example: task_loss(p, example)[0],
    l2_clip_norm=clip_norm,
    batch_argnums=1,
    keep_batch_dim=False,
    microbatch_size=1 if mode == "microbatch=1" else None,
  )
  optimizer = optax.adam(LEARNING_RATE)
  std = noise_multiplier * clip_norm

  def train_step(params, opt_state, data, key):
    key, noise_key = jax.random.split(key)
    summed = clipped_sum(params, data)
    leaves, treedef = jax.tree.flatten(summed)
    keys = jax.random.split(noise_key, len(leaves))
    grads = jax.tree.unflatten(
      treedef,
      [(g + std * jax.random.normal(k, g.shape, g.dtype)) / size for g, k in zip(leaves, keys)],
    )
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, key

  state = (params, optimizer.init(params), jax.random.PRNGKey(seed + 1))
  # Compiled here, so even warmup=0 times no compilation.
  compiled = (
    jax.jit(train_step, donate_argnums=(0, 1)).lower(state[0], state[1], data, state[2]).compile()
  )

  def step():
    nonlocal state
    params, opt_state, key = compiled(state[0], state[1], data, state[2])
    state = jax.block_until_ready((params, opt_state, key))

  return step, f"jax_privacy {jax_privacy.__version__}, jax {jax.__version__}"


def run_peer(
  system: str,
  mode: str,
  *,
  batch: dict[str, np.ndarray],
  config: dict,
  steps: int,
  warmup: int,
  clip_norm: float,
  noise_multiplier: float,
  seed: int,
  on_timed_start: Callable[[], None] | None = None,
) -> dict:
  """Times `steps` train steps (after `warmup` untimed ones) of one peer.

  Args:
    system: "pytorch", "opacus" or "jax_privacy" (see :data:`PEERS`).
    mode: the variant of ``system`` (see :data:`PEERS`).
    batch: ``input_ids`` [B, T], ``attention_mask`` [B, T] and ``label`` [B] (int32).
    config: the BERT architecture, Hugging Face BertConfig names (see :data:`ARCH_KEYS`).
    steps: timed steps.
    warmup: untimed steps before them.
    clip_norm: per-example L2 clipping norm (ignored by the non-private baseline).
    noise_multiplier: noise std / clip_norm (ignored by the non-private baseline).
    seed: model initialization (and noise) seed.
    on_timed_start: called after the warm-up steps (e.g. to start a memory watch).

  Returns:
    ``{"median_step_seconds", "examples_per_second" (B / median), "step_seconds",
    "version"}``, or ``{"error": reason}`` when the peer is not installed or fails
    (e.g. a library refuses the model).

  Raises:
    ValueError: for a (system, mode) pair not in :data:`PEERS`.
  """
  if (system, mode) not in PEERS:
    raise ValueError(f"unknown peer {(system, mode)!r}; known: {PEERS}")
  reason = available(system)
  if reason is not None:
    return {"error": reason}
  build = _jax_privacy_step if system == "jax_privacy" else _torch_step
  try:
    step, version = build(mode, batch, config, clip_norm, noise_multiplier, seed)
    result = _time_steps(step, steps, warmup, int(batch["label"].shape[0]), on_timed_start)
  except Exception as e:  # pylint: disable=broad-except  # Report, so other peers still run.
    first_line = (str(e).splitlines() or [""])[0]
    return {"error": f"{system} {mode} failed: {type(e).__name__}: {first_line}"}
  return {**result, "version": version}


def main(argv: list[str] | None = None) -> None:
  """Runs every peer once on a tiny model (or the MiniLM shape) and prints the timings."""
  # argparse, not absl flags: importing this module must not define flags that
  # could clash with the importing benchmark's own.
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--minilm",
    action="store_true",
    help="all-MiniLM-L6-v2 shape, B=32, T=64 (default: a tiny model).",
  )
  parser.add_argument("--steps", type=int, default=2, help="Timed steps per peer.")
  parser.add_argument("--warmup", type=int, default=1, help="Untimed steps per peer.")
  args = parser.parse_args(argv)
  # Opacus's per-run notices (secure RNG off; hooks on a graph whose inputs need no grad).
  warnings.filterwarnings("ignore", message="Secure RNG turned off")
  warnings.filterwarnings("ignore", message="Full backward hook is firing")
  minilm = args.minilm
  config = dict(
    vocab_size=30522 if minilm else 100,
    hidden_size=384 if minilm else 32,
    num_hidden_layers=6 if minilm else 2,
    num_attention_heads=12 if minilm else 4,
    intermediate_size=1536 if minilm else 64,
    max_position_embeddings=512 if minilm else 64,
    type_vocab_size=2,
    layer_norm_eps=1e-12,
    hidden_act="gelu",
  )
  size, length = (32, 64) if minilm else (4, 16)
  rng = np.random.default_rng(0)
  batch = {
    "input_ids": rng.integers(0, config["vocab_size"], (size, length), dtype=np.int32),
    "attention_mask": np.ones((size, length), np.int32),
    "label": rng.integers(0, 2, size, dtype=np.int32),
  }
  print(f"B={size} T={length} config={config}")
  for system, mode in PEERS:
    result = run_peer(
      system,
      mode,
      batch=batch,
      config=config,
      steps=args.steps,
      warmup=args.warmup,
      clip_norm=1.0,
      noise_multiplier=1.0,
      seed=0,
    )
    if "error" in result:
      print(f"{system:12} {mode:17} ERROR {result['error']}")
    else:
      print(
        f"{system:12} {mode:17} median {result['median_step_seconds']:8.4f} s/step  "
        f"{result['examples_per_second']:8.1f} ex/s  ({result['version']})"
      )


if __name__ == "__main__":
  main()
