"""Run as a script under XLA_FLAGS=--xla_force_host_platform_device_count=8 (see
test_parallel.py): one DP train step on several meshes, saved to an .npz for comparison."""

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpjax import batching, parallel, privacy
from dpjax.models import bert, heads
from dpjax.privacy import clipping, noise
from dpjax.privacy.secret import RunSecret
from dpjax.train import step as step_lib
from experiments.benchmarks import fsdp_memory
from tests import tiny_models

CONFIG = bert.BertConfig(**tiny_models.TINY_BERT_SHAPE)
MICRO = 2
MESHES = {"one": (1, 1, 1), "data8": (8, 1, 8), "data2_fsdp4": (2, 4, 8)}


rows = tiny_models.bert_rows


def one_step(backend, data, fsdp, devices, per_layer=False):
  """Two groups (11 and 5 real rows, padded) -> one DP step (σ = 1) on the mesh.

  ``per_layer``: the parameters enter ``shard_map`` split (per-layer FSDP gathers).
  """
  mesh = parallel.make_mesh(data, fsdp, jax.devices()[:devices])
  model = heads.SequenceClassifier(CONFIG, 2, "mean")
  params = model.init(jax.random.PRNGKey(0), rows(1, 4, 0))["params"]
  grad_fn = privacy.clipped_grad(
    heads.classification_loss(model), 0.5, backend, MICRO, has_aux=True
  )
  tx = optax.chain(
    privacy.gaussian_privatizer(
      1.0, grad_fn.sensitivity, 12.0, key=RunSecret.insecure_fixed(3).noise_key()
    ),
    optax.sgd(1.0),
  )
  state = step_lib.TrainState(np.zeros([], np.int32), params, tx.init(params))
  shardings = parallel.shardings(state, mesh, min_size=0)
  state = parallel.put(state, shardings)
  multiple = MICRO * parallel.batch_size_multiple(mesh)
  batches, masks = [], []
  for real, length, seed in ((11, 4, 1), (5, 8, 2)):
    size = -(-real // multiple) * multiple
    host = {k: v[:size] for k, v in rows(32, length, seed).items()}  # same rows on every mesh
    mask = np.arange(size) < real
    order = batching.balanced_order(size, parallel.batch_size_multiple(mesh))
    b, m = parallel.global_rows(
      lambda p, host=host: {k: v[p] for k, v in host.items()},
      order,
      mask[order],
      parallel.batch_sharding(mesh),
    )
    batches.append(b)
    masks.append(m)
  sharded = parallel.sharded_grad_fn(grad_fn, mesh, shardings.params if per_layer else None)
  assert (sharded.layout is not None) == per_layer
  step = jax.jit(
    functools.partial(step_lib.train_step, grad_fn=sharded, tx=tx),
    out_shardings=(shardings, parallel.replicated(mesh)),
  )
  new_state, metrics = step(state, tuple(batches), tuple(masks))
  out = {
    f"param/{clipping.path_to_str(p)}": np.asarray(v)
    for p, v in jax.tree_util.tree_leaves_with_path(new_state.params)
  }
  out["examples"] = np.asarray(metrics["examples"])
  out["privatizer_step"] = np.asarray(new_state.opt_state[0].step)
  return out


def sharded_noise(fsdp):
  """The privatizer's noise for a [64, 32] leaf, computed with the output split fsdp ways."""
  mesh = parallel.make_mesh(8 // fsdp, fsdp)
  template = {"w": jnp.zeros([64, 32]), "b": jnp.zeros([7])}
  spec = parallel.shardings(template, mesh, min_size=0)
  # The key is an argument, as in the privatizer's state: a constant key would be folded.
  fn = jax.jit(
    lambda key: noise.noise_for_step(key, jnp.asarray(5), template, 1.0), out_shardings=spec
  )
  result = fn(jnp.asarray(RunSecret.insecure_fixed(3).noise_key()))
  return {f"noise{fsdp}/{k}": np.asarray(v) for k, v in result.items()} | {
    f"noise{fsdp}/w_shards": np.asarray(len(result["w"].sharding.device_set))
  }


def gradient_memory():
  """XLA's per-device account of the compiled book-keeping clipped sum, with per-layer
  gathers, of a 6-block GPT-2-shaped model (width 256) on an fsdp=8 mesh, one 16-token
  example per device."""
  result = fsdp_memory.clipped_sum_memory(6, 256, 4, 8, 16, per_layer=True, vocab=512)
  result["activations"] = fsdp_memory.activation_memory(6, 256, 4, 16, vocab=512)
  result["largest_layer"] = fsdp_memory.largest_layer(6, 256, vocab=512)
  keys = ("working", "arguments", "block", "params", "activations", "largest_layer")
  return {f"memory/{k}": np.asarray(result[k]) for k in keys}


def main(path):
  assert len(jax.devices()) == 8, jax.devices()
  out = {}
  for backend in ("vmap", "bookkeeping"):
    for name, (data, fsdp, devices) in MESHES.items():
      # vmap on the FSDP mesh as dpjax.main runs it: slices in, gathered whole inside
      # shard_map, sums reduce-scattered; book-keeping there gathers whole at the start.
      split = backend == "vmap" and fsdp > 1
      step = one_step(backend, data, fsdp, devices, split)
      out.update({f"{backend}/{name}/{k}": v for k, v in step.items()})
  # Per-layer FSDP: the slices enter shard_map, each layer's weights are gathered where it runs.
  out.update(
    {f"per_layer/data2_fsdp4/{k}": v for k, v in one_step("bookkeeping", 2, 4, 8, True).items()}
  )
  out.update(gradient_memory())
  for fsdp in (1, 8):
    out.update(sharded_noise(fsdp))
  np.savez(path, **out)


if __name__ == "__main__":
  main(sys.argv[1])
