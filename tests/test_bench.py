"""The benches' registry resolves without torch; the sampler bench runs both impls and records."""

import json
import subprocess
import sys
import textwrap

import pytest

from dag_jax.bench import sampler
from dag_jax.bench.__main__ import run
from dag_jax.bench.common import IMPLS, RECORD_KEYS, Settings, float_on_cpu

RESOLVE_ALL = textwrap.dedent(
    """
    import sys
    from dag_jax.bench.__main__ import BENCHES, resolve
    names = sorted(BENCHES)
    assert all(callable(resolve(name)) for name in names)
    assert "torch" not in sys.modules, "torch imported by a bench module"
    print(",".join(names))
    """
)


def test_every_bench_resolves_to_a_function_without_importing_torch():
    proc = subprocess.run(
        [sys.executable, "-c", RESOLVE_ALL], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = proc.stdout.strip().splitlines()[-1].split(",")
    want = [
        "ascent",
        "dbterms",
        "epoch",
        "memory",
        "ops",
        "reward",
        "sampler",
        "tinyworld",
        "toy2d",
    ]
    assert names == sorted([*want, "train"])


def test_sampler_bench_writes_documented_records(tmp_path):
    pytest.importorskip("diffusers")
    settings = Settings(
        model="tiny",
        resolution=16,
        batch=2,
        steps=2,
        repeats=1,
        check=True,
        json=str(tmp_path / "sampler.json"),
    )
    returned = run("sampler", settings)
    records = json.loads((tmp_path / "sampler.json").read_text())
    assert records == returned
    assert all(set(r) == set(RECORD_KEYS) for r in records)
    assert {r["impl"] for r in records} == {"dag_jax", "torch_ref"}
    assert all(r["bench"] == "sampler" for r in records)
    by_metric = {(r["impl"], r["metric"]): r["value"] for r in records}
    rates = ("rollout_s", "rollout_min_s", "trajectories_per_s", "unet_calls_per_s")
    expected = {(impl, m) for impl in IMPLS for m in rates}
    expected |= {("dag_jax", "compile_s"), ("dag_jax", "speedup_vs_torch_ref")}
    assert expected <= set(by_metric)
    checks = {("dag_jax", "check_eps_max_abs_diff"), ("dag_jax", "check_eps_rel_l2_diff")}
    assert checks <= set(by_metric)
    assert all(v > 0 for key, v in by_metric.items() if key not in checks)
    assert all(0 <= by_metric[key] <= 1e-4 for key in checks)
    config = records[0]["config"]
    assert config["resolution"] == 16 and config["batch"] == 2 and config["steps"] == 2
    assert {"jax_device", "torch_device", "host_cpu", "date"} <= set(config)


def test_unknown_bench_is_rejected_with_the_known_names():
    with pytest.raises(ValueError, match="sampler"):
        run("nope", Settings())


def test_sampler_bench_runs_dag_jax_alone_when_torch_is_missing(monkeypatch, capsys):
    monkeypatch.setattr(sampler, "torch_missing", lambda: "torch is not installed")
    settings = Settings(model="tiny", resolution=16, batch=2, steps=2, repeats=1, warmup=0)
    records = run("sampler", settings)
    assert "skipping the PyTorch reference" in capsys.readouterr().out
    assert {r["impl"] for r in records} == {"dag_jax"}
    assert all(r["value"] > 0 for r in records)


def test_flops_counted_in_a_cpu_subprocess_equal_the_count_in_process():
    # accelerator hosts count the sampler's FLOPs this way: the target must resolve there
    settings = Settings(model="tiny", resolution=8, batch=1)
    here = sampler.cpu_unet_call_flops(settings)
    assert here > 0
    assert float_on_cpu("dag_jax.bench.sampler:cpu_unet_call_flops", settings) == here
