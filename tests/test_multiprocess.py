"""Two JAX processes × 4 CPU devices (jax.distributed on 127.0.0.1) train like one × 8.

Each process samples and scores only its own rows: a host reward sees half of them, and only
per-row scalars are gathered. SIGTERM to one process stops both at the same update window,
and the resumed run ends where an uninterrupted one does.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

DRIVER = textwrap.dedent(
    """
    import json, os, signal, sys
    pid, nproc, port, workdir, log = sys.argv[1:6]
    pid, nproc = int(pid), int(nproc)
    from dag_jax.infra import parallel
    if nproc > 1:
        parallel.initialize_distributed(f"127.0.0.1:{port}", nproc, pid)
    from dag_jax import rewards, train
    from dag_jax.train import update
    from tests.test_train import tiny_config

    rewards.register("counting_for_tests", "tests.test_multiprocess:counting_reward")
    cfg = tiny_config(algo="ddpo", train__epochs=2, reward__name="counting_for_tests")
    real, windows = update.update_window, []

    def window(ctx, state, data, rows, beta):
        windows.append([state.epoch, state.updates])
        if os.environ.get("SIGTERM_AT") == f"{pid}:{state.epoch}:{len(windows)}":
            os.kill(os.getpid(), signal.SIGTERM)
        return real(ctx, state, data, rows, beta)

    update.update_window = window
    try:
        state = train.train_and_evaluate(cfg, workdir)
        result = {"epoch": state.epoch, "preempted": False}
    except train.Preempted as err:
        result = {"epoch": err.epoch, "preempted": True}
    result["windows"] = windows
    if not result["preempted"]:
        import jax
        from flax import traverse_util

        flat = traverse_util.flatten_dict(jax.device_get(state.trainable))
        result["lora"] = {"/".join(k): v.tolist() for k, v in flat.items()}
    json.dump(result, open(log, "w"))
    """
)


def counting_reward():
    """A host reward (JPEG size) that appends the number of images of each call to a file."""
    from dag_jax import rewards
    from dag_jax.rewards.jpeg import jpeg_size_kb

    def score(images, prompts):
        path = Path(os.environ["COUNT_DIR"]) / f"{os.getpid()}.txt"
        with path.open("a") as f:
            f.write(f"{len(images)}\n")
        return -np.array([jpeg_size_kb(im) for im in images], np.float32)

    return rewards.host_reward("counting", score)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(tmp_path: Path, name: str, nproc: int, devices: int, **env) -> list[dict]:
    """Run the driver in ``nproc`` processes of ``devices`` CPU devices; return their logs."""
    port, counts = free_port(), tmp_path / f"counts_{name}"
    counts.mkdir(exist_ok=True)
    base = dict(os.environ, JAX_PLATFORMS="cpu", COUNT_DIR=str(counts), PYTHONPATH=str(ROOT))
    base["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    base.update(env)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", DRIVER, str(i), str(nproc), str(port)]
            + [str(tmp_path / "workdir" / name), str(tmp_path / f"{name}_{i}.json")],
            cwd=ROOT,
            env=base,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(nproc)
    ]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
    return [json.loads((tmp_path / f"{name}_{i}.json").read_text()) for i in range(nproc)]


def metrics(tmp_path: Path, name: str) -> list[dict]:
    path = tmp_path / "workdir" / name / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def call_sizes(tmp_path: Path, name: str) -> list[list[int]]:
    files = sorted((tmp_path / f"counts_{name}").glob("*.txt"))
    return [[int(x) for x in f.read_text().split()] for f in files]


@pytest.mark.slow
def test_two_processes_train_like_one_and_agree_on_preemption(tmp_path):
    one = run(tmp_path, "one", 1, 8)[0]
    two = run(tmp_path, "two", 2, 4)
    for a, b in zip(metrics(tmp_path, "one"), metrics(tmp_path, "two"), strict=True):
        assert a["reward_mean"] == b["reward_mean"] and a["reward_std"] == b["reward_std"]
        np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-5)
    # one process scored every row (8 per chunk); each of two processes scored its half
    assert call_sizes(tmp_path, "one") == [[8, 8]]
    assert call_sizes(tmp_path, "two") == [[4, 4], [4, 4]]
    # the layouts reduce in other orders: after 2 epochs of Adam, elements differ by up to
    # 1.3e-6 (measured, AMD EPYC); a real difference in data or gradients moves them by a
    # fraction of a step (lr 3e-4), far above 5e-6
    for name, tree in two[0]["lora"].items():
        np.testing.assert_allclose(tree, one["lora"][name], rtol=1e-4, atol=5e-6, err_msg=name)

    # SIGTERM to process 1 during the first window of epoch 1: both stop before the next one
    stopped = run(tmp_path, "resumed", 2, 4, SIGTERM_AT="1:1:3")
    assert [s["preempted"] for s in stopped] == [True, True]
    assert stopped[0]["windows"] == stopped[1]["windows"]
    assert stopped[0]["windows"][-1][0] == 1 and stopped[0]["epoch"] == 1
    assert [m["epoch"] for m in metrics(tmp_path, "resumed")] == [1]
    resumed = run(tmp_path, "resumed", 2, 4)
    assert resumed[0]["epoch"] == 2 and not resumed[0]["preempted"]
    for name, tree in resumed[0]["lora"].items():
        np.testing.assert_allclose(tree, two[0]["lora"][name], rtol=0, atol=0, err_msg=name)
    assert metrics(tmp_path, "resumed")[-1]["loss"] == metrics(tmp_path, "two")[-1]["loss"]
