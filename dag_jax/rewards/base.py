"""The one interface every reward follows, and the helpers that build rewards on it.

A ``Reward`` scores a batch of images against their prompts:

    scores = reward(images, prompts)          # eager: (B, H, W, 3) float in [0, 1], list[str]
    fn = reward.bind(prompt_list)             # for use inside jit:
    scores = fn(images, prompt_idx)           #   prompt_idx (B,) int32 indices into prompt_list

Both return float32 scores of shape (B,). Images are quantised to uint8 levels first
(``quantize``), as every reference implementation does (they go through PIL).

Rewards come in two kinds:

- JAX-native (``jittable=True``): ``score(images, prompt_idx)`` is traced; prompts enter only as
  indices into a token table built on the host by ``bind``. Strings never enter jit.
- Host rewards (``jittable=False``): a NumPy/PIL/PyTorch function run through
  ``jax.pure_callback`` with a fixed (B,) float32 result, so the surrounding program stays
  shape-stable; the callback maps the indices back to strings on the host.

Either way, no gradient flows through a reward (SPEC §8): outputs pass ``stop_gradient``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# (images (B, H, W, 3) float in [0, 1], prompt_idx (B,) int32) -> (B,) float32
BoundFn = Callable[[jax.Array, jax.Array], jax.Array]
# Build a BoundFn for a fixed prompt list (called once per prompt list, on the host).
BindFn = Callable[[Sequence[str]], BoundFn]
# Host scorer: (uint8 images (B, H, W, 3) numpy, prompts list[str]) -> (B,) float array.
HostFn = Callable[[np.ndarray, list[str]], np.ndarray]


class RewardError(ValueError):
    """A reward was asked for with a bad name, option, weight file or input."""


def quantize(images: jax.Array) -> jax.Array:
    """Return images in [0, 1] rounded to the 256 uint8 levels (still float32, in [0, 1]).

    Same as ``(x * 255).round().clip(0, 255).astype(uint8) / 255`` of the references; values
    outside [0, 1] are clipped, as the references' uint8 cast does after clamping.
    """
    x = jnp.clip(jnp.asarray(images, jnp.float32), 0.0, 1.0)
    return jnp.round(x * 255.0) / 255.0


def to_uint8(images) -> np.ndarray:
    """Return host uint8 (B, H, W, 3) images from float images in [0, 1]."""
    x = np.clip(np.asarray(images, np.float32), 0.0, 1.0)
    return np.round(x * 255.0).astype(np.uint8)


def check_static(images, name: str, batch_dims: int | None = 1) -> None:
    """Raise RewardError unless ``images`` has shape (..., H, W, 3) and a float dtype.

    ``batch_dims`` is the number of leading axes required (None: at least one). Works on
    tracers too (shapes and dtypes are static), so the bound functions check inside jit.
    """
    shape = getattr(images, "shape", None)
    ok_rank = shape is not None and (
        len(shape) == 3 + batch_dims if batch_dims is not None else len(shape) >= 4
    )
    if not ok_rank or shape[-1] != 3:
        raise RewardError(
            f"reward {name!r} expects images of shape (B, H, W, 3) (NHWC, RGB), got {shape}"
        )
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise RewardError(
            f"reward {name!r} expects float images in [0, 1], got dtype {images.dtype} "
            "(divide uint8 images by 255)"
        )


def check_images(images, name: str) -> None:
    """Raise RewardError unless ``images`` is a (B, H, W, 3) float batch in [0, 1].

    The range is only checked for concrete (eager) arrays; inside jit it cannot be checked
    cheaply (shape and dtype still are).
    """
    check_static(images, name)
    if isinstance(images, jax.core.Tracer):
        return
    lo, hi = float(np.min(images)), float(np.max(images))
    if lo < -1e-3 or hi > 1 + 1e-3:
        hint = " (looks like [-1, 1]: use (x + 1) / 2)" if lo < -0.05 else ""
        hint = " (looks like [0, 255]: divide by 255)" if hi > 2 else hint
        raise RewardError(
            f"reward {name!r} expects images in [0, 1], got values in [{lo:.3g}, {hi:.3g}]{hint}"
        )


@dataclasses.dataclass(frozen=True)
class Reward:
    """A named reward: ``bind`` builds a jit-usable scorer for a prompt list.

    ``jittable`` says whether the bound function is pure JAX (False: it is a host callback
    inside jit). ``config`` records the options it was built with (for logs and checkpoints).
    ``host`` is the host scorer of a host reward (None for JAX-native ones): eager calls run it
    directly, so its errors (e.g. RewardError) surface as themselves instead of wrapped in a
    ``JaxRuntimeError`` from the callback.

    Inside a compiled train step use ``bind_params(prompts)`` → ``fn(params, images, idx)`` and
    pass ``reward.params`` (the reward model's weights) as an argument of the jitted function:
    weights a function merely closes over are baked into the program as constants (gigabytes
    for CLIP ViT-H). ``bind`` is the closed-over convenience form.
    """

    name: str
    bind: BindFn
    jittable: bool
    config: dict = dataclasses.field(default_factory=dict)
    host: HostFn | None = None
    params: Any = None
    bind_params: Callable[[Sequence[str]], Callable] | None = None

    def bound_with_params(self, prompt_list: Sequence[str]) -> Callable:
        """Return ``fn(params, images, prompt_idx)`` (host rewards ignore ``params``)."""
        if self.bind_params is not None:
            return self.bind_params(prompt_list)
        fn = self.bind(prompt_list)
        return lambda params, images, prompt_idx: fn(images, prompt_idx)

    def __call__(self, images, prompts: Sequence[str]) -> jax.Array:
        """Return (B,) float32 scores of eager images in [0, 1] for their prompts."""
        check_images(images, self.name)
        prompts = list(prompts)
        if len(prompts) != images.shape[0]:
            raise RewardError(
                f"reward {self.name!r}: {images.shape[0]} images but {len(prompts)} prompts"
            )
        if self.host is not None:
            scores = _host_scores(self.name, self.host, to_uint8(images), prompts)
            return jnp.asarray(scores)
        unique = sorted(set(prompts))
        idx = np.asarray([unique.index(p) for p in prompts], np.int32)
        images, idx = jnp.asarray(images, jnp.float32), jnp.asarray(idx)
        if self.jittable:  # the weights are an argument, not constants baked into the program
            return jax.jit(self.bound_with_params(unique))(self.params, images, idx)
        return self.bind(unique)(images, idx)


def host_reward(name: str, fn: HostFn, config: dict | None = None) -> Reward:
    """Return a Reward running the host function ``fn(uint8 images, prompts)`` via callback.

    The callback is batched (one call per batch, ``vmap_method="broadcast_all"``) and declares a
    (B,) float32 result, so it can sit inside a jitted train step.
    """

    def bind(prompt_list: Sequence[str]) -> BoundFn:
        table = list(prompt_list)

        def host(images: np.ndarray, idx: np.ndarray) -> np.ndarray:
            images = np.asarray(images)
            lead = images.shape[:-3]
            flat = to_uint8(images.reshape((-1, *images.shape[-3:])))
            prompts = [table[int(i)] for i in np.asarray(idx).reshape(-1)]
            if len(prompts) != flat.shape[0]:  # broadcast idx over extra image axes
                prompts = [table[int(i)] for i in np.broadcast_to(idx, lead).reshape(-1)]
            return _host_scores(name, fn, flat, prompts).reshape(lead)

        def bound(images: jax.Array, prompt_idx: jax.Array) -> jax.Array:
            check_static(images, name, batch_dims=None)
            images = jax.lax.stop_gradient(jnp.asarray(images, jnp.float32))
            out_shape = jax.ShapeDtypeStruct(images.shape[:-3], jnp.float32)
            scores = jax.pure_callback(
                host, out_shape, images, prompt_idx, vmap_method="broadcast_all"
            )
            return scores

        return bound

    return Reward(name=name, bind=bind, jittable=False, config=dict(config or {}), host=fn)


def _host_scores(name: str, fn: HostFn, images: np.ndarray, prompts: list[str]) -> np.ndarray:
    """Return ``fn(images, prompts)`` as (B,) float32, raising RewardError on a wrong shape."""
    out = np.asarray(fn(images, prompts), np.float32)
    if out.shape != (images.shape[0],):
        raise RewardError(
            f"reward {name!r} returned scores of shape {out.shape} for {images.shape[0]} images"
        )
    return out


def jax_reward(
    name: str,
    score: Callable[..., jax.Array],
    tokenize: Callable[[Sequence[str]], jax.Array] | None = None,
    config: dict | None = None,
    params: Any = None,
) -> Reward:
    """Return a JAX-native Reward.

    ``score(quantised_images, tokens)`` — or ``score(params, quantised_images, tokens)`` when
    ``params`` (the reward model's weights) is given — maps (B, H, W, 3) float images (already
    quantised) and per-image prompt tokens (B, ...) to (B,) scores. ``tokenize(prompt_list)``
    returns a (P, ...) token table on the host (None for prompt-free rewards: ``tokens`` is then
    the index).
    """

    def bind_params(prompt_list: Sequence[str]) -> Callable:
        table = None if tokenize is None else np.asarray(tokenize(list(prompt_list)))

        def bound(weights, images: jax.Array, prompt_idx: jax.Array) -> jax.Array:
            check_static(images, name, batch_dims=None)
            x = quantize(jax.lax.stop_gradient(images))
            tokens = prompt_idx if table is None else jnp.asarray(table)[prompt_idx]
            out = score(x, tokens) if params is None else score(weights, x, tokens)
            return jax.lax.stop_gradient(out).astype(jnp.float32)

        return bound

    def bind(prompt_list: Sequence[str]) -> BoundFn:
        fn = bind_params(prompt_list)
        return lambda images, prompt_idx: fn(params, images, prompt_idx)

    return Reward(
        name=name,
        bind=bind,
        jittable=True,
        config=dict(config or {}),
        params=params,
        bind_params=bind_params,
    )


# (images (B, H, W, 3) float in [0, 1], prompt_idx (B,) indices into the prompt list)
#   -> (B,) float32 host scores
ScoreFn = Callable[[jax.Array, Any], np.ndarray]


def scorer(
    reward: Reward,
    prompts: Sequence[str],
    *,
    to_host: Callable[[Any], np.ndarray] = np.asarray,
    jitted: Callable | None = None,
) -> ScoreFn:
    """Return ``score(images, prompt_idx)`` → (B,) float32 host scores of ``reward`` on ``prompts``.

    JAX-native rewards run jitted, with ``reward.params`` passed as an argument (not baked in
    as constants); ``prompt_idx`` may be a host or a device (e.g. batch-sharded) array.
    ``jitted`` is a ready ``jax.jit(reward.bound_with_params(prompts))`` to reuse, so that a
    caller scoring batch after batch compiles once (None: jitted here). Host rewards score the
    host images against the prompt strings. ``to_host`` brings device arrays (the images, a
    jitted reward's scores, device indices) to the host: ``dag_jax.infra.parallel.gather`` for
    arrays sharded over processes.
    """
    table = list(prompts)
    if not reward.jittable:

        def host_score(images: jax.Array, prompt_idx: Any) -> np.ndarray:
            idx = np.asarray(to_host(prompt_idx)).reshape(-1)
            scores = reward(np.asarray(to_host(images)), [table[int(i)] for i in idx])
            return np.asarray(scores, np.float32)

        return host_score
    fn = jitted if jitted is not None else jax.jit(reward.bound_with_params(table))

    def jax_score(images: jax.Array, prompt_idx: Any) -> np.ndarray:
        idx = prompt_idx if isinstance(prompt_idx, jax.Array) else np.asarray(prompt_idx, np.int32)
        return np.asarray(to_host(fn(reward.params, images, idx)), np.float32)

    return jax_score


def token_table(tokenizer: Any, prompts: Sequence[str], length: int) -> np.ndarray:
    """Return (P, 2, length) int32: each prompt's token ids and attention mask.

    The tokenizer is called as the reward packages call it (``padding="max_length"``,
    ``truncation=True``, ``max_length=length``; the end token kept when truncating).
    """
    if not prompts:
        return np.zeros((0, 2, length), np.int32)
    out = tokenizer(
        list(prompts),
        padding="max_length",
        truncation=True,
        max_length=length,
        return_tensors="np",
    )
    return np.stack([out["input_ids"], out["attention_mask"]], axis=1).astype(np.int32)
