"""The test session cleans up after itself, even when a CI timeout sends it SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

INNER = textwrap.dedent(
    """
    import os, subprocess, time
    from pathlib import Path

    def test_hangs_with_a_subprocess():
        out = Path(os.environ["CLEANUP_OUT"])
        child = subprocess.Popen(["sleep", "300"])
        (out / "child").write_text(str(child.pid))
        (out / "cache").write_text(os.environ["JAX_COMPILATION_CACHE_DIR"])
        time.sleep(300)
    """
)


def alive(pid: int) -> bool:
    """Return whether ``pid`` runs (a zombie counts as ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_sigterm_ends_the_session_its_subprocesses_and_its_compile_cache(tmp_path):
    (tmp_path / "test_inner.py").write_text(INNER)
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env["CLEANUP_OUT"] = str(tmp_path)
    session = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "--noconftest"]
        + ["-p", "no:cacheprovider", str(tmp_path / "test_inner.py")],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.time() + 240
        while not (tmp_path / "cache").exists() and time.time() < deadline:
            assert session.poll() is None, session.stdout.read().decode()[-2000:]
            time.sleep(0.5)
        child = int((tmp_path / "child").read_text())
        cache = Path((tmp_path / "cache").read_text())
        assert alive(child) and cache.is_dir()
        session.send_signal(signal.SIGTERM)
        assert session.wait(timeout=60) != 0
    finally:
        session.kill()
    time.sleep(1)
    assert not alive(child), "the session's subprocess outlived it"
    assert not cache.exists(), "the session's compile cache was left behind"


def test_leftover_subprocesses_are_stopped_even_when_they_ignore_sigterm():
    from tests.conftest import stop_descendants

    script = "trap '' TERM; sleep 300 & echo $!; wait"
    parent = subprocess.Popen(["sh", "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        assert alive(child)
        assert child in stop_descendants(parent.pid, grace=0.5)
        deadline = time.time() + 10
        while alive(child) and time.time() < deadline:
            time.sleep(0.05)
        assert not alive(child)
    finally:
        parent.kill()
        parent.wait()
