"""encode() with the real MiniLM tokenizer on real SST-2 rows: truncation, templates, padding."""

from __future__ import annotations

import unicodedata

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from dpjax.data import (
  DataError,
  EncodedDataset,
  PromptTemplate,
  TextFileSource,
  encode,
  pad_id,
  resolve_buckets,
  sst2,
)

CLS, SEP, PAD, MASK = 101, 102, 0, 103


@pytest.fixture(scope="module")
def dev():
  return sst2("validation")


def _texts(source):
  return [source[i].text for i in range(len(source))]


def _plain_decoder(tokenizer: Tokenizer) -> Tokenizer:
  """A copy that joins word pieces but leaves spaces before punctuation as they are."""
  copy = Tokenizer.from_str(tokenizer.to_str())
  copy.decoder = decoders.WordPiece(prefix="##", cleanup=False)
  return copy


def _bert_normalized(text: str) -> str:
  """Lower-cased, accents stripped, whitespace collapsed: what BERT's normalizer keeps."""
  text = unicodedata.normalize("NFD", text.lower())
  return " ".join("".join(c for c in text if unicodedata.category(c) != "Mn").split())


def test_round_trip_on_sst2_dev(dev, minilm):
  encoded = encode(dev, minilm, max_length=128)
  decoder = _plain_decoder(minilm)
  unknown = minilm.token_to_id("[UNK]")
  exact, with_unknown = 0, 0
  for i, text in enumerate(_texts(dev)):
    ids = encoded.token_ids(i).tolist()
    assert ids[0] == CLS and ids[-1] == SEP and len(ids) == encoded.lengths[i]
    if unknown in ids:
      with_unknown += 1
      continue
    decoded = decoder.decode(ids)
    expected = _bert_normalized(text)
    assert decoded.replace(" ", "") == expected.replace(" ", ""), i
    if all(word.isalnum() or len(word) == 1 for word in expected.split()):
      assert decoded == expected, i
      exact += 1
  assert with_unknown < 5
  assert exact > 300


def test_plain_truncation_matches_the_tokenizers_own(dev, minilm):
  reference = Tokenizer.from_str(minilm.to_str())
  reference.no_padding()
  reference.enable_truncation(12)
  encoded = encode(dev, minilm, max_length=12)
  expected = [e.ids for e in reference.encode_batch(_texts(dev))]
  assert max(len(e) for e in expected) == 12
  assert [encoded.token_ids(i).tolist() for i in range(len(dev))] == expected
  long = encoded.lengths == 12
  assert long.sum() > 500
  batch = encoded.batch(np.flatnonzero(long))
  assert batch["input_ids"].shape[1] == 12
  assert (batch["input_ids"][:, 0] == CLS).all() and (batch["input_ids"][:, -1] == SEP).all()


def test_template_truncates_only_the_text(dev, minilm):
  template = PromptTemplate("{text} It was [MASK] .", ("terrible", "great"))
  full = encode(dev, minilm, max_length=128, template=template)
  short = encode(dev, minilm, max_length=16, template=template)
  tail = minilm.encode(" it was [MASK] .", add_special_tokens=False).ids[:4]
  assert tail == [2009, 2001, MASK, 1012]
  truncated = 0
  for i in range(len(dev)):
    whole, cut = full.token_ids(i).tolist(), short.token_ids(i).tolist()
    assert cut[0] == CLS and cut[-5:] == tail + [SEP]
    assert len(cut) == min(len(whole), 16)
    # The text part of the short encoding is a prefix of the full one's.
    assert whole[: len(cut) - 5] == cut[:-5]
    truncated += len(whole) > 16
  assert truncated > 500
  batch = short.batch(np.arange(len(dev)))
  rows = np.arange(len(dev))
  assert (batch["input_ids"][rows, batch["mask_position"]] == MASK).all()
  assert (batch["mask_position"] == short.lengths - 3).all()
  assert short.label_word_ids == (minilm.token_to_id("terrible"), minilm.token_to_id("great"))


def test_template_with_a_prefix_and_the_mask_placeholder(minilm, tmp_path):
  path = tmp_path / "d.tsv"
  path.write_text("sentence\tlabel\none two three four five six seven eight\t1\n")
  template = PromptTemplate("review : {text} . {mask} !", ("bad", "good"))
  encoded = encode(TextFileSource(path), minilm, max_length=10, template=template)
  tokens = [minilm.id_to_token(t) for t in encoded.token_ids(0)]
  assert tokens == ["[CLS]", "review", ":", "one", "two", "three", ".", "[MASK]", "!", "[SEP]"]
  assert encoded.batch([0])["mask_position"].tolist() == [7]


def test_label_words_must_be_single_known_tokens(minilm):
  assert PromptTemplate().label_word_ids(minilm) == (6659, 2307)
  with pytest.raises(ValueError, match="'secretions' must be one known token"):
    PromptTemplate(label_words=("secretions", "great")).label_word_ids(minilm)
  with pytest.raises(ValueError, match="must be one known token"):
    PromptTemplate(label_words=("\u2603", "great")).label_word_ids(minilm)


