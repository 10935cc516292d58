"""Config -> the pieces of a run: data, task model and parameters, privacy plan, optimizer."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from scipy import stats

from dpjax import data as data_lib
from dpjax import parallel, privacy
from dpjax.models import bert, heads, lora, pretrained
from dpjax.privacy import noise as noise_lib
from dpjax.train.config import ConfigError, lora_config

PyTree = Any


@dataclasses.dataclass
class Split:
  """An encoded dataset restricted to ``indices`` (the examples that make up the split)."""

  encoded: data_lib.EncodedDataset
  indices: np.ndarray

  def __len__(self) -> int:
    return len(self.indices)

  def batch(self, positions: np.ndarray) -> dict[str, np.ndarray]:
    """Arrays of the examples at ``positions`` (indices into this split)."""
    return self.encoded.batch(self.indices[positions])


class GroupedBatches:
  """Splits each Poisson sample into one padded group per token-length bucket.

  Short examples are then padded to a short length instead of to the longest
  example of the batch (SST-2 train rows average 13 tokens but a batch of 500
  nearly always holds one of 40+). Each group has a fixed capacity: the
  1 - 1e-9 quantile of its Binomial count, rounded up to a multiple of
  ``microbatch_size * num_shards`` (one compilation per group; the scan skips
  microbatches of pure padding). A larger group gets a larger shape, never a
  truncation. The groups' clipped sums add up to the clipped sum of the whole
  sample, which is noised once.

  With ``num_shards`` devices, each group's rows are laid out so every device's
  block holds the same number of real examples (±1), padding last
  (:func:`dpjax.parallel.balanced_order`).
  """

  def __init__(self, split: Split, sampling_prob: float, microbatch_size: int, num_shards: int = 1):
    self.split = split
    self.multiple = microbatch_size * num_shards
    self.num_shards = num_shards
    lengths = split.encoded.lengths[split.indices]
    self.bucket_lengths = split.encoded.buckets
    self.group_of = np.searchsorted(self.bucket_lengths, lengths)
    counts = np.bincount(self.group_of, minlength=len(self.bucket_lengths))
    self.groups = [g for g in range(len(self.bucket_lengths)) if counts[g]]
    self.capacity = {g: self._round(stats_quantile(counts[g], sampling_prob)) for g in self.groups}
    # A real example of the group fills its padding rows (any example fits its own bucket).
    self.filler = {g: int(np.flatnonzero(self.group_of == g)[0]) for g in self.groups}

  def _round(self, n: int) -> int:
    return max(self.multiple, -(-n // self.multiple) * self.multiple)

  def plan(self, sample: privacy.SampledBatch) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """(positions into the split, mask, token length) of each group, without loading rows."""
    positions = sample.indices[sample.mask]
    groups = []
    for g in self.groups:
      chosen = positions[self.group_of[positions] == g]
      size = max(self.capacity[g], self._round(len(chosen)))
      padded = np.full(size, self.filler[g], np.int64)
      padded[: len(chosen)] = chosen
      mask = np.zeros(size, bool)
      mask[: len(chosen)] = True
      if self.num_shards > 1:
        order = parallel.balanced_order(size, self.num_shards)
        padded, mask = padded[order], mask[order]
      groups.append((padded, mask, int(self.bucket_lengths[g])))
    return groups

  def load(self, positions: np.ndarray, length: int) -> dict[str, np.ndarray]:
    """The arrays of the examples at ``positions``, padded to ``length`` tokens."""
    return self.split.encoded.batch(self.split.indices[positions], length=length)


def stats_quantile(count: int, prob: float, level: float = 1 - 1e-9) -> int:
  """The ``level`` quantile of Binomial(count, prob)."""
  return int(stats.binom(count, prob).ppf(level))


def source_for(spec: str, c: ml_collections.ConfigDict) -> data_lib.Source:
  """``sst2:<split>`` or a path to a .tsv/.csv/.jsonl file -> a random-access source."""
  if spec.startswith("sst2:"):
    return data_lib.sst2(spec.split(":", 1)[1])
  if not Path(spec).is_file():
    raise ConfigError(
      f"data file {spec!r} not found (config.data.train / config.data.eval take "
      "sst2:train, sst2:validation or a .tsv/.csv/.jsonl path)"
    )
  return data_lib.TextFileSource(
    spec,
    text_field=c.data.text_field,
    label_field=c.data.label_field,
    num_labels=c.data.num_labels,
    skip_bad_rows=c.data.skip_bad_rows,
  )


def template_for(c: ml_collections.ConfigDict) -> data_lib.PromptTemplate | None:
  if c.model.task != "label_words":
    return None
  return data_lib.PromptTemplate(c.data.template, tuple(c.data.label_words))


def load_split(
  spec: str,
  tokenizer,
  c: ml_collections.ConfigDict,
  cache_dir: Path | None,
  *,
  fraction: float = 1.0,
  limit: int = 0,
  seed: int = 0,
) -> Split:
  """Encodes a source and keeps a subset of its rows.

  ``fraction`` < 1 keeps the rows whose :func:`row_hash` is below it: a row is in
  or out by its own content (and the seed), so adding or removing one row of
  the file changes the subset by at most that row (the add/remove guarantee
  carries over from the subset to the file). ``limit`` > 0 keeps that many
  random rows (for public evaluation splits only: one row more in the file
  reshuffles the choice).
  """
  encoded = data_lib.encode(
    source_for(spec, c),
    tokenizer,
    c.data.max_length,
    buckets=tuple(c.data.buckets),
    template=template_for(c),
    cache_dir=cache_dir,
  )
  if encoded.labels is None:
    raise ConfigError(f"{spec} has no labels (config.data.label_field={c.data.label_field!r})")
  indices = np.arange(len(encoded))
  if fraction < 1:
    threshold = int(fraction * 2**64)
    indices = np.array([i for i in indices if row_hash(encoded, i, seed) < threshold], np.int64)
    if len(indices) < 2:
      raise ConfigError(
        f"config.data.train_fraction={fraction:g} keeps {len(indices)} of the "
        f"{len(encoded)} rows of {spec}; it must keep at least 2"
      )
  if 0 < limit < len(indices):
    indices = np.sort(np.random.default_rng(seed).choice(indices, limit, replace=False))
  return Split(encoded, indices)


def row_hash(encoded: data_lib.EncodedDataset, index: int, seed: int) -> int:
  """A 64-bit hash of row ``index``'s tokens and label, keyed by ``seed``."""
  digest = hashlib.blake2b(digest_size=8, key=str(seed).encode())
  digest.update(encoded.token_ids(index).tobytes())
  digest.update(np.asarray(encoded.labels[index]).tobytes())
  return int.from_bytes(digest.digest(), "little")


