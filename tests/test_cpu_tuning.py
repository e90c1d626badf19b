"""dag_jax.infra.cpu_tuning: opt-in only (CLI flag or env), flags added only where safe (the
user's XLA_FLAGS win), they take effect without changing results beyond fp32 rounding, glibc
keeps freed memory, and no library code tunes the process or re-executes it."""

from __future__ import annotations

import ast
import ctypes.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dag_jax.infra import cpu_tuning

ROOT = Path(__file__).resolve().parents[1]
FLAG = "--{}={}".format(*cpu_tuning.FLAGS[0])
NAME = cpu_tuning.FLAGS[0][0]
APPLICABLE = cpu_tuning.applicable()
MACHINE = ["--{}={}".format(*flag) for flag in cpu_tuning.machine_flags()]  # what this box gets
HAS_GLIBC_MALLOPT = bool(ctypes.util.find_library("c")) and sys.platform.startswith("linux")
GLIBC = HAS_GLIBC_MALLOPT and cpu_tuning.allocator() == "glibc"  # children run on it too

# Compile a 3x3 conv (large enough for XLA to hand it to YNNPACK by default) and print whether
# XLA put it in a YNNPACK fusion and some of its output.
CONV = """
def conv_report():
    import os
    import numpy as np
    import jax, jax.numpy as jnp
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 16, 16, 32)), jnp.float32)
    k = jnp.asarray(np.random.default_rng(1).standard_normal((3, 3, 32, 32)), jnp.float32)
    conv = lambda x, k: jax.lax.conv_general_dilated(
        x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    compiled = jax.jit(conv).lower(x, k).compile()
    return {
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "ynn_conv": "__ynn_fusion" in compiled.as_text(),
        "out": np.asarray(compiled(x, k)).ravel()[::7].tolist(),
    }
"""

# In a fresh process: apply the tuning (or not, or too late), then report (without the conv
# for "off_cpu", where JAX_PLATFORMS names a missing accelerator).
APPLY = (
    CONV
    + """
import json, os, sys
from dag_jax.infra import cpu_tuning
import jax
if sys.argv[1] == "late":
    jax.devices()
done = cpu_tuning.apply() if sys.argv[1] != "none" else []
again = cpu_tuning.apply() if sys.argv[1] != "none" else []
report = {} if sys.argv[1] == "off_cpu" else conv_report()
print(json.dumps({
    "done": done, "again": again, "added": list(cpu_tuning.flags_added()),
    "kept": cpu_tuning.host_memory_kept(), "xla_flags": os.environ.get("XLA_FLAGS", ""), **report,
}))
"""
)

# Run ``python -m dag_jax.sample ARGS`` in this process (as runpy does for ``-m``); after the
# CLI exits, report XLA_FLAGS and compile a conv on the backend the CLI created.
CLI = (
    CONV
    + """
import json, runpy, sys
sys.argv = ["dag_jax.sample", *sys.argv[1:]]
try:
    runpy.run_module("dag_jax.sample", run_name="__main__", alter_sys=True)
except SystemExit as stop:  # absl's app.run exits with main's result: None when it succeeds
    code = stop.code or 0
except FileNotFoundError as err:  # the sampling CLI lets a missing model's error through
    code = repr(err)
else:
    code = 0
from dag_jax.infra import cpu_tuning
print(json.dumps({"code": str(code), "kept": cpu_tuning.host_memory_kept(), **conv_report()}))
"""
)


def _child(code: str, *args: str, env_extra: dict[str, str] | None = None, cwd=None) -> dict:
    drop = ("XLA_FLAGS", cpu_tuning.ENV_VAR)
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update({"JAX_PLATFORMS": "cpu", **(env_extra or {})})
    done = subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, cwd=cwd
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_requested_by_the_flag_or_the_env_var_only():
    assert cpu_tuning.requested(True, env={})
    assert not cpu_tuning.requested(False, env={})
    for value in ("1", "true", " YES ", "on"):
        assert cpu_tuning.requested(False, env={cpu_tuning.ENV_VAR: value})
    for value in ("0", "", "false", "off"):
        assert not cpu_tuning.requested(False, env={cpu_tuning.ENV_VAR: value})


