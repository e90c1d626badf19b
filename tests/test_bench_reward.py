"""The reward benchmark runs on tiny random towers and writes its documented records."""

from __future__ import annotations

import json

import pytest

from dag_jax.bench import reward as bench_reward
from dag_jax.bench.__main__ import run
from dag_jax.bench.common import RECORD_KEYS, Settings


def test_reward_bench_writes_documented_records(tmp_path):
    settings = Settings(
        model="tiny",
        batch=2,
        repeats=1,
        warmup=0,
        reward="jpeg_compressibility,aesthetic",
        json=str(tmp_path / "reward.json"),
    )
    returned = run("reward", settings)
    records = json.loads((tmp_path / "reward.json").read_text())
    assert records == returned
    assert all(set(r) == set(RECORD_KEYS) for r in records)
    assert {(r["bench"], r["impl"]) for r in records} == {("reward", "dag_jax")}
    got = {(r["config"]["reward"], r["metric"]) for r in records}
    assert got == {
        ("jpeg_compressibility", "images_per_s"),
        ("jpeg_compressibility", "batch_s"),
        ("aesthetic", "images_per_s"),
        ("aesthetic", "batch_s"),
        ("aesthetic", "compile_s"),
    }
    assert all(r["value"] > 0 for r in records)
    config = next(r["config"] for r in records if r["config"]["reward"] == "aesthetic")
    assert config["jittable"] and config["image_size"] == bench_reward.IMAGE_SIDE["tiny"]
    assert config["batch"] == 2 and {"jax_device", "host_cpu", "date"} <= set(config)


def test_reward_names_and_skips(monkeypatch, capsys):
    assert bench_reward.reward_names("all") == sorted(bench_reward.rewards.names())
    assert bench_reward.reward_names("aesthetic, hpsv2") == ["aesthetic", "hpsv2"]
    with pytest.raises(ValueError, match="--reward must be"):
        bench_reward.reward_names("aesthetik")
    monkeypatch.delenv(bench_reward.BERTSCORE_URL_ENV, raising=False)
    settings = Settings(model="tiny", batch=1, repeats=1, warmup=0, reward="bertscore")
    assert run("reward", settings) == []
    assert "skipping bertscore" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--model must be one of"):
        bench_reward.bench_reward(Settings(model="sd14", reward="jpeg_compressibility"))
