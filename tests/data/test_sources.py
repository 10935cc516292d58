"""TextFileSource: TSV, CSV and JSON lines; bad rows reported at their file:line or skipped."""

from __future__ import annotations

import logging
import re
import shutil

import pytest

from dpjax.data import DataError, Example, Source, TextFileSource


def _write(tmp_path, name: str, content: str | bytes):
  path = tmp_path / name
  path.write_bytes(content.encode() if isinstance(content, str) else content)
  return path


def test_tsv_with_user_ids(tmp_path):
  path = _write(
    tmp_path, "d.tsv", "user\tsentence\tlabel\nu1\ta fine film\t1\nu2\tdull , dull\t0\n"
  )
  source = TextFileSource(path, user_field="user")
  assert isinstance(source, Source)
  assert len(source) == 2
  assert source[0] == Example("a fine film", 1, "u1")
  assert source[1] == Example("dull , dull", 0, "u2")
  assert source[-1] == source[1]
  assert source.name == "d.tsv"
  with pytest.raises(IndexError):
    source[2]


def test_csv_quoted_fields_and_line_numbers_after_a_multiline_record(tmp_path):
  content = (
    'text,label,user\n"commas, ""quotes"" and\na newline",1,alice\nplain,0,bob\nbroken,x,carol\n'
  )
  path = _write(tmp_path, "d.csv", content)
  with pytest.raises(DataError, match=re.escape(f"{path}:5: label 'x' is not an integer")):
    TextFileSource(path, text_field="text", user_field="user")
  source = TextFileSource(path, text_field="text", user_field="user", skip_bad_rows=True)
  assert [source[0], source[1]] == [
    Example('commas, "quotes" and\na newline', 1, "alice"),
    Example("plain", 0, "bob"),
  ]
  assert source.skipped_examples == [(5, "label 'x' is not an integer")]


def test_jsonl_without_labels_and_integer_user_ids(tmp_path):
  path = _write(
    tmp_path, "d.jsonl", '{"sentence": "one", "uid": 7}\n{"sentence": "two", "uid": "x"}\n'
  )
  source = TextFileSource(path, label_field=None, user_field="uid")
  assert [source[0], source[1]] == [Example("one", None, "7"), Example("two", None, "x")]


def test_crlf_line_endings_and_byte_order_mark(tmp_path):
  path = _write(tmp_path, "d.tsv", b"\xef\xbb\xbfsentence\tlabel\r\nfine\t1\r\nbad\t0\r\n")
  source = TextFileSource(path)
  assert [source[0], source[1]] == [Example("fine", 1), Example("bad", 0)]


def test_format_is_inferred_or_explicit(tmp_path):
  path = _write(tmp_path, "d.txt", "sentence,label\nok,1\n")
  with pytest.raises(DataError, match="cannot infer the format"):
    TextFileSource(path)
  assert TextFileSource(path, format="csv")[0] == Example("ok", 1)
  with pytest.raises(ValueError, match="format must be one of"):
    TextFileSource(path, format="xml")


def test_fingerprint_follows_content_and_options_not_path(tmp_path):
  path = _write(tmp_path, "a.tsv", "sentence\tlabel\nfine\t1\n")
  copy = tmp_path / "b.tsv"
  shutil.copy(path, copy)
  assert TextFileSource(path).fingerprint == TextFileSource(copy).fingerprint
  assert TextFileSource(path).fingerprint != TextFileSource(path, label_field=None).fingerprint
  copy.write_bytes(b"sentence\tlabel\nfine\t0\n")
  assert TextFileSource(path).fingerprint != TextFileSource(copy).fingerprint


def test_missing_file_names_the_path(tmp_path):
  path = tmp_path / "nope.tsv"
  with pytest.raises(DataError, match=re.escape(f"{path}: no such file")):
    TextFileSource(path)


