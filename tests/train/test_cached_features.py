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


@pytest.mark.parametrize("pooling", heads.POOLINGS)
def test_layers_on_the_cached_input_of_layer_k_give_the_classifier_logits(pooling):
  shape = dict(TINY_BERT_SHAPE, num_hidden_layers=3)
  model = heads.SequenceClassifier(bert.BertConfig(**shape), 3, pooling)
  rows = bert_rows(4, 8, seed=2)
  rows["attention_mask"][1:, 5:] = 0
  batch = {k: jax.numpy.asarray(v) for k, v in rows.items()}
  params = model.init(jax.random.PRNGKey(0), batch)["params"]
  for k in (1, 2):
    hidden = model.apply({"params": params}, batch, stop_layer=k)
    assert hidden.shape == (4, 8, shape["hidden_size"])
    hidden = hidden.at[1:, 5:].set(0.0)  # the cache keeps zeros under masked tokens
    tail = {"hidden": hidden, "attention_mask": batch["attention_mask"]}
    np.testing.assert_allclose(
      model.clone(cached_layers=k).apply({"params": params}, tail),
      model.apply({"params": params}, batch),
      rtol=1e-5,
      atol=1e-5,
    )


def test_prefix_layers_is_the_first_trained_layer(token_cache):
  from dpjax.train import task as task_lib

  c = tiny(token_cache, **{"model.train": "lora", "model.tiny_layers": 3})
  c.model.lora_targets = ("layer_[12]/.*(query|value)",)
  built = task_lib.build(c)
  assert features.prefix_layers(c, built.model, built.trainable) == 1
  c.model.lora_targets = ("layer_2/.*dense",)
  built = task_lib.build(c)
  assert features.prefix_layers(c, built.model, built.trainable) == 2
  for key, value in (("cache_features", False), ("dropout", 0.1)):
    changed = c.copy_and_resolve_references()
    changed.model[key] = value
    assert features.prefix_layers(changed, built.model, built.trainable) == 0
  c.model.train, c.model.lora_targets = "all", ()
  built = task_lib.build(c)  # embeddings trained: nothing is frozen below
  assert features.prefix_layers(c, built.model, built.trainable) == 0


@pytest.mark.parametrize("backend", ["bookkeeping", "vmap"])
def test_a_run_on_cached_bottom_layers_equals_the_uncached_one(
  tmp_path, token_cache, capsys, backend
):
  runs = {}
  for cache in (True, False):
    c = tiny(token_cache, **{"train.steps": 3, "model.train": "lora", "model.tiny_layers": 3})
    c.model.lora_targets = ("layer_[12]/.*(query|value|dense)",)
    c.dp.backend = backend
    c.dp.noise_multiplier = 1.0
    c.train.checkpoint_every_steps = 3
    c.dp.insecure_fixed_noise_seed = 7  # the same noise and samples for both (test only)
    c.model.cache_features = cache
    summary = loop.train_and_evaluate(c, tmp_path / f"{backend}{cache}")
    runs[cache] = (summary, load_trained(tmp_path / f"{backend}{cache}").params)
  out = capsys.readouterr().out
  assert out.count("encoder layers below layer 1 are frozen") == 1
  (cached, cached_params), (plain, plain_params) = runs[True], runs[False]
  assert cached["epsilon"] == plain["epsilon"] and cached["eval"] == pytest.approx(plain["eval"])
  for a, b in zip(
    jax.tree_util.tree_leaves(cached_params), jax.tree_util.tree_leaves(plain_params)
  ):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
  # The run actually moved the adapters (a check that could not pass on untouched params).
  query = cached_params["backbone"]["encoder"]["layer_1"]["attention"]["self"]["query"]
  assert not np.allclose(np.asarray(query["lora_b"]), 0)


def test_the_cache_is_skipped_when_it_would_not_fit_in_memory(
  tmp_path, token_cache, capsys, monkeypatch
):
  c = tiny(token_cache, **{"train.steps": 1, "model.train": "lora", "model.tiny_layers": 3})
  c.model.lora_targets = ("layer_2/.*dense",)
  c.dp.noise_multiplier = 1.0
  monkeypatch.setattr(features, "memory_bytes", lambda: 1024)
  summary = loop.train_and_evaluate(c, tmp_path / "w")
  out = capsys.readouterr().out
  assert "not caching the frozen layers' output" in out and "are frozen: their output" not in out
  assert summary["steps"] == 1
