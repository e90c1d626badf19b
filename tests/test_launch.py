"""The launch/ scripts print (dry run) and run (against fake gcloud/srun/sbatch/python) the
right training commands, quote forwarded flags safely, and refuse to start without
--config or --workdir."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = ["tpu_pod.sh", "slurm_gpu.sbatch", "slurm_gpu.sh", "local.sh"]
# spaces, a single quote, $, ; and a glob: survives only if every shell level quotes it
NASTY = "--config.prompt=it's a red $HOME; cat *"
SPACED = "--config.prompt=a red cat"
BATCH = "--config.train.batch_size=64"
# variables the scripts read; the tests start from an environment without them
_READ = ("JAX_", "XLA_", "SLURM_", "SRUN_", "DAG_JAX_")
_READ_EXACT = {"PYTHON", "DRY_RUN", "GPUS_PER_NODE", "REPO_DIR", "TPU_NAME", "ZONE", "GCLOUD"}
_READ_EXACT |= {"SBATCH", "TPU_PIP_PACKAGES", "SETUP_PYTHON"}


def _env(**extra: str) -> dict[str, str]:
    """Return os.environ without anything the launchers read, plus extra."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_READ) and k not in _READ_EXACT}
    env.update(extra)
    return env


def _launch(script: str, *args: str, env: dict[str, str] | None = None, cwd: Path = ROOT):
    """Return the finished `bash launch/<script> args` run."""
    return subprocess.run(
        ["bash", str(LAUNCH / script), *args],
        capture_output=True,
        text=True,
        env=_env() if env is None else env,
        cwd=cwd,
        timeout=60,
    )


def _commands(stdout: str) -> list[list[str]]:
    """Return the printed command lines (comments skipped), each split as the shell would."""
    lines = [ln for ln in stdout.splitlines() if ln.strip() and not ln.startswith("#")]
    return [shlex.split(ln) for ln in lines]


def _train_args(argv: list[str]) -> list[str]:
    """Return the arguments after `-m dag_jax.train` in argv."""
    i = argv.index("dag_jax.train")
    assert argv[i - 1] == "-m"
    return argv[i + 1 :]


def _env_prefix(argv: list[str]) -> dict[str, str]:
    """Return the KEY=VALUE assignments of an `env K=V ... cmd` argv."""
    assert argv[0] == "env", argv
    out = {}
    for word in argv[1:]:
        key, eq, value = word.partition("=")
        if not eq or not key.replace("_", "").isalnum():
            break
        out[key] = value
    return out


