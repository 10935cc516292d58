"""The launch/ scripts: shellcheck, exact --dry-run command lines, usage errors, and
real runs against fake `python`, `srun` and `gcloud` executables (nothing of dpjax
or of a cluster is needed)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = ROOT / "launch"
SCRIPTS = ["local.sh", "multiprocess.sh", "slurm.sbatch", "tpu_pod.sh"]
CONFIG = "experiments/quickstart.py"
# The flags each script needs besides --config and --workdir.
REQUIRED = {
  "local.sh": [],
  "multiprocess.sh": ["--num_processes=2"],
  "slurm.sbatch": [],
  "tpu_pod.sh": ["--tpu_name=dp-test", "--zone=us-central2-b", "--accelerator_type=v4-32"],
}
# Overrides that break naive quoting; each must reach dpjax.main as one argument.
TRICKY = [
  '--config.name=it\'s a "quoted" value',
  "--config.pattern=*.py $HOME `date` ; exit 1",
  "--config.empty=",
]
DEFAULT_PYTHON = (
  str(ROOT / ".venv/bin/python") if os.access(ROOT / ".venv/bin/python", os.X_OK) else "python3"
)

# Records its argv, cwd and some environment into <workdir>/ran_<process_id>.json.
# FAKE_FAIL_ID=i: process i exits 3 after FAKE_FAIL_DELAY s; the others sleep
# FAKE_SLEEP s, then write <workdir>/done_<process_id>.
FAKE_PYTHON = """\
import json, os, sys, time
argv = sys.argv[1:]
flags = dict(a.split("=", 1) for a in argv if a.startswith("--") and "=" in a)
pid = flags.get("--process_id", "local")
workdir = flags["--workdir"]
os.makedirs(workdir, exist_ok=True)
env = {k: os.environ.get(k) for k in ("JAX_PLATFORMS", "XLA_FLAGS", "PYTHONUNBUFFERED")}
record = {"argv": argv, "cwd": os.getcwd(), "env": env, "pid": os.getpid()}
with open(os.path.join(workdir, f"ran_{pid}.json.tmp"), "w") as f:
  json.dump(record, f)
os.replace(os.path.join(workdir, f"ran_{pid}.json.tmp"), os.path.join(workdir, f"ran_{pid}.json"))
print(f"fake process {pid} started", flush=True)
if pid == os.environ.get("FAKE_FAIL_ID"):
  time.sleep(float(os.environ.get("FAKE_FAIL_DELAY", "0")))
  print(f"boom from process {pid}", file=sys.stderr, flush=True)
  sys.exit(3)
time.sleep(float(os.environ.get("FAKE_SLEEP", "0")))
open(os.path.join(workdir, f"done_{pid}"), "w").close()
"""

# Appends {"argv", "cwd", ...} to $FAKE_LOG; exits 5 when FAKE_FAIL is a substring of
# the joined argv. `gcloud ... scp` also lists the tarball it is given.
FAKE_TOOL = """\
import json, os, sys, tarfile
argv = sys.argv[1:]
record = {"tool": os.path.basename(sys.argv[0]), "argv": argv, "cwd": os.getcwd(),
          "JAX_LOCAL_DEVICE_IDS": os.environ.get("JAX_LOCAL_DEVICE_IDS")}
if record["tool"] == "gcloud" and argv[3] == "scp":
  with tarfile.open(argv[4]) as tar:
    record["members"] = tar.getnames()
with open(os.environ["FAKE_LOG"], "a") as f:
  f.write(json.dumps(record) + "\\n")
if os.environ.get("FAKE_FAIL") and os.environ["FAKE_FAIL"] in " ".join(argv):
  sys.exit(5)
