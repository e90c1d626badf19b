"""Per-op kernel times, dag_jax vs PyTorch: ``python -m dag_jax.bench ops``.

The kernels a tiny-model step is made of, at the shapes it runs them, timed alone: dag_jax's
formulation (``lax.conv_general_dilated`` as ``nn.Conv`` calls it, ``attention.
dot_product_attention``, ``layers.GroupNorm``) against PyTorch's (``F.conv2d`` on oneDNN,
``F.scaled_dot_product_attention``, ``F.group_norm``: ``torch_ref_ops``) on the same inputs.
This is where a difference in a whole step comes from, so the per-op table in BENCHMARKS.md is
reproducible:

    python -m dag_jax.bench ops --repeats=10 --cpu_tuning   # Eigen convs (docs/cpu.md)
    python -m dag_jax.bench ops --repeats=10                # XLA's default (YNNPACK) convs

Records per op (``config["op"]``, ``config["shape"]``) and impl:
  OP/fwd_ms    median wall milliseconds of the forward
  OP/grad_ms   median of forward + backward to all inputs (conv: x and the kernel; attention:
               q, k, v; group norm: x, scale, bias), from a fixed random output cotangent
  OP/check_max_rel_diff   (dag_jax) max |y_jax − y_torch| / max |y_torch| of the forward
Conv shapes are (N, H, W, C_in → C_out) with a 3×3 kernel, stride 1, padding 1; attention
shapes are (B, L_q, L_k, heads, head dim); group norms (N, H, W, C, groups). fp32 throughout.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import numpy as np

from dag_jax.bench.common import (
    Settings,
    cpu_count,
    machine_info,
    record,
    timed_runs,
    torch_missing,
)
from dag_jax.models.attention import dot_product_attention
from dag_jax.models.layers import GroupNorm as LinenGroupNorm


@dataclasses.dataclass(frozen=True)
class Conv:
    """A 3×3, stride-1, padding-1 convolution of an (N, H, W, C_in) input to C_out channels."""

    n: int
    h: int
    w: int
    c_in: int
    c_out: int
    where: str

    @property
    def name(self) -> str:
        """Return the op's name in metrics: its kind and shape."""
        return f"conv3x3_{self.n}x{self.h}x{self.w}x{self.c_in}to{self.c_out}"


@dataclasses.dataclass(frozen=True)
class Attention:
    """Softmax attention of (B, L_q, H·D) queries over (B, L_k, H·D) keys and values."""

    b: int
    lq: int
    lk: int
    heads: int
    d: int
    where: str

    @property
    def name(self) -> str:
        """Return the op's name in metrics: its kind and shape."""
        return f"attention_{self.b}x{self.lq}x{self.lk}x{self.heads}h{self.d}"


@dataclasses.dataclass(frozen=True)
class GroupNorm:
    """GroupNorm of an (N, H, W, C) input in ``groups`` groups, per-channel scale and bias."""

    n: int
    h: int
    w: int
    c: int
    groups: int
    where: str

    @property
    def name(self) -> str:
        """Return the op's name in metrics: its kind and shape."""
        return f"groupnorm_{self.n}x{self.h}x{self.w}x{self.c}g{self.groups}"


Op = Conv | Attention | GroupNorm

# The tiny model's shapes (B = 8 trajectories: 16 UNet rows with CFG; VAE decode of 8 images).
OPS = (
    Conv(16, 32, 32, 32, 32, "UNet level 0 resnet"),
    Conv(16, 32, 32, 96, 32, "UNet up-block 1 (skip concat)"),
    Conv(16, 32, 32, 64, 64, "UNet level 0→1 width"),
    Conv(16, 16, 16, 64, 64, "UNet level 1 resnet"),
    Conv(8, 128, 128, 32, 32, "VAE decoder, 128 px"),
    Conv(8, 256, 256, 32, 32, "VAE decoder, 256 px"),
    Attention(16, 256, 256, 8, 8, "UNet self-attention"),
    Attention(16, 256, 77, 8, 8, "UNet cross-attention"),
    Attention(32, 1024, 1024, 4, 8, "flow network self-attention"),
    GroupNorm(32, 32, 32, 32, 32, "UNet level 0 resnet (32 train rows)"),
    GroupNorm(32, 32, 32, 96, 32, "UNet up-block 1 resnet, skip concat (32 train rows)"),
    GroupNorm(32, 16, 16, 64, 32, "UNet level 1 resnet (32 train rows)"),
)


