"""Random-access example sources: text files (TSV, CSV, JSON lines), vendored SST-2, TFDS.

Every source has ``len(source)``, ``source[i] -> Example``, ``source.name`` and
``source.fingerprint`` (see ``dpjax.data.base.Source``).
"""

from __future__ import annotations

import hashlib
import json
import operator
import os
import re
from pathlib import Path
from typing import Any

from absl import logging

import dpjax
from dpjax.data import text_files
from dpjax.data.base import DataError, Example, LabelRangeError, Source
from dpjax.data.tfds_source import TfdsSource

__all__ = [
  "DataError",
  "Example",
  "ExampleList",
  "Source",
  "TextFileSource",
  "TfdsSource",
  "has_field",
  "sst2",
  "sst2_dir",
]

_FINGERPRINT_VERSION = 1
_MAX_SKIPPED_EXAMPLES = 10
_INTEGER = re.compile(r"[+-]?[0-9]+")
_SUFFIX_FORMATS = {".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl"}
_SST2_FILES = {"train": "train.tsv", "validation": "dev.tsv", "dev": "dev.tsv"}


class _BadValue(Exception):
  """A row whose fields parsed but whose values are not acceptable."""


class _LabelOutOfRange(_BadValue):
  """A row whose label is an integer >= num_labels."""


def _short(value: Any) -> str:
  text = repr(value)
  return text if len(text) <= 40 else text[:37] + "..."


def _parse_label(value: Any, num_labels: int | None) -> int:
  if isinstance(value, int) and not isinstance(value, bool):
    label = value
  elif isinstance(value, str) and _INTEGER.fullmatch(value.strip()):
    label = int(value)
  else:
    raise _BadValue(f"label {_short(value)} is not an integer")
  if label < 0:
    raise _BadValue(f"label {label} is negative")
  if num_labels is not None and label >= num_labels:
    raise _LabelOutOfRange(f"label {label} is outside [0, {num_labels})")
  return label


def _parse_text(value: Any, what: str) -> str:
  if not isinstance(value, str):
    raise _BadValue(f"{what} must be a string, found {_short(value)}")
  if not value.strip():
    raise _BadValue(f"empty text in {what}")
  return value


def _parse_user(value: Any, what: str) -> str:
  if isinstance(value, int) and not isinstance(value, bool):
    return str(value)
  if not isinstance(value, str):
    raise _BadValue(f"user id in {what} must be a string or an integer, found {_short(value)}")
  if not value.strip():
    raise _BadValue(f"empty user id in {what}")
  return value