def test_with_flags_appends_what_is_missing_and_keeps_the_rest():
    value, added = cpu_tuning.with_flags("")
    assert value == FLAG and added == [FLAG]
    value, added = cpu_tuning.with_flags(" --xla_force_host_platform_device_count=8 ")
    assert value == f"--xla_force_host_platform_device_count=8 {FLAG}" and added == [FLAG]
    user = f"--{NAME}=-LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT --xla_dump_to=/tmp/x"
    assert cpu_tuning.with_flags(user) == (user, [])


@pytest.mark.parametrize(
    ("version", "machine", "expected"),
    [
        ((0, 10), "x86_64", True),
        ((0, 10), "AMD64", True),
        ((0, 9), "x86_64", False),
        ((0, 11), "x86_64", False),
        ((1, 0), "x86_64", False),
        ((0, 10), "aarch64", False),
        ((0, 10), "arm64", False),
    ],
)
def test_flags_apply_only_to_the_measured_jaxlib_and_x86(version, machine, expected):
    assert cpu_tuning.applicable(version, machine) is expected


AMD_ZEN5 = (
    "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\n"
    "flags\t\t: fpu sse2 avx2 avx512f avx512bw\n\nprocessor\t: 1\n"
)
INTEL_AVX512 = AMD_ZEN5.replace("AuthenticAMD", "GenuineIntel")
AMD_AVX2 = AMD_ZEN5.replace(" avx512f avx512bw", "")


@pytest.mark.parametrize(
    ("cpuinfo", "wide"), [(AMD_ZEN5, True), (INTEL_AVX512, False), (AMD_AVX2, False), (None, False)]
)
def test_wide_vectors_only_on_amd_with_avx512(tmp_path, cpuinfo, wide):
    path = tmp_path / "cpuinfo"
    if cpuinfo is not None:
        path.write_text(cpuinfo)
    assert cpu_tuning.wide_vectors(str(path)) is wide
    flags = cpu_tuning.machine_flags(str(path))
    assert flags == cpu_tuning.FLAGS + (cpu_tuning.WIDE_VECTOR_FLAGS if wide else ())
    value, added = cpu_tuning.with_flags("--xla_cpu_prefer_vector_width=256", flags)
    assert "--xla_cpu_prefer_vector_width=512" not in value  # the user's width wins


def test_cpu_only_follows_jax_platforms_then_the_installed_plugins(monkeypatch):
    assert cpu_tuning.cpu_only("cpu")
    assert cpu_tuning.cpu_only(" CPU ,cuda")
    assert not cpu_tuning.cpu_only("cuda,cpu")
    assert not cpu_tuning.cpu_only("tpu")
    monkeypatch.setattr(cpu_tuning, "accelerator_plugins", lambda: ["jax-cuda12-plugin"])
    assert not cpu_tuning.cpu_only("")
    monkeypatch.setattr(cpu_tuning, "accelerator_plugins", lambda: [])
    assert cpu_tuning.cpu_only("")


def test_accelerator_plugins_lists_only_accelerator_distributions():
    plugins = cpu_tuning.accelerator_plugins()
    assert all(p.startswith(cpu_tuning.ACCELERATOR_DISTS) for p in plugins)
    assert "jax" not in plugins and "jaxlib" not in plugins


def test_allocator_names_a_preloaded_malloc_or_glibc(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text(
        "7f0-7f1 r-xp 00000000 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n"
        "7f2-7f3 rw-p 00000000 00:00 0 \n"
    )
    assert cpu_tuning.allocator(str(maps)) == "glibc"
    with maps.open("a") as f:
        f.write("7f4-7f5 r-xp 00000000 08:01 2 /usr/lib/libtcmalloc_minimal.so.4.5.10\n")
    assert cpu_tuning.allocator(str(maps)) == "tcmalloc"
    assert cpu_tuning.allocator(str(tmp_path / "absent")) == "unknown"


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc/self/maps")
def test_allocator_sees_the_malloc_of_a_real_process():
    code = "from dag_jax.infra import cpu_tuning\nprint(cpu_tuning.allocator())\n"
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "glibc"
    lib = ctypes.util.find_library("tcmalloc_minimal")
    if lib is None:
        pytest.skip("tcmalloc is not installed")
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, "LD_PRELOAD": lib},
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.strip() == "tcmalloc"


