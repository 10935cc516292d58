"""Random access to a prepared TensorFlow Datasets split, without TensorFlow.

``tfds.data_source`` reads the ``array_record`` (or ``parquet``) files of a prepared dataset
with pure-Python readers; TensorFlow is never imported. The dataset must already be prepared
in ``data_dir`` with ``file_format="array_record"``: this source never downloads or prepares.

Preparing needs no TensorFlow either, with one catch in tfds 4.9.10: for a builder class defined
inside a package, ``download_and_prepare`` imports the ``importlib_resources`` backport (which
tfds declares only for Python < 3.9). Install that package, or give the builder class
``code_path = None`` if it has no download checksums file.

A run names a split as ``tfds:NAME[/CONFIG][:VERSION]:SPLIT`` (:class:`TfdsSpec`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import operator
import re
from typing import Any, ClassVar

from dpjax.data.base import DataError, Example, LabelRangeError

_FINGERPRINT_VERSION = 1
_HASH_CHUNK = 1 << 20

_PREFIX = "tfds:"
# As tfds.core.naming reads builder names (without namespaces and builder kwargs).
_NAME = re.compile(r"[a-zA-Z]\w*(/[\w+\-.]+)?")
_VERSION = re.compile(r"(\d+|\*)(\.(\d+|\*)){2}")


class NotPreparedError(DataError):
  """The dataset is not prepared in the data directory (nor registered under its name)."""


@dataclasses.dataclass(frozen=True)
class TfdsSpec:
  """A parsed ``tfds:NAME[/CONFIG][:VERSION]:SPLIT``.

  Attributes:
    name: ``NAME[/CONFIG][:VERSION]``, as ``tfds.builder`` (and :class:`TfdsSource`) take it.
    split: the split, slices included (``train``, ``train[:10%]``, ``train+test``).
  """

  #: The form, for messages.
  FORM: ClassVar[str] = "tfds:NAME[/CONFIG][:VERSION]:SPLIT"

  name: str
  split: str

  @staticmethod
  def matches(spec: str) -> bool:
    """Whether ``spec`` is meant as a TFDS split (starts with ``tfds:``), well formed or not."""
    return isinstance(spec, str) and spec.startswith(_PREFIX)

  @classmethod
  def parse(cls, spec: str) -> TfdsSpec:
    """Splits ``tfds:NAME[/CONFIG][:VERSION]:SPLIT`` at its colons outside ``[...]``.

    The split is what follows the last such colon, so slices keep theirs
    (``tfds:my_data/cfg:1.0.0:train[:50%]`` is ``my_data/cfg:1.0.0`` and ``train[:50%]``).

    Raises:
      ValueError: ``spec`` is not of that form; the message says which part is wrong.
    """
    if not cls.matches(spec):
      raise ValueError(f"it does not start with {_PREFIX!r}")
    parts = _split_outside_brackets(spec[len(_PREFIX) :])
    if len(parts) < 2 or not parts[-1]:
      raise ValueError("it has no :SPLIT")
    if len(parts) > 3:
      raise ValueError("it has more than three ':'-separated parts outside [...]")
    name, *version, split = parts
    if not _NAME.fullmatch(name):
      raise ValueError(
        f"NAME {name!r} must start with a letter and hold letters, digits and _ (CONFIG also . - +)"
      )
    if version and not _VERSION.fullmatch(version[0]):
      raise ValueError(f"VERSION {version[0]!r} must be X.Y.Z (digits or *)")
    if split.strip() != split:
      raise ValueError(f"SPLIT {split!r} has surrounding spaces")
    return cls(":".join([name, *version]), split)

  def __str__(self) -> str:
    return f"{_PREFIX}{self.name}:{self.split}"


def _split_outside_brackets(text: str) -> list[str]:
  """``text`` cut at each ``:`` that is not inside ``[...]``.

  Raises:
    ValueError: the brackets do not balance.
  """
  parts, depth, start = [], 0, 0
  for i, char in enumerate(text):
    if char == "[":
      depth += 1
    elif char == "]":
      depth -= 1
      if depth < 0:
        break
    elif char == ":" and depth == 0:
      parts.append(text[start:i])
      start = i + 1
  if depth != 0:
    raise ValueError("its [ ] do not balance")
  return [*parts, text[start:]]


def _first_line(exc: Exception) -> str:
  lines = str(exc).strip().splitlines()
  return lines[0].strip() if lines else type(exc).__name__


def _file_sha256(path: Any) -> str:
  from etils import epath  # pylint: disable=g-import-not-at-top

  digest = hashlib.sha256()
  with epath.Path(path).open("rb") as f:
    while chunk := f.read(_HASH_CHUNK):
      digest.update(chunk)
  return digest.hexdigest()


class TfdsSource:
  """Examples from one split of a prepared TFDS dataset, read through ``tfds.data_source``.

  Records are dicts of features; text features (bytes) are decoded as UTF-8. Records are
  checked when read: ``source[i]`` raises ``DataError`` for empty text or prompt, a negative or
  non-integer label, or an empty user id, and ``LabelRangeError`` for a label
  ``>= num_labels``.
  """

  def __init__(
    self,
    name: str,
    split: str,
    data_dir: str | None = None,
    text_key: str = "sentence",
    label_key: str | None = "label",
    user_key: str | None = None,
    *,
    prompt_key: str | None = None,
    num_labels: int | None = None,
  ):
    """Opens the split.

    Args:
      name: the dataset name, optionally with config and version (``"my_data/config:1.0.0"``);
        it need not be registered if it is prepared in ``data_dir``.
      split: a TFDS split, slices included (``"train"``, ``"train[:10%]"``).
      data_dir: where the dataset was prepared; TFDS's default directory when None.
      text_key: the text feature.
      label_key: the integer label feature; None for unlabeled data.
      user_key: a user id feature, or None.
      prompt_key: a causal-LM prompt feature (the text ``text_key`` continues), or None.
      num_labels: if given, labels must lie in ``[0, num_labels)`` (checked as records are
        read).

    Raises:
      NotPreparedError: the dataset is not found or not prepared in ``data_dir``.
      DataError: it was prepared in a format without random access, has no such split, or
        lacks one of the keys.
    """
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    self.dataset, self.split, self.data_dir = name, split, data_dir
    self.text_key, self.label_key, self.user_key = text_key, label_key, user_key
    self.prompt_key, self.num_labels = prompt_key, num_labels
    where = data_dir if data_dir is not None else "the default TFDS data_dir"
    try:
      builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
      raise NotPreparedError(
        f"tfds dataset {name!r}: not registered and not prepared in {where}"
      ) from None
    except (AssertionError, ValueError) as exc:  # a registered builder without that version/config
      raise DataError(f"tfds dataset {name!r}: {_first_line(exc)}") from None
    if not builder.is_prepared():
      raise NotPreparedError(
        f"tfds dataset {name!r} is not prepared in {builder.data_dir}; prepare it "
        "first with download_and_prepare() and file_format='array_record'"
      )
    self._builder = builder
    try:
      self._source = builder.as_data_source(split=split)
    except NotImplementedError:
      raise DataError(
        f"tfds dataset {name!r} in {builder.data_dir} was prepared as "
        f"{builder.info.file_format.value}, which has no random access; prepare it "
        "with file_format='array_record'"
      ) from None
    except ValueError as exc:
      raise DataError(f"tfds dataset {name!r}: {_first_line(exc)}") from None
    features = builder.info.features
    self.features: tuple[str, ...] = tuple(features.keys()) if hasattr(features, "keys") else ()
    for key in (text_key, label_key, user_key, prompt_key):
      if key is not None and key not in self.features:
        raise DataError(
          f"tfds dataset {name!r} has no feature {key!r} (features: {', '.join(self.features)})"
        )
    self._fingerprint: str | None = None

  @property
  def name(self) -> str:
    return f"{self.dataset}/{self.split}"

  @property
  def fingerprint(self) -> str:
    """sha256 over the dataset's full name, the split, the keys, ``num_labels`` and its files'
    contents (not their directory: a moved dataset keeps its fingerprint).

    Computed on first use (it reads the split's files once) and remembered.
    """
    if self._fingerprint is None:
      files = [
        {
          "file": str(instruction.filename).rsplit("/", 1)[-1],
          "skip": instruction.skip,
          "take": instruction.take,
          "sha256": _file_sha256(instruction.filename),
        }
        for instruction in self._builder.info.splits[self.split].file_instructions
      ]
      spec = {
        "version": _FINGERPRINT_VERSION,
        "dataset": self._builder.info.full_name,
        "split": str(self.split),
        "keys": [self.text_key, self.label_key, self.user_key, self.prompt_key],
        "num_labels": self.num_labels,
        "files": files,
      }
      self._fingerprint = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
    return self._fingerprint

  def __len__(self) -> int:
    return len(self._source)

  def _fail(self, index: int, reason: str) -> DataError:
    return DataError(f"{self.name}[{index}]: {reason}")

  def _string(self, index: int, value: Any, key: str) -> str:
    if isinstance(value, bytes):
      try:
        value = value.decode("utf-8")
      except UnicodeDecodeError:
        raise self._fail(index, f"feature {key!r} is not valid UTF-8") from None
    if not isinstance(value, str):
      raise self._fail(index, f"feature {key!r} is not text (found {type(value).__name__})")
    if not value.strip():
      raise self._fail(index, f"feature {key!r} is empty")
    return value

  def __getitem__(self, index: int) -> Example:
    i = operator.index(index)
    if not -len(self) <= i < len(self):
      raise IndexError(f"index {i} out of range for {len(self)} examples")
    i %= len(self)
    record = self._source[i]
    text = self._string(i, record[self.text_key], self.text_key)
    label = None
    if self.label_key is not None:
      value = record[self.label_key]
      try:
        label = operator.index(value)
      except TypeError:
        raise self._fail(i, f"label {value!r} is not an integer") from None
      if label < 0:
        raise self._fail(
          i, f"label {label} is negative (for an unlabeled split pass label_key=None)"
        )
      if self.num_labels is not None and label >= self.num_labels:
        raise LabelRangeError(f"{self.name}[{i}]: label {label} is outside [0, {self.num_labels})")
    user = None
    if self.user_key is not None:
      value = record[self.user_key]
      if isinstance(value, (bytes, str)):
        user = self._string(i, value, self.user_key)
      else:
        try:
          user = str(operator.index(value))
        except TypeError:
          raise self._fail(i, f"user id {value!r} is neither text nor an integer") from None
    prompt = None
    if self.prompt_key is not None:
      prompt = self._string(i, record[self.prompt_key], self.prompt_key)
    return Example(text, label, user, prompt)

  def __repr__(self) -> str:
    return f"TfdsSource({self.dataset!r}, split={self.split!r}, examples={len(self)})"
