"""The memory and train benches on tiny shapes: records, FSDP shrinking, torch_ref = dag_jax."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dag_jax.bench.__main__ import run
from dag_jax.bench.common import IMPLS, RECORD_KEYS, Settings

ROOT = Path(__file__).resolve().parents[1]

MEMORY = textwrap.dedent(
    """
    import sys
    from dag_jax.bench.__main__ import run
    from dag_jax.bench.common import Settings
    settings = Settings(model="tiny", resolution=8, micro_batch=2, fsdp="1,2", json=sys.argv[1])
    run("memory", settings)
    """
)


def test_memory_bench_param_bytes_shrink_with_fsdp(tmp_path):
    out = tmp_path / "memory.json"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-c", MEMORY, str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = json.loads(out.read_text())
    assert all(set(r) == set(RECORD_KEYS) for r in records)
    assert {r["bench"] for r in records} == {"memory"} and {r["impl"] for r in records} == {
        "dag_jax"
    }
    value = {r["metric"]: r["value"] for r in records}
    for n in (1, 2):
        for m in ("param_bytes", "argument_bytes", "temp_bytes", "total_bytes", "compile_s"):
            assert value[f"fsdp{n}/{m}"] > 0, (n, m)
    assert value["fsdp2/param_bytes"] < value["fsdp1/param_bytes"]
    assert value["fsdp2/argument_bytes"] < value["fsdp1/argument_bytes"]
    assert 0.5 <= value["param_bytes_ratio_fsdp2_vs_fsdp1"] < 1.0
    config = records[0]["config"]
    assert config["compute_dtype"] == "bfloat16" and config["remat"] and config["fsdp"] == 1
    assert config["algo"] == "dag_db" and config["micro_batch"] == 2
    assert config["context_table_rows"] == 256  # the released trajectories per update


def test_train_bench_torch_ref_computes_the_same_loss(tmp_path):
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    settings = Settings(
        model="tiny",
        algos="ddpo,dag_db,dag_kl,b2",
        resolution=8,
        batch=2,
        steps=2,
        micro_batch=4,
        repeats=1,
        json=str(tmp_path / "train.json"),
    )
    returned = run("train", settings)
    records = json.loads((tmp_path / "train.json").read_text())
    assert records == returned
    assert all(set(r) == set(RECORD_KEYS) for r in records)
    assert {r["impl"] for r in records} == {"dag_jax", "torch_ref"}
    value = {(r["impl"], r["metric"]): r["value"] for r in records}
    rates = ("step_s", "step_min_s", "transitions_per_s", "first_step_s", "mfu")
    for algo in ("ddpo", "dag_db", "dag_kl"):  # b2 is skipped: its step is ddpo's
        for impl in IMPLS:
            assert all(value[(impl, f"{algo}/{m}")] > 0 for m in rates), (algo, impl)
        assert value[("dag_jax", f"{algo}/speedup_vs_torch_ref")] > 0
        assert value[("dag_jax", f"{algo}/check_loss_rel_diff")] < 1e-3, algo
        jax_loss, torch_loss = (value[(i, f"{algo}/loss")] for i in IMPLS)
        assert jax_loss == pytest.approx(torch_loss, rel=1e-3, abs=1e-6), algo
    assert not any("b2/" in r["metric"] for r in records)
    by_algo = {r["config"]["algo"] for r in records}
    assert by_algo == {"ddpo", "dag_db", "dag_kl"}
    config = records[0]["config"]
    assert config["transitions_per_step"] == 4 and config["micro_batch"] == 4
    assert {"jax_device", "torch_device", "peak_tflops", "step_gflop"} <= set(config)
