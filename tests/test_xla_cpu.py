"""dag_jax.infra.xla_cpu: flags appended only where safe, the user's XLA_FLAGS win, and they take
effect (convolutions leave YNNPACK) without changing results beyond fp32 rounding."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dag_jax.infra import xla_cpu

FLAG = "--{}={}".format(*xla_cpu.FLAGS[0])
NAME = xla_cpu.FLAGS[0][0]
APPLICABLE = xla_cpu.applicable()
MACHINE = ["--{}={}".format(*flag) for flag in xla_cpu.machine_flags()]  # what this box gets

# In a fresh process: set the flags (or not), then compile and run a 3x3 conv (large enough
# for XLA to hand it to YNNPACK by default); print whether
# the flags were added, XLA_FLAGS, whether XLA put the conv in a YNNPACK fusion, the output.
CONV = """
import json, sys
import numpy as np
from dag_jax.infra import xla_cpu
import jax, jax.numpy as jnp
if sys.argv[1] == "late":
    jax.devices()
added = xla_cpu.set_default_flags()
again = xla_cpu.set_default_flags()
x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 16, 16, 32)), jnp.float32)
k = jnp.asarray(np.random.default_rng(1).standard_normal((3, 3, 32, 32)), jnp.float32)
conv = lambda x, k: jax.lax.conv_general_dilated(
    x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
compiled = jax.jit(conv).lower(x, k).compile()
print(json.dumps({
    "added": list(added), "again": list(again), "applied": list(xla_cpu.applied()),
    "xla_flags": __import__("os").environ.get("XLA_FLAGS", ""),
    "ynn_conv": "__ynn_fusion" in compiled.as_text(),
    "out": np.asarray(compiled(x, k)).ravel()[::7].tolist(),
}))
"""


def _child(when: str = "early", opt_out: str | None = None, xla_flags: str = "") -> dict:
    env = {k: v for k, v in os.environ.items() if k not in (xla_cpu.ENV_VAR, "XLA_FLAGS")}
    env["JAX_PLATFORMS"] = "cpu"
    if xla_flags:
        env["XLA_FLAGS"] = xla_flags
    if opt_out is not None:
        env[xla_cpu.ENV_VAR] = opt_out
    done = subprocess.run(
        [sys.executable, "-c", CONV, when], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_with_flags_appends_what_is_missing_and_keeps_the_rest():
    value, added = xla_cpu.with_flags("")
    assert value == FLAG and added == [FLAG]
    value, added = xla_cpu.with_flags(" --xla_force_host_platform_device_count=8 ")
    assert value == f"--xla_force_host_platform_device_count=8 {FLAG}" and added == [FLAG]
    user = f"--{NAME}=-LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT --xla_dump_to=/tmp/x"
    assert xla_cpu.with_flags(user) == (user, [])


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
    assert xla_cpu.applicable(version, machine) is expected


@pytest.mark.skipif(not APPLICABLE, reason="flags not measured for this jaxlib/machine")
def test_flags_move_convolutions_out_of_ynnpack_without_changing_results():
    default = _child(opt_out="0")
    tuned = _child()
    assert default["added"] == [] and default["xla_flags"] == ""
    assert default["ynn_conv"], "jaxlib no longer puts convs in YNNPACK: re-measure the flags"
    assert tuned["added"] == tuned["again"] == tuned["applied"] == MACHINE
    assert tuned["xla_flags"] == " ".join(MACHINE)
    assert not tuned["ynn_conv"]
    np.testing.assert_allclose(tuned["out"], default["out"], rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not APPLICABLE, reason="flags not measured for this jaxlib/machine")
def test_flags_are_not_added_once_backends_exist_or_when_the_user_sets_them():
    late = _child("late")
    assert late["added"] == [] and late["xla_flags"] == "" and late["ynn_conv"]
    user = f"--{NAME}=-LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"
    theirs = _child(xla_flags=user)
    assert theirs["added"] == MACHINE[1:]
    assert theirs["xla_flags"] == " ".join([user, *MACHINE[1:]]) and theirs["ynn_conv"]


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
    assert xla_cpu.wide_vectors(str(path)) is wide
    flags = xla_cpu.machine_flags(str(path))
    assert flags == xla_cpu.FLAGS + (xla_cpu.WIDE_VECTOR_FLAGS if wide else ())
    value, added = xla_cpu.with_flags("--xla_cpu_prefer_vector_width=256", flags)
    assert "--xla_cpu_prefer_vector_width=512" not in value  # the user's width wins
