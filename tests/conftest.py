"""Session-wide tiny models: built once with the PyTorch oracles, saved in diffusers layout."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# One persistent XLA compilation cache per test session, set before JAX is imported so the
# subprocesses that tests start share it too: the tiny programs recur across tests (same HLO,
# same XLA flags, both part of the cache key), and each is compiled once. On the 2-core CI
# box the suite took 17.8 and 20.8 min in two fresh runs, against 22.1 min before. The folder
# goes when the session ends.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _xla_cache = tempfile.mkdtemp(prefix="dag_jax_test_xla_cache_")
    atexit.register(shutil.rmtree, _xla_cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _xla_cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")


def descendants(pid: int) -> list[int]:
    """Return the pids of every process below ``pid`` (children first), read from /proc."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], list(parents.get(pid, []))
    while todo:
        child = todo.pop()
        out.append(child)
        todo += parents.get(child, [])
    return out


def stop_descendants(pid: int, grace: float = 5.0) -> list[int]:
    """Send SIGTERM to every process below ``pid``, SIGKILL to those still there after
    ``grace`` seconds; return the pids signalled."""
    pids = descendants(pid)
    for child in pids:
        try:
            os.kill(child, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    left = pids
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [p for p in left if running(p)]
    for child in left:
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


def running(pid: int) -> bool:
    """Return whether ``pid`` runs (a zombie, waiting for its parent to reap it, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def stop_on_signal(signum, frame):
    """End the session on SIGTERM (a CI timeout) or SIGHUP: its subprocesses first, then the
    atexit clean-up (the compile cache) through SystemExit."""
    stop_descendants(os.getpid())
    raise SystemExit(128 + signum)


if Path("/proc").is_dir():
    signal.signal(signal.SIGTERM, stop_on_signal)
    signal.signal(signal.SIGHUP, stop_on_signal)

from dag_jax.infra import cpu_tuning  # noqa: E402
from tests import tiny_world  # noqa: E402

# Tests compute on the CPU with the CLIs' --cpu_tuning settings, applied here explicitly (the
# library never does): XLA:CPU flags (set before any test creates a backend; subprocesses
# inherit them) and freed host memory reused between jitted runs.
cpu_tuning.apply()


@pytest.fixture(scope="session")
def torch_sd1(tmp_path_factory):
    """Return (diffusers pipeline, its saved folder) for the tiny SD1-style model."""
    root = tmp_path_factory.mktemp("sd1")
    pipe = tiny_world.build_torch_pipeline(root, tiny_world.SD1_UNET)
    return pipe, tiny_world.save_torch_pipeline(pipe, root / "model")


@pytest.fixture(scope="session")
def torch_sd2(tmp_path_factory):
    """Return (diffusers pipeline, its saved folder) for the tiny SD2-style model."""
    root = tmp_path_factory.mktemp("sd2")
    pipe = tiny_world.build_torch_pipeline(root, tiny_world.SD2_UNET, seed=5)
    return pipe, tiny_world.save_torch_pipeline(pipe, root / "model")


@pytest.fixture(scope="session")
def sd1(torch_sd1):
    """Return the tiny SD1 model loaded through dag_jax.load_pipeline."""
    import dag_jax

    return dag_jax.load_pipeline(torch_sd1[1])


def pytest_sessionfinish(session, exitstatus):
    """Stop the subprocesses a test left running (a failed test's server, a leaked Popen), so
    none outlives the session. Under pytest-xdist each worker stops its own; the controller's
    children are the workers themselves, which end on their own."""
    controller = not hasattr(session.config, "workerinput") and bool(
        session.config.getoption("numprocesses", None)
    )
    if Path("/proc").is_dir() and not controller:
        stop_descendants(os.getpid())


def pytest_configure(config):
    """Register the ``slow`` marker (long end-to-end checks; CI runs them) unless registered."""
    if not any(line.split(":")[0].strip() == "slow" for line in config.getini("markers")):
        config.addinivalue_line("markers", "slow: a long end-to-end check (CI runs it)")
