"""Prompt templates for the label-word (masked language model) objective.

Following Li et al., "Large Language Models Can Be Strong Differentially Private Learners"
(ICLR 2022), a classification example is written as a cloze, e.g. ``"<text> It was [MASK] ."``,
and class ``k`` is scored by the language model's logit of the ``k``-th label word at the mask.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tokenizers import Tokenizer

from dpjax.data import tokenizer_utils

TEXT = "{text}"
MASK = "{mask}"
_LITERAL_MASKS = ("[MASK]", "<mask>")


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
  """A cloze template with one text slot and one mask, and one label word per class.

  Attributes:
    template: contains ``{text}`` exactly once, and the mask exactly once, written either as
      ``{mask}`` (replaced by the tokenizer's mask token) or literally as ``[MASK]``/``<mask>``.
      Truncation shortens only the text; the rest of the template is always kept whole.
    label_words: the word for class 0, 1, ...; each must be a single token of the tokenizer.
      For byte-level BPE tokenizers (RoBERTa) the word usually needs its leading space,
      e.g. ``" great"``.
  """

  template: str = "{text} It was [MASK] ."
  label_words: tuple[str, ...] = ("terrible", "great")

  def __post_init__(self):
    object.__setattr__(self, "label_words", tuple(self.label_words))
    if self.template.count(TEXT) != 1:
      raise ValueError(f"template must contain {TEXT} exactly once (got {self.template!r})")
    masks = sum(self.template.count(m) for m in (MASK, *_LITERAL_MASKS))
    if masks != 1:
      raise ValueError(
        f"template must contain the mask ({MASK}, [MASK] or <mask>) exactly once "
        f"(got {self.template!r})"
      )
    if len(self.label_words) < 2 or not all(
      isinstance(w, str) and w.strip() for w in self.label_words
    ):
      raise ValueError(
        f"label_words must be two or more non-empty strings (got {self.label_words!r})"
      )

  def render(self, text: str, mask: str) -> tuple[str, int, int]:
    """The filled-in template and the character span ``[start, end)`` of ``text`` in it.

    Args:
      text: the example's text.
      mask: the tokenizer's mask token, substituted for ``{mask}``.
    """
    prefix, suffix = self.template.split(TEXT)
    prefix, suffix = prefix.replace(MASK, mask), suffix.replace(MASK, mask)
    return prefix + text + suffix, len(prefix), len(prefix) + len(text)

  def label_word_ids(self, tokenizer: Tokenizer) -> tuple[int, ...]:
    """The token id of each label word, in label order.

    Raises:
      ValueError: a label word is not exactly one known token of ``tokenizer``.
    """
    plain = tokenizer_utils.unpadded_copy(tokenizer)
    unknown = getattr(plain.model, "unk_token", None)
    ids = []
    for word in self.label_words:
      encoding = plain.encode(word, add_special_tokens=False)
      if len(encoding.ids) != 1 or encoding.tokens[0] == unknown:
        raise ValueError(
          f"label word {word!r} must be one known token of the tokenizer; it is {encoding.tokens}"
        )
      ids.append(encoding.ids[0])
    return tuple(ids)

  def spec(self) -> dict[str, Any]:
    """A JSON-able description, part of cache keys."""
    return {"template": self.template, "label_words": list(self.label_words)}