# (file name, content, options, bad line, reason). Line 1 is the header for TSV and CSV.
BAD_ROWS = [
  (
    "d.tsv",
    "sentence\tlabel\nok\t1\nno label here\n",
    {},
    3,
    "expected 2 tab-separated columns, found 1",
  ),
  (
    "d.tsv",
    "sentence\tlabel\nok\t1\na\tb\t0\n",
    {},
    3,
    "expected 2 tab-separated columns, found 3",
  ),
  ("d.tsv", "sentence\tlabel\nok\t1\nok\tpositive\n", {}, 3, "label 'positive' is not an integer"),
  ("d.tsv", "sentence\tlabel\nok\t1\nok\t1.0\n", {}, 3, "label '1.0' is not an integer"),
  ("d.tsv", "sentence\tlabel\nok\t-1\n", {}, 2, "label -1 is negative"),
  ("d.tsv", "sentence\tlabel\nok\t1\nok\t2\n", {"num_labels": 2}, 3, "label 2 is outside [0, 2)"),
  ("d.tsv", "sentence\tlabel\nok\t1\n \t0\n", {}, 3, "empty text in column 'sentence'"),
  ("d.tsv", "sentence\tlabel\nok\t1\n\nok\t0\n", {}, 3, "empty line"),
  (
    "d.tsv",
    b"sentence\tlabel\nok\t1\nbad \xff byte\t0\n",
    {},
    3,
    "invalid UTF-8 (byte 0xff at byte 5 of the line)",
  ),
  (
    "d.tsv",
    "sentence\tscore\nok\t1\n",
    {},
    1,
    "missing column 'label' (the header has: sentence, score)",
  ),
  ("d.tsv", "", {}, 1, "empty file: expected a header row"),
  (
    "d.tsv",
    "u\tsentence\tlabel\nx\tok\t1\n\tok\t0\n",
    {"user_field": "u"},
    3,
    "empty user id in column 'u'",
  ),
  (
    "d.csv",
    "sentence,label\nok,1\nok,1,extra\n",
    {},
    3,
    "expected 2 comma-separated columns, found 3",
  ),
  ("d.csv", 'sentence,label\nok,1\n"a"b,1\n', {}, 3, "malformed CSV"),
  ("d.csv", b'sentence,label\nok,1\n"two\nlines \xc3",0\n', {}, 3, "invalid UTF-8"),
  (
    "d.jsonl",
    '{"sentence": "ok", "label": 1}\n{"sentence": "no label"}\n',
    {},
    2,
    "missing field 'label'",
  ),
  (
    "d.jsonl",
    '{"sentence": "ok", "label": 1}\n{"sentence": "x", "label": 1\n',
    {},
    2,
    "invalid JSON",
  ),
  ("d.jsonl", '["ok", 1]\n', {}, 1, "expected a JSON object, found list"),
  (
    "d.jsonl",
    '{"sentence": "ok", "label": 1}\n{"sentence": "x", "label": 1.5}\n',
    {},
    2,
    "label 1.5 is not an integer",
  ),
  ("d.jsonl", '{"sentence": "x", "label": true}\n', {}, 1, "label True is not an integer"),
  ("d.jsonl", '{"sentence": null, "label": 1}\n', {}, 1, "field 'sentence' must be a string"),
  (
    "d.jsonl",
    '{"sentence": "ok", "label": 1}\n{"sentence": "\\t ", "label": 0}\n',
    {},
    2,
    "empty text in field 'sentence'",
  ),
]


@pytest.mark.parametrize("name, content, options, line, reason", BAD_ROWS)
def test_bad_row_raises_with_file_and_line(tmp_path, name, content, options, line, reason):
  path = _write(tmp_path, name, content)
  with pytest.raises(DataError) as info:
    TextFileSource(path, **options)
  message = str(info.value)
  assert "\n" not in message
  assert message.startswith(f"{path}:{line}: {reason}")


def test_skip_bad_rows_counts_and_warns(tmp_path, caplog):
  content = (
    "sentence\tlabel\n"
    "good one\t1\n"  # 2
    "bad\tlabel\n"  # 3
    "good two\t0\n"  # 4
    "\t1\n"  # 5
    "too\tmany\t1\n"  # 6
    "good three\t1\n"
  )  # 7
  path = _write(tmp_path, "d.tsv", content)
  with caplog.at_level(logging.WARNING):
    source = TextFileSource(path, skip_bad_rows=True)
  assert [source[i].text for i in range(len(source))] == ["good one", "good two", "good three"]
  assert source.skipped_rows == 3
  assert [line for line, _ in source.skipped_examples] == [3, 5, 6]
  assert any("skipped 3 bad rows" in r.getMessage() for r in caplog.records)


def test_skip_keeps_only_the_first_few_reasons(tmp_path):
  content = "sentence\tlabel\n" + "x\tbad\n" * 25 + "good\t1\n"
  source = TextFileSource(_write(tmp_path, "d.tsv", content), skip_bad_rows=True)
  assert (len(source), source.skipped_rows) == (1, 25)
  assert 0 < len(source.skipped_examples) < 25
  assert source.skipped_examples[0] == (2, "label 'bad' is not an integer")


def test_a_file_with_only_bad_rows_is_an_error_even_when_skipping(tmp_path):
  path = _write(tmp_path, "d.tsv", "sentence\tlabel\nx\tbad\n")
  with pytest.raises(DataError, match="no examples"):
    TextFileSource(path, skip_bad_rows=True)


def test_missing_column_raises_even_when_skipping(tmp_path):
  path = _write(tmp_path, "d.csv", "text,label\nok,1\n")
  with pytest.raises(DataError, match=re.escape(f"{path}:1: missing column 'sentence'")):
    TextFileSource(path, skip_bad_rows=True)
