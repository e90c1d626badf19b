"""dag_jax.infra.hostmem: glibc's thresholds are raised once, and the env var opts out."""

from __future__ import annotations

import ctypes.util
import os
import subprocess
import sys

import pytest

from dag_jax.infra import hostmem

HAS_GLIBC_MALLOPT = bool(ctypes.util.find_library("c")) and sys.platform.startswith("linux")


def _transparent_huge_pages_always() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[always]" in f.read()
    except OSError:
        return False


def _child(code: str, env_value: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != hostmem.ENV_VAR}
    if env_value is not None:
        env[hostmem.ENV_VAR] = env_value
    env["JAX_PLATFORMS"] = "cpu"
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


@pytest.mark.skipif(not HAS_GLIBC_MALLOPT, reason="needs glibc's mallopt")
def test_tune_for_cpu_applies_once_and_honours_the_opt_out():
    code = (
        "from dag_jax import hostmem\n"
        "before = hostmem.is_applied()\n"
        "first = hostmem.tune_for_cpu()\n"
        "print(before, first, hostmem.tune_for_cpu(), hostmem.is_applied())\n"
    )
    assert _child(code, None) == "False True True True"
    assert _child(code, "0") == "False False False False"


@pytest.mark.skipif(not HAS_GLIBC_MALLOPT, reason="needs glibc's mallopt")
@pytest.mark.parametrize("keep", [False, True])
def test_a_freed_large_block_is_reused_without_page_faults(keep):
    # Touch a 64 MiB block, free it, allocate and touch one again: by glibc's default the
    # second block is a fresh mmap that faults in every page again; with the thresholds raised
    # it is the same heap memory, already mapped.
    code = (
        "import ctypes, ctypes.util, resource\n"
        "from dag_jax import hostmem\n"
        "libc = ctypes.CDLL(ctypes.util.find_library('c'))\n"
        "libc.malloc.restype = ctypes.c_void_p\n"
        "libc.free.argtypes = [ctypes.c_void_p]\n"
        f"if {keep}: hostmem.keep_freed_host_memory()\n"
        "n = 64 << 20\n"
        "a = libc.malloc(n); ctypes.memset(a, 1, n); libc.free(a)\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "b = libc.malloc(n); ctypes.memset(b, 2, n); libc.free(b)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
    )
    if not keep and _transparent_huge_pages_always():
        pytest.skip("huge pages fault a fresh mapping in 2 MiB at a time")
    faults = int(_child(code, None))
    pages = (64 << 20) // 4096
    if keep:
        assert faults < pages // 20
    else:
        assert faults > pages // 2  # glibc's default: the block is mapped afresh