def _transparent_huge_pages_always() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[always]" in f.read()
    except OSError:
        return False


@pytest.mark.skipif(not HAS_GLIBC_MALLOPT, reason="needs glibc's mallopt")
@pytest.mark.parametrize("keep", [False, True])
def test_a_freed_large_block_is_reused_without_page_faults(keep):
    # Touch a 64 MiB block, free it, allocate and touch one again: by glibc's default the
    # second block is a fresh mmap that faults in every page again; with the thresholds raised
    # it is the same heap memory, already mapped.
    code = (
        "import ctypes, ctypes.util, resource\n"
        "from dag_jax.infra import cpu_tuning\n"
        "libc = ctypes.CDLL(ctypes.util.find_library('c'))\n"
        "libc.malloc.restype = ctypes.c_void_p\n"
        "libc.free.argtypes = [ctypes.c_void_p]\n"
        f"if {keep}: assert cpu_tuning.keep_freed_host_memory()\n"
        "n = 64 << 20\n"
        "a = libc.malloc(n); ctypes.memset(a, 1, n); libc.free(a)\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "b = libc.malloc(n); ctypes.memset(b, 2, n); libc.free(b)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
    )
    if not keep and _transparent_huge_pages_always():
        pytest.skip("huge pages fault a fresh mapping in 2 MiB at a time")
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    faults, pages = int(done.stdout.strip()), (64 << 20) // 4096
    if keep:
        assert faults < pages // 20
    else:
        assert faults > pages // 2  # glibc's default: the block is mapped afresh


@pytest.mark.skipif(not APPLICABLE, reason="flags not measured for this jaxlib/machine")
def test_apply_moves_convolutions_out_of_ynnpack_without_changing_results():
    default = _child(APPLY, "none")
    tuned = _child(APPLY, "early")
    assert default["xla_flags"] == "" and not default["kept"]
    assert default["ynn_conv"], "jaxlib no longer puts convs in YNNPACK: re-measure the flags"
    assert tuned["done"][: len(MACHINE)] == [f"XLA_FLAGS += {flag}" for flag in MACHINE]
    assert tuned["again"] == [] and tuned["added"] == MACHINE  # a second call changes nothing
    assert tuned["xla_flags"] == " ".join(MACHINE)
    assert not tuned["ynn_conv"]
    assert tuned["kept"] is GLIBC and (cpu_tuning.MALLOPT_DONE in tuned["done"]) is GLIBC
    np.testing.assert_allclose(tuned["out"], default["out"], rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not APPLICABLE, reason="flags not measured for this jaxlib/machine")
def test_apply_does_nothing_once_backends_exist_or_off_the_cpu_and_the_user_flag_wins():
    late = _child(APPLY, "late")
    assert late["done"] == [] and late["xla_flags"] == "" and late["ynn_conv"]
    assert not late["kept"]
    user = f"--{NAME}=-LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"
    theirs = _child(APPLY, "early", env_extra={"XLA_FLAGS": user})
    assert theirs["added"] == MACHINE[1:]
    assert theirs["xla_flags"] == " ".join([user, *MACHINE[1:]]) and theirs["ynn_conv"]
    # JAX_PLATFORMS names an accelerator first: nothing is applied
    gpu = _child(APPLY, "off_cpu", env_extra={"JAX_PLATFORMS": "cuda,cpu"})
    assert gpu["done"] == [] and gpu["xla_flags"] == "" and not gpu["kept"]


