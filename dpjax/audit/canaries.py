"""Canary examples for the one-run black-box audit (Steinke, Nasr, Jagielski 2023).

m synthetic examples: each a sentence of random words with a random label, and
each in the training set by its own fair coin. All of it (texts, labels, coins)
is drawn before training from ``canary_seed``, so the included canaries are
ordinary rows of the dataset: they count in N, pass through the same Poisson
sampler, clipping and noise, and are charged in the ledger like every row.

After training, an attacker with the released model scores all m canaries and
guesses "in" for the highest scores; :mod:`dpjax.audit.statistics` turns the
guesses into an ε lower bound for the whole run, to set beside the ledger's ε.

The canaries are synthetic and say nothing about the real data, so their seed
is public: anyone holding the released model and the config can recompute the
audit. (The audit's validity needs the coins to be fair and independent of
the training randomness, not secret.)
"""

from __future__ import annotations

import dataclasses
import hashlib
import re

import numpy as np
import tokenizers

from dpjax.data.base import Example
from dpjax.data.sources import ExampleList

#: Words per canary sentence.
CANARY_WORDS = 12
_WORD = re.compile(r"^[a-z]{3,}$")


def vocabulary_words(tokenizer: tokenizers.Tokenizer) -> list[str]:
  """Whole lowercase words of the tokenizer's vocabulary (the canaries' alphabet), sorted."""
  words = sorted(w for w in tokenizer.get_vocab() if _WORD.match(w))
  if len(words) < 100:
    raise ValueError("the tokenizer's vocabulary has fewer than 100 whole words for canaries")
  return words


@dataclasses.dataclass(frozen=True)
class Canaries:
  """m canary examples and the coins that put them in the training set.

  Attributes:
    examples: the m canaries (random words, random label).
    included: bool [m], the fair coins: True = in the training set.
  """

  examples: tuple[Example, ...]
  included: np.ndarray

  def __len__(self) -> int:
    return len(self.examples)

  @property
  def in_examples(self) -> list[Example]:
    """The canaries that are in the training set, in canary order."""
    return [e for e, keep in zip(self.examples, self.included) if keep]


def make_canaries(count: int, seed: int, num_labels: int, words: list[str]) -> Canaries:
  """``count`` canaries of :data:`CANARY_WORDS` random ``words`` and labels, each in by a coin."""
  if isinstance(count, bool) or not isinstance(count, int) or count < 1:
    raise ValueError(f"count must be an integer >= 1 (got {count!r})")
  digest = hashlib.sha256(f"dpjax audit canaries:{seed}".encode()).digest()
  rng = np.random.default_rng(np.random.SeedSequence(int.from_bytes(digest, "little")))
  coins = rng.random(count) < 0.5
  labels = rng.integers(num_labels, size=count)
  picks = rng.integers(len(words), size=(count, CANARY_WORDS))
  examples = tuple(
    Example(" ".join(words[k] for k in row), int(label)) for row, label in zip(picks, labels)
  )
  return Canaries(examples, coins)


class CanarySource(ExampleList):
  """The canaries as a :class:`dpjax.data.Source` (for encoding them).

  Its fingerprint (the token cache key) covers only the label and the text of each canary.
  """

  def __init__(self, examples: list[Example], name: str = "canaries"):
    super().__init__(examples, name)

  @property
  def fingerprint(self) -> str:
    digest = hashlib.sha256()
    for e in self._examples:
      digest.update(f"{e.label}\t{e.text}\n".encode())
    return digest.hexdigest()
