"""An on-disk cache of tokenized examples: one ``.npz`` file per (data, tokenizer, settings).

Files are written to a temporary name in the cache directory and moved into place with
``os.replace``, so a reader sees either no file or a complete one. A file that cannot be read,
or whose stored key or shapes do not match, is ignored (with a warning) and rewritten.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import uuid
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from absl import logging

from dpjax.data.tokenization import TokenArrays

FORMAT_VERSION = 1
_OPTIONAL = ("labels", "user_ids", "mask_positions", "prompt_lengths")


def cache_key(
  source_fingerprint: str,
  tokenizer_json: str,
  max_length: int,
  template_spec: dict[str, Any] | None,
) -> str:
  """sha256 over everything the tokenized arrays depend on, and the file format version."""
  spec = {
    "format_version": FORMAT_VERSION,
    "source": source_fingerprint,
    "tokenizer": hashlib.sha256(tokenizer_json.encode()).hexdigest(),
    "max_length": max_length,
    "template": template_spec,
  }
  return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def cache_path(cache_dir: str | os.PathLike[str], source_name: str, key: str) -> Path:
  """``<cache_dir>/<source name>-<key prefix>.npz``, the name made file-system safe."""
  safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", source_name).strip("._") or "data"
  return Path(cache_dir) / f"{safe}-{key[:32]}.npz"


def save(path: Path, key: str, arrays: TokenArrays) -> None:
  """Writes ``arrays`` (and ``key``) to ``path`` atomically."""
  path.parent.mkdir(parents=True, exist_ok=True)
  payload = {"key": np.array(key), "ids": arrays.ids, "offsets": arrays.offsets}
  payload.update(
    {name: getattr(arrays, name) for name in _OPTIONAL if getattr(arrays, name) is not None}
  )
  tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
  fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, **payload)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise


def _consistent(arrays: TokenArrays) -> bool:
  offsets = arrays.offsets
  n = len(offsets) - 1
  return (
    offsets.ndim == 1
    and n >= 0
    and offsets[0] == 0
    and offsets[-1] == len(arrays.ids)
    and bool(np.all(np.diff(offsets) >= 0))
    and all(getattr(arrays, name) is None or len(getattr(arrays, name)) == n for name in _OPTIONAL)
  )


def load(path: Path, key: str) -> TokenArrays | None:
  """The arrays stored at ``path`` under ``key``, or None if absent, unreadable or stale."""
  try:
    with np.load(path, allow_pickle=False) as stored:
      if str(stored["key"]) != key:
        logging.warning("ignoring cache file %s: it was written for another key", path)
        return None
      arrays = TokenArrays(
        ids=stored["ids"],
        offsets=stored["offsets"],
        **{name: stored[name] if name in stored.files else None for name in _OPTIONAL},
      )
  except FileNotFoundError:
    return None
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
    logging.warning("ignoring unreadable cache file %s: %s", path, exc)
    return None
  if not _consistent(arrays):
    logging.warning("ignoring inconsistent cache file %s", path)
    return None
  return arrays