"""


def _write_executable(path: Path, body: str) -> Path:
  path.write_text(f"#!{sys.executable}\n{body}")
  path.chmod(0o755)
  return path


@pytest.fixture
def env(tmp_path):
  """A clean environment whose PATH starts with tripwire gcloud/srun/sbatch."""
  tripwires = tmp_path / "tripwire-bin"
  tripwires.mkdir()
  for tool in ("gcloud", "srun", "sbatch"):
    script = tripwires / tool
    script.write_text(f'#!/bin/sh\necho "{tool} $*" >> "{tmp_path}/tripwire.log"\nexit 97\n')
    script.chmod(0o755)
  clean = {
    k: v
    for k, v in os.environ.items()
    if not k.startswith(("SLURM_", "DPJAX_", "FAKE_"))
    and k not in ("PYTHON", "XLA_FLAGS", "JAX_LOCAL_DEVICE_IDS", "JAX_PLATFORMS")
  }
  clean["PATH"] = f"{tripwires}{os.pathsep}{clean.get('PATH', '/usr/bin:/bin')}"
  clean["TMPDIR"] = str(tmp_path)
  yield clean
  assert not (tmp_path / "tripwire.log").exists(), (tmp_path / "tripwire.log").read_text()


def run(script, *args, env, cwd=ROOT, timeout=30):
  path = LAUNCH / script
  cmd = ["bash", str(path), *args] if script.endswith(".sbatch") else [str(path), *args]
  return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def lines(stdout):
  """Each printed command as an argv list."""
  return [shlex.split(line) for line in stdout.splitlines()]


# --------------------------------------------------------------------------- lint


@pytest.mark.skipif(
  shutil.which("shellcheck") is None,
  reason="shellcheck is not installed (apt-get install shellcheck)",
)
@pytest.mark.parametrize("script", SCRIPTS + ["common.sh"])
def test_shellcheck_is_clean(script, tmp_path):
  # -x follows `source launch/common.sh`; run from elsewhere to show paths do not depend on cwd.
  result = subprocess.run(
    ["shellcheck", "-x", str(LAUNCH / script)], cwd=tmp_path, capture_output=True, text=True
  )
  assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", ["local.sh", "multiprocess.sh", "tpu_pod.sh"])
def test_scripts_are_executable(script):
  assert os.access(LAUNCH / script, os.X_OK)


# ------------------------------------------------------------------ help and usage


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script, env):
  result = run(script, "--help", env=env)
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith("Usage: ")
  assert "--dry-run" in result.stdout and "PYTHON" in result.stdout


def _usage_error(result, script, fragment):
  assert result.returncode == 2, (result.stdout, result.stderr)
  assert result.stdout == ""
  assert result.stderr.count("\n") == 1, result.stderr
  assert result.stderr.startswith(f"{script}: error: ")
  assert fragment in result.stderr and "Usage: " in result.stderr


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]])
def test_missing_config(script, dry_run, env, tmp_path):
  result = run(script, *dry_run, f"--workdir={tmp_path}", *REQUIRED[script], env=env)
  _usage_error(result, script, "missing --config")


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize(
  "args, fragment",
  [
    ([f"--config={CONFIG}"], "missing --workdir"),
    ([f"--config={CONFIG}", "--workdir=w", "--bogus=1"], "unknown argument: --bogus=1"),
    ([f"--config={CONFIG}", "--workdir=w", "stray"], "unknown argument: stray"),
    (["--config", CONFIG, "--workdir=w"], "--config needs a value"),
    (["--config=no/such/config.py", "--workdir=w"], "config file not found: no/such/config.py"),
  ],
)
def test_usage_errors(script, args, fragment, env):
  _usage_error(run(script, "--dry-run", *args, *REQUIRED[script], env=env), script, fragment)


@pytest.mark.parametrize(
  "script, args, fragment",
  [
    ("multiprocess.sh", [], "missing --num_processes"),
    ("multiprocess.sh", ["--num_processes=0"], "--num_processes must be a positive integer"),
    ("multiprocess.sh", ["--num_processes=2", "--devices_per_process=x"], "--devices_per_process"),
    ("multiprocess.sh", ["--num_processes=2", "--port=70000"], "--port"),
    (
      "multiprocess.sh",
      ["--num_processes=2", "--workdir=gs://b/r"],
      "--workdir must be a local directory",
    ),
    ("tpu_pod.sh", ["--zone=z", "--accelerator_type=v4-8"], "missing --tpu_name"),
    ("tpu_pod.sh", ["--tpu_name=t", "--accelerator_type=v4-8"], "missing --zone"),
    ("tpu_pod.sh", ["--tpu_name=t", "--zone=z"], "missing --accelerator_type"),
    ("tpu_pod.sh", ["--tpu_name=t", "--zone=z", "--accelerator_type=v9-8"], "--runtime_version"),
  ],
)
def test_script_specific_usage_errors(script, args, fragment, env):
  result = run(script, "--dry-run", f"--config={CONFIG}", "--workdir=w", *args, env=env)
  _usage_error(result, script, fragment)


# ------------------------------------------------------------------------- local.sh


def test_local_dry_run(env, tmp_path):
  result = run(
    "local.sh",
    "--dry-run",
    f"--config={CONFIG}",
    f"--workdir={tmp_path}/run",
    *TRICKY,
    "--",
    "--extra",
    "a b",
    env=env,
  )
  assert result.returncode == 0, result.stderr
  assert lines(result.stdout) == [
    ["cd", str(ROOT)],
    [
      DEFAULT_PYTHON,
      "-m",
      "dpjax.main",
      f"--config={CONFIG}",
      f"--workdir={tmp_path}/run",
      *TRICKY,
      "--extra",
      "a b",
    ],
  ]


def test_local_paths_from_another_directory(env, tmp_path):
  """Relative paths are the caller's; a config found only in the repository stays relative to it."""
  (tmp_path / "mine.py").write_text("")
  env["PYTHON"] = "bin/python"
  result = run(
    "local.sh", "--dry-run", f"--config={CONFIG}:tiny", "--workdir=./runs/a", env=env, cwd=tmp_path
  )
  assert result.returncode == 0, result.stderr
  assert lines(result.stdout)[1] == [
    f"{tmp_path}/bin/python",
    "-m",
    "dpjax.main",
    f"--config={CONFIG}:tiny",
    f"--workdir={tmp_path}/runs/a",
  ]
  result = run("local.sh", "--dry-run", "--config=mine.py", "--workdir=w", env=env, cwd=tmp_path)
  assert lines(result.stdout)[1][3] == f"--config={tmp_path}/mine.py"


