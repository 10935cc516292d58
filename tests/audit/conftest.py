"""The audit reports read the runner tests' shared finished tiny run."""

from tests.train.conftest import token_cache, trained  # noqa: F401