def test_allocator_names_a_preloaded_malloc_or_glibc(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text(
        "7f0-7f1 r-xp 00000000 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n"
        "7f2-7f3 rw-p 00000000 00:00 0 \n"
    )
    assert hostmem.allocator(str(maps)) == "glibc"
    with maps.open("a") as f:
        f.write("7f4-7f5 r-xp 00000000 08:01 2 /usr/lib/libtcmalloc_minimal.so.4.5.10\n")
    assert hostmem.allocator(str(maps)) == "tcmalloc"
    assert hostmem.allocator(str(tmp_path / "absent")) == "unknown"


def test_allocator_sees_the_malloc_of_a_real_process():
    code = "from dag_jax import hostmem\nprint(hostmem.allocator())\n"
    if not os.path.exists("/proc/self/maps"):
        pytest.skip("needs /proc/self/maps")
    assert _child(code, None) == (
        "tcmalloc" if "tcmalloc" in os.environ.get("LD_PRELOAD", "") else "glibc"
    )
    lib = ctypes.util.find_library("tcmalloc_minimal")
    if lib is None:
        pytest.skip("tcmalloc is not installed")
    env = {**os.environ, "LD_PRELOAD": lib, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "tcmalloc"


GLIBC_CPU = dict(malloc="glibc", library="libtcmalloc_minimal.so.4", cpu=True)


def test_preload_env_adds_tcmalloc_once_and_only_where_it_helps():
    env = hostmem.preload_env({"PATH": "/bin", "LD_PRELOAD": "libfoo.so"}, **GLIBC_CPU)
    assert env["LD_PRELOAD"] == "libtcmalloc_minimal.so.4 libfoo.so"  # the user's stay after
    assert env[hostmem.PRELOADED_ENV] == "libtcmalloc_minimal.so.4"
    assert env["PATH"] == "/bin"
    assert env[hostmem.LARGE_ALLOC_ENV[0]] == hostmem.LARGE_ALLOC_ENV[1]
    # the re-executed process (even where the preload did not take) never goes round again
    assert hostmem.preload_env(env, **GLIBC_CPU) is None
    assert hostmem.preload_env({hostmem.PRELOAD_ENV: "0"}, **GLIBC_CPU) is None
    assert hostmem.preload_env({}, **{**GLIBC_CPU, "malloc": "jemalloc"}) is None
    assert hostmem.preload_env({}, **{**GLIBC_CPU, "library": None}) is None
    assert hostmem.preload_env({}, **{**GLIBC_CPU, "cpu": False}) is None
    user = {hostmem.LARGE_ALLOC_ENV[0]: "123"}
    assert hostmem.preload_env(user, **GLIBC_CPU)[hostmem.LARGE_ALLOC_ENV[0]] == "123"


def test_cpu_only_follows_jax_platforms_then_the_installed_plugins(monkeypatch):
    assert hostmem.cpu_only({"JAX_PLATFORMS": "cpu"})
    assert hostmem.cpu_only({"JAX_PLATFORMS": " CPU ,cuda"})
    assert not hostmem.cpu_only({"JAX_PLATFORMS": "cuda,cpu"})
    assert not hostmem.cpu_only({"JAX_PLATFORMS": "tpu"})
    monkeypatch.setattr(hostmem, "accelerator_plugins", lambda: ["jax-cuda12-plugin"])
    assert not hostmem.cpu_only({})
    monkeypatch.setattr(hostmem, "accelerator_plugins", lambda: [])
    assert hostmem.cpu_only({"JAX_PLATFORMS": ""})


def test_accelerator_plugins_lists_only_accelerator_distributions():
    plugins = hostmem.accelerator_plugins()
    assert all(p.startswith(hostmem.ACCELERATOR_DISTS) for p in plugins)
    assert "jax" not in plugins and "jaxlib" not in plugins


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc/self/maps")
def test_preload_tcmalloc_re_executes_the_command_once_under_the_library():
    # A real re-execution, with libm standing in for tcmalloc (any library the loader finds
    # does; tcmalloc itself need not be installed): the child runs the same command line
    # again, with the library preloaded and the marker set, and does not go round again.
    libm = ctypes.util.find_library("m")
    if libm is None:
        pytest.skip("no libm to preload")
    code = (
        "import os, sys\n"
        "from dag_jax import hostmem\n"
        f"hostmem.find_tcmalloc = lambda: {libm!r}\n"
        "print('run', os.environ.get(hostmem.PRELOADED_ENV, '-'), sys.argv[1:], flush=True)\n"
        "hostmem.preload_tcmalloc()\n"
        "print('done', os.environ.get('LD_PRELOAD', '-'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", hostmem.PRELOADED_ENV)}
    env.update(JAX_PLATFORMS="cpu", **{hostmem.PRELOAD_ENV: "1"})
    done = subprocess.run(
        [sys.executable, "-c", code, "--flag=1"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "run - ['--flag=1']",
        f"run {libm} ['--flag=1']",
        f"done {libm}",
    ]
    assert "re-running under tcmalloc" in done.stderr
    env[hostmem.PRELOAD_ENV] = "0"
    done = subprocess.run(
        [sys.executable, "-c", code, "--flag=1"], env=env, capture_output=True, text=True
    )
    assert done.stdout.splitlines() == ["run - ['--flag=1']", "done -"]
