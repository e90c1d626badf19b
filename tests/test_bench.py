"""The sampler benchmark runs both implementations on the tiny model and writes its records."""

import json

import pytest

from dag_jax.bench import common as bench


def test_sampler_bench_writes_documented_records(tmp_path):
    pytest.importorskip("diffusers")
    settings = bench.Settings(
        model="tiny",
        resolution=16,
        batch=2,
        steps=2,
        repeats=1,
        check=True,
        json=str(tmp_path / "sampler.json"),
    )
    returned = bench.run("sampler", settings)
    records = json.loads((tmp_path / "sampler.json").read_text())
    assert records == returned
    assert all(set(r) == set(bench.RECORD_KEYS) for r in records)
    assert {r["impl"] for r in records} == {"dag_jax", "torch_ref"}
    assert all(r["bench"] == "sampler" for r in records)
    by_metric = {(r["impl"], r["metric"]): r["value"] for r in records}
    rates = ("rollout_s", "rollout_min_s", "trajectories_per_s", "unet_calls_per_s")
    expected = {(impl, m) for impl in bench.IMPLS for m in rates}
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
        bench.run("nope", bench.Settings())


def test_sampler_bench_runs_dag_jax_alone_when_torch_is_missing(monkeypatch, capsys):
    monkeypatch.setattr(bench, "torch_missing", lambda: "torch is not installed")
    settings = bench.Settings(model="tiny", resolution=16, batch=2, steps=2, repeats=1, warmup=0)
    records = bench.run("sampler", settings)
    assert "skipping the PyTorch reference" in capsys.readouterr().out
    assert {r["impl"] for r in records} == {"dag_jax"}
    assert all(r["value"] > 0 for r in records)
