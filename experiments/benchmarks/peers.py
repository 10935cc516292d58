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
  ``"microbatch=N"`` takes N examples at a time (dpjax's ``vmap:N``).

On a machine with a CUDA device the PyTorch models run on it (each step ends
with ``torch.cuda.synchronize()``, and ``peak_memory_mb`` is
``torch.cuda.max_memory_allocated()``); the JAX peer runs on JAX's default
device. ``dtype="bfloat16"`` runs the PyTorch forward under ``torch.autocast``
(the loss and the optimizer in float32) and gives dpjax's model
``BertConfig(dtype="bfloat16")`` under jax_privacy.

The PyTorch model uses BERT's pooler in its head (dpjax's uses the [CLS] state):
one extra H x H dense layer, which does not matter for throughput. Poisson sampling
is off everywhere: every step sees the same batch, so only compute is timed.

    python -m experiments.benchmarks.peers            # tiny smoke run of every peer
    python -m experiments.benchmarks.peers --minilm   # all-MiniLM-L6-v2 shape, B=32, T=64
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import importlib.util
import re
import statistics
import sys
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


def known(system: str, mode: str) -> bool:
  """Whether (system, mode) is a peer: one of :data:`PEERS`, or jax_privacy's ``microbatch=N``."""
  return (system, mode) in PEERS or (
    system == "jax_privacy" and re.fullmatch(r"microbatch=[1-9][0-9]*", mode) is not None
  )


def missing(system: str) -> str | None:
  """The first module ``system`` needs that is not installed, found without importing it.

  Cheap, and safe in a process that must not start a device backend (importing
  jax_privacy imports jax); :func:`available` also catches broken installs.
  """
  for name in _REQUIRES.get(system, ()):
    if importlib.util.find_spec(name) is None:
      return f"{name} is not installed"
  return None


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
    except ModuleNotFoundError as e:
      if e.name != name:  # Installed, but one of its own dependencies is missing.
        return f"{name} fails to import (ModuleNotFoundError: {e})"
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
  dtype: str = "float32",
) -> tuple[Callable[[], None], str]:
  """A PyTorch (optionally Opacus) train step on the fixed batch, and the library version.

  A BERT module with the architecture's sizes (for a RoBERTa shape too: the same
  compute; its positions simply start at 0).
  """
  # pylint: disable=import-outside-toplevel
  import torch
  import transformers

  torch.manual_seed(seed)
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  hf_config = transformers.BertConfig(
    **_arch(config), num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
  )
  model = transformers.BertForSequenceClassification(hf_config).to(device)
  model.train()
  input_ids = torch.as_tensor(batch["input_ids"], dtype=torch.long, device=device)
  size, length = input_ids.shape
  # Explicit [B, T] position (and token-type) ids: HF's default position ids have
  # batch dimension 1, so Opacus's hooks would give the position embedding a
  # [1, ...] grad_sample and fail to stack the per-example norms.
  inputs = {
    "input_ids": input_ids,
    "attention_mask": torch.as_tensor(batch["attention_mask"], dtype=torch.long, device=device),
    "token_type_ids": torch.zeros_like(input_ids),
    "position_ids": torch.arange(length, device=device).expand(size, length).contiguous(),
  }
  labels = torch.as_tensor(batch["label"], dtype=torch.long, device=device)
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
  if dtype not in ("float32", "bfloat16"):
    raise ValueError(f"dtype must be float32 or bfloat16 (got {dtype!r})")

  def step():
    with (
      torch.autocast(device.type, dtype=torch.bfloat16)
      if dtype == "bfloat16"
      else contextlib.nullcontext()
    ):
      logits = model(**inputs).logits
    loss = criterion(logits.float(), labels)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":  # Time the work, not its launch.
      torch.cuda.synchronize()

  return step, version


def _torch_memory() -> dict:
  """The CUDA peak of this process's PyTorch allocator; nothing on a CPU."""
  torch = sys.modules.get("torch")
  if torch is None or not torch.cuda.is_available():
    return {}
  return {
    "peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20,
    "memory_source": "torch.cuda.max_memory_allocated",
    "device": torch.cuda.get_device_name(),
  }


def _jax_privacy_step(
  mode: str,
  batch: dict[str, np.ndarray],
  config: dict,
  clip_norm: float,
  noise_multiplier: float,
  seed: int,
  dtype: str = "float32",
) -> tuple[Callable[[], None], str]:
  """A jitted jax_privacy DP-SGD step on dpjax's Flax model, and the library version."""
  # pylint: disable=import-outside-toplevel
  import jax
  import jax.numpy as jnp
  import jax_privacy
  import optax

  from dpjax.models import bert, heads

  if not known("jax_privacy", mode):
    raise ValueError(f"unknown mode {mode!r}")
  # Every BertConfig field the architecture gives (a RoBERTa shape keeps its position offset).
  fields = {f.name for f in dataclasses.fields(bert.BertConfig)}
  bert_config = bert.BertConfig(**{k: v for k, v in config.items() if k in fields}, dtype=dtype)
  model = heads.SequenceClassifier(bert_config, 2, "cls")
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
    microbatch_size=None if mode == "no microbatching" else int(mode.partition("=")[2]),
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
  dtype: str = "float32",
) -> dict:
  """Times `steps` train steps (after `warmup` untimed ones) of one peer.

  Args:
    system: "pytorch", "opacus" or "jax_privacy" (see :data:`PEERS`).
    mode: the variant of ``system`` (see :data:`PEERS`; jax_privacy also takes
      ``"microbatch=N"``).
    batch: ``input_ids`` [B, T], ``attention_mask`` [B, T] and ``label`` [B] (int32).
    config: the BERT architecture, Hugging Face BertConfig names (see :data:`ARCH_KEYS`).
    steps: timed steps.
    warmup: untimed steps before them.
    clip_norm: per-example L2 clipping norm (ignored by the non-private baseline).
    noise_multiplier: noise std / clip_norm (ignored by the non-private baseline).
    seed: model initialization (and noise) seed.
    on_timed_start: called after the warm-up steps (e.g. to start a memory watch).
    dtype: "float32", or "bfloat16" compute (see the module docstring).

  Returns:
    ``{"median_step_seconds", "examples_per_second" (B / median), "step_seconds",
    "version"}`` (and on a CUDA device PyTorch's ``peak_memory_mb``,
    ``memory_source`` and ``device``), or ``{"error": reason}`` when the peer is
    not installed or fails (e.g. a library refuses the model).

  Raises:
    ValueError: for a (system, mode) pair that is not a peer (see :func:`known`).
  """
  if not known(system, mode):
    raise ValueError(f"unknown peer {(system, mode)!r}; known: {PEERS}")
  reason = available(system)
  if reason is not None:
    return {"error": reason}
  build = _jax_privacy_step if system == "jax_privacy" else _torch_step
  try:
    step, version = build(mode, batch, config, clip_norm, noise_multiplier, seed, dtype)
    result = _time_steps(step, steps, warmup, int(batch["label"].shape[0]), on_timed_start)
    if system != "jax_privacy":
      result.update(_torch_memory())
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
