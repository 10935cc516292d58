"""The token-id cache: hits give identical arrays, any change of input misses, writes are atomic."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from dpjax.data import PromptTemplate, TextFileSource, cache, encode, sst2, tokenization


@pytest.fixture
def count_tokenize(monkeypatch):
  """Counts the calls that actually tokenize (cache misses)."""
  calls = []
  real = tokenization.tokenize

  def counted(*args, **kwargs):
    calls.append(args[0].name)
    return real(*args, **kwargs)

  monkeypatch.setattr(tokenization, "tokenize", counted)
  return calls


@pytest.fixture
def data_file(tmp_path):
  path = tmp_path / "data" / "dev.tsv"
  path.parent.mkdir()
  shutil.copy(sst2("dev").path, path)
  return path


def _same(a, b):
  for name in ("ids", "offsets", "labels", "user_ids", "mask_positions"):
    x, y = getattr(a.arrays, name), getattr(b.arrays, name)
    assert (x is None) == (y is None), name
    if x is not None:
      assert x.dtype == y.dtype and np.array_equal(x, y), name
  indices = np.arange(len(a))
  batch_a, batch_b = a.batch(indices), b.batch(indices)
  assert batch_a.keys() == batch_b.keys()
  for key in batch_a:
    assert np.array_equal(batch_a[key], batch_b[key]), key


def test_hit_gives_identical_arrays(data_file, minilm, tmp_path, count_tokenize):
  template = PromptTemplate()
  first = encode(TextFileSource(data_file), minilm, 32, template=template, cache_dir=tmp_path / "c")
  files = list((tmp_path / "c").iterdir())
  assert len(files) == 1 and files[0].suffix == ".npz"
  second = encode(
    TextFileSource(data_file), minilm, 32, template=template, cache_dir=tmp_path / "c"
  )
  assert len(count_tokenize) == 1
  _same(first, second)
  _same(first, encode(TextFileSource(data_file), minilm, 32, template=template))


def test_user_ids_survive_the_cache(tmp_path, minilm, count_tokenize):
  path = tmp_path / "d.jsonl"
  path.write_text(
    '{"sentence": "good", "label": 1, "user": "a"}\n{"sentence": "bad", "label": 0, "user": "bb"}\n'
  )
  first = encode(TextFileSource(path, user_field="user"), minilm, 8, cache_dir=tmp_path / "c")
  second = encode(TextFileSource(path, user_field="user"), minilm, 8, cache_dir=tmp_path / "c")
  assert len(count_tokenize) == 1
  assert second.user_ids.tolist() == ["a", "bb"]
  _same(first, second)


def test_changed_inputs_miss(data_file, minilm, tmp_path, count_tokenize):
  cache_dir = tmp_path / "c"
  encode(TextFileSource(data_file), minilm, 32, cache_dir=cache_dir)
  encode(TextFileSource(data_file), minilm, 48, cache_dir=cache_dir)
  encode(TextFileSource(data_file), minilm, 32, template=PromptTemplate(), cache_dir=cache_dir)
  encode(
    TextFileSource(data_file),
    minilm,
    32,
    cache_dir=cache_dir,
    template=PromptTemplate(label_words=("bad", "good")),
  )
  uncased = minilm.to_str().replace('"lowercase":true', '"lowercase":false')
  assert uncased != minilm.to_str()
  encode(TextFileSource(data_file), type(minilm).from_str(uncased), 32, cache_dir=cache_dir)
  assert len(count_tokenize) == 5
  assert len(list(cache_dir.iterdir())) == 5

  # One changed row: a miss, and the new arrays reflect the change.
  before = encode(TextFileSource(data_file), minilm, 32, cache_dir=cache_dir)
  assert len(count_tokenize) == 5
  data_file.write_bytes(
    data_file.read_bytes().replace(b"one long string of cliches", b"one short string of cliches", 1)
  )
  after = encode(TextFileSource(data_file), minilm, 32, cache_dir=cache_dir)
  assert len(count_tokenize) == 6
  assert minilm.decode(after.token_ids(0).tolist()) == "one short string of cliches."
  assert np.array_equal(before.token_ids(1), after.token_ids(1))


def test_padding_settings_and_buckets_do_not_change_the_key(
  data_file, minilm, tmp_path, count_tokenize
):
  encode(TextFileSource(data_file), minilm, 32, cache_dir=tmp_path)
  minilm.no_padding()
  encode(TextFileSource(data_file), minilm, 32, buckets=(8, 16), cache_dir=tmp_path)
  assert len(count_tokenize) == 1


def test_a_crash_while_writing_leaves_no_cache_file(data_file, minilm, tmp_path, monkeypatch):
  cache_dir = tmp_path / "c"
  visible_while_writing = []

  def crash(file, **arrays):
    file.write(b"PK\x03\x04 half of an archive")
    file.flush()
    # A process killed here must not leave a readable half-written file under the final name.
    visible_while_writing.extend(cache_dir.glob("*.npz"))
    raise KeyboardInterrupt

  with monkeypatch.context() as patch:
    patch.setattr(cache.np, "savez", crash)
    with pytest.raises(KeyboardInterrupt):
      encode(TextFileSource(data_file), minilm, 32, cache_dir=cache_dir)
  assert visible_while_writing == []
  assert list(cache_dir.iterdir()) == []
  encoded = encode(TextFileSource(data_file), minilm, 32, cache_dir=cache_dir)
  assert len(list(cache_dir.iterdir())) == 1
  _same(encoded, encode(TextFileSource(data_file), minilm, 32))


def test_a_damaged_cache_file_is_rebuilt(data_file, minilm, tmp_path, count_tokenize):
  first = encode(TextFileSource(data_file), minilm, 32, cache_dir=tmp_path)
  (path,) = tmp_path.glob("*.npz")
  path.write_bytes(path.read_bytes()[:100])
  second = encode(TextFileSource(data_file), minilm, 32, cache_dir=tmp_path)
  assert len(count_tokenize) == 2
  _same(first, second)
  third = encode(TextFileSource(data_file), minilm, 32, cache_dir=tmp_path)
  assert len(count_tokenize) == 2
  _same(first, third)
