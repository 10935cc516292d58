"""bfloat16 compute (model.dtype): the clipped sum is the float32 one to bf16 precision, and
every example's clipped contribution still has norm at most C (norms and clipping in float32)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpjax import privacy
from dpjax.models import gpt2, heads
from tests.models.test_models import TINY_BERT, TINY_GPT2, text_batch

C = 0.05  # every example's gradient is longer: each one is clipped to exactly C
MASK = np.array([1, 1, 0, 1], bool)


def _problem(kind: str, dtype: str):
  batch = text_batch()
  if kind == "gpt2_lm":
    model = gpt2.GPT2LMHeadModel(dataclasses.replace(TINY_GPT2, dtype=dtype))
    batch = {k: batch[k] for k in ("input_ids", "attention_mask")}
    init = lambda: model.init(jax.random.PRNGKey(0), batch["input_ids"], batch["attention_mask"])
    return heads.lm_loss(model), init()["params"], batch
  model = heads.SequenceClassifier(dataclasses.replace(TINY_BERT, dtype=dtype), 2, "pooler")
  return heads.classification_loss(model), model.init(jax.random.PRNGKey(0), batch)["params"], batch


def _norm(tree) -> float:
  return float(
    np.sqrt(sum(np.sum(np.square(np.asarray(x))) for x in jax.tree_util.tree_leaves(tree)))
  )


@pytest.mark.parametrize("kind", ["bert_pooler", "gpt2_lm"])
def test_bfloat16_clipped_sums_match_float32_and_keep_the_bound(kind):
  loss32, params, batch = _problem(kind, "float32")
  loss16, params16, _ = _problem(kind, "bfloat16")
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params16))  # fp32 master
  sums = {}
  runs = [("fp32", loss32, "bookkeeping"), ("bf16", loss16, "bookkeeping")]
  if kind == "bert_pooler":  # the vmap reference under bf16 too (one model is enough)
    runs.append(("bf16_vmap", loss16, "vmap"))
  for name, loss_fn, backend in runs:
    fn = jax.jit(privacy.clipped_grad(loss_fn, C, backend=backend, has_aux=True))
    total, aux = fn(params, batch, MASK)
    assert aux.norms.dtype == jnp.float32 and bool(np.all(np.asarray(aux.clipped)[MASK]))
    # One-example sensitivity: each example alone contributes exactly C (float32 rounding).
    for i in np.flatnonzero(MASK):
      alone, _ = fn(params, batch, np.arange(len(MASK)) == i)
      assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(alone))
      assert _norm(alone) <= C * (1 + 1e-5), (name, i, _norm(alone))
      assert _norm(alone) >= C * (1 - 1e-5)
    sums[name] = total
  fp32 = sums.pop("fp32")
  for name, total in sums.items():
    error = _norm(jax.tree_util.tree_map(lambda a, b: a - b, total, fp32)) / _norm(fp32)
    assert 0 < error <= 0.03, (name, error)  # bf16 has 8 significant bits; not fp32 either