class TextFileSource:
  """Examples from a small TSV, CSV or JSON-lines file, parsed eagerly into memory.

  TSV and CSV files start with a header row naming the columns; TSV has no quoting (a field
  cannot hold a tab or a newline), CSV follows Python's ``csv`` module (quoted fields may hold
  commas and newlines). JSON-lines files hold one object per line.

  A row is bad if it is not valid UTF-8, has the wrong number of columns, is not a JSON object,
  lacks a field, has empty or whitespace-only text or user id, or has a label that is not an
  integer, is negative, or is ``>= num_labels``. By default the first bad row raises a
  ``DataError`` reading ``"<path>:<line>: <reason>"``. With ``skip_bad_rows=True`` bad rows are
  dropped, counted in ``skipped_rows``, the first few kept in ``skipped_examples`` as
  ``(line, reason)``, and a warning is logged. A header that lacks a required column always
  raises, as does a file with no usable rows.
  """

  def __init__(
    self,
    path: str | os.PathLike[str],
    text_field: str = "sentence",
    label_field: str | None = "label",
    user_field: str | None = None,
    format: str | None = None,
    num_labels: int | None = None,  # noqa: A002
    skip_bad_rows: bool = False,
    *,
    name: str | None = None,
    prompt_field: str | None = None,
  ):
    """Reads and checks the whole file.

    Args:
      path: the file.
      text_field: the column or field holding the text.
      label_field: the column or field holding the integer label; None for unlabeled data
        (examples then have ``label=None``).
      user_field: the column or field holding a user id; None if there is none.
      format: ``"tsv"``, ``"csv"`` or ``"jsonl"``; inferred from the file suffix when None.
      num_labels: if given, labels must lie in ``[0, num_labels)``.
      skip_bad_rows: drop bad rows (with a logged warning) instead of raising.
      name: the source's name; the file name by default.
      prompt_field: the column or field holding a causal-LM prompt (the text ``text_field``
        continues); None if there is none.

    Raises:
      DataError: the file is missing, unreadable, or has a bad row (see the class docstring).
    """
    self.path = Path(path)
    self.format = self._resolve_format(format)
    if num_labels is not None and (
      isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1
    ):
      raise ValueError(f"num_labels must be an integer >= 1 or None (got {num_labels!r})")
    self.text_field, self.label_field, self.user_field = text_field, label_field, user_field
    self.prompt_field = prompt_field
    self.num_labels = num_labels
    self.skip_bad_rows = skip_bad_rows
    self._name = name or self.path.name
    self._required = [
      f for f in (text_field, label_field, user_field, prompt_field) if f is not None
    ]

    try:
      data = self.path.read_bytes()
    except FileNotFoundError:
      raise DataError(f"{self.path}: no such file") from None
    except OSError as exc:
      raise DataError(f"{self.path}: cannot read: {exc.strerror or exc}") from None
    self.file_sha256 = hashlib.sha256(data).hexdigest()

    self._texts: list[str] = []
    self._labels: list[int | None] = []
    self._users: list[str | None] = []
    self._prompts: list[str | None] = []
    self._lines: list[int] = []
    self.skipped_rows = 0
    self.skipped_examples: list[tuple[int, str]] = []
    self._read(data)

  def _resolve_format(self, file_format: str | None) -> str:
    if file_format is None:
      inferred = _SUFFIX_FORMATS.get(self.path.suffix.lower())
      if inferred is None:
        raise DataError(
          f"{self.path}: cannot infer the format from the suffix "
          f"{self.path.suffix!r}; pass format='tsv', 'csv' or 'jsonl'"
        )
      return inferred
    if file_format not in text_files.FORMATS:
      raise ValueError(f"format must be one of {text_files.FORMATS} or None (got {file_format!r})")
    return file_format

  def _fail(self, line: int, reason: str, error: type[DataError] = DataError) -> DataError:
    return error(f"{self.path}:{line}: {reason}")

  def _read(self, data: bytes) -> None:
    try:
      columns, rows = text_files.parse_rows(data, self.format)
    except text_files.FileFormatError as exc:
      raise self._fail(exc.line, exc.reason) from None
    if columns is not None:
      missing = [f for f in self._required if f not in columns]
      if missing:
        raise self._fail(1, f"missing column {missing[0]!r} (the header has: {', '.join(columns)})")
    kind = "field" if columns is None else "column"
    for row in rows:
      try:
        if row.error is not None:
          raise _BadValue(row.error)
        self._add(row.fields, kind)
        self._lines.append(row.line)
      except _BadValue as exc:
        if not self.skip_bad_rows:
          kind = LabelRangeError if isinstance(exc, _LabelOutOfRange) else DataError
          raise self._fail(row.line, str(exc), kind) from None
        self.skipped_rows += 1
        if len(self.skipped_examples) < _MAX_SKIPPED_EXAMPLES:
          self.skipped_examples.append((row.line, str(exc)))
    if self.skipped_rows:
      line, reason = self.skipped_examples[0]
      logging.warning(
        "%s: skipped %d bad rows (kept %d); the first, line %d: %s",
        self.path,
        self.skipped_rows,
        len(self._texts),
        line,
        reason,
      )
    if not self._texts:
      raise DataError(
        f"{self.path}: no examples"
        + (f" ({self.skipped_rows} bad rows skipped)" if self.skipped_rows else "")
      )

  def _add(self, fields: dict[str, Any], kind: str) -> None:
    for field in self._required:
      if field not in fields:
        raise _BadValue(f"missing {kind} {field!r}")
    text = _parse_text(fields[self.text_field], f"{kind} {self.text_field!r}")
    label = None
    if self.label_field is not None:
      label = _parse_label(fields[self.label_field], self.num_labels)
    user = None
    if self.user_field is not None:
      user = _parse_user(fields[self.user_field], f"{kind} {self.user_field!r}")
    prompt = None
    if self.prompt_field is not None:
      prompt = _parse_text(fields[self.prompt_field], f"{kind} {self.prompt_field!r}")
    self._texts.append(text)
    self._labels.append(label)
    self._users.append(user)
    self._prompts.append(prompt)

  @property
  def name(self) -> str:
    return self._name

  @property
  def fingerprint(self) -> str:
    """sha256 of the file's bytes together with every option that changes the examples."""
    spec = {
      "version": _FINGERPRINT_VERSION,
      "file_sha256": self.file_sha256,
      "format": self.format,
      "text_field": self.text_field,
      "label_field": self.label_field,
      "user_field": self.user_field,
      "num_labels": self.num_labels,
      "skip_bad_rows": self.skip_bad_rows,
    }
    if self.prompt_field is not None:
      spec["prompt_field"] = self.prompt_field
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()

  def __len__(self) -> int:
    return len(self._texts)

  def __getitem__(self, index: int) -> Example:
    i = operator.index(index)
    if not -len(self) <= i < len(self):
      raise IndexError(f"index {i} out of range for {len(self)} examples")
    return Example(self._texts[i], self._labels[i], self._users[i], self._prompts[i])

  def line_of(self, index: int) -> int:
    """The file line (1-based, as an editor shows it) of example ``index``."""
    return self._lines[operator.index(index)]

  def __repr__(self) -> str:
    return (
      f"TextFileSource({str(self.path)!r}, format={self.format!r}, examples={len(self)}, "
      f"skipped_rows={self.skipped_rows})"
    )


