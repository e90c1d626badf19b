"""Scaled dot-product attention for the UNet, the VAE and the flow network.

``dot_product_attention(q, k, v, heads, upcast, impl)`` on (B, L, H·D) projections. The
default ``impl="xla"`` is written here for XLA. It has three parts, each measured in
BENCHMARKS.md ("Where the CPU time goes"; "Convolutions back to Eigen, attention's v
transposed"):

- Head-major layout with k and v pre-transposed to (…, D, Lk). Every product of the
  forward and backward passes is then a batched matmul whose (…, Lq, Lk) operand is not
  transposed: XLA:CPU is several times slower at contracting that operand over its
  leading axis. At the UNet's self-attention shapes, Pᵀ·dO (v as (…, Lk, D)) took 17 ms
  alone where Qᵀ·dS, the same size, took 2 ms; the backward went from 52 to 40 ms.
  The softmax's division comes after the product with v, on (…, Lq, D) entries instead
  of (…, Lq, Lk).
- A custom VJP that keeps only q, k, v, the output and the row log-sum-exp. The backward
  pass recomputes the probabilities. The (…, Lq, Lk) probability tensor is never stored
  for the backward, as a flash kernel would do.
- On a single CPU device, (batch · head) slices go through in blocks (``lax.map``) that
  bound the live score memory, e.g. of the flow network's 1024-token attention and its
  gradient. The best block differs between the forward-only program (the sampler,
  forward-looking rewards), where XLA:CPU fuses a block's whole attention into one
  YNNPACK call, and the custom VJP's forward and backward, where each block is several
  passes over its scores: ``CPU_SCORE_BLOCK`` (2²² entries) is for the first,
  ``CPU_GRAD_SCORE_BLOCK`` (2²⁰) for the second. On the 2-core AMD box the tiny sampler
  ran 1.58 s at 2²² and 1.63 s at 2²⁰, while a DAG-DB gradient micro-step took 0.91 s at
  2²⁰ and 1.06–1.19 s at 2²². On GPU/TPU, and on multi-device meshes, the whole batch
  goes at once: there, blocking would serialise kernels or split a sharded axis.

``impl="pallas_tpu"`` runs JAX's Pallas splash-attention kernel for TPU
(``jax.experimental.pallas.ops.tpu.splash_attention``): a flash kernel that never stores the
(…, Lq, Lk) scores, keeps the softmax statistics in fp32, and has its own backward kernels.
Its tiles are 128 lanes wide, so q, k and v are zero-padded to head dims and sequence lengths
that are multiples of ``PALLAS_LANES`` (exact for q·kᵀ and for v); padded keys are masked
out by a static mask, whose all-masked tiles the kernel skips; padded queries are cut off.
The kernel takes no softmax scale: q is scaled beforehand exactly as the ``"xla"`` path does.
A Pallas kernel is a custom call that XLA's SPMD partitioner cannot split, so under a context
mesh (``jax.set_mesh``) the kernel runs in a ``shard_map`` over the batch axis; without one,
on several devices, XLA would gather the batch onto every device. On CPU the kernel runs in
Pallas interpret mode (``interpret=True``, for tests only); elsewhere it needs a TPU.

``impl="auto"`` picks per call: ``"pallas_tpu"`` on a TPU backend when both sequences have at
least ``AUTO_MIN_TOKENS`` tokens (SD1.5's self-attention at 64×64 and 32×32 latents, not
its 77-token cross-attention) and the batch can be split (a single device, or a context mesh
whose size divides the batch); ``"xla"`` otherwise.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
from jax.sharding import PartitionSpec

ATTENTION_IMPLS = ("xla", "jax", "cudnn", "pallas_tpu", "auto")
CPU_SCORE_BLOCK = 2**22  # score entries (16 MiB of fp32) per forward-only block, single CPU
CPU_GRAD_SCORE_BLOCK = 2**20  # score entries (4 MiB) per block under differentiation
AUTO_MIN_TOKENS = 1024  # "auto": the Pallas kernel on TPU when Lq and Lk both reach this
PALLAS_LANES = 128  # the TPU kernel's tile width: head dim and lengths are padded to multiples
PALLAS_MAX_BLOCK = 512  # largest q / kv tile (rows) of the TPU kernel
PALLAS_MAX_TILE = 2**17  # largest tile rows × padded head dim (512 × 256), bounding VMEM use
PALLAS_DTYPES = (jnp.float32, jnp.bfloat16)


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    heads: int,
    upcast: bool = True,
    impl: str = "xla",
    *,
    interpret: bool = False,
) -> jax.Array:
    """Return softmax(q kᵀ/√d) v over heads for (B, Lq, H·D), (B, Lk, H·D) inputs.

    ``impl`` chooses the formulation (same math, numerics within rounding):

    - ``"xla"``: the formulation above. Scores are formed in fp32 when ``upcast`` (diffusers'
      ``upcast_attention``), and the softmax always runs in fp32. The result has v's dtype.
    - ``"jax"``: ``jax.nn.dot_product_attention`` letting XLA pick (softmax in fp32).
    - ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")``, the fused flash
      kernel on NVIDIA GPUs (bf16/fp16 compute only; scores never materialise in memory).
    - ``"pallas_tpu"``: the Pallas splash-attention kernel on TPU (module docstring);
      ``interpret`` runs it in Pallas interpret mode on any backend (tests).
    - ``"auto"``: ``"pallas_tpu"`` or ``"xla"`` by ``auto_impl``.
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    b, lq, inner = q.shape
    lk = k.shape[1]
    if impl == "auto":
        impl = auto_impl(b, lq, lk)
    if impl == "pallas_tpu":
        return pallas_attention(q, k, v, heads, upcast, interpret=interpret)
    d = inner // heads
    q = q.reshape(b, lq, heads, d)
    k = k.reshape(b, lk, heads, d)
    v = v.reshape(b, lk, heads, d)
    if impl != "xla":
        kind = None if impl == "jax" else "cudnn"
        out = jax.nn.dot_product_attention(
            q, k.astype(q.dtype), v.astype(q.dtype), implementation=kind
        )
        return out.reshape(b, lq, inner)
    if upcast:
        q, k = q.astype(jnp.float32), k.astype(jnp.float32)
    q = q * jnp.asarray(d**-0.5, q.dtype)  # the scale on q: no full-size scale tensor
    q = q.transpose(0, 2, 1, 3).reshape(b * heads, lq, d)
    k = k.transpose(0, 2, 3, 1).reshape(b * heads, d, lk)
    v = v.transpose(0, 2, 3, 1).reshape(b * heads, d, lk)
    blocks = (
        score_block(b * heads, lq, lk, CPU_SCORE_BLOCK),
        score_block(b * heads, lq, lk, CPU_GRAD_SCORE_BLOCK),
    )
    out = softmax_attention(q, k, v, blocks)
    return out.reshape(b, heads, lq, d).transpose(0, 2, 1, 3).reshape(b, lq, inner)