def data_digest(split: Split) -> bytes:
  """sha256 of the split's rows (tokens and labels, in order): what training reads."""
  digest = hashlib.sha256()
  for i in split.indices:
    digest.update(split.encoded.token_ids(int(i)).tobytes())
    digest.update(np.asarray(split.encoded.labels[int(i)]).tobytes())
  return digest.digest()


def backbone_for(c: ml_collections.ConfigDict):
  """(backbone config, pretrained backbone params or None, head params, tokenizer)."""
  if c.model.name == "tiny":
    _, _, tokenizer = pretrained.load("minilm")
    hidden = c.model.tiny_hidden
    config = bert.BertConfig(
      hidden_size=hidden,
      num_hidden_layers=c.model.tiny_layers,
      num_attention_heads=max(1, hidden // 16),
      intermediate_size=4 * hidden,
    )
    return config, None, {}, tokenizer
  path = pretrained.resolve(c.model.name)
  model, params, tokenizer = pretrained.load(path)
  if not isinstance(model.config, bert.BertConfig):
    raise ConfigError(
      f"config.model.name={c.model.name!r} is a {model.config.model_type} model; "
      "the classification tasks need a BERT-family encoder"
    )
  return model.config, params, pretrained.load_head_params(path), tokenizer


def task_model(
  c: ml_collections.ConfigDict, backbone: bert.BertConfig, label_word_ids: tuple[int, ...] | None
):
  if c.model.dropout:
    backbone = dataclasses.replace(
      backbone,
      hidden_dropout_prob=float(c.model.dropout),
      attention_probs_dropout_prob=float(c.model.dropout),
    )
  lora_cfg = lora_config(c, backbone.model_type)
  if c.model.task == "label_words":
    return heads.LabelWordClassifier(backbone, tuple(label_word_ids), lora=lora_cfg)
  return heads.SequenceClassifier(backbone, c.data.num_labels, c.model.pooling, lora=lora_cfg)


def init_params(
  c: ml_collections.ConfigDict, model, example_batch, backbone_params, head_params
) -> tuple[PyTree, PyTree]:
  """(trainable, frozen) parameters: pretrained where available, else seeded random."""
  rng = jax.random.PRNGKey(c.seed)
  batch = {k: jnp.asarray(v) for k, v in example_batch.items()}
  if backbone_params is None:
    params = jax.jit(lambda r: model.init(r, batch)["params"])(rng)
  else:
    params = heads.init_with_backbone(model, rng, batch, backbone_params, head_params)
  if c.model.train == "lora" and not lora.has_adapters(params):
    raise ConfigError(
      f"config.model.lora_targets must match at least one Dense module path, "
      f"e.g. 'attention/self/query' (got {tuple(c.model.lora_targets)!r})"
    )
  return lora.partition(params, lora.trainable_mask(params, c.model.train))


def clip_rule(c: ml_collections.ConfigDict) -> privacy.ClipRule:
  if c.dp.clip == "automatic":
    return privacy.AutomaticClip()
  if c.dp.clip == "per_layer":
    return privacy.PerLayerClip(c.dp.clip_norm)
  return privacy.FlatClip(c.dp.clip_norm)


@dataclasses.dataclass(frozen=True)
class PrivacyPlan:
  """What the run promises: (ε, δ) for N, B, steps; σ calibrated or given."""

  dataset_size: int
  expected_batch_size: float
  steps: int
  delta: float
  noise_multiplier: float
  target_epsilon: float
  accountant: str

  @property
  def sampling_prob(self) -> float:
    return self.expected_batch_size / self.dataset_size


def plan_privacy(c: ml_collections.ConfigDict, dataset_size: int) -> PrivacyPlan:
  """Steps from epochs; δ = N^-1.1 by default; σ by calibration unless given."""
  batch = float(c.train.batch_size)
  if batch > dataset_size:
    raise ConfigError(
      f"config.train.batch_size must be in (0, dataset_size={dataset_size}] (got {batch:g})"
    )
  steps = c.train.steps or max(1, round(c.train.epochs * dataset_size / batch))
  if not c.dp.enabled:
    return PrivacyPlan(dataset_size, batch, steps, 0.0, 0.0, float("inf"), c.dp.accountant)
  delta = c.dp.delta or privacy.default_delta(dataset_size)
  if delta >= 1.0 / dataset_size:
    raise ConfigError(
      f"config.dp.delta must be < 1/dataset_size = {1 / dataset_size:.3g} (got {delta:g})"
    )
  q = batch / dataset_size
  if c.dp.noise_multiplier >= 0:
    sigma = float(c.dp.noise_multiplier)
  else:
    sigma = privacy.calibrate_noise(
      c.dp.epsilon, delta, q, steps, c.dp.accountant, dataset_size=dataset_size
    )
  tail = noise_lib.tail_probability(sigma, steps)
  if sigma > 0 and tail > 1e-3 * delta:
    raise ConfigError(
      f"config.dp.noise_multiplier={sigma:.4g} is too small for the noise "
      f"generator's tails (P(tail event) = {tail:.2g} over {steps} steps must "
      f"be below 1e-3·delta = {1e-3 * delta:.2g}); use σ >= 0.3"
    )
  return PrivacyPlan(dataset_size, batch, steps, delta, sigma, float(c.dp.epsilon), c.dp.accountant)


def optimizer(c: ml_collections.ConfigDict, steps: int) -> optax.GradientTransformation:
  """AdamW or SGD with linear warmup, then linear decay to 0 (or constant)."""
  lr, warmup = c.train.learning_rate, c.train.warmup_steps
  if c.train.schedule == "linear":
    decay = optax.linear_schedule(lr, 0.0, max(1, steps - warmup))
  else:
    decay = optax.constant_schedule(lr)
  schedule = (
    optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])
    if warmup
    else decay
  )
  if c.train.optimizer == "sgd":
    return optax.sgd(schedule, momentum=c.train.momentum or None)
  return optax.adamw(schedule, weight_decay=c.train.weight_decay)


