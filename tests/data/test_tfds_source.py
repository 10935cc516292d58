"""TfdsSource on a real dataset prepared in array_record format, with no TensorFlow involved,
and the ``tfds:NAME[/CONFIG][:VERSION]:SPLIT`` specs a run names one by."""

from __future__ import annotations

import importlib.abc
import sys

import pytest
import tensorflow_datasets as tfds

from dpjax.data import DataError, Example, LabelRangeError, Source, TfdsSource, TfdsSpec, encode
from dpjax.train import config as config_lib
from dpjax.train import splits
from dpjax.train.config import ConfigError

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


def test_labels_outside_num_labels_and_prompts(data_dir):
  labels = [e.label for e in _all(TfdsSource("dpjax_tiny_reviews", "train", data_dir=data_dir))]
  source = TfdsSource("dpjax_tiny_reviews", "train", data_dir=data_dir, num_labels=1)
  assert source[labels.index(0)].label == 0
  one = labels.index(1)
  with pytest.raises(LabelRangeError, match=rf"dpjax_tiny_reviews/train\[{one}\]: label 1 is out"):
    source[one]
  prompted = TfdsSource("dpjax_tiny_reviews", "train", data_dir=data_dir, prompt_key="user")
  rows = {(text, label): user for text, label, user in TRAIN}
  assert all(e.prompt == rows[e.text, e.label] for e in _all(prompted))
  plain = TfdsSource("dpjax_tiny_reviews", "train", data_dir=data_dir)
  assert len({plain.fingerprint, source.fingerprint, prompted.fingerprint}) == 3


# ---- tfds:NAME[/CONFIG][:VERSION]:SPLIT in data.train / data.eval ----

FORMS = "tfds:NAME[/CONFIG][:VERSION]:SPLIT, sst2:train, sst2:validation or a .tsv/.csv/.jsonl path"


@pytest.mark.parametrize(
  "spec, name, split",
  [
    ("tfds:my_data:train", "my_data", "train"),
    ("tfds:my_data/cfg:1.0.0:train[:50%]", "my_data/cfg:1.0.0", "train[:50%]"),
    ("tfds:my_data:1.*.*:train[10:]+test", "my_data:1.*.*", "train[10:]+test"),
  ],
)
def test_spec_splits_at_the_last_colon_outside_brackets(spec, name, split):
  parsed = TfdsSpec.parse(spec)
  assert (parsed.name, parsed.split) == (name, split)
  assert str(parsed) == spec


@pytest.mark.parametrize(
  "spec, reason",
  [
    ("tfds:my_data", "it has no :SPLIT"),
    ("tfds:my_data:", "it has no :SPLIT"),
    ("tfds:my-data:train", "NAME 'my-data' must start with a letter"),
    ("tfds:my_data:1.0:train", "VERSION '1.0' must be X.Y.Z"),
    ("tfds:my_data:1.0.0:train:x", "more than three"),
    ("tfds:my_data:train[:5", "do not balance"),
  ],
)
def test_malformed_specs_are_refused_naming_the_key_and_the_forms(spec, reason):
  c = config_lib.default_config()
  c.data.eval = spec
  with pytest.raises(ConfigError) as err:
    config_lib.validate(c)
  message = str(err.value)
  assert message.startswith(f"config.data.eval must be {FORMS} (got {spec!r}: ")
  assert reason in message and "\n" not in message


def test_config_accepts_tfds_specs_as_custom_data():
  c = config_lib.default_config()
  c.data.train = "tfds:my_data/cfg:1.0.0:train[:50%]"
  c.data.eval = "tfds:my_data:test"
  c.data.tfds_dir = "datasets"
  c.data.num_labels = 3
  config_lib.validate(c)
  c.dp.unit, c.dp.max_examples_per_user, c.data.user_field = "user", 2, "user"
  config_lib.validate(c)  # user ids may come from a feature
  c.data.eval = "sst2:validation"  # binary SST-2 cannot score a 3-class task
  with pytest.raises(ConfigError, match="set --config.data.eval to a held-out file or tfds:"):
    config_lib.validate(c)


