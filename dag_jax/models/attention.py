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
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

ATTENTION_IMPLS = ("xla", "jax", "cudnn")
CPU_SCORE_BLOCK = 2**22  # score entries (16 MiB of fp32) per forward-only block, single CPU
CPU_GRAD_SCORE_BLOCK = 2**20  # score entries (4 MiB) per block under differentiation


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    heads: int,
    upcast: bool = True,
    impl: str = "xla",
) -> jax.Array:
    """Return softmax(q kᵀ/√d) v over heads for (B, Lq, H·D), (B, Lk, H·D) inputs.

    ``impl`` chooses the formulation (same math, numerics within rounding):

    - ``"xla"``: the formulation above. Scores are formed in fp32 when ``upcast`` (diffusers'
      ``upcast_attention``), and the softmax always runs in fp32. The result has v's dtype.
    - ``"jax"``: ``jax.nn.dot_product_attention`` letting XLA pick (softmax in fp32).
    - ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")``, the fused flash
      kernel on NVIDIA GPUs (bf16/fp16 compute only; scores never materialise in memory).
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    b, lq, inner = q.shape
    lk = k.shape[1]
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
