"""The training and evaluation splits of a run: sources, encoding, the kept subset, digests."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import ml_collections
import numpy as np

from dpjax import data as data_lib
from dpjax.audit import canaries
from dpjax.data import causal
from dpjax.data import encoded as encoded_lib
from dpjax.data.tfds_source import NotPreparedError
from dpjax.train import config as config_lib
from dpjax.train.config import ConfigError


@dataclasses.dataclass
class Split:
  """An encoded dataset restricted to ``indices`` (the examples that make up the split)."""

  encoded: data_lib.EncodedDataset
  indices: np.ndarray

  def __len__(self) -> int:
    return len(self.indices)

  def batch(self, positions: np.ndarray, length: int | None = None) -> dict[str, np.ndarray]:
    """Arrays of the examples at ``positions`` (indices into this split), padded to ``length``."""
    return self.encoded.batch(self.indices[positions], length=length)

  def padded_batches(self, batch_size: int):
    """Yields (positions, padded positions, mask) covering the split in fixed-size batches.

    Shortest examples first, so each batch pads to the bucket of its own longest
    example; padding rows repeat the batch's first (shortest) example and are
    masked out.
    """
    order = np.argsort(self.encoded.lengths[self.indices], kind="stable")
    for start in range(0, len(self), batch_size):
      positions = order[start : start + batch_size]
      mask = np.zeros(batch_size, bool)
      mask[: len(positions)] = True
      padded = np.concatenate([positions, np.full(batch_size - len(positions), positions[0])])
      yield positions, padded, mask

  def length_groups(self) -> np.ndarray:
    """int [len(self)]: each example's token-length bucket (an index into ``encoded.buckets``)."""
    return np.searchsorted(self.encoded.buckets, self.encoded.lengths[self.indices])


def source_for(
  spec: str,
  c: ml_collections.ConfigDict,
  user_field: str | None = None,
  *,
  key: str | None = None,
  optional_labels: bool = False,
) -> data_lib.Source:
  """A random-access source for ``spec``: ``sst2:<split>``, a path to a .tsv/.csv/.jsonl
  file, or ``tfds:NAME[/CONFIG][:VERSION]:SPLIT`` (a TFDS dataset prepared as array_record in
  ``data.tfds_dir``, see :class:`dpjax.data.TfdsSource`).

  Files and TFDS records are read with the run's ``data.text_field``,
  ``data.label_field`` and ``data.prompt_field`` as their columns or features.

  Args:
    spec: the data, as ``data.train`` / ``data.eval`` name it.
    c: the run's config.
    user_field: the user id column or feature (every row must have one), or None.
    key: what named ``spec`` (``"config.data.eval"``, ``"--data"``), for messages.
    optional_labels: read data without ``data.label_field`` as unlabeled (labels then come
      only where the file has the column or the dataset the feature).

  Raises:
    ConfigError: the file is missing; a malformed tfds spec, or a TFDS dataset that is not
      prepared or lacks the split or a feature; a label outside ``[0, data.num_labels)``
      (files: read now; TFDS records: as they are read).
    DataError: the file has another bad row (TFDS records: as they are read).
  """
  if data_lib.TfdsSpec.matches(spec):
    return _tfds_source(spec, c, user_field, key=key, optional_labels=optional_labels)
  if spec.startswith("sst2:"):
    if user_field is not None:
      raise ConfigError(
        f"data source {spec!r} has no user ids (config.data.user_field={user_field!r}); "
        "user-level DP needs a .tsv/.csv/.jsonl file or a tfds: split with a user column"
      )
    try:
      return data_lib.sst2(spec.split(":", 1)[1])
    except ValueError as err:  # an unknown split (sst2:test has no labels and is not shipped)
      raise ConfigError(f"data source {spec!r}: sst2 {err}") from None
  if not Path(spec).is_file():
    raise ConfigError(
      f"data file {spec!r} not found (config.data.train / config.data.eval take "
      f"{config_lib.DATA_FORMS})"
    )
  label_field = c.data.label_field or None
  if optional_labels and label_field and not data_lib.has_field(spec, label_field):
    label_field = None
  try:
    return data_lib.TextFileSource(
      spec,
      text_field=c.data.text_field,
      label_field=label_field,
      num_labels=c.data.num_labels,
      skip_bad_rows=c.data.skip_bad_rows,
      prompt_field=c.data.prompt_field or None,
      user_field=user_field,
    )
  except data_lib.LabelRangeError as err:
    raise _label_range_error(spec, c, key, err) from None


def _named(spec: str, key: str | None) -> str:
  return f"{key}={spec!r}" if key else f"data source {spec!r}"