def score_block(slices: int, lq: int, lk: int, entries: int | None = None) -> int:
    """Return how many (batch · head) slices to process at once (``slices`` = no blocking).

    ``entries``: the score entries a block may hold on a single CPU device (default
    ``CPU_SCORE_BLOCK``); never fewer than one slice.
    """
    if jax.default_backend() != "cpu" or jax.device_count() != 1:
        return slices
    entries = CPU_SCORE_BLOCK if entries is None else entries
    return max(1, min(slices, entries // (lq * lk)))


def _blockwise(fn, block: int, *arrays):
    """Apply ``fn`` to ``block`` leading slices at a time (all at once when it covers all)."""
    if block >= arrays[0].shape[0]:
        return fn(*arrays)
    return jax.lax.map(lambda xs: fn(*xs), arrays, batch_size=block)


def _t(x: jax.Array) -> jax.Array:
    return jnp.swapaxes(x, -1, -2)


def _forward(q, k, v):
    """Return (softmax(q k) vᵀ, row log-sum-exp) for q (…, Lq, D), k and v (…, D, Lk)."""
    scores = (q @ k).astype(jnp.float32)
    top = scores.max(axis=-1, keepdims=True)  # the custom VJP never differentiates this
    weights = jnp.exp(scores - top)
    total = weights.sum(axis=-1, keepdims=True)
    out = (weights.astype(v.dtype) @ _t(v)) / total
    return out.astype(v.dtype), (top + jnp.log(total))[..., 0]


def _backward(q, k, v, out, lse, d_out):
    """Return (dq, dk, dv), recomputing the probabilities from the log-sum-exp.

    Probabilities and score gradients are fp32; they are rounded to the operands' dtype
    for the products, as the forward does for its product with v.
    """
    probs = jnp.exp((q @ k).astype(jnp.float32) - lse[..., None])  # (…, Lq, Lk)
    dv = _t(d_out) @ probs.astype(d_out.dtype)  # (…, D, Lk), v's layout
    d_probs = (d_out @ v).astype(jnp.float32)
    delta = (d_out.astype(jnp.float32) * out.astype(jnp.float32)).sum(axis=-1, keepdims=True)
    d_scores = (probs * (d_probs - delta)).astype(q.dtype)
    return d_scores @ _t(k), _t(q) @ d_scores, dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def softmax_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, blocks: tuple[int, int]
) -> jax.Array:
    """Return softmax(q k) vᵀ per slice: q (N, Lq, D) pre-scaled, k and v (N, D, Lk).

    ``blocks`` = (slices per block when only the value is computed, slices per block in
    the forward and backward passes of its gradient).
    """
    return _blockwise(_forward, blocks[0], q, k, v)[0]


def _softmax_attention_fwd(q, k, v, blocks):
    out, lse = _blockwise(_forward, blocks[1], q, k, v)
    return out, (q, k, v, out, lse)


def _softmax_attention_bwd(blocks, residuals, d_out):
    return _blockwise(_backward, blocks[1], *residuals, d_out)


softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)


