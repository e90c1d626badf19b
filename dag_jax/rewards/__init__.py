"""Reward registry: ``dag_jax.rewards.get(name, **options) -> Reward`` (see ``rewards.base``).

    reward = dag_jax.rewards.get("aesthetic", clip="openai/clip-vit-large-patch14")
    scores = reward(images, prompts)               # eager, (B,) float32
    fn = reward.bind(prompts_of_the_epoch)         # inside jit: fn(images, prompt_idx)

Factories are imported lazily, so asking for ``jpeg_compressibility`` never imports CLIP code
and a reward whose optional dependency is missing fails only when asked for, with its name.
"""

from __future__ import annotations

import importlib
import inspect

from dag_jax.rewards.base import Reward, RewardError, host_reward, jax_reward, quantize

__all__ = ["Reward", "RewardError", "get", "names", "register", "host_reward", "jax_reward"]
__all__ += ["quantize"]

# name -> "module:factory"; each factory takes keyword options and returns a Reward.
_FACTORIES: dict[str, str] = {
    "jpeg_compressibility": "dag_jax.rewards.jpeg:compressibility",
    "jpeg_incompressibility": "dag_jax.rewards.jpeg:incompressibility",
    "aesthetic": "dag_jax.rewards.aesthetic:aesthetic",
    "clipscore": "dag_jax.rewards.clipscore:clipscore",
    "hpsv2": "dag_jax.rewards.clipscore:hpsv2",
    "tiny_clipscore": "dag_jax.rewards.clipscore:tiny_clipscore",
    "imagereward": "dag_jax.rewards.imagereward:imagereward",
    "pickscore": "dag_jax.rewards.pickscore:pickscore",
    "mix": "dag_jax.rewards.mix:mix",
    "bertscore": "dag_jax.rewards.captioning:bertscore",
}


def names() -> list[str]:
    """Return the registered reward names."""
    return sorted(_FACTORIES)


def register(name: str, factory: str) -> None:
    """Register ``"module:function"`` as the factory of reward ``name`` (replacing any)."""
    if ":" not in factory:
        raise RewardError(f"factory must be 'module:function', got {factory!r}")
    _FACTORIES[name] = factory


def factory(name: str):
    """Return the factory function of reward ``name`` (importing its module)."""
    if name not in _FACTORIES:
        raise RewardError(f"unknown reward {name!r}; known rewards: {', '.join(names())}")
    module, fn = _FACTORIES[name].split(":")
    try:
        return getattr(importlib.import_module(module), fn)
    except ImportError as e:
        raise RewardError(
            f"reward {name!r} could not be loaded: {e} (is its optional dependency installed?)"
        ) from e


def get(name: str, **options) -> Reward:
    """Return the Reward ``name`` built with ``options``; unknown options raise RewardError."""
    make = factory(name)
    params = inspect.signature(make).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(options) - set(params))
        if unknown:
            raise RewardError(
                f"reward {name!r} has no option(s) {', '.join(unknown)}; "
                f"its options: {', '.join(params) or 'none'}"
            )
    return make(**options)
