"""Causal-LM encoding: [bos] prompt completion [eos], the loss mask, truncation and bad rows."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dpjax import data
from dpjax.data import causal, tokenizer_utils

ROWS = [
  {
    "prompt": "name : blue spice | food : chinese",
    "completion": "blue spice serves chinese food .",
  },
  {"prompt": "name : the mill", "completion": "the mill is a pub .", "label": 1},
]


def _file(tmp_path, rows, name="rows.jsonl"):
  path = tmp_path / name
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def _source(path, **kwargs):
  return data.TextFileSource(
    path, text_field="completion", label_field=None, prompt_field="prompt", **kwargs
  )


def test_sequence_layout_and_loss_mask(tmp_path, minilm):
  fmt = causal.CausalFormat(template="{prompt} =")
  encoded = data.encode(_source(_file(tmp_path, ROWS)), minilm, 32, causal_format=fmt)
  bos, eos, pad = fmt.special_ids(minilm)
  assert (bos, eos, pad) == (minilm.token_to_id("[CLS]"), minilm.token_to_id("[SEP]"), 0)
  unpadded = tokenizer_utils.unpadded_copy(minilm)  # the file asks for padding to 128
  plain = lambda text: unpadded.encode(text, add_special_tokens=False).ids
  for i, row in enumerate(ROWS):
    prompt = plain(row["prompt"] + " =")
    expected = [bos, *prompt, *plain(row["completion"]), eos]
    np.testing.assert_array_equal(encoded.token_ids(i), expected)
    assert encoded.prompt_lengths[i] == 1 + len(prompt)
  batch = encoded.batch(np.array([0, 1]))
  length = batch["input_ids"].shape[1]
  for i in range(2):
    n, p = encoded.lengths[i], encoded.prompt_lengths[i]
    expected = (np.arange(length) >= p) & (np.arange(length) < n)
    np.testing.assert_array_equal(batch["loss_mask"][i], expected.astype(np.int32))
  # Padding and the prompt are not targets; the completion and eos are.
  assert batch["loss_mask"][batch["attention_mask"] == 0].sum() == 0


def test_label_control_code_and_plain_text(tmp_path, minilm):
  rows = [{"sentence": "a fine film .", "label": 1}, {"sentence": "dull .", "label": 0}]
  path = _file(tmp_path, rows)
  fmt = causal.CausalFormat(template="sentiment : {label} :", label_words=("bad", "good"))
  source = data.TextFileSource(path, num_labels=2)
  encoded = data.encode(source, minilm, 16, causal_format=fmt)
  unpadded = tokenizer_utils.unpadded_copy(minilm)
  prompt = unpadded.encode("sentiment : good :", add_special_tokens=False).ids
  assert list(encoded.token_ids(0)[1 : 1 + len(prompt)]) == prompt
  np.testing.assert_array_equal(encoded.labels, [1, 0])
  plain = data.encode(source, minilm, 16, causal_format=causal.CausalFormat())
  assert list(plain.prompt_lengths) == [1, 1]  # only bos: every text token is a target


def test_too_long_truncates_with_a_count_or_refuses(tmp_path, minilm, caplog):
  long = {"prompt": "p", "completion": " ".join(["word"] * 40)}
  path = _file(tmp_path, [ROWS[0], long])
  encoded = data.encode(_source(path), minilm, 16, causal_format=causal.CausalFormat("{prompt}"))
  assert encoded.lengths[1] == 16
  assert encoded.token_ids(1)[-1] != minilm.token_to_id("[SEP]")  # truncated: no eos
  assert "1 of 2 completions truncated" in caplog.text
  refuse = causal.CausalFormat("{prompt}", too_long="refuse")
  with pytest.raises(data.DataError, match=r"rows.jsonl:2: .* more than data.max_length=16"):
    data.encode(_source(path), minilm, 16, causal_format=refuse)


def test_bad_rows_are_named(tmp_path, minilm):
  fmt = causal.CausalFormat("{prompt}")
  long_prompt = _file(tmp_path, [ROWS[0], {"prompt": "x " * 30, "completion": "y"}], "p.jsonl")
  with pytest.raises(data.DataError, match=r"p.jsonl:2: bos \+ prompt take .* no room"):
    data.encode(_source(long_prompt), minilm, 16, causal_format=fmt)
  prompt_only = _file(
    tmp_path, [ROWS[0], {"prompt": "only a prompt", "completion": " "}], "o.jsonl"
  )
  with pytest.raises(data.DataError, match=r"o.jsonl:2: empty text in field 'completion'"):
    _source(prompt_only)
  no_prompt = _file(tmp_path, [{"completion": "text"}], "n.jsonl")
  with pytest.raises(data.DataError, match=r"n.jsonl:1: missing field 'prompt'"):
    _source(no_prompt)
  labels = _file(tmp_path, [{"sentence": "ok", "label": 0}, {"sentence": "ok", "label": 2}], "l")
  source = data.TextFileSource(labels, format="jsonl", num_labels=3)
  words = causal.CausalFormat("{label}", label_words=("a", "b"))
  with pytest.raises(data.DataError, match=r"l:2: label 2 has no label word"):
    data.encode(source, minilm, 16, causal_format=words)


def test_special_tokens_auto_and_named(minilm):
  assert causal.CausalFormat(pad_token="[UNK]").special_ids(minilm)[2] == 100
  with pytest.raises(ValueError, match=r"eos_token '<\|endoftext\|>' is not a token"):
    causal.CausalFormat(eos_token="<|endoftext|>").special_ids(minilm)
  with pytest.raises(ValueError, match="too_long must be one of"):
    causal.CausalFormat(too_long="cut")


def test_cache_keeps_prompt_lengths(tmp_path, minilm):
  fmt = causal.CausalFormat("{prompt}")
  path = _file(tmp_path, ROWS)
  first = data.encode(_source(path), minilm, 32, causal_format=fmt, cache_dir=tmp_path / "c")
  again = data.encode(_source(path), minilm, 32, causal_format=fmt, cache_dir=tmp_path / "c")
  np.testing.assert_array_equal(first.prompt_lengths, again.prompt_lengths)
  other = data.encode(
    _source(path), minilm, 32, causal_format=causal.CausalFormat("{prompt} ="), cache_dir=tmp_path
  )
  assert list(other.prompt_lengths) == [p + 1 for p in first.prompt_lengths]
