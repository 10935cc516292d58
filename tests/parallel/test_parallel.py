"""dpjax.parallel: mesh shapes, sharding rules, balanced layout, and on 8 virtual CPU devices
(a subprocess): one DP step equals the 1-device step and the noise is the same."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from dpjax import parallel
from dpjax.train import config as config_lib
from tests.shared_fixtures import shared_once

ROOT = Path(__file__).resolve().parents[2]


def test_mesh_shape_resolves_none_and_names_the_bad_field():
  assert parallel.mesh_shape(8, None, 2) == (4, 2)
  assert parallel.mesh_shape(8, 2, None) == (2, 4)
  for data, fsdp, field in (
    (3, 1, "data"),
    (None, 3, "fsdp"),
    (0, 1, "data"),
    (None, None, "fsdp"),
  ):
    with pytest.raises(parallel.ParallelError, match=f"^{field} must") as err:
      parallel.mesh_shape(8, data, fsdp)
    assert str(config_lib.config_error(err.value)).startswith(f"config.parallel.{field} must")


def test_fsdp_splits_large_arrays_on_their_largest_divisible_dim_and_rules_win():
  mesh = AbstractMesh((2, 4), parallel.AXES)
  assert parallel.spec_for("enc/kernel", (384, 1536), mesh, min_size=0) == P(None, "fsdp")
  assert parallel.spec_for("enc/kernel", (6, 384), mesh, min_size=0) == P(None, "fsdp")
  assert parallel.spec_for("enc/bias", (3, 5), mesh, min_size=0) == P()  # nothing divisible
  assert parallel.spec_for("enc/kernel", (384, 1536), mesh) == P(None, "fsdp")
  assert parallel.spec_for("enc/bias", (384,), mesh) == P()  # below fsdp_min_size
  rules = parallel.parse_rules(["word_embeddings=fsdp,None"])
  name = "opt_state/0/mu/embeddings/word_embeddings/embedding"  # moments follow their param
  assert parallel.spec_for(name, (32, 8), mesh, rules, min_size=0) == P("fsdp", None)
  with pytest.raises(parallel.ParallelError, match="cannot be split 4 ways"):
    parallel.spec_for(name, (30, 8), mesh, rules)
  with pytest.raises(parallel.ParallelError, match="REGEX=SPEC"):
    parallel.parse_rules(["no equals sign"])
  with pytest.raises(parallel.ParallelError, match="not a mesh axis"):
    parallel.parse_rules(["x=model"])


def _run_eight_devices(directory: Path) -> None:
  env = {
    **os.environ,
    "XLA_FLAGS": "--xla_force_host_platform_device_count=8 " + parallel.CPU_PER_LAYER_XLA_FLAGS,
    "JAX_PLATFORMS": "cpu",
  }
  subprocess.run(
    [sys.executable, "-m", "tests.parallel.eight_devices", str(directory / "results.npz")],
    cwd=ROOT,
    env=env,
    check=True,
    timeout=900,
  )


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory):
  """The results of one 8-virtual-device subprocess, run once per test run."""
  directory = shared_once(tmp_path_factory, "eight_devices", _run_eight_devices)
  return dict(np.load(directory / "results.npz"))


@pytest.mark.parametrize(
  "backend,mesh",
  [
    ("vmap", "data8"),
    ("vmap", "data2_fsdp4"),
    ("bookkeeping", "data8"),
    ("bookkeeping", "data2_fsdp4"),
    ("per_layer", "data2_fsdp4"),  # book-keeping, weights gathered one layer at a time
  ],
)
def test_dp_step_on_eight_devices_equals_the_one_device_step(eight_devices, backend, mesh):
  reference = "bookkeeping" if backend == "per_layer" else backend
  one = {
    k.split("/", 2)[2]: v for k, v in eight_devices.items() if k.startswith(f"{reference}/one/")
  }
  many = {
    k.split("/", 2)[2]: v for k, v in eight_devices.items() if k.startswith(f"{backend}/{mesh}/")
  }
  assert one.keys() == many.keys() and len(one) > 5
  assert int(many["examples"]) == int(one["examples"]) == 16  # padding rows not counted
  assert int(many["privatizer_step"]) == 1  # noise drawn once for both groups
  for key in one:
    np.testing.assert_allclose(many[key], one[key], atol=2e-5, rtol=1e-5, err_msg=key)


def test_vmap_and_bookkeeping_steps_agree_on_eight_devices(eight_devices):
  for key, value in eight_devices.items():
    if key.startswith("vmap/data2_fsdp4/param/"):
      other = eight_devices[key.replace("vmap/", "bookkeeping/", 1)]
      np.testing.assert_allclose(other, value, atol=2e-5, rtol=1e-5, err_msg=key)


def test_per_layer_fsdp_holds_one_layer_of_gathered_weights_not_the_model(eight_devices):
  """Per device, XLA's account of the compiled clipped sum (6 blocks, fsdp = 8): with
  per-layer gathers the working memory stays within the largest layer's weights plus the
  activations plain (non-private) AD needs for one example, the bound of DP-ZeRO; gathering
  the model whole holds all 6 blocks and their whole gradient (2x the model;
  ``python -m experiments.benchmarks.fsdp_memory --models=tiny`` compiles both)."""
  block = int(eight_devices["memory/block"])
  model = int(eight_devices["memory/params"])
  working = int(eight_devices["memory/working"])
  largest = int(eight_devices["memory/largest_layer"])
  activations = int(eight_devices["memory/activations"])
  print(
    f"block {block / 2**20:.2f} MiB, model {model / 2**20:.2f} MiB, per-device working "
    f"memory {working / 2**20:.2f} MiB (bound: largest layer {largest / 2**20:.2f} MiB + "
    f"activations {activations / 2**20:.2f} MiB)"
  )
  largest = max(largest, block)  # a block (with its biases and norms) is the largest here
  assert model > 6 * block
  assert working <= largest + activations
  # The slices a device holds: an eighth of the split parameters (plus the replicated ones).
  assert int(eight_devices["memory/arguments"]) < model / 4


def test_noise_is_identical_whatever_the_sharding(eight_devices):
  assert int(eight_devices["noise8/w_shards"]) == 8 and int(eight_devices["noise1/w_shards"]) == 8
  for leaf in ("w", "b"):
    np.testing.assert_array_equal(eight_devices[f"noise8/{leaf}"], eight_devices[f"noise1/{leaf}"])
  assert 0.9 < np.std(eight_devices["noise8/w"]) < 1.1
