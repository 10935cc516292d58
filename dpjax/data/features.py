"""Text to fixed-shape arrays: ``encode`` a source once, then batch it by index."""

from __future__ import annotations

import os
from collections.abc import Sequence

from absl import logging
from tokenizers import Tokenizer

from dpjax.data import cache, tokenization, tokenizer_utils
from dpjax.data.base import Source
from dpjax.data.encoded import EncodedDataset, resolve_buckets
from dpjax.data.templates import PromptTemplate


def encode(
  source: Source,
  tokenizer: Tokenizer,
  max_length: int,
  buckets: Sequence[int] | None = None,
  template: PromptTemplate | None = None,
  cache_dir: str | os.PathLike[str] | None = None,
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

  Returns:
    The encoded dataset.

  Raises:
    ValueError: the tokenizer has no padding (or, with a template, mask) token, a label word is
      not a single token, or ``max_length`` is too small.
    DataError: an example cannot be encoded (see ``tokenization.tokenize``).
  """
  buckets = resolve_buckets(buckets, max_length)
  pad = tokenizer_utils.pad_id(tokenizer)
  label_word_ids = template.label_word_ids(tokenizer) if template is not None else None

  arrays, path = None, None
  if cache_dir is not None:
    tokenizer_json = tokenizer_utils.unpadded_copy(tokenizer).to_str()
    key = cache.cache_key(
      source.fingerprint, tokenizer_json, max_length, None if template is None else template.spec()
    )
    path = cache.cache_path(cache_dir, source.name, key)
    arrays = cache.load(path, key)
    if arrays is not None:
      logging.info("%s: token ids loaded from %s", source.name, path)
  if arrays is None:
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
