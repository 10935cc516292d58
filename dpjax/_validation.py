"""Argument checks that fail with one line naming the argument and its valid range."""

from __future__ import annotations

import math
from typing import Any


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def require_positive(name: str, value: Any) -> float:
  """Returns ``value`` as float if it is a finite number > 0, else raises."""
  if not _is_number(value) or not math.isfinite(value) or value <= 0:
    raise ValueError(f"{name} must be a finite number > 0 (got {value!r})")
  return float(value)


def require_non_negative(name: str, value: Any) -> float:
  """Returns ``value`` as float if it is a finite number >= 0, else raises."""
  if not _is_number(value) or not math.isfinite(value) or value < 0:
    raise ValueError(f"{name} must be a finite number >= 0 (got {value!r})")
  return float(value)


def require_int_in(name: str, value: Any, low: int, high: float = math.inf) -> int:
  """Returns ``value`` if it is an integer in [low, high], else raises."""
  if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
    bound = "" if high == math.inf else f", {int(high)}"
    raise ValueError(f"{name} must be an integer in [{low}{bound}] (got {value!r})")
  return value


def require_probability(name: str, value: Any) -> float:
  """Returns ``value`` if it lies in the half-open interval (0, 1], else raises."""
  if not _is_number(value) or not 0 < value <= 1:
    raise ValueError(f"{name} must be in (0, 1] (got {value!r})")
  return float(value)


def require_delta(delta: Any, dataset_size: int | None = None, name: str = "delta") -> float:
  """Checks 0 < delta < 1, and delta < 1/N when the dataset size N is known.

  A delta of 1/N or more permits mechanisms that publish one record outright, so
  it is rejected rather than silently accepted.
  """
  if not _is_number(delta) or not 0 < delta < 1:
    raise ValueError(f"{name} must be in (0, 1) (got {delta!r})")
  if dataset_size is not None and delta >= 1.0 / dataset_size:
    raise ValueError(
      f"{name} must be < 1/dataset_size = {1.0 / dataset_size:.3g} "
      f"(got {delta!r}; the usual choice is dataset_size**-1.1 = "
      f"{dataset_size**-1.1:.3g})"
    )
  return float(delta)
