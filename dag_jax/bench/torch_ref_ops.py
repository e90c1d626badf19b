"""The PyTorch reference of ``python -m dag_jax.bench ops``: each kernel as PyTorch runs it.

Imported only when torch is installed. ``F.conv2d`` (oneDNN on the CPU),
``F.scaled_dot_product_attention`` and ``F.group_norm`` on the same NumPy inputs as the JAX
side (channels-last there, so they are transposed to PyTorch's channels-first here), fp32.
Each builder returns (forward, forward + backward, the forward's output in the JAX layout).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

TorchOp = tuple[Callable[[], torch.Tensor], Callable[[], list[torch.Tensor]], np.ndarray]


def use_threads(n: int) -> None:
    """Let torch's CPU kernels use ``n`` threads."""
    torch.set_num_threads(n)


def channels_first(a: np.ndarray) -> torch.Tensor:
    """Return an (N, H, W, C) array as a contiguous (N, C, H, W) tensor."""
    return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))


def channels_last(y: torch.Tensor) -> np.ndarray:
    """Return an (N, C, H, W) tensor as an (N, H, W, C) array."""
    return y.detach().numpy().transpose(0, 2, 3, 1)


def fwd_and_grad(
    fn: Callable[..., torch.Tensor],
    inputs: Sequence[torch.Tensor],
    cotangent: torch.Tensor,
    to_jax_layout: Callable[[torch.Tensor], np.ndarray],
) -> TorchOp:
    """Return (forward, forward + backward to every input, forward output) of ``fn(*inputs)``."""

    def fwd() -> torch.Tensor:
        with torch.no_grad():
            return fn(*inputs)

    leaves = [t.clone().requires_grad_() for t in inputs]

    def grad() -> list[torch.Tensor]:
        for t in leaves:
            t.grad = None
        fn(*leaves).backward(cotangent)
        return [t.grad for t in leaves]

    return fwd, grad, to_jax_layout(fwd())


def conv3x3(x: np.ndarray, kernel: np.ndarray, cotangent: np.ndarray) -> TorchOp:
    """Return the ``TorchOp`` of a 3×3, padding-1 conv of NHWC ``x`` with an HWIO kernel."""
    k = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
    fn = lambda a, b: F.conv2d(a, b, padding=1)
    return fwd_and_grad(fn, [channels_first(x), k], channels_first(cotangent), channels_last)


def group_norm(
    x: np.ndarray, scale: np.ndarray, bias: np.ndarray, cotangent: np.ndarray, groups: int
) -> TorchOp:
    """Return the ``TorchOp`` of a GroupNorm (ε = 1e-5) of NHWC ``x`` in ``groups`` groups."""
    inputs = [channels_first(x), torch.from_numpy(scale), torch.from_numpy(bias)]
    fn = lambda a, w, b: F.group_norm(a, groups, w, b, eps=1e-5)
    return fwd_and_grad(fn, inputs, channels_first(cotangent), channels_last)


def attention(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, cotangent: np.ndarray, heads: int
) -> TorchOp:
    """Return the ``TorchOp`` of softmax attention of (B, L, heads·D) q over k, v."""

    def split(a: np.ndarray) -> torch.Tensor:  # (B, L, H·D) → (B, H, L, D)
        t = torch.from_numpy(a).view(a.shape[0], a.shape[1], heads, -1)
        return t.transpose(1, 2).contiguous()

    b, lq = q.shape[:2]
    to_jax_layout = lambda y: y.detach().transpose(1, 2).reshape(b, lq, -1).numpy()
    inputs = [split(a) for a in (q, k, v)]
    return fwd_and_grad(F.scaled_dot_product_attention, inputs, split(cotangent), to_jax_layout)
