"""Splitting TSV, CSV and JSON-lines bytes into rows, each tagged with its line number.

This module only parses: it turns bytes into ``Row`` records (a mapping of column or field
names to values, or the reason the row could not be parsed). Checking the values (labels,
empty text) is the job of the source that uses it.

Line numbers are 1-based and count every physical line, the header included, as an editor
shows them. A CSV record whose quoted field spans several lines is numbered by its first line.
"""

from __future__ import annotations

import codecs
import csv
import json
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

FORMATS = ("tsv", "csv", "jsonl")


class FileFormatError(Exception):
  """A problem that makes the whole file unreadable (no header, a duplicate column)."""

  def __init__(self, line: int, reason: str):
    super().__init__(reason)
    self.line = line
    self.reason = reason


class Row(NamedTuple):
  """One parsed row: ``fields`` when it parsed, else ``error`` says why not."""

  line: int
  fields: dict[str, Any] | None = None
  error: str | None = None


class _Line(NamedTuple):
  number: int
  text: str
  error: str | None


def _decode_lines(data: bytes) -> list[_Line]:
  """Splits ``data`` at newlines and decodes each line as UTF-8 on its own.

  A line that is not valid UTF-8 is decoded with replacement characters and carries the
  error, so that one bad line spoils only its own row. A UTF-8 byte-order mark is dropped.
  Line texts keep no ``\\n`` but do keep a ``\\r`` of a CRLF line ending.
  """
  if data.startswith(codecs.BOM_UTF8):
    data = data[len(codecs.BOM_UTF8) :]
  raw_lines = data.split(b"\n")
  if raw_lines[-1] == b"":
    raw_lines.pop()  # The newline that ends the last line does not start another.
  lines = []
  for number, raw in enumerate(raw_lines, 1):
    try:
      lines.append(_Line(number, raw.decode("utf-8"), None))
    except UnicodeDecodeError as exc:
      reason = f"invalid UTF-8 (byte 0x{raw[exc.start]:02x} at byte {exc.start + 1} of the line)"
      lines.append(_Line(number, raw.decode("utf-8", errors="replace"), reason))
  return lines


def _strip_cr(text: str) -> str:
  return text[:-1] if text.endswith("\r") else text


def _check_header(columns: Sequence[str]) -> list[str]:
  seen = set()
  for column in columns:
    if column in seen:
      raise FileFormatError(1, f"duplicate column {column!r} in the header")
    seen.add(column)
  return list(columns)


def _tsv_rows(lines: list[_Line]) -> tuple[list[str], Iterator[Row]]:
  if not lines:
    raise FileFormatError(1, "empty file: expected a header row")
  if lines[0].error:
    raise FileFormatError(1, f"header: {lines[0].error}")
  columns = _check_header(_strip_cr(lines[0].text).split("\t"))

  def rows() -> Iterator[Row]:
    for line in lines[1:]:
      if line.error:
        yield Row(line.number, error=line.error)
        continue
      text = _strip_cr(line.text)
      if not text.strip():
        yield Row(line.number, error="empty line")
        continue
      values = text.split("\t")
      if len(values) != len(columns):
        yield Row(
          line.number, error=(f"expected {len(columns)} tab-separated columns, found {len(values)}")
        )
        continue
      yield Row(line.number, dict(zip(columns, values)))

  return columns, rows()


def _csv_rows(lines: list[_Line]) -> tuple[list[str], Iterator[Row]]:
  if not lines:
    raise FileFormatError(1, "empty file: expected a header row")
  errors = {line.number: line.error for line in lines if line.error}
  reader = csv.reader((line.text + "\n" for line in lines), strict=True)

  def next_record() -> tuple[int, int, list[str] | None, str | None]:
    """(first line, last line, values or None, error or None); raises StopIteration at the end."""
    first = reader.line_num + 1
    try:
      values = next(reader)
    except csv.Error as exc:
      return first, reader.line_num, None, f"malformed CSV: {exc}"
    return first, reader.line_num, values, None

  def spoiled(first: int, last: int) -> str | None:
    return next((errors[n] for n in range(first, last + 1) if n in errors), None)

  try:
    first, last, header, error = next_record()
  except StopIteration:
    raise FileFormatError(1, "empty file: expected a header row") from None
  error = error or spoiled(first, last)
  if error or not header:
    raise FileFormatError(first, f"header: {error or 'empty line'}")
  columns = _check_header(header)

  def rows() -> Iterator[Row]:
    while True:
      try:
        first, last, values, error = next_record()
      except StopIteration:
        return
      error = spoiled(first, last) or error
      if error:
        yield Row(first, error=error)
      elif not values or (len(values) == 1 and not values[0].strip()):
        yield Row(first, error="empty line")
      elif len(values) != len(columns):
        yield Row(
          first, error=(f"expected {len(columns)} comma-separated columns, found {len(values)}")
        )
      else:
        yield Row(first, dict(zip(columns, values)))

  return columns, rows()


def _jsonl_rows(lines: list[_Line]) -> Iterator[Row]:
  for line in lines:
    if line.error:
      yield Row(line.number, error=line.error)
      continue
    if not line.text.strip():
      yield Row(line.number, error="empty line")
      continue
    try:
      value = json.loads(line.text)
    except json.JSONDecodeError as exc:
      yield Row(line.number, error=f"invalid JSON: {exc.msg} at column {exc.colno}")
      continue
    if not isinstance(value, dict):
      yield Row(line.number, error=f"expected a JSON object, found {type(value).__name__}")
      continue
    yield Row(line.number, value)


def parse_rows(data: bytes, file_format: str) -> tuple[list[str] | None, Iterator[Row]]:
  """Parses the bytes of a text data file.

  Args:
    data: the whole file.
    file_format: ``"tsv"`` (header row, tab-separated, no quoting), ``"csv"`` (header row,
      Python ``csv`` dialect with quoted fields) or ``"jsonl"`` (one JSON object per line).

  Returns:
    The header's column names (None for JSON lines) and an iterator over the data rows.

  Raises:
    FileFormatError: the header is missing or unreadable.
  """
  lines = _decode_lines(data)
  if file_format == "tsv":
    return _tsv_rows(lines)
  if file_format == "csv":
    return _csv_rows(lines)
  if file_format == "jsonl":
    return None, _jsonl_rows(lines)
  raise ValueError(f"file_format must be one of {FORMATS} (got {file_format!r})")