def _write_exe(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


FAKE_PYTHON = r"""#!/usr/bin/env bash
# stands in for the trainer: records argv, environment and cwd under $REC
printf '%s\0' "$@" > "$REC/argv"
env -0 > "$REC/env"
pwd > "$REC/cwd"
echo "fake trainer running"
if [[ -n ${FAKE_WAIT:-} ]]; then
  trap 'echo term > "$REC/term"; exit 0' TERM
  for _ in $(seq 300); do sleep 0.1; done
fi
"""


@pytest.fixture
def fakes(tmp_path):
    """Return (bin dir with a fake `python` and `hostname`, record dir, environment)."""
    bin_dir = tmp_path / "bin"
    rec = tmp_path / "rec"
    bin_dir.mkdir()
    rec.mkdir()
    _write_exe(bin_dir / "python", FAKE_PYTHON)
    _write_exe(bin_dir / "hostname", "#!/bin/sh\necho tpu-worker-0\n")
    env = _env(PATH=f"{bin_dir}:{os.environ['PATH']}", REC=str(rec))
    return bin_dir, rec, env


def _recorded(rec: Path) -> tuple[list[str], dict[str, str], str]:
    """Return the fake trainer's argv (after -m dag_jax.train), environment and cwd."""
    argv = rec.joinpath("argv").read_text().split("\0")[:-1]
    env = dict(kv.partition("=")[::2] for kv in rec.joinpath("env").read_text().split("\0") if kv)
    assert argv[:2] == ["-m", "dag_jax.train"], argv
    return argv[2:], env, rec.joinpath("cwd").read_text().strip()


# ---------------------------------------------------------------- all scripts


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_parses_with_bash_n(script):
    res = subprocess.run(["bash", "-n", str(LAUNCH / script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_scripts_pass_shellcheck():
    res = subprocess.run(
        ["shellcheck", "--shell=bash", *(str(LAUNCH / s) for s in SCRIPTS)],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_documents_usage(script):
    res = _launch(script, "--help")
    assert res.returncode == 0, res.stderr
    for piece in ("Usage", "--config", "--workdir", "--dry-run", "PYTHON"):
        assert piece in res.stdout, piece


_REQUIRED = {
    "tpu_pod.sh": ["--tpu=my-tpu", "--zone=us-central2-b"],
    "slurm_gpu.sbatch": [],
    "slurm_gpu.sh": [],
    "local.sh": [],
}


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("missing", ["--config", "--workdir"])
def test_missing_config_or_workdir_fails_clearly(script, missing):
    given = {"--config": "--config=configs/x.py", "--workdir": "--workdir=gs://b/w"}
    del given[missing]
    res = _launch(script, *_REQUIRED[script], *given.values(), BATCH, "--dry-run")
    assert res.returncode != 0
    assert f"missing {missing}=" in res.stderr
    assert "dag_jax.train" not in res.stdout


# ---------------------------------------------------------------- local.sh


def test_local_dry_run_prints_the_train_command():
    res = _launch(
        "local.sh",
        "--config=configs/x.py:tiny",
        "--workdir=/tmp/w",
        SPACED,
        NASTY,
        BATCH,
        "--dry-run",
    )
    assert res.returncode == 0, res.stderr
    assert f"'{SPACED}'" in res.stdout  # shown quoted, copy-pasteable
    (argv,) = _commands(res.stdout)
    assert _train_args(argv) == [
        "--config=configs/x.py:tiny",
        "--workdir=/tmp/w",
        SPACED,
        NASTY,
        BATCH,
    ]
    env = _env_prefix(argv)
    assert env["JAX_COMPILATION_CACHE_DIR"] == "/tmp/w/jax_cache"
    assert env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] == "1"
    assert "JAX_PLATFORMS" not in env and "XLA_FLAGS" not in env
    assert argv[argv.index("-m") - 1] == "python"


def test_local_devices_sets_virtual_cpu_devices():
    env = _env(XLA_FLAGS="--xla_dump_to=/tmp/dump", DRY_RUN="1")
    res = _launch("local.sh", "--config=c.py", "--workdir=w", "--devices=8", env=env)
    assert res.returncode == 0, res.stderr
    assert "XLA_FLAGS" in res.stdout
    (argv,) = _commands(res.stdout)
    got = _env_prefix(argv)
    assert got["XLA_FLAGS"] == "--xla_dump_to=/tmp/dump --xla_force_host_platform_device_count=8"
    assert got["JAX_PLATFORMS"] == "cpu"


def test_local_cpu_cache_dir_and_python_options():
    env = _env(PYTHON="/opt/venv/bin/python")
    res = _launch(
        "local.sh",
        "--cpu",
        "--config",
        "c.py",
        "--workdir",
        "w",
        "--cache-dir=/c",
        "--dry-run",
        env=env,
    )
    (argv,) = _commands(res.stdout)
    assert _env_prefix(argv) == {
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": "/c",
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "1",
    }
    assert argv[argv.index("-m") - 1] == "/opt/venv/bin/python"
    res = _launch("local.sh", "--config=c.py", "--workdir=w", "--no-cache", "--dry-run")
    assert "JAX_COMPILATION_CACHE_DIR" not in res.stdout


def test_local_rejects_a_bad_device_count():
    res = _launch("local.sh", "--config=c.py", "--workdir=w", "--devices=eight", "--dry-run")
    assert res.returncode != 0 and "--devices" in res.stderr


def test_local_runs_exactly_what_the_dry_run_prints(fakes, tmp_path):
    _, rec, env = fakes
    args = ["--config=configs/x.py", f"--workdir={tmp_path}/w", "--devices=2", NASTY, BATCH]
    res = _launch("local.sh", *args, env=env)
    assert res.returncode == 0, res.stderr
    assert "fake trainer running" in res.stdout
    argv, got, _ = _recorded(rec)
    assert argv == [*args[:2], NASTY, BATCH]
    assert got["JAX_PLATFORMS"] == "cpu"
    assert got["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"
    assert got["JAX_COMPILATION_CACHE_DIR"] == f"{tmp_path}/w/jax_cache"
    # the printed line, run by bash, gives the trainer the same argv
    shown = _launch("local.sh", *args, "--dry-run", env=env).stdout
    rec.joinpath("argv").unlink()
    subprocess.run(["bash", "-c", shown], env=env, check=True, capture_output=True)
    assert _recorded(rec)[0] == argv


# ---------------------------------------------------------------- slurm_gpu.sbatch / .sh


def test_sbatch_dry_run_prints_the_srun_command():
    env = _env(DRY_RUN="1")
    res = _launch(
        "slurm_gpu.sbatch", "--config=configs/x.py", "--workdir=/shared/w", SPACED, BATCH, env=env
    )
    assert res.returncode == 0, res.stderr
    assert "2 node(s) x 8 GPU(s)" in res.stdout  # from the file's #SBATCH directives
    cd, argv = _commands(res.stdout)
    assert cd == ["cd", str(ROOT)]
    assert "srun" in argv and "--ntasks-per-node=1" in argv
    assert argv.index("srun") < argv.index("dag_jax.train")
    assert _train_args(argv) == ["--config=configs/x.py", "--workdir=/shared/w", SPACED, BATCH]
    got = _env_prefix(argv)
    assert got["JAX_COMPILATION_CACHE_DIR"] == "/shared/w/jax_cache"
    assert got["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] == "1"
    assert got["JAX_LOCAL_DEVICE_IDS"] == "0,1,2,3,4,5,6,7"
    # --dry-run as a flag does the same
    flag = _launch(
        "slurm_gpu.sbatch",
        "--config=configs/x.py",
        "--workdir=/shared/w",
        SPACED,
        BATCH,
        "--dry-run",
    )
    assert flag.stdout == res.stdout


def test_sbatch_refuses_to_run_outside_a_slurm_job():
    res = _launch("slurm_gpu.sbatch", "--config=c.py", "--workdir=/w")
    assert res.returncode != 0
    assert "not inside a Slurm job" in res.stderr


def test_sbatch_in_a_job_runs_srun_with_all_gpus(fakes, tmp_path):
    bin_dir, rec, env = fakes
    # fake srun: drop its own options, run the command once (as task 0 would)
    _write_exe(
        bin_dir / "srun",
        '#!/usr/bin/env bash\nwhile [[ $1 == -* ]]; do shift; done\nexec "$@"\n',
    )
    submit = tmp_path / "submit"
    submit.mkdir()
    env.update(
        SLURM_JOB_ID="42",
        SLURM_GPUS_ON_NODE="4",
        SLURM_JOB_NUM_NODES="3",
        SLURM_SUBMIT_DIR=str(submit),
    )
    res = _launch(
        "slurm_gpu.sbatch",
        "--config=configs/x.py",
        "--workdir=/shared/w",
        "--",
        NASTY,
        env=env,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    assert "3 node(s) x 4 GPU(s)" in res.stdout
    argv, got, cwd = _recorded(rec)
    assert argv == ["--config=configs/x.py", "--workdir=/shared/w", NASTY]
    assert got["JAX_LOCAL_DEVICE_IDS"] == "0,1,2,3"
    assert got["JAX_COMPILATION_CACHE_DIR"] == "/shared/w/jax_cache"
    assert cwd == str(submit)


def test_slurm_wrapper_dry_run_prints_sbatch_and_srun():
    res = _launch(
        "slurm_gpu.sh",
        "--nodes=4",
        "--gpus-per-node=2",
        "--time=01:00:00",
        "--sbatch-arg=--qos=high",
        "--config=configs/x.py",
        "--workdir=/shared/w",
        SPACED,
        "--dry-run",
    )
    assert res.returncode == 0, res.stderr
    assert "4 node(s) x 2 GPU(s)" in res.stdout
    sbatch, cd, srun = _commands(res.stdout)
    script = str(LAUNCH / "slurm_gpu.sbatch")
    assert sbatch == [
        "sbatch",
        "--nodes=4",
        "--gpus-per-node=2",
        "--time=01:00:00",
        "--qos=high",
        script,
        "--config=configs/x.py",
        "--workdir=/shared/w",
        "--",
        SPACED,
    ]
    assert cd[0] == "cd"
    assert "srun" in srun
    assert _env_prefix(srun)["JAX_LOCAL_DEVICE_IDS"] == "0,1"
    assert _train_args(srun) == ["--config=configs/x.py", "--workdir=/shared/w", SPACED]


def test_slurm_wrapper_submits_with_sbatch(fakes, tmp_path):
    bin_dir, rec, env = fakes
    _write_exe(
        bin_dir / "sbatch",
        '#!/usr/bin/env bash\nprintf "%s\\0" "$@" > "$REC/sbatch"\n'
        'echo "$GPUS_PER_NODE" > "$REC/gpus"\necho "Submitted batch job 7"\n',
    )
    res = _launch(
        "slurm_gpu.sh", "--gpus-per-node=4", "--config=c.py", "--workdir=/w", NASTY, env=env
    )
    assert res.returncode == 0, res.stderr
    assert "Submitted batch job 7" in res.stdout
    argv = rec.joinpath("sbatch").read_text().split("\0")[:-1]
    assert argv == [
        "--gpus-per-node=4",
        str(LAUNCH / "slurm_gpu.sbatch"),
        "--config=c.py",
        "--workdir=/w",
        "--",
        NASTY,
    ]
    assert rec.joinpath("gpus").read_text().strip() == "4"


# ---------------------------------------------------------------- tpu_pod.sh

TPU_ARGS = ["--tpu=my-tpu", "--zone=us-central2-b", "--project=proj"]


def _ssh_script(argv: list[str]) -> str:
    """Return the remote script of a `gcloud compute tpus tpu-vm ssh` argv (checked)."""
    assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu"], argv
    assert "--worker=all" in argv
    assert "--zone=us-central2-b" in argv and "--project=proj" in argv
    (cmd,) = [a for a in argv if a.startswith("--command=")]
    script = cmd.removeprefix("--command=")
    subprocess.run(["bash", "-n", "-c", script], check=True)
    return script


def test_tpu_dry_run_prints_one_ssh_to_all_workers():
    res = _launch(
        "tpu_pod.sh",
        *TPU_ARGS,
        "--config=configs/imagereward.py",
        "--workdir=gs://b/runs/x",
        SPACED,
        NASTY,
        BATCH,
        "--env=HF_HOME=/data/hf",
        "--dry-run",
    )
    assert res.returncode == 0, res.stderr
    (argv,) = _commands(res.stdout)
    script = _ssh_script(argv)
    assert "python -m dag_jax.train" in script
    assert "JAX_COMPILATION_CACHE_DIR=gs://b/runs/x/jax_cache" in script
    assert "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=1" in script
    assert "DAG_JAX_DISTRIBUTED=1 HF_HOME=/data/hf" in script
    assert "tee ~/dag_jax_logs/train-$(hostname).log" in script
    assert r"--config.prompt=a\ red\ cat" in script  # printf %q for the remote shell
    # what the remote shell will hand the trainer: split the script as bash would
    words = shlex.split(script.split(" ) 2>&1 | tee ")[0])
    assert _train_args(words) == [
        "--config=configs/imagereward.py",
        "--workdir=gs://b/runs/x",
        SPACED,
        NASTY,
        BATCH,
    ]


def test_tpu_setup_copies_the_tree_and_installs_on_all_workers():
    res = _launch(
        "tpu_pod.sh", *TPU_ARGS, "--config=c.py", "--workdir=gs://b/w", "--setup", "--dry-run"
    )
    assert res.returncode == 0, res.stderr
    tar, scp, setup, train = _commands(res.stdout)
    assert tar[0] == "tar" and "--exclude=.git" in tar and tar[-1] == "."
    tarball = tar[tar.index("-czf") + 1]
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
    assert scp[5:7] == [tarball, "my-tpu:/tmp/dag_jax_src.tar.gz"] and "--worker=all" in scp
    script = _ssh_script(setup)
    assert "tar -xzf /tmp/dag_jax_src.tar.gz -C ~/dag_jax" in script
    assert r"pip install -q -e . jax\[tpu\]" in script
    assert "dag_jax.train" in _ssh_script(train)


def test_tpu_setup_only_from_git_needs_no_config():
    res = _launch(
        "tpu_pod.sh",
        *TPU_ARGS,
        "--setup-only",
        "--git=https://example.com/dag_jax.git",
        "--ref=v1",
        "--dry-run",
    )
    assert res.returncode == 0, res.stderr
    (setup,) = _commands(res.stdout)
    script = _ssh_script(setup)
    assert "git clone -q https://example.com/dag_jax.git ~/dag_jax" in script
    assert "fetch -q https://example.com/dag_jax.git v1" in script
    assert "dag_jax.train" not in script


def test_tpu_needs_gcloud_and_a_tpu_name():
    res = _launch("tpu_pod.sh", "--config=c.py", "--workdir=gs://b/w", "--dry-run")
    assert res.returncode != 0 and "missing --tpu" in res.stderr
    env = _env(GCLOUD="no-such-gcloud-here")
    res = _launch("tpu_pod.sh", *TPU_ARGS, "--config=c.py", "--workdir=gs://b/w", env=env)
    assert res.returncode != 0 and "not found" in res.stderr


def _fake_gcloud(bin_dir: Path, tmp_path: Path) -> Path:
    """Install a fake gcloud that records calls and runs ssh commands here, as worker 0."""
    calls = tmp_path / "calls"
    calls.mkdir()
    _write_exe(
        bin_dir / "gcloud",
        "#!/usr/bin/env bash\n"
        f'printf "%s\\0" "$@" > "{calls}/$(ls "{calls}" | wc -l)"\n'
        "if [[ $4 == ssh ]]; then\n"
        '  for a in "$@"; do [[ $a != --command=* ]] || exec bash -c "${a#--command=}"; done\n'
        "fi\n",
    )
    return calls


def test_tpu_runs_the_quoted_command_on_a_worker(fakes, tmp_path):
    bin_dir, rec, env = fakes
    _fake_gcloud(bin_dir, tmp_path)
    home = tmp_path / "home"
    (home / "dag_jax").mkdir(parents=True)
    env["HOME"] = str(home)
    res = _launch(
        "tpu_pod.sh",
        *TPU_ARGS,
        "--config=configs/x.py",
        "--workdir=gs://b/w",
        NASTY,
        BATCH,
        "--env=EXTRA=a b",
        env=env,
    )
    assert res.returncode == 0, res.stderr
    argv, got, cwd = _recorded(rec)
    assert argv == ["--config=configs/x.py", "--workdir=gs://b/w", NASTY, BATCH]
    assert got["JAX_COMPILATION_CACHE_DIR"] == "gs://b/w/jax_cache"
    assert got["DAG_JAX_DISTRIBUTED"] == "1" and got["EXTRA"] == "a b"
    assert cwd == str(home / "dag_jax")
    log = home / "dag_jax_logs" / "train-tpu-worker-0.log"
    assert "fake trainer running" in log.read_text()
    assert (home / "dag_jax_logs" / "train.pid").exists()


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="--stop reads /proc")
def test_tpu_detach_then_stop_sends_sigterm(fakes, tmp_path):
    bin_dir, rec, env = fakes
    _fake_gcloud(bin_dir, tmp_path)
    home = tmp_path / "home"
    (home / "dag_jax").mkdir(parents=True)
    env.update(HOME=str(home), FAKE_WAIT="1")
    args = [*TPU_ARGS, "--config=c.py", "--workdir=gs://b/w", "--detach"]
    start = time.monotonic()
    res = _launch("tpu_pod.sh", *args, env=env)
    assert res.returncode == 0, res.stderr
    assert "tpu-worker-0: started" in res.stdout
    assert time.monotonic() - start < 10  # returned without waiting for the trainer
    pid_file = home / "dag_jax_logs" / "train.pid"
    pid = None
    try:
        for _ in range(100):
            if rec.joinpath("argv").exists() and pid_file.exists():
                break
            time.sleep(0.05)
        pid = int(pid_file.read_text())
        res = _launch("tpu_pod.sh", *TPU_ARGS, "--stop", env=env)
        assert res.returncode == 0, res.stderr
        assert f"sent SIGTERM to {pid}" in res.stdout
        for _ in range(100):
            if rec.joinpath("term").exists():
                break
            time.sleep(0.05)
        assert rec.joinpath("term").exists()
    finally:  # never leave the fake trainer behind
        if pid is not None and not rec.joinpath("term").exists():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
