"""Writes ``sst2_users.tsv``: SST-2 training rows, each assigned to a synthetic user.

    python experiments/data/make_sst2_users.py [--out=experiments/data/sst2_users.tsv]

SST-2 has no authors, so for the user-level DP demo (``experiments/sst2_users.py``)
the first ``--rows`` rows of the vendored ``third_party/sst2/train.tsv`` are handed
out to users with a skewed number of rows each, reproducibly:

1. the row numbers 0..rows-1 are shuffled by ``numpy.random.default_rng(seed)``;
2. users are made one after the other: user i gets the next n_i shuffled rows, n_i
   drawn from the same generator as ``min(Zipf(exponent), max_rows)`` (a Zipf
   law: about 61% of users have one row at exponent 2, a few have hundreds);
3. the rows are written in their original order with a ``user`` column
   (``u00000``, ``u00001``, ... in the order the users were made).

The defaults (20,000 rows, seed 0, exponent 2, at most 400 rows per user) give the
committed file; rerunning the command rewrites it byte for byte (a test checks
this). The users are synthetic: a user-level guarantee on this file protects
these made-up groups of rows, which is what the demo needs, not real authors.
The rows stay under SST-2's terms (see third_party/sst2/README.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "third_party" / "sst2" / "train.tsv"
DEFAULT_OUT = ROOT / "experiments" / "data" / "sst2_users.tsv"
ROWS, SEED, EXPONENT, MAX_ROWS = 20_000, 0, 2.0, 400


def assign_users(rows: int, seed: int, exponent: float, max_rows: int) -> np.ndarray:
  """int [rows]: the user of each row (users numbered in the order they were made)."""
  rng = np.random.default_rng(seed)
  order = rng.permutation(rows)
  users = np.empty(rows, np.int64)
  start, user = 0, 0
  while start < rows:
    size = int(min(rng.zipf(exponent), max_rows, rows - start))
    users[order[start : start + size]] = user
    start += size
    user += 1
  return users


def make(
  out: Path,
  rows: int = ROWS,
  seed: int = SEED,
  exponent: float = EXPONENT,
  max_rows: int = MAX_ROWS,
) -> dict[str, float]:
  """Writes the users file to ``out``; returns a few facts about it."""
  lines = SOURCE.read_text(encoding="utf-8").split("\n")
  header, body = lines[0], [line for line in lines[1:] if line]
  if header != "sentence\tlabel" or rows > len(body):
    raise ValueError(f"{SOURCE}: expected a sentence/label header and at least {rows} rows")
  users = assign_users(rows, seed, exponent, max_rows)
  width = len(str(int(users.max())))
  text = "sentence\tlabel\tuser\n" + "".join(
    f"{line}\tu{int(u):0{max(width, 5)}d}\n" for line, u in zip(body[:rows], users)
  )
  out.write_text(text, encoding="utf-8")
  counts = np.bincount(users)
  return {
    "rows": rows,
    "users": len(counts),
    "max_rows_of_a_user": int(counts.max()),
    "users_with_one_row": float(np.mean(counts == 1)),
    "bytes": len(text.encode()),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
  parser.add_argument("--rows", type=int, default=ROWS)
  parser.add_argument("--seed", type=int, default=SEED)
  parser.add_argument("--exponent", type=float, default=EXPONENT)
  parser.add_argument("--max_rows", type=int, default=MAX_ROWS)
  args = parser.parse_args()
  facts = make(args.out, args.rows, args.seed, args.exponent, args.max_rows)
  print(f"wrote {args.out}: {facts}")


if __name__ == "__main__":
  main()
