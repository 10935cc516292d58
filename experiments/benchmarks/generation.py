"""Benchmark: greedy generation speed, dpjax.generate (JAX, KV cache) vs transformers (PyTorch).

    python -m experiments.benchmarks.generation            # GPT-2 small shape (124M)
    python -m experiments.benchmarks.generation --tiny     # a tiny GPT-2, seconds

Needs torch and transformers next to dpjax (``pip install .[bench]``; or a torch
virtual environment with ``pip install -e .`` in it), run from the repository root.

Both sides run the same model: a randomly initialized Hugging Face
``GPT2LMHeadModel`` (seeded, dropout 0, float32, tied LM head) is saved with
``save_pretrained`` and loaded into dpjax with :func:`dpjax.models.pretrained.load`.
Both decode greedily, without EOS, ``--new`` tokens after ``--batch`` random
prompts of ``--prompt`` tokens (no padding):

* dpjax: :func:`dpjax.generate.generate` (prefill + jitted ``lax.while_loop`` of
  cached decode steps);
* transformers: ``model.generate(do_sample=False, num_beams=1, use_cache=True)``
  under ``torch.inference_mode()``, default attention implementation, with
  ``torch.set_num_threads(--torch_threads)``, by default the cores this process
  may use. On a machine shared with other busy processes, OpenMP's spinning
  worker threads can make torch many times slower (measured: 10x on 2 loaded
  cores); compare with ``--torch_threads=1`` or ``OMP_WAIT_POLICY=PASSIVE``.

The first call of each is untimed (for dpjax it compiles; its time is printed,
and "compile" is that minus the median call). Then ``--reps`` repetitions
alternate the two, side by side; the table shows the median seconds per call
and new tokens per second (batch x new tokens / seconds), and the ratio. It also
prints whether the two greedy outputs are equal token for token (with random
weights the next-token distributions are nearly flat, so a difference in the
last float bits may flip a near tie; the first difference is then printed).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np

GPT2_SMALL = dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12)
GPT2_TINY = dict(vocab_size=1000, n_positions=128, n_embd=64, n_layer=2, n_head=2)


def _torch_model(shape: dict, seed: int):
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel

  transformers.logging.set_verbosity_error()
  torch.manual_seed(seed)
  config = transformers.GPT2Config(**shape, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
  model = transformers.GPT2LMHeadModel(config).eval()
  # Random weights: no EOS (50256 would otherwise stop rows early) and no BOS.
  model.generation_config.eos_token_id = None
  model.generation_config.bos_token_id = None
  return model


def _cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def main(argv: list[str] | None = None) -> None:
  """Times both generators side by side and prints the table."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tiny", action="store_true", help="A tiny GPT-2 instead of GPT-2 small.")
  parser.add_argument("--batch", type=int, default=8, help="Prompts decoded together.")
  parser.add_argument("--prompt", type=int, default=16, help="Tokens per prompt.")
  parser.add_argument("--new", type=int, default=64, help="New tokens per prompt.")
  parser.add_argument("--reps", type=int, default=5, help="Timed calls of each generator.")
  parser.add_argument(
    "--torch_threads", type=int, default=None, help="torch threads (default: available cores)."
  )
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)

  # pylint: disable=import-outside-toplevel
  import jax
  import torch
  import transformers

  from dpjax import generate
  from dpjax.models import pretrained

  threads = args.torch_threads or _cores()
  torch.set_num_threads(threads)
  shape = GPT2_TINY if args.tiny else GPT2_SMALL
  hf = _torch_model(shape, args.seed)
  with tempfile.TemporaryDirectory() as tmp:
    hf.save_pretrained(tmp)
    model, params, _ = pretrained.load(tmp, with_tokenizer=False)
  params = jax.device_put(params)

  rng = np.random.default_rng(args.seed)
  ids = rng.integers(0, shape["vocab_size"], (args.batch, args.prompt)).astype(np.int64)
  prompts = ids.tolist()
  config = generate.GenerationConfig(max_new_tokens=args.new, strategy="greedy")
  input_ids = torch.from_numpy(ids)
  attention_mask = torch.ones_like(input_ids)

  def run_dpjax() -> np.ndarray:
    return generate.generate(model, params, prompts, config)  # np.ndarray: blocks until done

  def run_torch() -> np.ndarray:
    with torch.inference_mode():
      out = hf.generate(
        input_ids,
        attention_mask=attention_mask,
        max_new_tokens=args.new,
        do_sample=False,
        num_beams=1,
        use_cache=True,
        pad_token_id=0,
      )
    return out[:, args.prompt :].numpy()

  def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out

  first = {"dpjax": timed(run_dpjax), "transformers": timed(run_torch)}
  times = {"dpjax": [], "transformers": []}
  for _ in range(args.reps):
    for name, fn in (("dpjax", run_dpjax), ("transformers", run_torch)):
      times[name].append(timed(fn)[0])
  ours, theirs = first["dpjax"][1], first["transformers"][1]

  tokens = args.batch * args.new
  name = "tiny GPT-2" if args.tiny else "GPT-2 small shape"
  print(
    f"{name}: n_embd {shape['n_embd']}, {shape['n_layer']} layers, {shape['n_head']} heads, "
    f"vocab {shape['vocab_size']}, n_positions {shape['n_positions']}; random weights, float32"
  )
  print(
    f"greedy, no EOS: batch {args.batch}, prompt {args.prompt} tokens, {args.new} new tokens; "
    f"median of {args.reps} calls each, alternated; device {jax.devices()[0].platform}, "
    f"torch threads {threads} (of {_cores()} cores)"
  )
  print(
    f"jax {jax.__version__}, torch {torch.__version__}, transformers {transformers.__version__}"
  )
  print()
  header = (
    f"{'generator':34} {'median s':>9} {'tokens/s':>9} {'first call s':>13} {'compile s':>10}"
  )
  print(header)
  print("-" * len(header))
  medians = {k: statistics.median(v) for k, v in times.items()}
  labels = {
    "dpjax": "dpjax.generate (JAX, jit + cache)",
    "transformers": "transformers generate (PyTorch)",
  }
  for key in ("dpjax", "transformers"):
    compile_s = f"{first[key][0] - medians[key]:10.2f}" if key == "dpjax" else f"{'-':>10}"
    print(
      f"{labels[key]:34} {medians[key]:9.3f} {tokens / medians[key]:9.1f} "
      f"{first[key][0]:13.2f} {compile_s}"
    )
  print()
  print(f"tokens/s ratio dpjax / transformers: {medians['transformers'] / medians['dpjax']:.2f}x")
  equal = np.array_equal(ours, theirs)
  line = f"greedy outputs equal: {equal}"
  if not equal:
    rows, steps = np.nonzero(ours != theirs)
    first_step = int(steps.min())
    line += (
      f" (first difference at new token {first_step}, in {len(set(rows.tolist()))} of "
      f"{args.batch} rows)"
    )
  print(line)


if __name__ == "__main__":
  main()
