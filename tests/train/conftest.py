"""Fixtures of the runner tests: a token cache and one finished tiny run shared by all."""

import json

import pytest

from dpjax.train import loop
from tests.shared_fixtures import shared_once
from tests.train.runs import SHARED_RUN, tiny


@pytest.fixture(scope="module")
def token_cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("token_cache"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """(workdir, summary) of one finished 16-step tiny run (read it; copy it to change it)."""
  build = lambda root: loop.train_and_evaluate(
    tiny(str(root / "token_cache"), **SHARED_RUN), root / "run"
  )
  workdir = shared_once(tmp_path_factory, "trained_tiny_run", build) / "run"
  return workdir, json.loads((workdir / "summary.json").read_text())