@pytest.mark.parametrize(
  "template, words, message",
  [
    ("It was [MASK] .", ("a", "b"), "{text} exactly once"),
    ("{text} {text} [MASK]", ("a", "b"), "{text} exactly once"),
    ("{text} [MASK] {mask}", ("a", "b"), "mask"),
    ("{text} It was .", ("a", "b"), "mask"),
    ("{text} [MASK]", ("a",), "two or more"),
  ],
)
def test_template_validation(template, words, message):
  with pytest.raises(ValueError, match=message.replace("{", r"\{").replace("}", r"\}")):
    PromptTemplate(template, words)


def test_mask_token_inside_the_text_is_an_error(minilm, tmp_path):
  path = tmp_path / "d.tsv"
  path.write_text("sentence\tlabel\nfine\t1\nguess the [MASK] word\t0\n")
  with pytest.raises(DataError, match=r"d.tsv\[1\]: the mask token \[MASK\] occurs 2 times"):
    encode(TextFileSource(path), minilm, max_length=32, template=PromptTemplate())


def test_max_length_too_small_for_the_template(dev, minilm):
  with pytest.raises(ValueError, match="leaves no room for text"):
    encode(dev, minilm, max_length=6, template=PromptTemplate())


def test_padding_uses_the_tokenizers_pad_id(dev, minilm):
  assert pad_id(minilm) == PAD
  # Make the pad id distinguishable from zero-initialized memory.
  minilm.enable_padding(pad_id=7, pad_token="[unused6]")
  encoded = encode(dev, minilm, max_length=64)
  batch = encoded.batch(np.arange(0, len(dev), 3))
  lengths = encoded.lengths[np.arange(0, len(dev), 3)]
  assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "label"}
  assert all(a.dtype == np.int32 for a in batch.values())
  assert (batch["attention_mask"].sum(1) == lengths).all()
  assert (batch["attention_mask"] == (np.arange(64) < lengths[:, None])).all()
  assert (batch["input_ids"][batch["attention_mask"] == 0] == 7).all()
  assert (batch["input_ids"][batch["attention_mask"] == 1] != 7).all()
  assert (batch["token_type_ids"] == 0).all()
  # The caller's tokenizer keeps its own settings.
  assert minilm.padding["pad_id"] == 7 and minilm.truncation["max_length"] == 128


def test_a_tokenizer_without_pad_token_is_refused(dev):
  tokenizer = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
  tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
  with pytest.raises(ValueError, match="no padding token"):
    encode(dev, tokenizer, max_length=32)


def test_batch_rows_equal_the_examples(dev, minilm):
  encoded = encode(dev, minilm, max_length=128)
  indices = [5, -1, 5, 0]
  batch = encoded.batch(indices)
  for row, i in enumerate(indices):
    ids = encoded.token_ids(i)
    assert (batch["input_ids"][row, : len(ids)] == ids).all()
    assert batch["label"][row] == dev[i].label
  with pytest.raises(IndexError):
    encoded.batch([len(dev)])


def test_bucket_is_the_smallest_that_fits(dev, minilm):
  encoded = encode(dev, minilm, max_length=128)
  assert encoded.buckets == (32, 64, 128)
  by_length = np.argsort(encoded.lengths)
  shortest, longest = by_length[0], by_length[-1]
  assert encoded.lengths[longest] > 32
  assert encoded.batch([shortest])["input_ids"].shape == (1, 32)
  assert encoded.batch([shortest, longest])["input_ids"].shape == (2, 64)
  assert encoded.batch([shortest], length=40)["input_ids"].shape == (1, 40)
  with pytest.raises(ValueError, match="longest example"):
    encoded.batch([longest], length=32)
  histogram = encoded.bucket_histogram()
  assert sum(histogram.values()) == len(dev)
  assert histogram[32] == int((encoded.lengths <= 32).sum())
  assert histogram[64] == int(((encoded.lengths > 32) & (encoded.lengths <= 64)).sum())

  custom = encode(dev, minilm, max_length=50, buckets=(48, 16, 100))
  assert custom.buckets == (16, 48, 50)
  for index in range(0, len(dev), 7):
    length = custom.batch([index])["input_ids"].shape[1]
    assert length == min(b for b in custom.buckets if b >= custom.lengths[index])


@pytest.mark.parametrize(
  "buckets, max_length, expected",
  [
    (None, 128, (32, 64, 128)),
    (None, 100, (32, 64, 100)),
    (None, 16, (16,)),
    ((8, 8, 64, 200), 64, (8, 64)),
  ],
)
def test_resolve_buckets(buckets, max_length, expected):
  assert resolve_buckets(buckets, max_length) == expected


def test_unlabeled_data_with_user_ids(minilm, tmp_path):
  path = tmp_path / "d.jsonl"
  path.write_text('{"text": "good", "user": "a"}\n{"text": "bad", "user": "b"}\n')
  encoded = encode(
    TextFileSource(path, text_field="text", label_field=None, user_field="user"),
    minilm,
    max_length=8,
  )
  assert isinstance(encoded, EncodedDataset)
  assert encoded.labels is None and "label" not in encoded.batch([0, 1])
  assert encoded.user_ids.tolist() == ["a", "b"]
