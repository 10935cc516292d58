"""Fixtures of the runner tests: a token cache and one finished tiny run shared by all."""

import json

import pytest

from tests.train.runs import shared_run


@pytest.fixture(scope="module")
def token_cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("token_cache"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """(workdir, summary) of one finished 16-step tiny run (read it; copy it to change it)."""
  workdir = shared_run(tmp_path_factory)
  return workdir, json.loads((workdir / "summary.json").read_text())
