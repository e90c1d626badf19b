"""Session-wide tiny models: built once with the PyTorch oracles, saved in diffusers layout."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

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


def pytest_configure(config):
    """Register the ``slow`` marker (long end-to-end checks; CI runs them) unless registered."""
    if not any(line.split(":")[0].strip() == "slow" for line in config.getini("markers")):
        config.addinivalue_line("markers", "slow: a long end-to-end check (CI runs it)")
