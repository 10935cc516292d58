"""Tokenized examples held in memory, batched into padded arrays of a few bucketed lengths.

:func:`encode` builds an :class:`EncodedDataset` from a source (tokenizing once,
cached by content); the dataset hands out fixed-shape batches.

A batch is padded to the smallest bucket length that holds its longest example, so a jitted
training step compiles once per bucket rather than once per batch.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Sequence

import numpy as np
from absl import logging
from tokenizers import Tokenizer

from dpjax.data import cache, causal, tokenization, tokenizer_utils
from dpjax.data.base import Source
from dpjax.data.templates import PromptTemplate
from dpjax.data.tokenization import TokenArrays

_SMALLEST_DEFAULT_BUCKET = 32


def resolve_buckets(buckets: Sequence[int] | None, max_length: int) -> tuple[int, ...]:
  """Sorted bucket lengths, all ``<= max_length`` and always ending with ``max_length``.

  Args:
    buckets: lengths to pad to; those above ``max_length`` are dropped. None gives the powers
      of two from 32 below ``max_length``.
    max_length: the longest an example can be.
  """
  if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
    raise ValueError(f"max_length must be an integer >= 1 (got {max_length!r})")
  if buckets is None:
    chosen, length = [], _SMALLEST_DEFAULT_BUCKET
    while length < max_length:
      chosen.append(length)
      length *= 2
  else:
    chosen = list(buckets)
    for length in chosen:
      if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 1:
        raise ValueError(f"buckets must be integers >= 1 (got {tuple(buckets)!r})")
    chosen = sorted({int(b) for b in chosen if b < max_length})
  return (*chosen, max_length)


class EncodedDataset:
  """Variable-length token ids of every example, with labels, user ids and mask positions.

  Attributes:
    name: the source's name.
    max_length: the most tokens of any example.
    buckets: the padded lengths batches can have, ascending, the last being ``max_length``.
    pad_id: the id padding is filled with.
    lengths: int32 [n], the token count of each example (special tokens included).
    labels: int32 [n], or None for unlabeled data.
    user_ids: str [n], or None.
    mask_positions: int32 [n], the index of the mask token (templates only), else None.
    label_word_ids: the token id of each class's label word (templates only), else None.
    prompt_lengths: int32 [n], the leading tokens that carry no loss (causal-LM data), else None.
  """

  def __init__(
    self,
    arrays: TokenArrays,
    *,
    pad_id: int,
    max_length: int,
    buckets: Sequence[int] | None = None,
    label_word_ids: tuple[int, ...] | None = None,
    name: str = "",
  ):
    self.name = name
    self.max_length = max_length
    self.buckets = resolve_buckets(buckets, max_length)
    self.pad_id = int(pad_id)
    self.label_word_ids = label_word_ids
    self._ids = np.asarray(arrays.ids, np.int32)
    self._offsets = np.asarray(arrays.offsets, np.int64)
    self.lengths = np.diff(self._offsets).astype(np.int32)
    if len(self.lengths) and self.lengths.max() > max_length:
      raise ValueError(
        f"an example has {self.lengths.max()} tokens, more than max_length={max_length}"
      )
    self.labels = arrays.labels
    self.user_ids = arrays.user_ids
    self.mask_positions = arrays.mask_positions
    self.prompt_lengths = arrays.prompt_lengths

  @property
  def arrays(self) -> TokenArrays:
    """The stored arrays (what the cache saves)."""
    return TokenArrays(
      self._ids,
      self._offsets,
      self.labels,
      self.user_ids,
      self.mask_positions,
      self.prompt_lengths,
    )

  def __len__(self) -> int:
    return len(self.lengths)

  def token_ids(self, index: int) -> np.ndarray:
    """The token ids of one example, unpadded."""
    i = operator.index(index)
    if not -len(self) <= i < len(self):
      raise IndexError(f"index {i} out of range for {len(self)} examples")
    i %= len(self)
    return self._ids[self._offsets[i] : self._offsets[i + 1]]

  def bucket_length(self, num_tokens: int) -> int:
    """The smallest bucket length ``>= num_tokens``."""
    if num_tokens > self.max_length:
      raise ValueError(f"{num_tokens} tokens exceed max_length={self.max_length}")
    return self.buckets[int(np.searchsorted(self.buckets, num_tokens))]

  def bucket_histogram(self) -> dict[int, int]:
    """How many examples fall in each bucket (the smallest one that holds them)."""
    counts = np.bincount(np.searchsorted(self.buckets, self.lengths), minlength=len(self.buckets))
    return {length: int(count) for length, count in zip(self.buckets, counts)}

  def batch(
    self, indices: Sequence[int] | np.ndarray, length: int | None = None
  ) -> dict[str, np.ndarray]:
    """Padded arrays for the examples at ``indices`` (repeats allowed).

    Args:
      indices: example indices, shape [n].
      length: the padded length L; by default the smallest bucket holding the longest example.

    Returns:
      ``input_ids``, ``attention_mask`` (1 on real tokens) and ``token_type_ids`` (zeros), all
      int32 [n, L]; ``label`` int32 [n] if the examples have labels; ``mask_position`` int32 [n]
      if they were encoded with a template; ``loss_mask`` int32 [n, L] (1 on the tokens to
      predict: from ``prompt_lengths`` to the end of the example) for causal-LM data.
    """
    idx = np.asarray(indices)
    if idx.size == 0:
      idx = idx.astype(np.int64)
    if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
      raise ValueError(
        f"indices must be a 1-D array of integers (got shape {idx.shape}, dtype {idx.dtype})"
      )
    n = len(self)
    if idx.size and (idx.min() < -n or idx.max() >= n):
      raise IndexError(f"indices must lie in [-{n}, {n}) (got {idx.min()}..{idx.max()})")
    idx = np.where(idx < 0, idx + n, idx)
    lengths = self.lengths[idx]
    longest = int(lengths.max()) if idx.size else 0
    if length is None:
      length = self.bucket_length(longest)
    elif isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < longest:
      raise ValueError(
        f"length must be an integer >= the longest example of the batch "
        f"({longest} tokens) (got {length!r})"
      )
    attention = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
    rows, cols = np.nonzero(attention)
    input_ids = np.full((len(idx), length), self.pad_id, np.int32)
    input_ids[rows, cols] = self._ids[self._offsets[idx][rows] + cols]
    out = {
      "input_ids": input_ids,
      "attention_mask": attention,
      "token_type_ids": np.zeros_like(input_ids),
    }
    if self.labels is not None:
      out["label"] = self.labels[idx].astype(np.int32)
    if self.mask_positions is not None:
      out["mask_position"] = self.mask_positions[idx].astype(np.int32)
    if self.prompt_lengths is not None:
      targets = np.arange(length)[None, :] >= self.prompt_lengths[idx][:, None]
      out["loss_mask"] = (targets & (attention > 0)).astype(np.int32)
    return out

  def __repr__(self) -> str:
    return (
      f"EncodedDataset({self.name!r}, examples={len(self)}, max_length={self.max_length}, "
      f"buckets={self.buckets})"
    )


def encode(
  source: Source,
  tokenizer: Tokenizer,
  max_length: int,
  buckets: Sequence[int] | None = None,
  template: PromptTemplate | None = None,
  cache_dir: str | os.PathLike[str] | None = None,
  causal_format: causal.CausalFormat | None = None,
) -> EncodedDataset:
  """Tokenizes every example of ``source`` into an ``EncodedDataset``.

  Args:
    source: the examples.
    tokenizer: a ``tokenizers.Tokenizer``, e.g. ``Tokenizer.from_file(".../tokenizer.json")``.
      Its post-processor adds the special tokens; its padding and truncation settings are
      ignored, and it is not modified.
    max_length: the most tokens per example, special tokens included; longer examples lose
      tokens from the end of their text (never special tokens or template tokens).
    buckets: the padded lengths of batches (see ``resolve_buckets``); by default 32, 64, ...
      below ``max_length``, and ``max_length``.
    template: a ``PromptTemplate`` for the label-word objective; batches then carry
      ``mask_position`` and the dataset ``label_word_ids``.
    cache_dir: if given, the token ids are stored there and reused by later calls with the same
      source content, tokenizer, ``max_length`` and template.
    causal_format: encode for causal-LM training instead (``[bos] prompt completion [eos]``,
      see :mod:`dpjax.data.causal`); batches then carry ``loss_mask``. Not with ``template``.

  Returns:
    The encoded dataset.

  Raises:
    ValueError: the tokenizer has no padding (or, with a template, mask) token, a label word is
      not a single token, or ``max_length`` is too small.
    DataError: an example cannot be encoded (see ``tokenization.tokenize``).
  """
  buckets = resolve_buckets(buckets, max_length)
  if causal_format is not None and template is not None:
    raise ValueError("a causal-LM format and a cloze template cannot be combined")
  if causal_format is not None:
    pad = causal_format.special_ids(tokenizer)[2]
    spec = causal_format.spec()
  else:
    pad = tokenizer_utils.pad_id(tokenizer)
    spec = None if template is None else template.spec()
  label_word_ids = template.label_word_ids(tokenizer) if template is not None else None

  arrays, path = None, None
  if cache_dir is not None:
    tokenizer_json = tokenizer_utils.unpadded_copy(tokenizer).to_str()
    key = cache.cache_key(source.fingerprint, tokenizer_json, max_length, spec)
    path = cache.cache_path(cache_dir, source.name, key)
    arrays = cache.load(path, key)
    if arrays is not None:
      logging.info("%s: token ids loaded from %s", source.name, path)
  if arrays is None:
    if causal_format is not None:
      arrays = causal.tokenize(source, tokenizer, max_length, causal_format)
    else:
      arrays = tokenization.tokenize(source, tokenizer, max_length, template)
    if path is not None:
      cache.save(path, key, arrays)
      logging.info("%s: token ids saved to %s", source.name, path)
  return EncodedDataset(
    arrays,
    pad_id=pad,
    max_length=max_length,
    buckets=buckets,
    label_word_ids=label_word_ids,
    name=source.name,
  )


def concatenate(first: EncodedDataset, second: EncodedDataset) -> EncodedDataset:
  """The examples of ``first`` followed by those of ``second`` (same encoding settings).

  Raises:
    ValueError: the two were encoded differently (padding, lengths, buckets,
      label words) or only one has labels, user ids or mask positions.
  """
  same = (first.pad_id, first.max_length, first.buckets, first.label_word_ids) == (
    second.pad_id,
    second.max_length,
    second.buckets,
    second.label_word_ids,
  )
  if not same:
    raise ValueError("datasets encoded with different settings cannot be concatenated")
  a, b = first.arrays, second.arrays

  def join(x, y, what):
    if (x is None) != (y is None):
      raise ValueError(f"only one of the datasets has {what}")
    return None if x is None else np.concatenate([x, y])

  arrays = TokenArrays(
    np.concatenate([a.ids, b.ids]),
    np.concatenate([a.offsets, b.offsets[1:] + a.offsets[-1]]),
    join(a.labels, b.labels, "labels"),
    join(a.user_ids, b.user_ids, "user ids"),
    join(a.mask_positions, b.mask_positions, "mask positions"),
    join(a.prompt_lengths, b.prompt_lengths, "prompt lengths"),
  )
  return EncodedDataset(
    arrays,
    pad_id=first.pad_id,
    max_length=first.max_length,
    buckets=first.buckets,
    label_word_ids=first.label_word_ids,
    name=f"{first.name}+{second.name}",
  )
