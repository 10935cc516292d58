"""model.train=head on cached backbone features: the same head, gradients and run as uncached."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from dpjax import load_trained
from dpjax.models import bert, heads
from dpjax.train import features, loop
from tests.tiny_models import TINY_BERT_SHAPE, bert_rows
from tests.train.runs import tiny


@pytest.mark.parametrize("pooling", heads.POOLINGS)
def test_the_head_on_features_gives_the_classifier_logits(pooling):
  model = heads.SequenceClassifier(bert.BertConfig(**TINY_BERT_SHAPE), 3, pooling)
  rows = bert_rows(4, 7, seed=1)
  rows["attention_mask"][1:, 4:] = 0  # padded rows: masked tokens change no feature
  batch = {k: jax.numpy.asarray(v) for k, v in rows.items()}
  params = model.init(jax.random.PRNGKey(0), batch)["params"]
  cached = model.apply({"params": params}, batch, features_only=True)
  head = heads.PooledHead(model.backbone, 3, pooling)
  trainable = {k: params[k] for k in params if k in ("head", "pooler")}
  assert set(head.init(jax.random.PRNGKey(1), {"features": cached})["params"]) == set(trainable)
  np.testing.assert_allclose(
    head.apply({"params": trainable}, {"features": cached}),
    model.apply({"params": params}, batch),
    rtol=1e-6,
    atol=1e-6,
  )


def test_a_cached_head_only_run_equals_the_uncached_one(tmp_path, token_cache, capsys):
  runs = {}
  for cache in (True, False):
    c = tiny(token_cache, **{"train.steps": 3, "model.train": "head", "model.pooling": "pooler"})
    c.dp.noise_multiplier = 1.0  # σ given: no calibration
    c.train.checkpoint_every_steps = 3
    c.dp.insecure_fixed_noise_seed = 7  # the same noise and samples for both (test only)
    c.model.cache_features = cache
    assert features.applies(c) == cache
    summary = loop.train_and_evaluate(c, tmp_path / str(cache))
    runs[cache] = (summary, load_trained(tmp_path / str(cache)).params)
  out = capsys.readouterr().out
  assert out.count("features of the") == 1 and "computed once" in out
  (cached, cached_params), (plain, plain_params) = runs[True], runs[False]
  assert cached["epsilon"] == plain["epsilon"] and cached["eval"] == pytest.approx(plain["eval"])
  for a, b in zip(
    jax.tree_util.tree_leaves(cached_params), jax.tree_util.tree_leaves(plain_params)
  ):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  c.model.dropout = 0.1  # features random per step: the uncached path runs
  c.model.cache_features = True
  assert not features.applies(c)
