"""Prompts in, text out, for a causal-LM run: the run's own format both ways.

A prompt is encoded exactly as training encoded the start of a row
(:mod:`dpjax.data.causal`): ``[bos] tokens(template filled with the prompt text
and/or label word)``; the model then continues it. Generated ids are cut at the
first eos and decoded with the run's tokenizer, special tokens dropped.
"""

from __future__ import annotations

from collections.abc import Sequence

import ml_collections
import numpy as np
import tokenizers

from dpjax.data import tokenizer_utils
from dpjax.train import splits
from dpjax.train.config import ConfigError


class RunFormat:
  """The prompt format and special tokens of a ``model.task = causal_lm`` config.

  Raises:
    ConfigError: the config is not a causal-LM run, or a special token is missing.
  """

  def __init__(self, c: ml_collections.ConfigDict, tokenizer: tokenizers.Tokenizer):
    fmt = splits.causal_format_for(c)
    if fmt is None:
      raise ConfigError(f"model.task is {c.model.task!r}: generation needs a causal_lm run")
    self.format = fmt
    self.tokenizer = tokenizer_utils.unpadded_copy(tokenizer)
    try:
      self.bos_id, self.eos_id, self.pad_id = fmt.special_ids(self.tokenizer)
    except ValueError as err:
      raise ConfigError(f"config.data.{err}") from None
    self.label_words = tuple(c.data.label_words)

  def prompt_ids(self, prompt: str | None = None, label: int | None = None) -> list[int]:
    """``[bos] + tokens(prompt)``, the prompt written by the run's template.

    Raises:
      ValueError: the template needs a prompt or label that is not given.
    """
    text = self.format.prompt_text(prompt, label)
    return [self.bos_id, *self.tokenizer.encode(text, add_special_tokens=False).ids]

  def decode(self, new_tokens: Sequence[int] | np.ndarray) -> str:
    """The text of generated ids up to (not including) the first eos."""
    ids = [int(t) for t in new_tokens]
    if self.eos_id in ids:
      ids = ids[: ids.index(self.eos_id)]
    return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

  def label_of(self, word: str) -> int:
    """The label whose word is ``word``.

    Raises:
      ValueError: no label has that word.
    """
    if word not in self.label_words:
      raise ValueError(f"label {word!r} is not one of the run's label words {self.label_words}")
    return self.label_words.index(word)