def transform(
  c: ml_collections.ConfigDict, plan: PrivacyPlan, sensitivity: float, noise_key: np.ndarray
) -> optax.GradientTransformation:
  """DP: privatizer (σ·Δ noise once, / B) then the optimizer; non-DP: the optimizer."""
  if not c.dp.enabled:
    return optimizer(c, plan.steps)
  return optax.chain(
    privacy.gaussian_privatizer(
      plan.noise_multiplier, sensitivity, plan.expected_batch_size, key=noise_key
    ),
    optimizer(c, plan.steps),
  )


def abstract_state(c: ml_collections.ConfigDict, trainable: PyTree):
  """A TrainState with the structure of the run's (what a checkpoint restores into)."""
  from dpjax.train import step as step_lib  # pylint: disable=import-outside-toplevel

  dummy = PrivacyPlan(1, 1.0, 1, 0.0, 0.0, 0.0, "pld")
  tx = transform(c, dummy, 1.0, np.zeros(8, np.uint32))
  state = step_lib.TrainState(jnp.zeros([], jnp.int32), trainable, tx.init(trainable))
  return jax.tree_util.tree_map(np.asarray, state)


def steps_within_budget(
  ledger: privacy.PrivacyLedger,
  segment: privacy.Segment,
  target_epsilon: float,
  delta: float,
  wanted: int,
) -> int:
  """The largest k <= wanted such that recording k more steps keeps ε(δ) <= target."""
  fits = lambda k: (
    ledger.record(dataclasses.replace(segment, steps=k)).epsilon(delta) <= target_epsilon
  )
  if wanted <= 0 or fits(wanted):
    return max(wanted, 0)
  lo, hi = 0, wanted  # fits(lo) (ledger already within budget), not fits(hi)
  while hi - lo > 1:
    mid = (lo + hi) // 2
    lo, hi = (mid, hi) if fits(mid) else (lo, mid)
  return lo
