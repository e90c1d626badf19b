"""The per-op benchmark times dag_jax's conv and attention against PyTorch's on equal outputs."""

import pytest

from dag_jax.bench import ops
from dag_jax.bench.common import IMPLS, Settings

SMALL = (
    ops.Conv(2, 8, 8, 16, 8, "small conv"),
    ops.Attention(2, 16, 7, 2, 4, "small cross-attention"),
    ops.GroupNorm(2, 4, 4, 12, 4, "small group norm"),
)


def test_ops_bench_records_each_op_and_agrees_with_torch():
    pytest.importorskip("torch")
    settings = Settings(repeats=2, warmup=1)
    records = ops.bench_ops(settings, SMALL)
    by_metric = {(r["impl"], r["metric"]): r for r in records}
    names = ("conv3x3_2x8x8x16to8", "attention_2x16x7x2h4", "groupnorm_2x4x4x12g4")
    for name in names:
        for impl in IMPLS:
            for metric in ("fwd_ms", "grad_ms"):
                rec = by_metric[(impl, f"{name}/{metric}")]
                assert rec["value"] > 0 and rec["unit"] == "ms" and rec["bench"] == "ops"
                assert rec["config"]["op"] == name
        # the two formulations compute the same function of the same inputs
        assert by_metric[("dag_jax", f"{name}/check_max_rel_diff")]["value"] < 1e-5
    assert by_metric[("dag_jax", f"{names[0]}/fwd_ms")]["config"]["shape"] == (2, 8, 8, 16, 8)
    assert "xla_flags" in records[0]["config"]


def test_ops_bench_runs_without_the_reference():
    settings = Settings(repeats=1, warmup=1, impl="dag_jax")
    records = ops.bench_ops(settings, SMALL[:1])
    assert {r["impl"] for r in records} == {"dag_jax"}
    assert {r["metric"] for r in records} == {
        "conv3x3_2x8x8x16to8/fwd_ms",
        "conv3x3_2x8x8x16to8/grad_ms",
    }
