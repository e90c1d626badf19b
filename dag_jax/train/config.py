"""Config checks before anything is built: known keys, choices, sizes that divide."""

from __future__ import annotations

import logging
import math
import numbers
import os
from pathlib import Path
from typing import Any

import ml_collections

from dag_jax import rewards
from dag_jax.algos.stats import GROUP_SCALES
from dag_jax.algos.transitions import (
    states_are_shared,
)
from dag_jax.configs import base
from dag_jax.diffusion.schedule import Schedule

log = logging.getLogger("dag_jax.train")

ALGOS = base.ALGOS
B2_OBJECTIVES = ("ddpo", "dag_db", "dag_kl")
DAG_BASELINES = ("rows", "step")
FL_SOURCES = ("current", "sampling")
B2_BASELINES = ("prompt", "prefix")
TRAINABLES = ("lora", "unet")  # train.trainable: a LoRA on a frozen UNet, or the whole UNet


class ConfigError(ValueError):
    """The config names something that does not exist or cannot work together."""


# --------------------------------------------------------------------------- config checks


def default_config() -> ml_collections.ConfigDict:
    """Return every key a config may have, with its default (``dag_jax.configs.base``)."""
    return base.get_config()


def flat_keys(c: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
    """Return {dotted key: value} of a config (reward options count as one value)."""
    out = {}
    for k, v in c.items():
        if isinstance(v, ml_collections.ConfigDict) and k not in ("options",):
            out.update(flat_keys(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def validate(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Raise ConfigError naming the first problem, before anything is built or compiled."""
    known = set(flat_keys(default_config()))
    unknown = sorted(set(flat_keys(config)) - known)
    if unknown:
        hints = [f"{k}{base.did_you_mean(k, known)}" for k in unknown]
        raise ConfigError(f"unknown config key(s): {', '.join(hints)}")
    if config.algo not in ALGOS:
        hint = base.did_you_mean(config.algo, ALGOS)
        raise ConfigError(f"config.algo must be one of {ALGOS}, got {config.algo!r}{hint}")
    check_choice(config, "b2.objective", B2_OBJECTIVES)
    if config.reward.name not in rewards.names():
        hint = base.did_you_mean(config.reward.name, rewards.names())
        raise ConfigError(
            f"unknown reward {config.reward.name!r}{hint}; known: {', '.join(rewards.names())}"
        )
    if config.reward.name == "mix":  # a mix's parts, weights and option keys, before building
        from dag_jax.rewards import mix

        try:
            mix.check_options(config.reward.options)
        except rewards.RewardError as err:
            raise ConfigError(f"config.reward.options: {err}") from err
    # the model, prompt and reward files: train.inputs.check_inputs, all at once
    c = config
    check_ranges(c)
    _divides("sample.chunk", c.sample.chunk, "the device count", num_devices)
    _divides("train.micro_batch", c.train.micro_batch, "the device count", num_devices)
    if c.algo == "b2":
        _divides("b2.prefixes", c.b2.prefixes, "the device count", num_devices)
        if not 1 <= c.b2.low <= c.b2.high <= c.sample.steps:
            raise ConfigError(
                f"need 1 <= b2.low ({c.b2.low}) <= b2.high ({c.b2.high}) <= "
                f"sample.steps ({c.sample.steps})"
            )
    else:
        _divides("sample.trajectories", c.sample.trajectories, "sample.chunk", c.sample.chunk)
        if c.sample.group < 1:
            raise ConfigError(f"sample.group must be >= 1, got {c.sample.group}")
        _divides("sample.trajectories", c.sample.trajectories, "sample.group", c.sample.group)
        _divides(
            "sample.trajectories",
            c.sample.trajectories,
            "train.trajectories_per_step",
            c.train.trajectories_per_step,
        )
    if c.algo == "grpo":
        check_grpo(c)
    check_trainable(c)
    check_prompts(c)
    check_choice(c, "b2.baseline", B2_BASELINES)
    check_choice(c, "dag.baseline", DAG_BASELINES)
    check_choice(c, "dag.fl_source", FL_SOURCES)
    check_choice(c, "ddpo.group_scale", GROUP_SCALES)
    if objective_of(c) == "dag_kl" or step_baseline(c):
        if c.dag.baseline_group < 2:
            raise ConfigError(f"dag.baseline_group must be >= 2, got {c.dag.baseline_group}")
        _divides(
            "train.micro_batch", c.train.micro_batch, "dag.baseline_group", c.dag.baseline_group
        )
    if step_baseline(c):  # windows must split into whole blocks of trajectories
        g = c.dag.baseline_group
        _divides(
            "train.trajectories_per_step", c.train.trajectories_per_step, "dag.baseline_group", g
        )
        if c.algo == "b2":
            _divides(
                "b2.prefixes × b2.branches", c.b2.prefixes * c.b2.branches, "dag.baseline_group", g
            )
        else:
            _divides("sample.trajectories", c.sample.trajectories, "dag.baseline_group", g)
    if c.train.epochs < 1:
        raise ConfigError("train.epochs must be >= 1")


# Sizes every run uses, and those only one kind of run reads: each must be an integer >= 1.
SIZES = (
    "sample.steps",
    "sample.chunk",
    "train.epochs",
    "train.trajectories_per_step",
    "train.micro_batch",
    "train.max_nonfinite",
    "lora.rank",
    "checkpoint.every_epochs",
    "checkpoint.max_to_keep",
    "mesh.min_shard_size",
)
SAMPLER_SIZES = ("sample.trajectories",)  # every algo but B² (its sizes are b2.*)
B2_SIZES = ("b2.prefixes", "b2.branches", "b2.stages", "b2.passes")
LEARNING_RATES = ("train.learning_rate", "train.flow_learning_rate")
GRID_SIZES = ("log.grid_prompts", "log.grid_seeds")


def check_prompts(c: ml_collections.ConfigDict) -> None:
    """Check the prompt source keys: a ``tfds:`` name's syntax and field; no stray tfds keys."""
    from dag_jax.data import PromptError
    from dag_jax.data import tfds as tfds_source

    name = str(c.prompts.name)
    if tfds_source.is_tfds_name(name):
        try:
            tfds_source.parse_name(name)
        except PromptError as err:
            raise ConfigError(f"config.prompts.name: {err}") from err
        if not str(c.prompts.field).strip():
            raise ConfigError(
                f"config.prompts.field must name the text feature of {name!r} (e.g. 'prompt', "
                "or 'meta/text' for a nested one)"
            )
        if c.prompts.root:
            raise ConfigError(
                "config.prompts.root is not read for tfds: prompt sources; set "
                "config.prompts.data_dir to their TFDS data_dir"
            )
        return
    for key in ("field", "data_dir"):
        if c.prompts.get(key):
            raise ConfigError(
                f"config.prompts.{key} is only read for 'tfds:' prompt sources, not {name!r}"
            )


def check_ranges(c: ml_collections.ConfigDict) -> None:
    """Raise ConfigError naming the key, its value and the allowed range of a value out of it.

    Runs before the divisibility checks, so that a size of 0 or -4 is reported as out of
    range rather than as "not divisible by ...".
    """
    sizes = SIZES + (B2_SIZES if c.algo == "b2" else SAMPLER_SIZES)
    for key in sizes:
        _in_range(key, _get(c, key), 1)
    for key in LEARNING_RATES:
        value = _get(c, key)
        ok = _is_number(value) and math.isfinite(value) and value > 0
        if not ok:
            raise ConfigError(
                f"config {key}={value!r} is out of range: it must be a finite number > 0"
            )
    _in_range("log.grid_every_epochs", c.log.grid_every_epochs, 0, "(0: no sample grids)")
    for key in GRID_SIZES:  # a grid of 0 prompts or seeds is only fine when there is none
        if c.log.grid_every_epochs > 0:
            _in_range(key, _get(c, key), 1, "while log.grid_every_epochs > 0")
        else:
            _in_range(key, _get(c, key), 0)
    check_ema_and_eval(c)


EVAL_PROMPTS = ("train", "test", "both")


def check_ema_and_eval(c: ml_collections.ConfigDict) -> None:
    """Raise ConfigError naming the key of a bad ``train.ema_decay`` or ``eval.*`` value."""
    decay = c.train.ema_decay
    if not (_is_number(decay) and math.isfinite(decay) and 0 <= decay < 1):
        raise ConfigError(
            f"config train.ema_decay={decay!r} is out of range: it must be a number in [0, 1) "
            "(0: no EMA; e.g. 0.99)"
        )
    e = c.eval
    _in_range("eval.every_epochs", e.every_epochs, 0, "(0: no evaluation in the loop)")
    _in_range("eval.num_per_prompt", e.num_per_prompt, 1)
    _in_range("eval.seed", e.seed, 0)
    for key in ("eval.max_prompts", "eval.batch_size"):
        _in_range(key, _get(c, key), 0)
    for key in ("eval.grid_prompts", "eval.grid_seeds"):
        _in_range(key, _get(c, key), 1)
    if e.prompts not in EVAL_PROMPTS:
        hint = base.did_you_mean(e.prompts, EVAL_PROMPTS)
        raise ConfigError(
            f"config eval.prompts must be one of {EVAL_PROMPTS}, got {e.prompts!r}{hint}"
        )
    if isinstance(e.test_prompts, str) or not all(isinstance(p, str) for p in e.test_prompts):
        raise ConfigError(
            f"config eval.test_prompts must be a tuple of prompt strings, got {e.test_prompts!r}"
        )
    if not isinstance(e.feature_model, str):
        raise ConfigError(f"config eval.feature_model must be a string, got {e.feature_model!r}")
    if e.ema and not decay > 0:
        raise ConfigError("config eval.ema=True evaluates the EMA weights: set train.ema_decay > 0")


def check_grpo(c: ml_collections.ConfigDict) -> None:
    """Raise ConfigError naming the ``grpo.*`` key that cannot work (``algo=grpo``)."""
    g = c.grpo
    _in_range("grpo.group", g.group, 2, "(a group of 1 has no spread: every advantage is 0)")
    _divides("sample.trajectories", c.sample.trajectories, "grpo.group", g.group)
    for key in ("grpo.clip_range", "grpo.adv_clip"):
        value = _get(c, key)
        if not (_is_number(value) and math.isfinite(value) and value > 0):
            raise ConfigError(f"config {key}={value!r} is out of range: it must be a number > 0")
    if not (_is_number(g.kl) and math.isfinite(g.kl) and g.kl >= 0):
        raise ConfigError(f"config grpo.kl={g.kl!r} is out of range: it must be a number >= 0")
    if g.kl > 0 and c.sample.eta == 0:
        raise ConfigError(
            f"config grpo.kl={g.kl} needs sample.eta > 0: with η = 0 the DDIM step is "
            "deterministic (σ_t = 0) and has no KL to the reference; set grpo.kl=0 or eta > 0"
        )


def check_trainable(c: ml_collections.ConfigDict) -> None:
    """Raise ConfigError for an unknown ``train.trainable`` or one its objective cannot use."""
    value = c.train.trainable
    if value not in TRAINABLES:
        hint = base.did_you_mean(value, TRAINABLES)
        raise ConfigError(
            f"config train.trainable must be one of {TRAINABLES}, got {value!r}{hint}"
        )
    if value == "unet" and c.algo == "grpo" and c.grpo.kl > 0:
        raise ConfigError(
            f"config grpo.kl={c.grpo.kl} with train.trainable='unet': the KL's reference is the "
            "base UNet, which a full fine-tune does not keep beside the trained one (it would "
            "cost one more UNet, sharded like the frozen weights); set grpo.kl=0 or "
            "train.trainable='lora'"
        )


def trains_unet(c) -> bool:
    """Return whether the whole UNet trains (``train.trainable`` = "unet"), not a LoRA."""
    return c.train.trainable == "unet"


def check_choice(c: ml_collections.ConfigDict, key: str, choices) -> None:
    """Raise ConfigError naming ``key``, its value, the choices and the closest one, unless the
    value of the dotted ``key`` is one of ``choices``."""
    value = _get(c, key)
    if value not in choices:
        hint = base.did_you_mean(value, choices)
        raise ConfigError(f"config.{key} must be one of {tuple(choices)}, got {value!r}{hint}")


def _get(c: ml_collections.ConfigDict, dotted: str) -> Any:
    node = c
    for part in dotted.split("."):
        node = node[part]
    return node


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _in_range(key: str, value: Any, low: int, why: str = "") -> None:
    """Raise ConfigError unless ``value`` is an integer >= ``low``."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < low:
        raise ConfigError(
            f"config {key}={value!r} is out of range: it must be an integer >= {low}"
            + (f" {why}" if why else "")
        )


# --------------------------------------------------------------------------- the workdir


def check_workdir(workdir: str | os.PathLike) -> None:
    """Raise ConfigError if ``workdir`` cannot be a run folder, naming it and why.

    A local path must be a folder or not exist yet, and its nearest existing ancestor must be
    a folder (``runs/a_file/run`` cannot be created). A URL (``gs://bucket/run``) is only
    checked for its form here: a scheme, ``://`` and a bucket; whether it can be written is
    ``train.workdir.check_writable``'s job. ``gs:/bucket/run`` (a URL that went through
    ``pathlib.Path``) is named as such.
    """
    text = os.fspath(workdir)
    if not text.strip():
        raise ConfigError("the workdir is empty; pass --workdir=FOLDER (or gs://bucket/run)")
    head, sep, rest = text.partition("://")
    if sep:
        if not head.isalnum():
            raise ConfigError(f"the workdir {text!r} is not a URL of the form scheme://bucket/path")
        if not rest.split("/", 1)[0]:
            raise ConfigError(f"the workdir URL {text!r} names no bucket: use {head}://bucket/path")
        return
    if text.startswith(("gs:/", "s3:/")):
        raise ConfigError(
            f"the workdir {text!r} looks like a URL that lost a slash (pathlib.Path does that); "
            f"pass it as a string: {text.replace(':/', '://', 1)}"
        )
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(
            f"the workdir {text} is an existing file, not a folder; pass a folder (new or an "
            "earlier run's) as --workdir"
        )
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(
                    f"the workdir {text} cannot be created: {parent} is a file, not a folder"
                )
            break


def _divides(name: str, value: int, what: str, by: int) -> None:
    if by <= 0 or value <= 0 or value % by:
        raise ConfigError(f"config {name}={value} is not divisible by {what} ({by})")


def step_baseline(c) -> bool:
    """Return whether a DAG objective takes its baselines over step groups (``dag.baseline``)."""
    return objective_of(c).startswith("dag") and c.dag.baseline == "step"


def trajectory_group(c) -> int:
    """Return how many consecutive trajectories of an epoch share prompt and x_T (or prefix)."""
    return c.b2.branches if c.algo == "b2" else c.sample.group


def noise_group(c) -> int:
    """Return how many consecutive trajectories of a sampling call share their initial x_T.

    ``sample.group``; GRPO: ``grpo.group`` when ``grpo.share_noise``, else 1. Evaluation
    sets ``sample.group`` = 1 and ``grpo.share_noise`` = False (every seed its own x_T).
    """
    if c.algo == "grpo":
        return c.grpo.group if c.grpo.share_noise else 1
    return c.sample.group


def objective_of(c) -> str:
    """Return the loss an algo trains with (B² has its own choice)."""
    return c.b2.objective if c.algo == "b2" else c.algo


def fl_from_sampling(c) -> bool:
    """Return whether DAG's forward-looking x̂₀ come from the sampling pass (``dag.fl_source``)."""
    return objective_of(c).startswith("dag") and c.dag.fl_source == "sampling"


def flow_per_state(c, schedule: Schedule, start: int, num_steps: int) -> bool:
    """Return whether a window of steps [start, start + num_steps) computes F̃ once per state.

    DAG objectives, where the states chain exactly (``transitions.states_are_shared``): F̃ of
    each state once per window (a forward at its start, one VJP over the states at its end),
    the same gradient as the release's F̃ on [x_t; x_s] per row with half the flow passes that
    need a backward. Otherwise F̃ is evaluated per row, as released.
    """
    if not objective_of(c).startswith("dag"):
        return False
    return states_are_shared(schedule, start, num_steps)
