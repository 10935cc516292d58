"""Flag parsing for the command lines: a bad flag is one line on stderr and exit code 2."""

from __future__ import annotations

import sys

from absl import flags


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with an unknown flag or a bad value as ``error: ...`` and exit 2."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as err:
    print(f"error: {' '.join(str(err).split())}", file=sys.stderr, flush=True)
    sys.exit(2)