def has_field(path: str | os.PathLike[str], field: str, format: str | None = None) -> bool:  # noqa: A002
  """Whether a TSV/CSV file's header names ``field``, or a JSON-lines file's first object
  has it: for reading a column only where a file has it (e.g. labels of data to predict).

  A file that cannot be parsed answers True, so that reading it reports the problem.
  """
  path = Path(path)
  file_format = format or _SUFFIX_FORMATS.get(path.suffix.lower())
  try:
    columns, rows = text_files.parse_rows(path.read_bytes(), file_format or "")
    if columns is not None:
      return field in columns
    first = next((row for row in rows if row.fields is not None), None)
  except (OSError, ValueError, text_files.FileFormatError):
    return True
  return first is None or field in first.fields


class ExampleList:
  """Examples held in memory, as a :class:`Source` (e.g. texts given to a function)."""

  def __init__(self, examples: list[Example], name: str = "examples"):
    self._examples = list(examples)
    self._name = name

  @property
  def name(self) -> str:
    return self._name

  @property
  def fingerprint(self) -> str:
    digest = hashlib.sha256()
    for e in self._examples:
      digest.update(json.dumps([e.text, e.label, e.user_id, e.prompt]).encode() + b"\n")
    return digest.hexdigest()

  def __len__(self) -> int:
    return len(self._examples)

  def __getitem__(self, index: int) -> Example:
    return self._examples[operator.index(index)]


def sst2_dir() -> Path:
  """The vendored SST-2 directory, ``third_party/sst2`` at the repository root.

  Raises:
    DataError: the directory is missing (e.g. dpjax was installed without the repository).
  """
  path = Path(dpjax.__file__).resolve().parent.parent / "third_party" / "sst2"
  if not path.is_dir():
    raise DataError(
      f"{path}: the vendored SST-2 directory is missing; SST-2 ships with the "
      "dpjax repository (third_party/sst2), use dpjax from a checkout of it"
    )
  return path


def sst2(split: str) -> TextFileSource:
  """The GLUE SST-2 split ``"train"`` (67,349 rows) or ``"validation"``/``"dev"`` (872 rows).

  Binary sentiment, label 0 = negative, 1 = positive; read from ``third_party/sst2``.
  """
  if split not in _SST2_FILES:
    raise ValueError(f"split must be one of {tuple(_SST2_FILES)} (got {split!r})")
  canonical = "train" if split == "train" else "validation"
  return TextFileSource(
    sst2_dir() / _SST2_FILES[split],
    text_field="sentence",
    label_field="label",
    format="tsv",
    num_labels=2,
    name=f"sst2/{canonical}",
  )
