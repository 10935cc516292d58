"""Tokenizing every example of a source into variable-length token ids.

Each example is tokenized on its own (no statistics across examples), with the tokenizer's
post-processor adding its special tokens (``[CLS] ... [SEP]`` for BERT). An encoding longer than
``max_length`` loses tokens from the end of the text part only: special tokens, and with a
template every token outside the text, are always kept. Without a template this equals the
tokenizer's own truncation (``enable_truncation(max_length)``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from tokenizers import Encoding, Tokenizer

from dpjax.data import tokenizer_utils
from dpjax.data.base import DataError, Source
from dpjax.data.templates import PromptTemplate

_CHUNK = 4096


class TokenArrays(NamedTuple):
  """Token ids of all examples, concatenated, with per-example metadata.

  Attributes:
    ids: int32 [total tokens]; example ``i`` is ``ids[offsets[i]:offsets[i + 1]]``.
    offsets: int64 [n + 1], starting at 0.
    labels: int32 [n], or None if the examples have no labels.
    user_ids: str [n], or None if the examples have no user ids.
    mask_positions: int32 [n], the mask token's index in each example (templates only).
    prompt_lengths: int32 [n], the leading tokens of each example that carry no loss
      (causal-LM data only, see :mod:`dpjax.data.causal`).
  """

  ids: np.ndarray
  offsets: np.ndarray
  labels: np.ndarray | None = None
  user_ids: np.ndarray | None = None
  mask_positions: np.ndarray | None = None
  prompt_lengths: np.ndarray | None = None


def _truncate(encoding: Encoding, span: tuple[int, int], max_length: int) -> list[int]:
  """The encoding's ids with the last text tokens removed so that at most max_length remain."""
  ids = encoding.ids
  excess = len(ids) - max_length
  if excess <= 0:
    return ids
  start, end = span
  text_tokens = [
    j
    for j, ((s, e), special) in enumerate(zip(encoding.offsets, encoding.special_tokens_mask))
    if not special and start <= s < e <= end
  ]
  if len(text_tokens) <= excess:
    raise ValueError(
      f"max_length={max_length} leaves no room for text: the special tokens and "
      f"template take {len(ids) - len(text_tokens)} tokens"
    )
  drop = set(text_tokens[-excess:])
  return [token for j, token in enumerate(ids) if j not in drop]


def _column(values: Sequence, what: str, name: str):
  """All values, or None if all are None; a mix is an error."""
  present = [v is not None for v in values]
  if not any(present):
    return None
  if not all(present):
    missing, given = present.index(False), present.index(True)
    raise DataError(f"{name}: example {missing} has no {what} but example {given} has one")
  return values


def tokenize(
  source: Source, tokenizer: Tokenizer, max_length: int, template: PromptTemplate | None = None
) -> TokenArrays:
  """Tokenizes every example of ``source``.

  Args:
    source: the examples.
    tokenizer: a ``tokenizers.Tokenizer``; its own padding and truncation settings are ignored.
    max_length: the most tokens an example keeps, special tokens included.
    template: if given, each text is first written into the template, the mask token must occur
      exactly once in the result, and its index is recorded in ``mask_positions``.

  Raises:
    DataError: with a template, an example whose tokens hold the mask token other than once
      (e.g. its text contains the mask token), or a mix of labeled and unlabeled examples.
    ValueError: ``max_length`` is too small to keep any text.
  """
  plain = tokenizer_utils.unpadded_copy(tokenizer)
  mask, mask_id = tokenizer_utils.mask_token(plain) if template is not None else (None, None)
  examples = [source[i] for i in range(len(source))]
  pieces, positions = [], []
  for first in range(0, len(examples), _CHUNK):
    chunk = examples[first : first + _CHUNK]
    if template is None:
      rendered = [(e.text, 0, len(e.text)) for e in chunk]
    else:
      rendered = [template.render(e.text, mask) for e in chunk]
    encodings = plain.encode_batch([r[0] for r in rendered])
    for i, (encoding, (_, start, end)) in enumerate(zip(encodings, rendered), first):
      ids = _truncate(encoding, (start, end), max_length)
      if template is not None:
        count = ids.count(mask_id)
        if count != 1:
          raise DataError(
            f"{source.name}[{i}]: the mask token {mask} occurs {count} times in the "
            "templated example, expected once"
          )
        positions.append(ids.index(mask_id))
      pieces.append(ids)

  lengths = np.array([len(p) for p in pieces], np.int64)
  offsets = np.zeros(len(pieces) + 1, np.int64)
  np.cumsum(lengths, out=offsets[1:])
  ids = np.fromiter((t for p in pieces for t in p), np.int32, count=int(offsets[-1]))
  labels = _column([e.label for e in examples], "label", source.name)
  users = _column([e.user_id for e in examples], "user id", source.name)
  return TokenArrays(
    ids=ids,
    offsets=offsets,
    labels=None if labels is None else np.asarray(labels, np.int32),
    user_ids=None if users is None else np.asarray(users, np.str_),
    mask_positions=None if template is None else np.asarray(positions, np.int32),
  )
