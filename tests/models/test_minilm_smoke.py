"""Smoke test: DP fine-tuning of the real MiniLM on 64 real SST-2 rows lowers the loss."""

import jax
import numpy as np
import optax

from dpjax import data, privacy
from dpjax.models import heads, lora, pretrained
from dpjax.privacy.secret import RunSecret


class FirstRows:
  """The first ``n`` examples of a source (the real SST-2 text, without encoding all of it)."""

  def __init__(self, source, n: int):
    self.source, self.n = source, n
    self.name = f"{source.name}[:{n}]"
    self.fingerprint = f"{source.fingerprint}[:{n}]"

  def __len__(self) -> int:
    return self.n

  def __getitem__(self, index: int):
    return self.source[index]


def test_real_minilm_dp_finetuning_on_sst2_lowers_the_loss():
  model, backbone, tokenizer = pretrained.load("minilm")
  rows = data.encode(FirstRows(data.sst2("train"), 64), tokenizer, max_length=32, buckets=(32,))
  batch = rows.batch(np.arange(64))
  task = heads.SequenceClassifier(model.config, 2, "mean")
  params = heads.init_with_backbone(
    task, jax.random.PRNGKey(0), {k: v[:1] for k, v in batch.items()}, backbone
  )
  trainable, frozen = lora.partition(params, lora.trainable_mask(params, "all"))
  loss_fn = heads.classification_loss(task, frozen)
  grad_fn = privacy.clipped_grad(loss_fn, 1.0, microbatch_size=16, has_aux=True)
  # A small σ: the point is that the clipped, noised, real-weight step works and learns.
  tx = optax.chain(
    privacy.gaussian_privatizer(
      0.1, grad_fn.sensitivity, 64.0, key=RunSecret.insecure_fixed(0).noise_key()
    ),
    optax.adam(5e-4),
  )
  opt_state = tx.init(trainable)
  mask = np.ones(64, bool)

  @jax.jit
  def step(trainable, opt_state):
    grads, aux = grad_fn(trainable, batch, mask)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, aux.mean_loss

  losses = []
  for _ in range(5):
    trainable, opt_state, loss = step(trainable, opt_state)
    losses.append(float(loss))
  assert np.all(np.isfinite(losses))
  assert losses[-1] < losses[0] - 0.05, losses
