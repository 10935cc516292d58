"""Hugging Face checkpoints load into the Flax models and match transformers' outputs.

The reference outputs come from tests/fixtures/make_parity_fixtures.py (PyTorch,
run offline once); see tests/fixtures/parity/README.md.
"""

import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from dpjax.models import bert, pretrained

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "parity"
ATOL = 1e-4


def expected(name):
  return dict(np.load(FIXTURES / name / "expected.npz"))


def max_err(a, b):
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def test_minilm_matches_transformers():
  model, params, tokenizer = pretrained.load("minilm")
  want = expected("minilm")
  hidden = model.apply(
    {"params": params}, want["input_ids"], want["attention_mask"], want["token_type_ids"]
  )
  assert max_err(hidden, want["last_hidden_state"]) < ATOL
  pooler = pretrained.load_head_params("minilm")["pooler"]
  pooled = bert.BertPooler(model.config).apply({"params": pooler}, hidden)
  assert max_err(pooled, want["pooler_output"]) < ATOL
  # The sentence embedding of sentence-transformers: masked mean, L2-normalized.
  m = want["attention_mask"][..., None]
  mean = jnp.sum(hidden * m, 1) / m.sum(1)
  embedding = mean / jnp.linalg.norm(mean, axis=-1, keepdims=True)
  assert max_err(embedding, want["sentence_embedding"]) < ATOL
  # The tokenizer is the checkpoint's: it reproduces the fixture's ids.
  first = tokenizer.encode("a gorgeous , witty , seductive movie .").ids
  real = want["input_ids"][0][want["attention_mask"][0] == 1]
  np.testing.assert_array_equal(first[: len(real)], real)


def test_roberta_matches_transformers():
  model, params, tokenizer = pretrained.load(FIXTURES / "roberta_tiny", with_tokenizer=False)
  assert tokenizer is None and model.config.position_offset == 2
  want = expected("roberta_tiny")
  hidden = model.apply({"params": params}, want["input_ids"], want["attention_mask"])
  assert max_err(hidden, want["last_hidden_state"]) < ATOL
  pooler = pretrained.load_head_params(FIXTURES / "roberta_tiny")["pooler"]
  pooled = bert.BertPooler(model.config).apply({"params": pooler}, hidden)
  assert max_err(pooled, want["pooler_output"]) < ATOL


def test_bert_mlm_head_matches_transformers():
  model, params, _ = pretrained.load(FIXTURES / "bert_tiny_mlm", with_tokenizer=False)
  want = expected("bert_tiny_mlm")
  hidden = model.apply({"params": params}, want["input_ids"], want["attention_mask"])
  assert max_err(hidden, want["last_hidden_state"]) < ATOL
  head = pretrained.load_head_params(FIXTURES / "bert_tiny_mlm")["lm_head"]
  table = params["embeddings"]["word_embeddings"]["embedding"]

  def decoder(h, rows):  # The tied decoder as BertModel.word_logits computes it.
    return h @ (table if rows is None else table[rows]).T

  logits = bert.BertMaskedLMHead(model.config).apply({"params": head}, hidden, decoder)
  assert max_err(logits, want["logits"]) < ATOL
  # Restricting to a few vocabulary ids (label words) gives the same numbers.
  few = bert.BertMaskedLMHead(model.config).apply(
    {"params": head}, hidden, decoder, jnp.array([5, 40])
  )
  np.testing.assert_allclose(few, np.asarray(logits)[..., [5, 40]], atol=1e-5)


def test_gpt2_matches_transformers():
  model, params, _ = pretrained.load(FIXTURES / "gpt2_tiny", with_tokenizer=False)
  want = expected("gpt2_tiny")
  args = (want["input_ids"], want["attention_mask"], want["position_ids"])
  assert max_err(model.apply({"params": params}, *args), want["logits"]) < ATOL
  hidden = model.apply({"params": params}, *args, return_hidden=True)
  assert max_err(hidden, want["last_hidden_state"]) < ATOL


def test_parity_detects_a_single_wrong_tensor():
  """Record the measured errors (and make sure the comparison is not vacuous)."""
  model, params, _ = pretrained.load(FIXTURES / "bert_tiny_mlm", with_tokenizer=False)
  want = expected("bert_tiny_mlm")
  hidden = model.apply({"params": params}, want["input_ids"], want["attention_mask"])
  # Zeroing one LayerNorm bias must break parity: the fixture is sensitive to every tensor.
  broken = jax_tree_set(params, ("encoder", "layer_1", "output", "LayerNorm", "bias"), 0.0)
  hidden_broken = model.apply({"params": broken}, want["input_ids"], want["attention_mask"])
  assert max_err(hidden_broken, want["last_hidden_state"]) > 100 * max_err(
    hidden, want["last_hidden_state"]
  )


def jax_tree_set(params, path, value):
  out = dict(params)
  node = out
  for key in path[:-1]:
    node[key] = dict(node[key])
    node = node[key]
  node[path[-1]] = jnp.full_like(node[path[-1]], value)
  return out


def _copy_fixture(tmp_path, name="bert_tiny_mlm"):
  target = tmp_path / name
  shutil.copytree(FIXTURES / name, target)
  return target, load_file(target / "model.safetensors")


def test_missing_extra_and_misshapen_tensors_are_listed(tmp_path):
  path, tensors = _copy_fixture(tmp_path)
  del tensors["bert.encoder.layer.1.attention.self.key.bias"]
  tensors["bert.embeddings.word_embeddings.weight"] = tensors[
    "bert.embeddings.word_embeddings.weight"
  ][:, :16].copy()
  save_file(tensors, path / "model.safetensors")
  with pytest.raises(pretrained.PretrainedError) as err:
    pretrained.load(path, with_tokenizer=False)
  message = str(err.value)
  assert "encoder.layer.1.attention.self.key.bias" in message
  assert "embeddings.word_embeddings.weight (97, 16) vs model (97, 32)" in message

  path, tensors = _copy_fixture(tmp_path / "extra")
  tensors["bert.encoder.layer.2.output.dense.weight"] = np.zeros((32, 64), np.float32)
  save_file(tensors, path / "model.safetensors")
  with pytest.raises(pretrained.PretrainedError, match=r"has no place for: \['encoder.layer.2"):
    pretrained.load(path, with_tokenizer=False)


def test_bad_paths_and_pickles_are_refused(tmp_path):
  with pytest.raises(pretrained.PretrainedError, match="must be one of"):
    pretrained.load(tmp_path / "nope")
  path, _ = _copy_fixture(tmp_path)
  (path / "model.safetensors").rename(path / "pytorch_model.bin")
  with pytest.raises(pretrained.PretrainedError, match="pickled weights are never loaded"):
    pretrained.load(path, with_tokenizer=False)
  path, _ = _copy_fixture(tmp_path / "t")
  with pytest.raises(pretrained.PretrainedError, match="tokenizer.json not found"):
    pretrained.load(path)
  config = json.loads((path / "config.json").read_text())
  (path / "config.json").write_text(json.dumps({**config, "model_type": "t5"}))
  with pytest.raises(pretrained.PretrainedError, match="model_type must be bert, roberta or gpt2"):
    pretrained.load(path, with_tokenizer=False)