def _label_range_error(
  spec: str, c: ml_collections.ConfigDict, key: str | None, err: data_lib.LabelRangeError
) -> ConfigError:
  return ConfigError(
    f"{_named(spec, key)} has a label outside [0, config.data.num_labels="
    f"{c.data.num_labels}) ({err}); set config.data.num_labels to the number of classes, "
    "or give data of this task"
  )


def _tfds_source(
  spec: str,
  c: ml_collections.ConfigDict,
  user_field: str | None,
  *,
  key: str | None,
  optional_labels: bool,
) -> data_lib.TfdsSource:
  """The split ``tfds:NAME[/CONFIG][:VERSION]:SPLIT`` of a dataset prepared in data.tfds_dir.

  Raises:
    ConfigError: ``spec`` is malformed, or the dataset is not prepared or lacks the split or
      a feature.
  """
  config_lib.check_data_spec(key or "data source", spec)
  parsed = data_lib.TfdsSpec.parse(spec)
  label_field = c.data.label_field or None

  def open_split(label_key: str | None) -> data_lib.TfdsSource:
    return data_lib.TfdsSource(
      parsed.name,
      parsed.split,
      data_dir=c.data.tfds_dir or None,
      text_key=c.data.text_field,
      label_key=label_key,
      user_key=user_field,
      prompt_key=c.data.prompt_field or None,
      num_labels=c.data.num_labels,
    )

  try:
    if not optional_labels:
      return open_split(label_field)
    unlabeled = open_split(None)
    return open_split(label_field) if label_field in unlabeled.features else unlabeled
  except NotPreparedError as err:
    raise ConfigError(
      f"{_named(spec, key)}: {err} (config.data.tfds_dir names the directory it was prepared in)"
    ) from None
  except data_lib.DataError as err:
    raise ConfigError(f"{_named(spec, key)}: {err}") from None


def encode_source(
  source: data_lib.Source, tokenizer, c: ml_collections.ConfigDict, cache_dir: Path | None
) -> data_lib.EncodedDataset:
  """``source`` tokenized as the run encodes its data (template, max_length, buckets).

  Raises:
    ConfigError: (causal_lm) a special token the tokenizer lacks.
    DataError: an example cannot be encoded.
  """
  try:
    return data_lib.encode(
      source,
      tokenizer,
      c.data.max_length,
      buckets=tuple(c.data.buckets),
      template=template_for(c),
      cache_dir=cache_dir,
      causal_format=causal_format_for(c),
    )
  except data_lib.DataError:
    raise
  except ValueError as err:  # a special token the tokenizer lacks (causal_lm)
    if c.model.task != "causal_lm":
      raise
    raise ConfigError(f"config.data.{err}") from None


def template_for(c: ml_collections.ConfigDict) -> data_lib.PromptTemplate | None:
  if c.model.task != "label_words":
    return None
  return data_lib.PromptTemplate(c.data.template, tuple(c.data.label_words))


def causal_format_for(c: ml_collections.ConfigDict) -> causal.CausalFormat | None:
  """How rows become causal-LM sequences (``model.task = causal_lm``), else None."""
  if c.model.task != "causal_lm":
    return None
  return causal.CausalFormat(
    template=config_lib.causal_template(c),
    label_words=tuple(c.data.label_words),
    bos_token=c.data.bos_token,
    eos_token=c.data.eos_token,
    pad_token=c.data.pad_token,
    too_long=c.data.too_long,
  )


def load_split(
  spec: str,
  tokenizer,
  c: ml_collections.ConfigDict,
  cache_dir: Path | None,
  *,
  fraction: float = 1.0,
  limit: int | None = None,
  seed: int = 0,
  user_field: str | None = None,
  key: str | None = None,
) -> Split:
  """Encodes a source and keeps a subset of its rows.

  ``fraction`` < 1 keeps the rows whose :func:`row_hash` is below it: a row is in
  or out by its own content (and the seed), so adding or removing one row of
  the file changes the subset by at most that row (the add/remove guarantee
  carries over from the subset to the file). ``limit`` (if given) keeps that many
  random rows (for public evaluation splits only: one row more in the file
  reshuffles the choice). ``user_field``: read each row's user id from that column
  (into ``encoded.user_ids``). ``key``: what named ``spec``, for messages (see
  :func:`source_for`).
  """
  source = source_for(spec, c, user_field, key=key)
  try:
    encoded = encode_source(source, tokenizer, c, cache_dir)
  except data_lib.LabelRangeError as err:  # a TFDS record's label, found as it is read
    raise _label_range_error(spec, c, key, err) from None
  if encoded.labels is None and c.model.task != "causal_lm":
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
  if limit is not None and 0 < limit < len(indices):
    indices = np.sort(np.random.default_rng(seed).choice(indices, limit, replace=False))
  return Split(encoded, indices)


