"""The example record, the random-access source protocol and the data error type."""

from __future__ import annotations

import dataclasses
from typing import Protocol, runtime_checkable


class DataError(ValueError):
  """Bad or missing input data; the message is one line naming the file (and line) at fault."""


class LabelRangeError(DataError):
  """A row's label lies outside ``[0, num_labels)`` (the data is of another task, or
  ``num_labels`` is too small)."""


@dataclasses.dataclass(frozen=True)
class Example:
  """One text example.

  Attributes:
    text: the raw text, as stored in the source.
    label: the integer class label, or None for unlabeled data.
    user_id: the id of the user who contributed the example (for user-level privacy), or None.
    prompt: for causal-LM data, the text the completion ``text`` is conditioned on, or None.
  """

  text: str
  label: int | None = None
  user_id: str | None = None
  prompt: str | None = None


@runtime_checkable
class Source(Protocol):
  """A finite, random-access collection of examples.

  ``source[i]`` for ``0 <= i < len(source)`` returns the same ``Example`` every time.
  ``fingerprint`` identifies the content: two sources with equal fingerprints yield equal
  examples, so it can key caches of anything computed from them.
  """

  @property
  def name(self) -> str:
    """A short human-readable name, e.g. ``"sst2/train"``."""
    ...

  @property
  def fingerprint(self) -> str:
    """A string that changes whenever the examples change."""
    ...

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> Example: ...
