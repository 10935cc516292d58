"""DP synthetic text: sample a DP fine-tuned generator in its DP label proportions.

    python -m dpjax.synthesize --workdir=GEN --out=OUT [--num=5000] [--top_p=0.95] \
      [--downstream_config=experiments/synthetic_sst2.py:downstream] [--distance]

``GEN`` is a ``model.task = causal_lm`` run whose template holds ``{label}`` (a
control code, e.g. ``"sentiment: {label} :"``), trained with
``dp.label_histogram_noise`` so that it released a DP histogram of its labels
(one Gaussian segment in its ledger, inside its target ε). Synthesis is then
post-processing of released things only:

1. label proportions from the released noisy counts (negative counts -> 0);
2. ``num`` labels in those proportions (largest remainder), each prompted
   with its control code and continued by the generator (sampling, top-p);
3. ``OUT/synthetic.jsonl``: one ``{text_field: text, label_field: label}`` row per
   text, in the run's own field names, so it trains with the same data config;
   ``OUT/synthetic_summary.json``: ε and δ of the run (the whole ledger, histogram
   included), the proportions, the decoding settings and seed.

Optional evaluation, also post-processing (it reads public data and the synthetic file):
``--downstream_config`` trains that classifier config NON-privately on the synthetic file
(``data.train`` replaced, ``dp.enabled=False``) and scores it on its ``data.eval``, real
labelled text (``OUT/downstream.json``); ``--distance`` computes the Fréchet distance between
MiniLM embeddings of synthetic and real eval text (:mod:`dpjax.embedding_distance`).

Labels come from the released histogram; Yue et al. 2023 sample in the exact private
proportions, which is a release their ε does not cover. ``--proportions=uniform``
uses equal proportions instead (no histogram needed).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging

from dpjax import _cli, embedding_distance, generate, prompts
from dpjax.data import DataError
from dpjax.models.pretrained import PretrainedError
from dpjax.privacy import histogram
from dpjax.train import splits
from dpjax.train.config import ConfigError, generation_config
from dpjax.trained import Trained, load_trained, read_config, spent_ledger

FLAGS = flags.FLAGS
SYNTHETIC_FILE = "synthetic.jsonl"
SUMMARY_FILE = "synthetic_summary.json"
DOWNSTREAM_FILE = "downstream.json"
PROPORTIONS = ("released", "uniform")
MAX_ROUNDS = 5  # rounds of re-sampling texts that came out empty


def allocate(total: int, proportions: np.ndarray) -> np.ndarray:
  """Integer counts summing to ``total`` closest to ``total * proportions`` (largest remainder)."""
  exact = total * np.asarray(proportions, np.float64)
  counts = np.floor(exact).astype(np.int64)
  order = np.argsort(-(exact - counts), kind="stable")
  counts[order[: total - counts.sum()]] += 1
  return counts


def _label_proportions(trained: Trained, which: str, num_labels: int) -> tuple[np.ndarray, Any]:
  if which == "uniform":
    return np.full(num_labels, 1.0 / num_labels), None
  released = trained.releases.get("label_histogram")
  if released is None:
    raise ConfigError(
      "the run released no label histogram: train it with config.dp.label_histogram_noise "
      "(e.g. 10), or pass --proportions=uniform"
    )
  return histogram.proportions(released["counts"]), released


def synthesize(
  workdir: str | Path,
  out: str | Path,
  num: int,
  *,
  proportions: str = "released",
  strategy: str = "sample",
  temperature: float = 1.0,
  top_k: int = 0,
  top_p: float = 0.95,
  max_new_tokens: int | None = None,
  batch_size: int | None = None,
  seed: int | None = None,
) -> dict[str, Any]:
  """Writes ``out/synthetic.jsonl`` and ``out/synthetic_summary.json``; returns the summary.

  Raises:
    ConfigError: the run is not a label-conditioned causal LM, a value is out of
      range, or ``out`` exists and is not empty.
  """
  if isinstance(num, bool) or not isinstance(num, int) or num < 1:
    raise ConfigError(f"--num must be an integer >= 1 (got {num!r})")
  if proportions not in PROPORTIONS:
    raise ConfigError(f"--proportions must be one of {PROPORTIONS} (got {proportions!r})")
  if strategy != "sample":
    raise ConfigError(
      f"--strategy must be 'sample' for synthesis (got {strategy!r}: greedy and beam search "
      "write the same text for every prompt of a label)"
    )
  out = Path(out)
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise ConfigError(f"--out={out} exists and is not an empty directory")
  trained = load_trained(workdir)
  c = trained.config
  fmt = prompts.RunFormat(c, trained.tokenizer)
  if not fmt.format.uses_label or fmt.format.uses_prompt:
    raise ConfigError(
      f"{workdir}'s template {fmt.format.template!r} must hold {{label}} and no {{prompt}}: "
      "synthesis prompts the generator with each label's control code"
    )
  k = int(c.data.num_labels)
  probs, released = _label_proportions(trained, proportions, k)
  counts = allocate(num, probs)
  overrides = {"strategy": strategy, "temperature": temperature, "top_k": top_k, "top_p": top_p}
  if max_new_tokens is not None:
    overrides["max_new_tokens"] = max_new_tokens
  config = generation_config(c, **overrides, eos_token_id=fmt.eos_id, pad_token_id=fmt.pad_id)
  room = int(trained.model.config.n_positions) - max(len(fmt.prompt_ids(label=i)) for i in range(k))
  if config.max_new_tokens > room:
    raise ConfigError(
      f"--max_new_tokens must be <= {room} (the model's positions minus the prompt; got "
      f"{config.max_new_tokens})"
    )
  size = int(c.generate.batch_size if batch_size is None else batch_size)
  if size < 1:
    raise ConfigError(f"--batch_size must be an integer >= 1 (got {size})")
  seed = int.from_bytes(os.urandom(4), "little") if seed is None else int(seed)
  rng = jax.random.PRNGKey(seed)
  rows, empty = [], 0
  for label in range(k):
    wanted, made, prompt = int(counts[label]), [], fmt.prompt_ids(label=label)
    for attempt in range(MAX_ROUNDS):  # texts that came out empty are drawn again
      missing = wanted - len(made)
      if missing <= 0:
        break
      key = jax.random.fold_in(jax.random.fold_in(rng, label), attempt)
      new = generate.generate_in_batches(
        trained.model, trained.params, [prompt] * missing, config, key, size
      )
      texts = [fmt.decode(row) for row in new]
      empty += sum(1 for t in texts if not t)
      made += [t for t in texts if t]
    if len(made) < wanted:
      raise ConfigError(
        f"the generator wrote {len(made)} non-empty texts for label "
        f"{c.data.label_words[label]!r} of the {wanted} asked for, in {MAX_ROUNDS} rounds "
        "(it ends most texts at once: raise --temperature or --max_new_tokens?)"
      )
    rows += [{c.data.text_field: t, c.data.label_field: label} for t in made[:wanted]]
  ledger, note = spent_ledger(workdir, trained)
  delta = trained.mechanism.get("delta")
  epsilon = ledger.epsilon(delta) if delta is not None else math.inf
  summary = {
    "epsilon": epsilon if math.isfinite(epsilon) else str(epsilon),
    "delta": delta,
    "guarantee": trained.mechanism.get("guarantee"),
    "covered": (
      "post-processing of the generator's released parameters and label histogram: the "
      "run's (epsilon, delta) covers this file"
      if released is not None or proportions == "uniform"
      else None
    ),
    "ledger": ledger.to_dict(),
    "epsilon_note": note,
    "texts": len(rows),
    "empty_texts_dropped": empty,
    "label_words": list(c.data.label_words),
    "proportions_from": proportions,
    "proportions": [float(p) for p in probs],
    "label_counts": [int(sum(1 for r in rows if r[c.data.label_field] == i)) for i in range(k)],
    "released_label_histogram": released,
    "decoding": {**dataclasses.asdict(config), "seed": seed, "batch_size": size},
    "generator_step": trained.step,
  }
  tmp = out.parent / f".{out.name}.{uuid.uuid4().hex}.tmp"
  tmp.mkdir(parents=True)
  try:
    with open(tmp / SYNTHETIC_FILE, "w") as f:
      for row in rows:
        f.write(json.dumps(row) + "\n")
    (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    if out.exists():
      out.rmdir()
    tmp.replace(out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return summary


def downstream(
  out: str | Path, classifier: ml_collections.ConfigDict, workdir: str | Path
) -> dict[str, Any]:
  """Trains ``classifier`` non-privately on ``out/synthetic.jsonl``; scores its ``data.eval``.

  Returns (and writes to ``out/downstream.json``) the eval metrics on real data.
  """
  from dpjax.train import loop  # pylint: disable=import-outside-toplevel

  c = ml_collections.ConfigDict(classifier.to_dict())
  c.data.train = str(Path(out) / SYNTHETIC_FILE)
  c.data.train_fraction = 1.0
  c.dp.enabled = False
  result = loop.train_and_evaluate(c, workdir)
  report = {
    "eval": result["eval"],
    "eval_data": c.data.eval,
    "trained_on": c.data.train,
    "training": "non-private on the synthetic file (post-processing: the generator's "
    "(epsilon, delta) covers it)",
    "classifier_workdir": str(workdir),
  }
  (Path(out) / DOWNSTREAM_FILE).write_text(json.dumps(report, indent=2))
  return report


def distance(out: str | Path, real: str, c: ml_collections.ConfigDict, limit: int = 2000) -> dict:
  """Fréchet distance of MiniLM embeddings: synthetic texts vs the real ``real`` split.

  Also the distance between two halves of the real split, a same-distribution reference.
  """
  synthetic = [
    json.loads(line)[c.data.text_field]
    for line in (Path(out) / SYNTHETIC_FILE).read_text().splitlines()
  ][:limit]
  source = splits.source_for(real, c)
  texts = [source[i].text for i in range(len(source))][:limit]
  a = embedding_distance.sentence_embeddings(synthetic)
  b = embedding_distance.sentence_embeddings(texts)
  half = len(b) // 2
  order = np.random.default_rng(0).permutation(len(b))
  report = {
    "frechet_synthetic_vs_real": embedding_distance.frechet_distance(a[: len(b)], b),
    "frechet_real_half_vs_half": embedding_distance.frechet_distance(
      b[order[:half]], b[order[half:]]
    ),
    "synthetic_texts": min(len(a), len(b)),
    "real_texts": len(b),
    "real_data": real,
    "embedding": "all-MiniLM-L6-v2, masked mean pooling, L2-normalized",
  }
  summary_path = Path(out) / SUMMARY_FILE
  summary = json.loads(summary_path.read_text())
  summary["distance"] = report
  summary_path.write_text(json.dumps(summary, indent=2))
  return report


def _define_flags() -> None:
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel

  flags.DEFINE_string("workdir", None, "A causal_lm dpjax.main workdir (the generator).")
  flags.DEFINE_string("out", None, "A new (or empty) directory for the synthetic data.")
  flags.DEFINE_integer("num", 5000, "How many texts.")
  flags.DEFINE_enum("proportions", "released", PROPORTIONS, "Label proportions.")
  flags.DEFINE_enum("strategy", "sample", generate.STRATEGIES, "Decoding.")
  flags.DEFINE_float("temperature", 1.0, "Sampling temperature (> 0).")
  flags.DEFINE_integer("top_k", 0, "Sampling: keep the k most likely tokens (0 = all).")
  flags.DEFINE_float("top_p", 0.95, "Sampling: nucleus mass in (0, 1].")
  flags.DEFINE_integer("max_new_tokens", None, "Tokens per text (default: config.generate).")
  flags.DEFINE_integer("batch_size", None, "Texts decoded together.")
  flags.DEFINE_integer("seed", None, "Sampling seed (default: from OS entropy; recorded).")
  flags.DEFINE_bool("distance", False, "Fréchet distance to the run's (real) eval split.")
  config_flags.DEFINE_config_file(
    "downstream_config", None, "A classifier config trained non-privately on the synthetic file."
  )
  flags.DEFINE_string(
    "downstream_workdir", None, "Workdir of the downstream classifier (default OUT/downstream)."
  )


def main(argv: list[str]) -> None:
  """Prints the summary path; a user mistake is one ``error:`` line and exit status 2."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  if len(argv) > 1 or not FLAGS.workdir or not FLAGS.out:
    print("error: usage: python -m dpjax.synthesize --workdir=DIR --out=DIR", file=sys.stderr)
    sys.exit(2)
  try:
    summary = synthesize(
      FLAGS.workdir,
      FLAGS.out,
      FLAGS.num,
      proportions=FLAGS.proportions,
      strategy=FLAGS.strategy,
      temperature=FLAGS.temperature,
      top_k=FLAGS.top_k,
      top_p=FLAGS.top_p,
      max_new_tokens=FLAGS.max_new_tokens,
      batch_size=FLAGS.batch_size,
      seed=FLAGS.seed,
    )
    print(
      f"{summary['texts']} texts (labels {summary['label_counts']}) -> "
      f"{Path(FLAGS.out) / SYNTHETIC_FILE}; epsilon {summary['epsilon']} delta {summary['delta']}"
    )
    if FLAGS.distance:
      run_config = read_config(FLAGS.workdir)
      report = distance(FLAGS.out, run_config.data.eval, run_config)
      print(
        f"Frechet distance to {report['real_data']}: {report['frechet_synthetic_vs_real']:.4f} "
        f"(real half vs half {report['frechet_real_half_vs_half']:.4f})"
      )
    if FLAGS.downstream_config is not None:
      work = FLAGS.downstream_workdir or str(Path(FLAGS.out) / "downstream")
      report = downstream(FLAGS.out, FLAGS.downstream_config, work)
      print(f"downstream on {report['eval_data']}: {json.dumps(report['eval'])}")
  except (ConfigError, DataError, PretrainedError) as err:
    print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=_cli.parse_flags)
