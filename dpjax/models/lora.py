"""LoRA adapters and which parameters train (adapters, heads, or everything): two trees.

DP rule: frozen parameters are neither clipped nor noised. The cleanest way to
guarantee it is to never differentiate them: :func:`partition` splits the
parameters into a ``trainable`` tree (the only argument the loss is
differentiated in, so the only one that gets clipped, noised and updated) and
a ``frozen`` tree that the loss closes over as constants.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

from flax import traverse_util


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Low-rank adapters on the Dense layers whose module path matches ``targets``.

  Attributes:
    rank: r >= 1.
    alpha: scale numerator; the adapter output is multiplied by alpha / rank.
    targets: regular expressions searched in the Dense module path, e.g.
      ``("attention/self/(query|value)",)`` for BERT or ``("attn/c_attn",)`` for GPT-2.
  """

  rank: int = 8
  alpha: float = 16.0
  targets: tuple[str, ...] = ("query", "value")

  def __post_init__(self):
    if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
      raise ValueError(f"lora rank must be an integer >= 1 (got {self.rank!r})")
    if not self.alpha > 0:
      raise ValueError(f"lora alpha must be > 0 (got {self.alpha!r})")
    object.__setattr__(self, "targets", tuple(self.targets))

  def applies_to(self, path: Sequence[str]) -> bool:
    joined = "/".join(path)
    return any(re.search(t, joined) for t in self.targets)


PyTree = Any
LORA_LEAVES = ("lora_a", "lora_b")
# Presets of Dense module paths that get adapters (Hu et al. 2021: queries and values).
LORA_TARGETS = {
  "bert": ("attention/self/(query|value)",),
  "roberta": ("attention/self/(query|value)",),
  "gpt2": ("attn/c_attn",),
}

__all__ = [
  "LoraConfig",
  "LORA_TARGETS",
  "trainable_mask",
  "has_adapters",
  "partition",
  "combine",
  "count",
]


def trainable_mask(
  params: PyTree,
  train: str = "all",
  head_patterns: Sequence[str] = ("^head/", "^pooler/", "^lm_head/"),
) -> PyTree:
  """A bool tree like ``params``: True for the parameters to train.

  Args:
    params: the model parameters.
    train: ``"all"`` (full fine-tuning), ``"lora"`` (LoRA adapters + head),
      ``"head"`` (head only), or a regular expression over ``"a/b/kernel"`` paths.
    head_patterns: regular expressions that identify head parameters.
  """
  flat = traverse_util.flatten_dict(params, sep="/")
  is_head = lambda path: any(re.search(p, path) for p in head_patterns)
  if train == "all":
    keep = lambda path: True
  elif train == "lora":
    if not has_adapters(params):
      raise ValueError("train='lora' but the model has no LoRA adapters (set a LoraConfig)")
    keep = lambda path: path.rsplit("/", 1)[-1] in LORA_LEAVES or is_head(path)
  elif train == "head":
    keep = is_head
  else:
    try:
      pattern = re.compile(train)
    except re.error as err:
      raise ValueError(
        f"train must be 'all', 'lora', 'head' or a regular expression (got {train!r}: {err})"
      ) from None
    keep = lambda path: bool(pattern.search(path))
  mask = {path: keep(path) for path in flat}
  if not any(mask.values()):
    raise ValueError(f"train={train!r} selects no parameter")
  return traverse_util.unflatten_dict(mask, sep="/")


def has_adapters(params: PyTree) -> bool:
  """Whether any LoRA adapter leaf (``lora_a`` / ``lora_b``) is in the tree."""
  return any(path[-1] in LORA_LEAVES for path in traverse_util.flatten_dict(params))


def partition(params: PyTree, mask: PyTree) -> tuple[PyTree, PyTree]:
  """Splits ``params`` into (trainable, frozen) nested dicts by a bool ``mask``."""
  flat = traverse_util.flatten_dict(params)
  flat_mask = traverse_util.flatten_dict(mask)
  if flat.keys() != flat_mask.keys():
    raise ValueError("mask and params have different structures")
  trainable = {k: v for k, v in flat.items() if flat_mask[k]}
  frozen = {k: v for k, v in flat.items() if not flat_mask[k]}
  return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def combine(trainable: PyTree, frozen: PyTree) -> PyTree:
  """The inverse of :func:`partition`."""
  flat = dict(traverse_util.flatten_dict(frozen))
  overlap = flat.keys() & traverse_util.flatten_dict(trainable).keys()
  if overlap:
    raise ValueError(f"trainable and frozen overlap at {sorted(overlap)[:3]}")
  flat.update(traverse_util.flatten_dict(trainable))
  return traverse_util.unflatten_dict(flat)


def count(params: PyTree) -> int:
  """Number of scalars in a parameter tree."""
  return sum(int(v.size) for v in traverse_util.flatten_dict(params).values())
