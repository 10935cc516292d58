"""TfdsSource on a real dataset prepared in array_record format, with no TensorFlow involved."""

from __future__ import annotations

import importlib.abc
import sys

import pytest
import tensorflow_datasets as tfds

from dpjax.data import DataError, Example, Source, TfdsSource, encode

TRAIN = [
  ("a warm , funny film", 1, "ann"),
  ("flat and lifeless", 0, "bob"),
  ("the best hour of the year", 1, "ann"),
  ("it drags", 0, "cy"),
]
TEST = [("not bad at all", 1, "dee")]


class DpjaxTinyReviews(tfds.core.GeneratorBasedBuilder):
  """Five hand-written reviews in two splits."""

  VERSION = tfds.core.Version("1.0.0")
  # tfds 4.9.10 finds the source file of a builder defined in a package through the
  # `importlib_resources` backport, which it requires only on Python < 3.9, to look for a
  # download checksums file next to it. This builder downloads nothing, so it has no such file.
  code_path = None

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      features=tfds.features.FeaturesDict(
        {
          "sentence": tfds.features.Text(),
          "label": tfds.features.ClassLabel(names=["negative", "positive"]),
          "user": tfds.features.Text(),
        }
      ),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(TRAIN), "test": self._generate_examples(TEST)}

  def _generate_examples(self, rows):
    for i, (sentence, label, user) in enumerate(rows):
      yield i, {"sentence": sentence, "label": label, "user": user}


class _ImportWatcher(importlib.abc.MetaPathFinder):
  """Records every attempt to import tensorflow (and lets the import go on as usual)."""

  def __init__(self):
    self.attempts = []

  def find_spec(self, name, path=None, target=None):
    del path, target
    if name == "tensorflow" or name.startswith("tensorflow."):
      self.attempts.append(name)
    return None


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("tfds")
  DpjaxTinyReviews(data_dir=str(directory), file_format="array_record").download_and_prepare()
  return str(directory)


def _all(source):
  return [source[i] for i in range(len(source))]


def test_reads_the_prepared_split_without_tensorflow(data_dir):
  watcher = _ImportWatcher()
  sys.meta_path.insert(0, watcher)
  try:
    source = TfdsSource("dpjax_tiny_reviews", "train", data_dir=data_dir, user_key="user")
    examples = _all(source)
    _ = source.fingerprint
  finally:
    sys.meta_path.remove(watcher)
  assert watcher.attempts == []
  assert "tensorflow" not in sys.modules
  assert isinstance(source, Source)
  assert source.name == "dpjax_tiny_reviews/train"
  assert len(source) == len(TRAIN)
  assert all(isinstance(e.text, str) and isinstance(e.label, int) for e in examples)
  assert sorted(examples, key=lambda e: e.text) == sorted(
    (Example(*row) for row in TRAIN), key=lambda e: e.text
  )


def test_split_slices_and_unlabeled_reading(data_dir):
  test = TfdsSource("dpjax_tiny_reviews", "test", data_dir=data_dir, label_key=None)
  assert _all(test) == [Example("not bad at all")]
  head = TfdsSource("dpjax_tiny_reviews", "train[:2]", data_dir=data_dir)
  full = TfdsSource("dpjax_tiny_reviews", "train", data_dir=data_dir)
  assert len(head) == 2
  assert _all(head) == _all(full)[:2]
  assert head[-1] == head[1]
  with pytest.raises(IndexError):
    head[2]


def test_fingerprint_is_stable_and_distinguishes_splits(data_dir):
  def fingerprint(split):
    return TfdsSource("dpjax_tiny_reviews", split, data_dir=data_dir).fingerprint

  assert len(fingerprint("train")) == 64
  assert fingerprint("train") == fingerprint("train")
  assert len({fingerprint("train"), fingerprint("test"), fingerprint("train[:2]")}) == 3


def test_not_prepared_is_a_clear_error_and_prepares_nothing(tmp_path):
  with pytest.raises(DataError, match="'dpjax_tiny_reviews' is not prepared in"):
    TfdsSource("dpjax_tiny_reviews", "train", data_dir=str(tmp_path))
  assert not list(tmp_path.rglob("*.array_record*"))
  assert not list(tmp_path.rglob("dataset_info.json"))


def test_unknown_dataset_split_and_key(data_dir, tmp_path):
  with pytest.raises(DataError, match="not registered and not prepared"):
    TfdsSource("dpjax_no_such_dataset", "train", data_dir=str(tmp_path))
  with pytest.raises(DataError, match="validation"):
    TfdsSource("dpjax_tiny_reviews", "validation", data_dir=data_dir)
  with pytest.raises(DataError, match="no feature 'text'"):
    TfdsSource("dpjax_tiny_reviews", "train", data_dir=data_dir, text_key="text")


def test_encodes_like_any_source(data_dir, minilm):
  source = TfdsSource("dpjax_tiny_reviews", "train", data_dir=data_dir)
  encoded = encode(source, minilm, max_length=16)
  batch = encoded.batch(range(len(source)))
  assert batch["label"].tolist() == [source[i].label for i in range(len(source))]
  for i in range(len(source)):
    ids = encoded.token_ids(i).tolist()
    assert minilm.decode(ids) == source[i].text.replace(" ,", ",")
