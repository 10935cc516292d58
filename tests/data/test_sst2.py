"""The vendored SST-2 files: row and label counts, and the checksums stated in their README."""

from __future__ import annotations

import collections
import hashlib
import re

import pytest

import dpjax
from dpjax.data import DataError, sst2, sst2_dir


@pytest.fixture(scope="module")
def splits():
  return {"train": sst2("train"), "validation": sst2("validation")}


@pytest.mark.parametrize(
  "split, rows, negative, positive",
  [
    ("train", 67349, 29780, 37569),
    ("validation", 872, 428, 444),
  ],
)
def test_rows_and_labels(splits, split, rows, negative, positive):
  source = splits[split]
  assert source.name == f"sst2/{split}"
  assert len(source) == rows
  labels = collections.Counter(source[i].label for i in range(len(source)))
  assert labels == {0: negative, 1: positive}
  assert source.skipped_rows == 0


def test_dev_is_validation():
  assert sst2("dev").fingerprint == sst2("validation").fingerprint
  assert sst2("dev")[0] == sst2("validation")[0]


def test_first_rows(splits):
  assert splits["train"][0].text == "hide new secretions from the parental units"
  assert splits["validation"][0].text == "one long string of cliches ."


def test_readme_checksums_match_the_files():
  readme = (sst2_dir() / "README.md").read_text()
  stated = dict(
    (name, digest)
    for digest, name in re.findall(r"^([0-9a-f]{64})  (\S+\.tsv)$", readme, re.MULTILINE)
  )
  assert set(stated) == {"train.tsv", "dev.tsv"}
  for name, digest in stated.items():
    assert hashlib.sha256((sst2_dir() / name).read_bytes()).hexdigest() == digest, name


def test_source_records_the_file_checksum():
  digest = hashlib.sha256((sst2_dir() / "dev.tsv").read_bytes()).hexdigest()
  assert sst2("dev").file_sha256 == digest


def test_unknown_split():
  with pytest.raises(ValueError, match="split must be one of"):
    sst2("test")


def test_missing_vendored_directory_is_a_clear_error(tmp_path, monkeypatch):
  monkeypatch.setattr(dpjax, "__file__", str(tmp_path / "dpjax" / "__init__.py"))
  with pytest.raises(DataError, match=re.escape(str(tmp_path / "third_party" / "sst2"))):
    sst2("train")
