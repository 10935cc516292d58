"""Special-token lookups on a ``tokenizers.Tokenizer`` and a copy of it without padding."""

from __future__ import annotations

from tokenizers import Tokenizer

_PAD_TOKENS = ("[PAD]", "<pad>")
_MASK_TOKENS = ("[MASK]", "<mask>")


def unpadded_copy(tokenizer: Tokenizer) -> Tokenizer:
  """A copy of ``tokenizer`` with padding and truncation turned off; the original is untouched.

  Tokenizers saved from pretrained models often pad or truncate every encoding to a fixed
  length; the data layer pads per batch and truncates itself.
  """
  copy = Tokenizer.from_str(tokenizer.to_str())
  copy.no_padding()
  copy.no_truncation()
  return copy


def pad_id(tokenizer: Tokenizer) -> int:
  """The padding token id: from the tokenizer's padding settings, else ``[PAD]`` or ``<pad>``.

  Raises:
    ValueError: the tokenizer has no padding token.
  """
  padding = tokenizer.padding
  if padding is not None and padding.get("pad_id") is not None:
    return int(padding["pad_id"])
  for token in _PAD_TOKENS:
    token_id = tokenizer.token_to_id(token)
    if token_id is not None:
      return token_id
  raise ValueError(
    f"the tokenizer has no padding token (looked for {', '.join(_PAD_TOKENS)} "
    "and its padding settings)"
  )


def mask_token(tokenizer: Tokenizer) -> tuple[str, int]:
  """The mask token and its id: ``[MASK]`` (BERT) or ``<mask>`` (RoBERTa).

  Raises:
    ValueError: the tokenizer has no mask token.
  """
  for token in _MASK_TOKENS:
    token_id = tokenizer.token_to_id(token)
    if token_id is not None:
      return token, token_id
  raise ValueError(f"the tokenizer has no mask token (looked for {', '.join(_MASK_TOKENS)})")
