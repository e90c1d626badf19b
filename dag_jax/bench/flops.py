"""Model FLOPs of a JAX function, counted on its jaxpr with every loop body × its trip count.

XLA's cost analysis (``Lowered.cost_analysis()``) counts the body of a while loop once. A
``lax.map`` or ``lax.scan`` is such a loop, so every program built on them was under-counted:
the sampler's ``lax.scan`` over steps, the forward-looking rewards' and state flows'
``lax.map`` over states, and, on a single CPU device, the attention's ``lax.map`` over blocks
of (batch · head) slices (``models.attention``), where an SD1.5 self-attention at 64² latents
runs in 128 one-slice blocks and was counted as one.

Here the model FLOPs are the multiply-adds of matrix products and convolutions, two FLOPs
each (elementwise work is not counted: it is not what a chip's peak measures). Sub-programs
(``jit``, ``custom_vjp``/``custom_jvp``, ``remat``, ``shard_map``) are entered; a ``scan``
body counts ``length`` times; ``cond`` counts its most expensive branch; a ``while`` loop,
whose trip count is not static, counts its body once and is reported in ``Count.loops``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
from jax._src.interpreters import partial_eval as pe  # dce_jaxpr: no public equivalent
from jax.extend import core as jcore


@dataclasses.dataclass
class Count:
    """FLOPs of matrix products and convolutions, and the while loops counted once."""

    dot: float = 0.0
    conv: float = 0.0
    loops: int = 0

    @property
    def total(self) -> float:
        return self.dot + self.conv

    def add(self, other: Count, times: float = 1.0) -> None:
        self.dot += times * other.dot
        self.conv += times * other.conv
        self.loops += other.loops


def dot_flops(eqn) -> float:
    """Return 2 × batch × M × N × K of a ``dot_general`` equation."""
    (contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    out = eqn.outvars[0].aval.shape
    return 2.0 * math.prod(out) * math.prod(lhs[d] for d in contract)


def conv_flops(eqn) -> float:
    """Return 2 × the multiply-adds of a convolution that touch real (unpadded) input.

    Each output element sums over the kernel's input features (already C_in /
    feature_group_count) and those window taps that land on the input rather than on its
    padding or, for a transposed convolution, the holes of its dilation: what XLA's cost
    analysis counts, so a 3×3 "same" convolution of an 8×8 map counts (22/24)² of its taps.
    """
    p = eqn.params
    dn = p["dimension_numbers"]
    lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
    out = eqn.outvars[0].aval.shape
    taps = 1
    for i in range(len(dn.rhs_spec) - 2):
        size = (lhs[dn.lhs_spec[2 + i]] - 1) * p["lhs_dilation"][i] + 1  # dilated input
        lo = p["padding"][i][0]
        positions = (
            o * p["window_strides"][i] - lo + j * p["rhs_dilation"][i]
            for o in range(out[dn.out_spec[2 + i]])
            for j in range(rhs[dn.rhs_spec[2 + i]])
        )
        taps *= sum(1 for x in positions if 0 <= x < size and x % p["lhs_dilation"][i] == 0)
    per_tap = out[dn.out_spec[0]] * out[dn.out_spec[1]] * rhs[dn.rhs_spec[1]]
    return 2.0 * taps * per_tap


def _sub_jaxprs(value):
    if isinstance(value, jcore.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jcore.Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _sub_jaxprs(v)


def jaxpr_count(jaxpr) -> Count:
    """Return the Count of a (closed or open) jaxpr."""
    if isinstance(jaxpr, jcore.ClosedJaxpr):
        jaxpr = jaxpr.jaxpr
    count = Count()
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            count.dot += dot_flops(eqn)
        elif name == "conv_general_dilated":
            count.conv += conv_flops(eqn)
        elif name == "scan":
            count.add(jaxpr_count(eqn.params["jaxpr"]), eqn.params["length"])
        elif name == "cond":
            branches = [jaxpr_count(b) for b in eqn.params["branches"]]
            count.add(max(branches, key=lambda c: c.total))
        elif name == "while":
            count.add(jaxpr_count(eqn.params["body_jaxpr"]))
            count.loops += 1
        else:  # jit, custom_vjp/jvp, remat, shard_map, …: count what they call, once
            for value in eqn.params.values():
                for sub in _sub_jaxprs(value):
                    count.add(jaxpr_count(sub))
    return count


def count(fn: Callable, *args, **kwargs) -> Count:
    """Return the Count of ``fn(*args, **kwargs)`` (arrays or ``jax.ShapeDtypeStruct``s).

    ``fn`` may be jitted; static arguments must be bound (``functools.partial``) first. What
    the outputs do not need is dropped first, as lowering drops it (a gradient's unused
    primal forward, for one).
    """
    closed = jax.make_jaxpr(fn)(*args, **kwargs)
    jaxpr, _ = pe.dce_jaxpr(closed.jaxpr, [True] * len(closed.jaxpr.outvars))
    return jaxpr_count(jaxpr)


def model_flops(fn: Callable, *args, **kwargs) -> float:
    """Return the matmul and convolution FLOPs of one call of ``fn`` (see ``count``)."""
    return count(fn, *args, **kwargs).total