def _config(data_dir, **data):
  c = config_lib.default_config()
  c.data.tfds_dir = data_dir
  for key, value in data.items():
    c.data[key] = value
  return c


def test_source_for_reads_tfds_splits_with_the_runs_field_keys(data_dir):
  c = _config(data_dir)
  train = splits.source_for("tfds:dpjax_tiny_reviews:train", c, key="config.data.train")
  head = splits.source_for("tfds:dpjax_tiny_reviews:1.0.0:train[:50%]", c)
  assert sorted(_all(train), key=lambda e: e.text) == sorted(
    (Example(text, label) for text, label, _ in TRAIN), key=lambda e: e.text
  )
  assert _all(head) == _all(train)[:2]
  assert len(train.fingerprint) == 64 and train.fingerprint != head.fingerprint
  users = splits.source_for("tfds:dpjax_tiny_reviews:train", c, "user")
  assert sorted(e.user_id for e in _all(users)) == sorted(user for _, _, user in TRAIN)
  # predict/evaluate read data without the label feature as unlabeled (optional_labels)
  c.data.label_field = "stars"
  unlabeled = splits.source_for("tfds:dpjax_tiny_reviews:test", c, optional_labels=True)
  assert _all(unlabeled) == [Example("not bad at all")]


@pytest.mark.parametrize(
  "spec, data, message",
  [
    ("tfds:dpjax_tiny_reviews", {}, f"config.data.eval must be {FORMS} (got "),
    (
      "tfds:dpjax_tiny_reviews:validation",
      {},
      "config.data.eval='tfds:dpjax_tiny_reviews:validation': tfds dataset "
      "'dpjax_tiny_reviews': Unknown split 'validation'",
    ),
    ("tfds:dpjax_tiny_reviews:test", {"text_field": "text"}, "has no feature 'text'"),
    ("tfds:dpjax_tiny_reviews:2.0.0:test", {}, "cannot be loaded at version 2.0.0"),
    (
      "tfds:dpjax_tiny_reviews:test",
      {"tfds_dir": "<empty>"},
      "is not prepared in <empty>/dpjax_tiny_reviews/1.0.0; prepare it first with "
      "download_and_prepare() and file_format='array_record' (config.data.tfds_dir names",
    ),
    ("tfds:dpjax_no_such:test", {"tfds_dir": "<empty>"}, "not registered and not prepared"),
  ],
)
def test_source_for_refuses_bad_tfds_data_in_one_line_naming_the_key(
  data_dir, tmp_path, spec, data, message
):
  data = {k: str(tmp_path) if v == "<empty>" else v for k, v in data.items()}
  with pytest.raises(ConfigError) as err:
    splits.source_for(spec, _config(data_dir, **data), key="config.data.eval")
  assert message.replace("<empty>", str(tmp_path)) in str(err.value)
  assert "\n" not in str(err.value)


def test_the_run_encodes_and_digests_tfds_rows_through_the_token_cache(data_dir, minilm, tmp_path):
  c = _config(data_dir, train="tfds:dpjax_tiny_reviews:train")
  train, canaries = splits.training_split(c, minilm, tmp_path)
  assert (len(train), canaries) == (len(TRAIN), 0)
  cached, _ = splits.training_split(c, minilm, tmp_path)  # the cache is keyed by the fingerprint
  assert splits.data_digest(cached) == splits.data_digest(train)
  c.data.train = "tfds:dpjax_tiny_reviews:train[:50%]"
  half, _ = splits.training_split(c, minilm, tmp_path)
  assert len(half) == 2 and splits.data_digest(half) != splits.data_digest(train)
  assert len(list(tmp_path.glob("*.npz"))) == 2
  c.data.num_labels = 1  # labels are read as the rows are encoded
  with pytest.raises(ConfigError, match=r"config.data.eval='tfds:dpjax_tiny_reviews:train' has a "):
    splits.load_split("tfds:dpjax_tiny_reviews:train", minilm, c, None, key="config.data.eval")
