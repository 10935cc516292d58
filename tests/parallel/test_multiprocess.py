"""Two processes on localhost (jax.distributed, CPU collectives) train exactly like one.

The multi-host path end to end, through ``launch/multiprocess.sh``: the
Poisson sample is decided from the shared secret, each process loads its own
rows, clipped sums meet in one psum, noise is added once, only process 0
writes, and orbax saves/restores the sharded state across both processes,
including the fallback when the latest checkpoint is unreadable. The reference
is one process with two virtual devices: a two-way sum is the same in either
order, so the trained parameters must agree bit for bit.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Tiny encoder, one length bucket, sigma given (the plan does not depend on the step
# count), constant learning rate (the schedule does not either): a run stopped at
# step 4 and resumed to 6 is the same run as one straight to 6.
FLAGS = [
  "--config.data.buckets=(16,)",
  "--config.data.max_length=16",
  "--config.data.train_fraction=0.004",
  "--config.data.eval_limit=64",
  "--config.train.batch_size=32",
  "--config.dp.microbatch_size=8",
  "--config.dp.noise_multiplier=1.0",
  "--config.train.schedule=constant",
  "--config.train.checkpoint_every_steps=2",
  "--config.train.log_every_steps=2",
  # Two runs are compared bit for bit: they must share their (here public) noise seed.
  "--config.dp.insecure_fixed_noise_seed=11",
]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env() -> dict[str, str]:
  env = {
    k: v
    for k, v in os.environ.items()
    if not k.startswith("SLURM_") and k not in ("XLA_FLAGS", "TPU_WORKER_HOSTNAMES")
  }
  env["PYTHON"] = sys.executable
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _two_processes(workdir: Path, cache: Path, *flags: str) -> None:
  cmd = [
    str(ROOT / "launch/multiprocess.sh"),
    "--config=experiments/sst2.py:tiny",
    f"--workdir={workdir}",
    "--num_processes=2",
    f"--port={_free_port()}",
    *FLAGS,
    f"--config.data.cache_dir={cache}",
    *flags,
  ]
  result = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr


def _summary(workdir: Path) -> dict:
  return json.loads((workdir / "summary.json").read_text())


def _one_process(workdir: Path, cache: Path, *flags: str) -> None:
  env = _env() | {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "dpjax.main",
      "--config=experiments/sst2.py:tiny",
      f"--workdir={workdir}",
      *FLAGS,
      f"--config.data.cache_dir={cache}",
      *flags,
    ],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr


def _garble(checkpoint: Path) -> None:
  for f in checkpoint.rglob("*"):
    if f.is_file():
      f.write_bytes(b"garbage")


def _reference(one: Path, cache: Path) -> dict:
  """One process with 2 devices, through the same damaged-checkpoint resume."""
  _one_process(one, cache, "--config.train.steps=4")
  _garble(one / "checkpoints" / "4")
  _one_process(one, cache, "--config.train.steps=6", "--config.resume=allow_changes")
  return _summary(one)


def test_two_processes_train_checkpoint_and_resume_like_one_process(tmp_path):
  # The reference runs beside the two processes (independent: each has its own workdir and
  # token cache), not before them.
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    pending = pool.submit(_reference, tmp_path / "one_process", tmp_path / "token_cache_one")
    resumed = _two_processes_chain(tmp_path)
    reference = pending.result()
  assert reference["devices"] == 2 and reference["processes"] == 1
  assert resumed["steps"] == reference["steps"] == 6
  assert resumed["ledger_steps"] == reference["ledger_steps"] == 8
  assert resumed["params_sha256"] == reference["params_sha256"]
  assert resumed["epsilon"] == reference["epsilon"]
  assert resumed["eval"] == reference["eval"]


def _two_processes_chain(tmp_path: Path) -> dict:
  """Two processes: train to 4, damage checkpoint 4, resume to 6; the resumed summary."""
  cache = tmp_path / "token_cache"
  two = tmp_path / "two_processes"
  _two_processes(two, cache, "--config.train.steps=4")
  first = _summary(two)
  assert first["processes"] == 2 and first["devices"] == 2 and first["steps"] == 4
  assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["2", "4"]
  logs = two / "logs"
  assert "plan:" in (logs / "process_0.log").read_text()
  assert "plan:" not in (logs / "process_1.log").read_text()  # Only process 0 speaks.

  # The latest checkpoint is damaged: both processes must agree to drop it, and resume
  # from step 2 with the ledger of step 2 (never a fresh one), then train to step 6.
  _garble(two / "checkpoints" / "4")
  _two_processes(two, cache, "--config.train.steps=6", "--config.resume=allow_changes")
  log = (logs / "process_0.log").read_text()
  # Step 3-4 had been executed and written: charged again, and the rest re-keyed.
  assert "resumed from step 2 (ledger: 4 steps)" in log, log
  assert "steps 2 executed past the restored checkpoint" in log, log
  assert (two / "checkpoints_unreadable" / "4").is_dir()
  # Process 1 wrote no metrics; the records of the dropped step 4 were rewound.
  records = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
  steps = [r["step"] for r in records if r["split"] == "privacy"]
  assert steps == [2, 4, 6], steps
  return _summary(two)