def op_inputs(op: Op, seed: int) -> tuple[np.ndarray, ...]:
    """Return fp32 NumPy inputs of ``op`` (channels-last for convs) and an output cotangent."""
    rng = np.random.default_rng(seed)
    f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    if isinstance(op, Conv):
        x = f32(op.n, op.h, op.w, op.c_in)
        k = f32(3, 3, op.c_in, op.c_out) * np.float32((9 * op.c_in) ** -0.5)
        return x, k, f32(op.n, op.h, op.w, op.c_out)
    if isinstance(op, GroupNorm):
        x = f32(op.n, op.h, op.w, op.c) * 2 + 1  # an offset, as activations have
        return x, f32(op.c), f32(op.c), f32(op.n, op.h, op.w, op.c)
    inner = op.heads * op.d
    q, k, v = f32(op.b, op.lq, inner), f32(op.b, op.lk, inner), f32(op.b, op.lk, inner)
    return q, k, v, f32(op.b, op.lq, inner)


def jax_fns(op: Op) -> tuple[Callable, Callable]:
    """Return (forward, forward + backward) of dag_jax's formulation of ``op``, jitted."""
    if isinstance(op, Conv):

        def fwd(x, k):
            dims = ("NHWC", "HWIO", "NHWC")
            return jax.lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)), None, None, dims)

    elif isinstance(op, GroupNorm):
        norm = LinenGroupNorm(num_groups=op.groups, epsilon=1e-5)

        def fwd(x, scale, bias):
            return norm.apply({"params": {"scale": scale, "bias": bias}}, x)

    else:

        def fwd(q, k, v):
            return dot_product_attention(q, k, v, op.heads)

    def grad(*args):
        *inputs, cotangent = args
        out, vjp = jax.vjp(fwd, *inputs)
        return out, vjp(cotangent)

    return jax.jit(fwd), jax.jit(grad)


def torch_fns(op: Op, arrays: tuple[np.ndarray, ...]) -> tuple:
    """Return (forward, forward + backward, output as NumPy) of PyTorch's ``op`` on ``arrays``."""
    from dag_jax.bench import torch_ref_ops

    if isinstance(op, Conv):
        return torch_ref_ops.conv3x3(*arrays)
    if isinstance(op, GroupNorm):
        return torch_ref_ops.group_norm(*arrays, groups=op.groups)
    return torch_ref_ops.attention(*arrays, heads=op.heads)


def median_ms(fn: Callable[[], object], repeats: int, warmup: int) -> float:
    """Return the median wall milliseconds of ``fn()`` (which blocks) after ``warmup`` calls."""
    return float(np.median(timed_runs({"fn": fn}, repeats, warmup)["fn"]) * 1e3)


def op_records(op: Op, settings: Settings, impls: Sequence[str], base: dict) -> list[dict]:
    """Return the records of one op for each impl (and their agreement)."""
    arrays = op_inputs(op, settings.seed)
    cfg = dict(base, op=op.name, shape=dataclasses.astuple(op)[:-1], where=op.where)
    warmup = max(settings.warmup, 1)

    def rec(impl, metric, value, unit):
        return record("ops", impl, f"{op.name}/{metric}", value, unit, cfg)

    def timed(impl, fwd, grad):
        return [
            rec(impl, "fwd_ms", median_ms(fwd, settings.repeats, warmup), "ms"),
            rec(impl, "grad_ms", median_ms(grad, settings.repeats, warmup), "ms"),
        ]

    records, out_jax = [], None
    if "dag_jax" in impls:
        fwd, grad = jax_fns(op)
        device = jax.device_put(arrays)
        out_jax = np.asarray(fwd(*device[:-1]))
        records += timed(
            "dag_jax",
            lambda: jax.block_until_ready(fwd(*device[:-1])),
            lambda: jax.block_until_ready(grad(*device)),
        )
    if "torch_ref" in impls:
        fwd_t, grad_t, out_torch = torch_fns(op, arrays)
        records += timed("torch_ref", fwd_t, grad_t)
        if out_jax is not None:
            diff = np.abs(out_jax - out_torch).max() / max(np.abs(out_torch).max(), 1e-30)
            records.append(rec("dag_jax", "check_max_rel_diff", float(diff), "rel"))
    return records


def bench_ops(settings: Settings, ops: Sequence[Op] = OPS) -> list[dict]:
    """Return fwd/grad milliseconds of each op, dag_jax vs PyTorch (when installed)."""
    impls = settings.impls()
    missing = torch_missing() if "torch_ref" in impls else None
    if missing:
        print(f"[bench] {missing}: skipping the PyTorch reference")
        impls = tuple(i for i in impls if i != "torch_ref")
    if "torch_ref" in impls:
        from dag_jax.bench import torch_ref_ops

        torch_ref_ops.use_threads(cpu_count())
    base = {**machine_info(), "repeats": settings.repeats, "dtype": "float32"}
    records = []
    for op in ops:
        records += op_records(op, settings, impls, base)
        print(f"[bench] ops: {op.name} ({op.where}) done", flush=True)
    return records