def training_split(
  c: ml_collections.ConfigDict, tokenizer, cache_dir: Path | None
) -> tuple[Split, int]:
  """(the training set, its number of canaries): the kept file rows, then the in-canaries.

  With ``audit.canaries = m``, the canaries whose coin is heads are appended
  after the file's rows (see :mod:`dpjax.audit.canaries`); they are rows like
  any other from here on.

  With ``dp.unit = user`` each row's user id is read from ``data.user_field`` and
  each user keeps at most ``dp.max_examples_per_user`` rows (:func:`cap_per_user`).
  """
  user_level = c.dp.unit == "user"
  train = load_split(
    c.data.train,
    tokenizer,
    c,
    cache_dir,
    fraction=c.data.train_fraction,
    seed=c.seed,
    user_field=c.data.user_field if user_level else None,
    key="config.data.train",
  )
  if user_level:
    train = cap_per_user(train, int(c.dp.max_examples_per_user))
  if not c.audit.canaries:
    return train, 0
  extra = encode_canaries(c, tokenizer, canaries_of(c, tokenizer).in_examples)
  if len(extra) == 0:
    return train, 0
  base = train.encoded
  joined = encoded_lib.concatenate(base, extra)
  indices = np.concatenate([train.indices, len(base) + np.arange(len(extra))])
  return Split(joined, indices), len(extra)


def cap_per_user(split: Split, k: int) -> Split:
  """``split`` with each user's first ``k`` rows only (in file order).

  The rule is local to each user: which of a user's rows are kept depends on
  that user's rows alone (their order in the file, after ``data.train_fraction``,
  which keeps a row by its own content), so adding or removing one user's rows
  changes the kept rows by that user's at most k rows.

  Raises:
    ConfigError: the split has no user ids.
  """
  users = split.encoded.user_ids
  if users is None:
    raise ConfigError(f"{split.encoded.name} has no user ids (config.data.user_field)")
  kept, counts = [], {}
  for i in split.indices:  # ascending: file order
    user = users[i]
    if counts.get(user, 0) < k:
      counts[user] = counts.get(user, 0) + 1
      kept.append(i)
  return Split(split.encoded, np.asarray(kept, np.int64))


def count_users(split: Split) -> int:
  """The number of distinct user ids among the split's rows (0 without user ids)."""
  users = split.encoded.user_ids
  return 0 if users is None else len(np.unique(users[split.indices]))


def canaries_of(c: ml_collections.ConfigDict, tokenizer) -> canaries.Canaries:
  """The run's canaries (all m, with their coins), from ``audit.canaries`` and ``canary_seed``."""
  try:
    words = canaries.vocabulary_words(tokenizer)
  except ValueError as err:
    raise ConfigError(f"config.audit.canaries: {err}") from None
  return canaries.make_canaries(
    int(c.audit.canaries), int(c.audit.canary_seed), int(c.data.num_labels), words
  )


def encode_canaries(c: ml_collections.ConfigDict, tokenizer, examples) -> data_lib.EncodedDataset:
  """Canary examples encoded exactly as the training rows are."""
  return data_lib.encode(
    canaries.CanarySource(examples),
    tokenizer,
    c.data.max_length,
    buckets=tuple(c.data.buckets),
    template=template_for(c),
  )


def row_hash(encoded: data_lib.EncodedDataset, index: int, seed: int) -> int:
  """A 64-bit hash of row ``index``'s tokens and label, keyed by ``seed``."""
  digest = hashlib.blake2b(digest_size=8, key=str(seed).encode())
  digest.update(encoded.token_ids(index).tobytes())
  _update_row_facts(digest, encoded, index)
  return int.from_bytes(digest.digest(), "little")


def _update_row_facts(digest, encoded: data_lib.EncodedDataset, index: int) -> None:
  """Feeds the row's label and (causal_lm) prompt length to ``digest``."""
  if encoded.labels is not None:
    digest.update(np.asarray(encoded.labels[index]).tobytes())
  if encoded.prompt_lengths is not None:
    digest.update(b"prompt" + np.asarray(encoded.prompt_lengths[index]).tobytes())


def data_digest(split: Split) -> bytes:
  """sha256 of the split's rows (tokens, labels and user ids, in order): what training reads."""
  digest = hashlib.sha256()
  users = split.encoded.user_ids
  for i in split.indices:
    digest.update(split.encoded.token_ids(int(i)).tobytes())
    _update_row_facts(digest, split.encoded, int(i))
    if users is not None:
      user = str(users[int(i)]).encode()
      digest.update(b"user" + len(user).to_bytes(8, "little") + user)
  return digest.digest()