# ----------------------------------------------------------------------------------------------
# Pallas splash attention (TPU)


def auto_impl(batch: int, lq: int, lk: int) -> str:
    """Return the impl that ``"auto"`` stands for at these sizes on this backend."""
    if jax.default_backend() != "tpu" or min(lq, lk) < AUTO_MIN_TOKENS:
        return "xla"
    if jax.device_count() > 1 and not batch_mesh_axes(batch):
        return "xla"  # no mesh to split the batch with: XLA would gather it onto every device
    return "pallas_tpu"


def batch_mesh_axes(batch: int) -> tuple[str, ...]:
    """Return the context mesh's non-manual axes to split the batch over; () if none or uneven."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return ()
    axes = tuple(a for a in mesh.axis_names if a not in mesh.manual_axes)
    size = int(np.prod([mesh.shape[a] for a in axes], dtype=np.int64))
    return axes if size > 1 and batch % size == 0 else ()


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pallas_block(length: int, head_dim: int) -> int:
    """Return the tile rows for a padded ``length``: a power of two from 128 to 512 dividing it."""
    block = PALLAS_LANES
    while (
        block * 2 <= PALLAS_MAX_BLOCK
        and length % (block * 2) == 0
        and block * 2 * head_dim <= PALLAS_MAX_TILE
    ):
        block *= 2
    return block


def splash_kernel(
    heads: int, lq: int, lk: int, valid_keys: int, head_dim: int, interpret: bool = False
) -> splash.SplashAttentionKernel:
    """Return the splash kernel for (heads, lq, head_dim) queries on (heads, lk, head_dim) keys.

    ``lq``, ``lk`` and ``head_dim`` are the padded sizes; keys from ``valid_keys`` on are masked.
    """
    if valid_keys == lk:
        mask = splash_mask.FullMask((lq, lk))
    else:
        mask = splash_mask.NumpyMask(np.broadcast_to(np.arange(lk) < valid_keys, (lq, lk)))
    bq, bkv = pallas_block(lq, head_dim), pallas_block(lk, head_dim)
    blocks = splash.BlockSizes(
        block_q=bq,
        block_kv=bkv,
        block_kv_compute=bkv,
        block_q_dkv=bq,
        block_kv_dkv=bkv,
        block_kv_dkv_compute=bkv,
        block_q_dq=bq,
        block_kv_dq=bkv,
    )
    return splash.make_splash_mha(
        splash_mask.MultiHeadMask([mask] * heads),
        block_sizes=blocks,
        head_shards=1,
        q_seq_shards=1,
        interpret=interpret,
    )


def _pad_to(x: jax.Array, length: int, head_dim: int) -> jax.Array:
    """Return (B, h, L, D) ``x`` zero-padded to (B, h, length, head_dim)."""
    pad = ((0, 0), (0, 0), (0, length - x.shape[2]), (0, head_dim - x.shape[3]))
    return jnp.pad(x, pad)


def _check_pallas_shapes(q: jax.Array, k: jax.Array, v: jax.Array, heads: int) -> None:
    """Raise ValueError for inputs the Pallas path does not take."""
    if q.ndim != 3 or k.ndim != 3 or k.shape != v.shape:
        raise ValueError(
            f"pallas_tpu attention takes (B, Lq, H·D) q and equal (B, Lk, H·D) k, v; "
            f"got {q.shape}, {k.shape}, {v.shape}"
        )
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[2] % heads:
        raise ValueError(
            f"pallas_tpu attention needs one batch and a width H·D divisible by heads={heads}; "
            f"got q {q.shape}, k {k.shape}"
        )
    if min(q.shape[1], k.shape[1]) < 1:
        raise ValueError(f"pallas_tpu attention needs non-empty sequences: {q.shape}, {k.shape}")
    if q.dtype not in PALLAS_DTYPES:
        raise ValueError(f"pallas_tpu attention runs in float32 or bfloat16, got {q.dtype}")


def pallas_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    heads: int,
    upcast: bool = True,
    *,
    interpret: bool = False,
) -> jax.Array:
    """Return softmax(q kᵀ/√d) v for (B, Lq, H·D), (B, Lk, H·D) inputs by the splash kernel.

    The kernel runs in q's dtype (k and v are cast to it) and returns v's dtype. q is scaled
    as on the ``"xla"`` path, in fp32 when ``upcast``, then rounded to q's dtype. The
    kernel forms scores and softmax statistics in fp32 whatever its dtype.
    """
    _check_pallas_shapes(q, k, v, heads)
    if not interpret and jax.default_backend() != "tpu":
        raise ValueError(
            f"pallas_tpu attention needs a TPU backend (this is {jax.default_backend()!r}); "
            "interpret=True runs it anywhere, slowly"
        )
    b, lq, inner = q.shape
    lk, d, out_dtype = k.shape[1], inner // heads, v.dtype
    scale_dtype = jnp.float32 if upcast else q.dtype
    q = (q.astype(scale_dtype) * jnp.asarray(d**-0.5, scale_dtype)).astype(q.dtype)
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    lq_pad, lk_pad = _round_up(lq, PALLAS_LANES), _round_up(lk, PALLAS_LANES)
    d_pad = _round_up(d, PALLAS_LANES)
    q, k, v = (x.reshape(b, x.shape[1], heads, d).transpose(0, 2, 1, 3) for x in (q, k, v))
    q = _pad_to(q, lq_pad, d_pad)  # (B, h, Lq', D')
    k, v = _pad_to(k, lk_pad, d_pad), _pad_to(v, lk_pad, d_pad)  # (B, h, Lk', D')
    kernel = jax.vmap(splash_kernel(heads, lq_pad, lk_pad, lk, d_pad, interpret))
    axes = batch_mesh_axes(b)
    if axes:
        spec = PartitionSpec(axes)
        kernel = jax.shard_map(kernel, in_specs=(spec,) * 3, out_specs=spec, check_vma=False)
    out = kernel(q, k, v)[:, :, :lq, :d]  # (B, h, Lq, D)
    return out.transpose(0, 2, 1, 3).reshape(b, lq, inner).astype(out_dtype)