@pytest.mark.skipif(not APPLICABLE, reason="flags not measured for this jaxlib/machine")
def test_sample_cli_applies_the_tuning_before_jax_starts_only_when_asked(tmp_path):
    # With --cpu_tuning the CLI samples (creating JAX's backend inside main); a conv compiled
    # afterwards on that backend is out of YNNPACK, so XLA read the flags the CLI added.
    args = ("--model=random-tiny", "--num_images=1", "--steps=1", "--batch_size=1")
    tuned = _child(CLI, "--cpu_tuning", *args, f"--out={tmp_path / 'a'}", cwd=tmp_path)
    assert tuned["code"] == "0" and (tmp_path / "a" / "prompts.txt").exists()
    assert tuned["xla_flags"] == " ".join(MACHINE) and not tuned["ynn_conv"]
    assert tuned["kept"] is GLIBC
    # Without it (a missing model stops the CLI early): the process is left as it was; the
    # env var alone opts in as the flag does.
    absent = (f"--model={tmp_path / 'absent'}", f"--out={tmp_path / 'b'}")
    plain = _child(CLI, *absent, cwd=tmp_path)
    assert plain["code"] != "0" and plain["xla_flags"] == "" and plain["ynn_conv"]
    assert not plain["kept"]
    by_env = _child(CLI, *absent, env_extra={cpu_tuning.ENV_VAR: "1"}, cwd=tmp_path)
    assert by_env["xla_flags"] == " ".join(MACHINE) and not by_env["ynn_conv"]


# The compute CLIs: module → (function defining its flags, its absl main).
CLIS = {
    "dag_jax/train/__main__.py": ("define_flags", "main"),
    "dag_jax/eval/evaluate.py": ("define_flags", "main"),
    "dag_jax/sample.py": ("define_flags", "main"),
    "dag_jax/bench/__main__.py": ("define_flags", "main"),
    "dag_jax/tinyworld/build.py": ("define_flags", "main"),
}
TUNING_CALLS = {"apply", "apply_if_requested", "keep_freed_host_memory"}
ENV_WRITES = {"update", "setdefault", "pop", "popitem", "clear", "__setitem__", "__delitem__"}


def _calls(tree: ast.AST) -> list[tuple[str, str, ast.Call]]:
    """Return (object name, attribute, call) of every ``name.attr(...)`` call in ``tree``."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            value = node.func.value
            name = ast.unparse(value) if isinstance(value, ast.Name | ast.Attribute) else ""
            out.append((name, node.func.attr, node))
    return out


def test_only_the_clis_main_tunes_and_nothing_re_executes_or_writes_the_environment():
    for path in sorted((ROOT / "dag_jax").rglob("*.py")):
        if path.name == "cpu_tuning.py":
            continue
        rel = path.relative_to(ROOT).as_posix()
        tree = ast.parse(path.read_text())
        allowed = set()
        for fn in ast.walk(tree):
            if isinstance(fn, ast.FunctionDef) and fn.name in ("main", "cli"):
                allowed |= {id(call) for *_, call in _calls(fn)}
        for name, attr, call in _calls(tree):
            where = f"{rel}:{call.lineno}"
            if name == "cpu_tuning" and attr in TUNING_CALLS:
                assert id(call) in allowed, f"{where} tunes the process outside a CLI's main"
            assert not (name == "os" and (attr.startswith("exec") or attr == "putenv")), where
            assert not (name == "os.environ" and attr in ENV_WRITES), where
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign | ast.AugAssign | ast.Delete):
                targets = node.targets if hasattr(node, "targets") else [node.target]
                for target in targets:
                    text = ast.unparse(target)
                    assert not text.startswith("os.environ"), f"{rel}:{node.lineno} sets env"


@pytest.mark.parametrize("rel", sorted(CLIS))
def test_every_compute_cli_defines_the_flag_and_applies_it_in_main(rel):
    tree = ast.parse((ROOT / rel).read_text())
    define, main = CLIS[rel]
    fns = {fn.name: fn for fn in tree.body if isinstance(fn, ast.FunctionDef)}
    assert ("cpu_tuning", "define_flag") in {(n, a) for n, a, _ in _calls(fns[define])}
    applies = [c for n, a, c in _calls(fns[main]) if (n, a) == ("cpu_tuning", "apply_if_requested")]
    assert len(applies) == 1 and ast.unparse(applies[0].args[0]).endswith("cpu_tuning")
