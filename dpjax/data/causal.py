"""Causal-LM examples: ``[bos] prompt completion [eos]``, with the loss on the completion only.

A row gives a completion (the text the model learns to write) and, optionally, a
prompt it is conditioned on. The prompt is ``template`` filled in with the row's
fields: ``{prompt}`` is the row's prompt text, ``{label}`` the label word of its
label, so ``"sentiment: {label}\\n"`` writes a control code for label-conditioned
generation (Keskar et al. 2019) and ``"{prompt} ="`` the source side of a
table-to-text pair. The encoded sequence is

    bos  tokens(prompt)  tokens(completion)  eos

where prompt and completion are tokenized separately (what generation sees: a
tokenized prompt, then new tokens). ``prompt_length = 1 + len(tokens(prompt))``
positions carry no loss: position t >= prompt_length is predicted from the
tokens before it, so the completion and the closing eos are the targets.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from absl import logging
from tokenizers import Tokenizer

from dpjax.data import tokenizer_utils
from dpjax.data.base import DataError, Source
from dpjax.data.tokenization import TokenArrays

PROMPT = "{prompt}"
LABEL = "{label}"
TOO_LONG = ("truncate", "refuse")
AUTO = "auto"
# Looked up in this order when a special token is "auto".
_BOS_TOKENS = ("<|endoftext|>", "<s>", "[CLS]", "<bos>")
_EOS_TOKENS = ("<|endoftext|>", "</s>", "[SEP]", "<eos>")


@dataclasses.dataclass(frozen=True)
class CausalFormat:
  """How a row becomes a causal-LM training sequence.

  Attributes:
    template: the prompt, with ``{prompt}`` (the row's prompt text) and/or
      ``{label}`` (the label word of its label); ``""`` for plain text.
    label_words: the word written for label 0, 1, ... (used with ``{label}``).
    bos_token, eos_token, pad_token: token strings, or ``"auto"``: bos/eos are
      ``<|endoftext|>`` (GPT-2), ``<s>``/``</s>`` or ``[CLS]``/``[SEP]``, whichever
      the tokenizer has; pad is the tokenizer's own padding token, else eos
      (padded positions are masked out of attention and loss, so its id does not
      change any result).
    too_long: ``"truncate"``: a sequence over ``max_length`` loses completion
      tokens from its end (and its eos; the count is logged); ``"refuse"``: a
      :class:`DataError` naming the row.
  """

  template: str = ""
  label_words: tuple[str, ...] = ()
  bos_token: str = AUTO
  eos_token: str = AUTO
  pad_token: str = AUTO
  too_long: str = "truncate"

  def __post_init__(self):
    object.__setattr__(self, "label_words", tuple(self.label_words))
    if self.too_long not in TOO_LONG:
      raise ValueError(f"too_long must be one of {TOO_LONG} (got {self.too_long!r})")
    if self.template.count(PROMPT) > 1 or self.template.count(LABEL) > 1:
      raise ValueError(f"template holds {PROMPT} and {LABEL} at most once each ({self.template!r})")
    if self.uses_label and not self.label_words:
      raise ValueError(f"template {self.template!r} uses {LABEL} but label_words is empty")

  @property
  def uses_prompt(self) -> bool:
    return PROMPT in self.template

  @property
  def uses_label(self) -> bool:
    return LABEL in self.template

  def prompt_text(self, prompt: str | None, label: int | None) -> str:
    """The prompt of a row: the template with its fields filled in.

    Raises:
      ValueError: the template needs a prompt or label the row does not have, or
        the label has no label word.
    """
    text = self.template
    if self.uses_prompt:
      if prompt is None:
        raise ValueError(f"the template {self.template!r} needs a prompt and the row has none")
      text = text.replace(PROMPT, prompt)
    if self.uses_label:
      if label is None or not 0 <= label < len(self.label_words):
        raise ValueError(
          f"label {label!r} has no label word (label_words has {len(self.label_words)})"
        )
      text = text.replace(LABEL, self.label_words[label])
    return text

  def special_ids(self, tokenizer: Tokenizer) -> tuple[int, int, int]:
    """(bos, eos, pad) token ids.

    Raises:
      ValueError: a named token is not in the vocabulary, or "auto" finds none.
    """
    bos = _token_id(tokenizer, self.bos_token, _BOS_TOKENS, "bos_token")
    eos = _token_id(tokenizer, self.eos_token, _EOS_TOKENS, "eos_token")
    if self.pad_token == AUTO:
      try:
        pad = tokenizer_utils.pad_id(tokenizer)
      except ValueError:
        pad = eos
    else:
      pad = _token_id(tokenizer, self.pad_token, (), "pad_token")
    return bos, eos, pad

  def spec(self) -> dict[str, Any]:
    """A JSON-able description, part of cache keys."""
    return {"kind": "causal_lm", **dataclasses.asdict(self), "label_words": list(self.label_words)}


def _token_id(tokenizer: Tokenizer, token: str, candidates: tuple[str, ...], what: str) -> int:
  if token != AUTO:
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
      raise ValueError(f"{what} {token!r} is not a token of the tokenizer")
    return token_id
  for candidate in candidates:
    token_id = tokenizer.token_to_id(candidate)
    if token_id is not None:
      return token_id
  raise ValueError(
    f"{what}: the tokenizer has none of {', '.join(candidates)}; name one of its tokens"
  )


def row_name(source: Source, index: int) -> str:
  """``"<file>:<line>"`` when the source knows the row's line, else ``"<name>[index]"``."""
  line_of = getattr(source, "line_of", None)
  if line_of is not None:
    return f"{getattr(source, 'path', source.name)}:{line_of(index)}"
  return f"{source.name}[{index}]"


def tokenize(
  source: Source, tokenizer: Tokenizer, max_length: int, fmt: CausalFormat
) -> TokenArrays:
  """Encodes every row of ``source`` as ``[bos] prompt completion [eos]``.

  Returns:
    TokenArrays with ``prompt_lengths`` (the positions before the first target).

  Raises:
    DataError: naming the row, when its prompt cannot be written (a missing
      prompt or label word), when bos + prompt leave no room for one completion
      token within ``max_length``, or (``too_long="refuse"``) when the sequence
      is longer than ``max_length``.
    ValueError: a special token is missing from the tokenizer.
  """
  plain = tokenizer_utils.unpadded_copy(tokenizer)
  bos, eos, _ = fmt.special_ids(plain)
  pieces, prompt_lengths, truncated = [], [], 0
  examples = [source[i] for i in range(len(source))]
  try:
    prompts = [fmt.prompt_text(e.prompt, e.label) for e in examples]
  except ValueError:
    for i, e in enumerate(examples):  # find the row to name
      try:
        fmt.prompt_text(e.prompt, e.label)
      except ValueError as err:
        raise DataError(f"{row_name(source, i)}: {err}") from None
    raise
  prompt_ids = [e.ids for e in plain.encode_batch(prompts, add_special_tokens=False)]
  completion_ids = plain.encode_batch([e.text for e in examples], add_special_tokens=False)
  for i, (prompt, completion) in enumerate(zip(prompt_ids, completion_ids)):
    head = [bos, *prompt]
    room = max_length - len(head)
    body = completion.ids
    if not body:
      raise DataError(f"{row_name(source, i)}: the completion has no tokens")
    if room < 1:
      raise DataError(
        f"{row_name(source, i)}: bos + prompt take {len(head)} tokens, leaving no room for "
        f"the completion within data.max_length={max_length}"
      )
    if len(body) + 1 > room:
      if fmt.too_long == "refuse":
        raise DataError(
          f"{row_name(source, i)}: {len(head) + len(body) + 1} tokens, more than "
          f"data.max_length={max_length} (data.too_long='refuse')"
        )
      truncated += 1
      sequence = head + body[:room]
    else:
      sequence = head + body + [eos]
    pieces.append(sequence)
    prompt_lengths.append(len(head))
  if truncated:
    logging.warning(
      "%s: %d of %d completions truncated to data.max_length=%d (they lose their eos)",
      source.name,
      truncated,
      len(pieces),
      max_length,
    )
  lengths = np.array([len(p) for p in pieces], np.int64)
  offsets = np.zeros(len(pieces) + 1, np.int64)
  np.cumsum(lengths, out=offsets[1:])
  labels = [e.label for e in examples]
  users = [e.user_id for e in examples]
  return TokenArrays(
    ids=np.fromiter((t for p in pieces for t in p), np.int32, count=int(offsets[-1])),
    offsets=offsets,
    labels=None if any(v is None for v in labels) else np.asarray(labels, np.int32),
    user_ids=None if any(v is None for v in users) else np.asarray(users, np.str_),
    prompt_lengths=np.asarray(prompt_lengths, np.int32),
  )
