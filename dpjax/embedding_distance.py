"""How far synthetic text is from real text: Fréchet distance of sentence embeddings.

Each text is embedded by all-MiniLM-L6-v2 (the attention-masked mean of its last
hidden states, L2-normalized: the sentence-transformers recipe for this model);
each set of embeddings is summarized by its mean μ and covariance Σ, and

    FD = |μ_a - μ_b|² + Tr(Σ_a + Σ_b - 2 (Σ_a Σ_b)^{1/2})

(the Fréchet distance of two Gaussians; Heusel et al. 2017's FID, here on text
embeddings as in Yue et al. 2023). 0 for identical distributions; the value
depends on the sample sizes, so compare sets of similar sizes.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from dpjax.data import tokenizer_utils
from dpjax.models import pretrained


@functools.lru_cache(maxsize=1)
def _encoder():
  model, params, tokenizer = pretrained.load("minilm")
  apply = jax.jit(lambda p, ids, mask: model.apply({"params": p}, ids, mask))
  return apply, params, tokenizer_utils.unpadded_copy(tokenizer)


def sentence_embeddings(texts: Sequence[str], batch_size: int = 64, max_length: int = 64):
  """float64 [n, 384]: L2-normalized mean-pooled MiniLM embeddings of ``texts``."""
  apply, params, tokenizer = _encoder()
  tokenizer.enable_truncation(max_length)
  out = []
  for start in range(0, len(texts), batch_size):
    chunk = list(texts[start : start + batch_size])
    encodings = tokenizer.encode_batch(chunk + [""] * (batch_size - len(chunk)))
    length = max(len(e.ids) for e in encodings)
    length = 1 << max(3, (length - 1).bit_length())  # a few compiled shapes
    ids = np.zeros((batch_size, length), np.int32)
    mask = np.zeros_like(ids)
    for i, e in enumerate(encodings):
      ids[i, : len(e.ids)] = e.ids
      mask[i, : len(e.ids)] = 1
    hidden = apply(params, jnp.asarray(ids), jnp.asarray(mask))
    weights = mask[..., None].astype(np.float32)
    pooled = np.asarray(jnp.sum(hidden * weights, 1)) / np.maximum(weights.sum(1), 1.0)
    out.append(pooled[: len(chunk)].astype(np.float64))
  embeddings = np.concatenate(out) if out else np.zeros((0, 384))
  return embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
  """The Fréchet distance between Gaussians fitted to the rows of ``a`` and ``b``.

  Raises:
    ValueError: fewer than 2 rows in either set, or different widths.
  """
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
    raise ValueError(f"need two [n >= 2, d] arrays of one width (got {a.shape} and {b.shape})")
  mu = a.mean(0) - b.mean(0)
  cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  root = scipy.linalg.sqrtm(cov_a @ cov_b)
  root = np.real(root)  # rounding leaves a negligible imaginary part
  return float(mu @ mu + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(root))