def test_local_runs_the_command(env, tmp_path):
  env["PYTHON"] = str(_write_executable(tmp_path / "python", FAKE_PYTHON))
  result = run("local.sh", f"--config={CONFIG}", "--workdir=out", *TRICKY, env=env, cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  record = json.loads((tmp_path / "out/ran_local.json").read_text())
  assert record["argv"] == [
    "-m",
    "dpjax.main",
    f"--config={CONFIG}",
    f"--workdir={tmp_path}/out",
    *TRICKY,
  ]
  assert record["cwd"] == str(ROOT)


# ------------------------------------------------------------------ multiprocess.sh


def _process_argv(python, workdir, i, n=3, port=12355, extra=()):
  return [
    python,
    "-m",
    "dpjax.main",
    f"--config={CONFIG}",
    f"--workdir={workdir}",
    *extra,
    f"--coordinator_address=127.0.0.1:{port}",
    f"--num_processes={n}",
    f"--process_id={i}",
  ]


def test_multiprocess_dry_run(env, tmp_path):
  env["XLA_FLAGS"] = "--xla_dump_to=/tmp/dump"
  workdir = tmp_path / "run"
  result = run(
    "multiprocess.sh",
    "--dry-run",
    f"--config={CONFIG}",
    f"--workdir={workdir}",
    "--num_processes=3",
    "--devices_per_process=4",
    "--port=23456",
    *TRICKY,
    env=env,
  )
  assert result.returncode == 0, result.stderr
  env_prefix = [
    "env",
    "JAX_PLATFORMS=cpu",
    "PYTHONUNBUFFERED=1",
    "XLA_FLAGS=--xla_dump_to=/tmp/dump --xla_force_host_platform_device_count=4",
  ]
  assert lines(result.stdout) == [
    ["cd", str(ROOT)],
    ["mkdir", "-p", f"{workdir}/logs"],
    *[
      [
        *env_prefix,
        *_process_argv(DEFAULT_PYTHON, workdir, i, port=23456, extra=TRICKY),
        ">",
        f"{workdir}/logs/process_{i}.log",
        "2>&1",
        "&",
      ]
      for i in range(3)
    ],
    ["wait"],
  ]


def test_multiprocess_dry_run_defaults(env, tmp_path):
  result = run(
    "multiprocess.sh",
    "--dry-run",
    f"--config={CONFIG}",
    "--workdir=w",
    "--num_processes=1",
    env=env,
    cwd=tmp_path,
  )
  assert lines(result.stdout)[2] == [
    "env",
    "JAX_PLATFORMS=cpu",
    "PYTHONUNBUFFERED=1",
    *_process_argv(DEFAULT_PYTHON, tmp_path / "w", 0, n=1),
    ">",
    f"{tmp_path}/w/logs/process_0.log",
    "2>&1",
    "&",
  ]


def _records(workdir):
  return {
    int(p.stem.split("_")[1]): json.loads(p.read_text()) for p in Path(workdir).glob("ran_*.json")
  }


def _is_running(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  return True


def test_multiprocess_runs_every_process(env, tmp_path):
  env["PYTHON"] = python = str(_write_executable(tmp_path / "python", FAKE_PYTHON))
  result = run(
    "multiprocess.sh",
    f"--config={CONFIG}",
    "--workdir=run",
    "--num_processes=3",
    "--devices_per_process=2",
    "--port=23456",
    *TRICKY,
    env=env,
    cwd=tmp_path,
  )
  assert result.returncode == 0, result.stderr
  assert "all 3 processes finished" in result.stderr
  workdir = tmp_path / "run"
  records = _records(workdir)
  assert sorted(records) == [0, 1, 2]
  for i, record in records.items():
    assert record["argv"] == _process_argv(python, workdir, i, port=23456, extra=TRICKY)[1:]
    assert record["cwd"] == str(ROOT)
    assert record["env"] == {
      "JAX_PLATFORMS": "cpu",
      "PYTHONUNBUFFERED": "1",
      "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
    }
    assert (workdir / f"done_{i}").exists()
    assert (workdir / f"logs/process_{i}.log").read_text() == f"fake process {i} started\n"


def test_multiprocess_failure_stops_the_others(env, tmp_path):
  env["PYTHON"] = str(_write_executable(tmp_path / "python", FAKE_PYTHON))
  env.update(FAKE_FAIL_ID="1", FAKE_FAIL_DELAY="1", FAKE_SLEEP="60")
  start = time.monotonic()
  result = run(
    "multiprocess.sh",
    f"--config={CONFIG}",
    f"--workdir={tmp_path}/run",
    "--num_processes=3",
    env=env,
  )
  assert time.monotonic() - start < 15  # the others were stopped, not waited for
  assert result.returncode == 1
  assert "process 1 failed with exit code 3" in result.stderr
  assert "boom from process 1" in result.stderr  # the tail of its log
  assert f"{tmp_path}/run/logs/process_1.log" in result.stderr
  records = _records(tmp_path / "run")
  assert sorted(records) == [0, 1, 2]
  for i in (0, 2):
    assert not (tmp_path / f"run/done_{i}").exists()
    assert not _is_running(records[i]["pid"])


def test_multiprocess_interrupt_stops_every_process(env, tmp_path):
  env["PYTHON"] = str(_write_executable(tmp_path / "python", FAKE_PYTHON))
  env["FAKE_SLEEP"] = "60"
  proc = subprocess.Popen(
    [
      str(LAUNCH / "multiprocess.sh"),
      f"--config={CONFIG}",
      f"--workdir={tmp_path}/run",
      "--num_processes=2",
    ],
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  try:
    # Generous limits: on a loaded machine the two processes can take seconds to start.
    deadline = time.monotonic() + 60
    while len(_records(tmp_path / "run")) < 2 and time.monotonic() < deadline:
      time.sleep(0.05)
    assert len(_records(tmp_path / "run")) == 2, "the two processes did not start within 60 s"
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
  finally:
    proc.kill()
  assert proc.returncode == 130, stderr
  assert "interrupted" in stderr
  for record in _records(tmp_path / "run").values():
    assert not _is_running(record["pid"])


def test_multiprocess_runs_no_command_substitution_once_its_traps_are_set():
  # bash 5.2 can drop a SIGINT that arrives while it waits for a $(...) child (3 of 40 and
  # 4 of 100 signals sent into a loop of them); the interrupt test above then sees the
  # processes outlive the interrupt.
  text = (LAUNCH / "multiprocess.sh").read_text()
  after_traps = text[text.index("trap 'on_signal 130' INT") :]
  code = [line for line in after_traps.splitlines() if not line.lstrip().startswith("#")]
  offending = [line for line in code if "`" in line or "$(" in line.replace("$((", "")]
  assert not offending, offending


# --------------------------------------------------------------------- slurm.sbatch


def _srun(python, workdir, device_ids="0,1,2,3,4,5,6,7", extra=()):
  env_part = ["env", f"JAX_LOCAL_DEVICE_IDS={device_ids}"] if device_ids else []
  return [
    "srun",
    "--ntasks-per-node=1",
    "--kill-on-bad-exit=1",
    *env_part,
    python,
    "-m",
    "dpjax.main",
    f"--config={CONFIG}",
    f"--workdir={workdir}",
    *extra,
  ]


def test_slurm_dry_run(env, tmp_path):
  result = run(
    "slurm.sbatch", "--dry-run", f"--config={CONFIG}", f"--workdir={tmp_path}/run", *TRICKY, env=env
  )
  assert result.returncode == 0, result.stderr
  out = result.stdout.splitlines()
  assert len(out) == 3
  assert lines("\n".join(out[:2])) == [
    ["cd", str(ROOT)],
    _srun(DEFAULT_PYTHON, f"{tmp_path}/run", extra=TRICKY),
  ]
  prefix = "# submit with: "
  assert out[2].startswith(prefix)
  assert shlex.split(out[2][len(prefix) :]) == [
    "cd",
    str(ROOT),
    "&&",
    "mkdir",
    "-p",
    "logs",
    "&&",
    "sbatch",
    "launch/slurm.sbatch",
    f"--config={CONFIG}",
    f"--workdir={tmp_path}/run",
    *TRICKY,
  ]


@pytest.mark.parametrize(
  "extra_env, device_ids, srun_args",
  [
    ({"SLURM_GPUS_PER_NODE": "h100:4"}, "0,1,2,3", []),
    ({"SLURM_GPUS_ON_NODE": "2", "SLURM_GPUS_PER_NODE": "8"}, "0,1", []),
    ({"JAX_LOCAL_DEVICE_IDS": "0"}, None, []),  # the user's choice is kept (inherited by srun)
    (
      {"DPJAX_SRUN_ARGS": " --mpi=none  --exclusive "},
      "0,1,2,3,4,5,6,7",
      ["--mpi=none", "--exclusive"],
    ),
  ],
)
def test_slurm_dry_run_environment(extra_env, device_ids, srun_args, env, tmp_path):
  env.update(extra_env)
  result = run("slurm.sbatch", "--dry-run", f"--config={CONFIG}", "--workdir=/shared/run", env=env)
  expected = _srun(DEFAULT_PYTHON, "/shared/run", device_ids=device_ids)
  assert lines(result.stdout)[1] == expected[:3] + srun_args + expected[3:]


def test_slurm_refuses_to_run_outside_a_job(env):
  result = run("slurm.sbatch", f"--config={CONFIG}", "--workdir=/shared/run", env=env)
  assert result.returncode == 1
  assert "not inside a SLURM job" in result.stderr and "sbatch launch/slurm.sbatch" in result.stderr


def test_slurm_job_runs_srun_from_the_spool_copy(env, tmp_path):
  """sbatch runs a copy of the script from a spool directory.

  The repository is found from SLURM_SUBMIT_DIR.
  """
  spool = tmp_path / "spool"
  spool.mkdir()
  shutil.copy(LAUNCH / "slurm.sbatch", spool / "slurm_script")
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _write_executable(bin_dir / "srun", FAKE_TOOL)
  env.update(
    PATH=f"{bin_dir}{os.pathsep}{env['PATH']}",
    FAKE_LOG=str(tmp_path / "srun.log"),
    SLURM_JOB_ID="42",
    SLURM_SUBMIT_DIR=str(ROOT),
    SLURM_GPUS_ON_NODE="2",
    SLURM_JOB_NUM_NODES="2",
    PYTHON="/opt/venv/bin/python",
  )
  result = subprocess.run(
    ["bash", str(spool / "slurm_script"), f"--config={CONFIG}", "--workdir=runs/x", *TRICKY],
    env=env,
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=30,
  )
  assert result.returncode == 0, result.stderr
  assert "slurm.sbatch: job 42: 2 node(s)" in result.stderr
  [record] = [json.loads(line) for line in (tmp_path / "srun.log").read_text().splitlines()]
  assert ["srun", *record["argv"]] == _srun(
    "/opt/venv/bin/python", f"{ROOT}/runs/x", "0,1", extra=TRICKY
  )
  assert record["cwd"] == str(ROOT)


def test_slurm_header():
  header = []
  for line in (LAUNCH / "slurm.sbatch").read_text().splitlines()[1:]:
    if not line.startswith("#"):
      break  # sbatch reads #SBATCH lines up to the first command
    if line.startswith("#SBATCH"):
      header.append(line)
  options = dict(line.split()[1].lstrip("-").split("=", 1) for line in header)
  assert options["ntasks-per-node"] == "1"
  assert {"nodes", "gpus-per-node", "time", "output"} <= set(options)
  assert options["output"].startswith("logs/")


# ----------------------------------------------------------------------- tpu_pod.sh

TPU_ARGS = [
  "--tpu_name=dp-test",
  "--zone=us-central2-b",
  "--accelerator_type=v4-32",
  "--project=my-project",
]
GCLOUD_TAIL = ["--zone=us-central2-b", "--project=my-project", "--quiet"]
TAR_EXCLUDES = [
  "./.git",
  "./.venv",
  "./venv",
  "./build",
  "./dist",
  "./logs",
  "./workdirs",
  "./.hypothesis",
  "./.pytest_cache",
  "__pycache__",
  "*.egg-info",
]


def _tpu_remote_commands(python="python3", extra=()):
  install = [
    "mkdir",
    "-p",
    "dpjax",
    "&&",
    "tar",
    "-xzf",
    "dpjax.tar.gz",
    "-C",
    "dpjax",
    "&&",
    "cd",
    "dpjax",
    "&&",
    python,
    "-m",
    "pip",
    "install",
    "-q",
    "-e",
    ".",
    "jax[tpu]",
  ]
  main = [
    "cd",
    "dpjax",
    "&&",
    python,
    "-m",
    "dpjax.main",
    f"--config={CONFIG}",
    "--workdir=gs://bucket/run",
    *extra,
  ]
  return install, main


def _parse_tpu_line(argv):
  """A gcloud argv with its --command=STRING value split the way the remote shell splits it."""
  return [
    ["--command", shlex.split(a[len("--command=") :])] if a.startswith("--command=") else a
    for a in argv
  ]


def test_tpu_pod_dry_run(env, tmp_path):
  result = run(
    "tpu_pod.sh",
    "--dry-run",
    *TPU_ARGS,
    f"--config={CONFIG}",
    "--workdir=gs://bucket/run",
    *TRICKY,
    env=env,
  )
  assert result.returncode == 0, result.stderr
  tarball = f"{tmp_path}/dpjax-dp-test.tar.gz"
  gcloud = ["gcloud", "compute", "tpus", "tpu-vm"]
  install, main = _tpu_remote_commands(extra=TRICKY)
  assert [_parse_tpu_line(argv) for argv in lines(result.stdout)] == [
    ["tar", "-czf", tarball, *[f"--exclude={p}" for p in TAR_EXCLUDES], "-C", str(ROOT), "."],
    [
      *gcloud,
      "create",
      "dp-test",
      "--accelerator-type=v4-32",
      "--version=tpu-ubuntu2204-base",
      *GCLOUD_TAIL,
    ],
    [*gcloud, "scp", tarball, "dp-test:dpjax.tar.gz", "--worker=all", *GCLOUD_TAIL],
    [*gcloud, "ssh", "dp-test", "--worker=all", ["--command", install], *GCLOUD_TAIL],
    [*gcloud, "ssh", "dp-test", "--worker=all", ["--command", main], *GCLOUD_TAIL],
    [*gcloud, "delete", "dp-test", *GCLOUD_TAIL],
    ["rm", "-f", tarball],
  ]
  assert not Path(tarball).exists()


def test_tpu_pod_dry_run_keep_and_python(env, tmp_path):
  env["PYTHON"] = "python3.11"
  result = run(
    "tpu_pod.sh",
    "--dry-run",
    "--keep",
    "--tpu_name=dp-test",
    "--zone=z",
    "--accelerator_type=v4-8",
    f"--config={CONFIG}",
    "--workdir=gs://bucket/run",
    env=env,
  )
  out = result.stdout.splitlines()
  assert not any(line.startswith("gcloud compute tpus tpu-vm delete") for line in out)
  assert out[-2].startswith(
    "# --keep: the TPU VM is kept; delete it with: gcloud compute tpus tpu-vm delete dp-test"
  )
  assert _parse_tpu_line(shlex.split(out[4]))[7] == [
    "--command",
    _tpu_remote_commands("python3.11")[1],
  ]


@pytest.mark.parametrize(
  "accelerator_type, version",
  [
    ("v4-32", "tpu-ubuntu2204-base"),
    ("v3-8", "tpu-ubuntu2204-base"),
    ("v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v5p-8", "v2-alpha-tpuv5"),
    ("v6e-8", "v2-alpha-tpuv6e"),
  ],
)
def test_tpu_pod_runtime_version(accelerator_type, version, env):
  args = [
    "--dry-run",
    "--tpu_name=t",
    "--zone=z",
    f"--accelerator_type={accelerator_type}",
    f"--config={CONFIG}",
    "--workdir=gs://b/r",
  ]
  assert f"--version={version}" in lines(run("tpu_pod.sh", *args, env=env).stdout)[1]
  assert (
    "--version=custom"
    in lines(run("tpu_pod.sh", *args, "--runtime_version=custom", env=env).stdout)[1]
  )


def test_tpu_pod_rejects_a_config_outside_the_repository(env, tmp_path):
  (tmp_path / "outside.py").write_text("")
  result = run(
    "tpu_pod.sh",
    "--dry-run",
    *TPU_ARGS,
    f"--config={tmp_path}/outside.py",
    "--workdir=gs://b/r",
    env=env,
  )
  _usage_error(result, "tpu_pod.sh", "must be inside the repository")


def _run_tpu_with_fake_gcloud(env, tmp_path, *args, fail=None):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  _write_executable(bin_dir / "gcloud", FAKE_TOOL)
  env = dict(env, PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", FAKE_LOG=str(tmp_path / "gcloud.log"))
  if fail:
    env["FAKE_FAIL"] = fail
  result = run(
    "tpu_pod.sh", *TPU_ARGS, f"--config={CONFIG}", "--workdir=gs://bucket/run", *args, env=env
  )
  log = tmp_path / "gcloud.log"
  calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
  assert not (tmp_path / "dpjax-dp-test.tar.gz").exists()  # removed on every exit
  return result, calls


def _verbs(calls):
  return [
    c["argv"][3] + (":main" if any("dpjax.main" in a for a in c["argv"]) else "") for c in calls
  ]


def test_tpu_pod_flow(env, tmp_path):
  result, calls = _run_tpu_with_fake_gcloud(env, tmp_path, *TRICKY)
  assert result.returncode == 0, result.stderr
  assert _verbs(calls) == ["create", "scp", "ssh", "ssh:main", "delete"]
  install, main = _tpu_remote_commands(extra=TRICKY)
  assert _parse_tpu_line(calls[2]["argv"])[6] == ["--command", install]
  assert _parse_tpu_line(calls[3]["argv"])[6] == ["--command", main]
  members = set(calls[1]["members"])
  assert {"./dpjax/__init__.py", "./launch/tpu_pod.sh", "./setup.cfg"} <= members
  assert not any(m.startswith(("./.venv", "./.git/")) or "__pycache__" in m for m in members)


def test_tpu_pod_deletes_the_vm_when_the_run_fails(env, tmp_path):
  result, calls = _run_tpu_with_fake_gcloud(env, tmp_path, fail="dpjax.main")
  assert result.returncode == 5
  assert _verbs(calls) == ["create", "scp", "ssh", "ssh:main", "delete"]
  assert "deleting TPU VM dp-test" in result.stderr


def test_tpu_pod_keep(env, tmp_path):
  result, calls = _run_tpu_with_fake_gcloud(env, tmp_path, "--keep")
  assert result.returncode == 0, result.stderr
  assert _verbs(calls) == ["create", "scp", "ssh", "ssh:main"]
  assert "kept (--keep)" in result.stderr


def test_tpu_pod_does_not_delete_a_vm_it_did_not_create(env, tmp_path):
  result, calls = _run_tpu_with_fake_gcloud(env, tmp_path, fail="create")
  assert result.returncode == 5
  assert _verbs(calls) == ["create"]


def test_tpu_pod_reports_a_failed_delete(env, tmp_path):
  result, calls = _run_tpu_with_fake_gcloud(env, tmp_path, fail="delete")
  assert result.returncode == 1
  assert _verbs(calls) == ["create", "scp", "ssh", "ssh:main", "delete"]
  assert "could not delete TPU VM dp-test" in result.stderr
