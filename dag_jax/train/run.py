"""Build a run from its config: model, flow, prompts, reward, trainable tree, optimizer.

Shared by training, evaluation and export (``build_model``/``restore`` of a workdir).

``train.trainable`` says what θ is. "lora" (the releases): a LoRA on the attention projections
of a frozen UNet; the LoRA, flow and optimizer state are replicated on the mesh. "unet" (full
fine-tuning): every UNet weight trains; the UNet params move from the frozen tree into the
trainable one (``init_trainable``, then ``without_frozen_unet``: one copy, not two), and they,
the flow and the AdamW moments are sharded on the mesh's "fsdp" axis as the frozen weights are
(``Model.trainable_layout``: each leaf's largest axis that fsdp divides; leaves under
``mesh.min_shard_size`` elements whole). The jitted steps constrain the gradient sum, the new
params and the optimizer state to those shardings (a reduce-scatter of the gradients), and
orbax writes and reads the checkpoint's arrays sharded."""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np

from dag_jax import rewards
from dag_jax.algos.optim import GroupConfig, make_optimizer
from dag_jax.diffusion.schedule import Schedule, make_schedule
from dag_jax.infra import parallel
from dag_jax.models.flow import FlowConfig, FlowNetwork
from dag_jax.models.lora import LoRAConfig, init_lora
from dag_jax.pipeline import Pipeline
from dag_jax.train.config import ConfigError, objective_of, trains_unet

log = logging.getLogger("dag_jax.train")

# --------------------------------------------------------------------------- the model


@dataclasses.dataclass
class Model:
    """Everything static a run computes with: modules, schedule, frozen params, prompts."""

    pipe: Pipeline
    flow: FlowNetwork
    lora: LoRAConfig
    schedule: Schedule
    frozen: dict  # {"unet", "vae", "text_encoder"} fp32, sharded
    prompts: list[str]
    prompt_ids: np.ndarray  # (P, L) int32 token ids
    uncond: jax.Array  # (1, L, D) embedding of the negative prompt
    reward: rewards.Reward
    latent_shape: tuple[int, int, int]
    # where the trainable tree and its optimizer state live (replicated; train.trainable=unet:
    # FSDP-sharded); without a mesh (abstract benches) the steps constrain nothing
    trainable_layout: parallel.TreeLayout = dataclasses.field(default_factory=parallel.TreeLayout)

    def eps_fn(self, policy, x, t, ctx):
        """Return the adapted UNet's output; ``policy`` = {"base": unet params, "lora": …}.

        A full fine-tune's policy has the trained UNet as "base" and an empty "lora".
        """
        variables = {"params": policy["base"], "lora": policy["lora"]}
        return self.pipe.unet.apply(variables, x, t, ctx).sample

    def flow_fn(self, flow_params, x, t, ctx):
        """Return F̃_φ(x, t, c), (B,) fp32."""
        return self.flow.apply({"params": flow_params}, x, t, ctx)

    @staticmethod
    def policy_of(frozen: dict, trainable: dict) -> dict:
        """Return the policy params {"base": frozen UNet, "lora": trainable LoRA}.

        A trainable tree with a "unet" (``train.trainable=unet``): {"base": that UNet,
        "lora": {}}; the frozen tree then holds no UNet.
        """
        if "unet" in trainable:
            return {"base": trainable["unet"], "lora": {}}
        return {"base": frozen["unet"], "lora": trainable["lora"]}


def load_model(config, mesh, task: bool = True) -> Model:
    """Return the Model: pipeline (loaded or random-tiny), flow, prompts, reward.

    ``task=False`` leaves out the prompts, their negative embedding and the reward (empty /
    None): what tools that only restore a run's checkpoints need (``dag_jax.export``).
    """
    import dag_jax
    from dag_jax.tinyworld import random_tiny as tiny

    dtype = jnp.dtype(config.dtype)
    if config.model == "random-tiny":
        pipe = tiny.random_tiny_pipeline(config.seed)
        pipe = dataclasses.replace(
            pipe,
            unet=pipe.unet.clone(dtype=dtype, remat=config.remat),
            vae=pipe.vae.clone(dtype=dtype),
        )
    else:
        pipe = dag_jax.load_pipeline(
            config.model,
            dtype=dtype,
            variant=config.variant or None,
            revision=config.revision or None,
            remat=config.remat,
        )
    lora = LoRAConfig(rank=config.lora.rank, alpha=config.lora.alpha)
    pipe = dataclasses.replace(
        pipe, unet=pipe.unet.clone(lora_scale=lora.scale, attention_impl=config.attention)
    )
    side = config.resolution or pipe.unet.config.sample_size
    latent_shape = (pipe.unet.config.in_channels, side, side)
    flow = make_flow(config, pipe.unet.config)
    min_size = config.mesh.min_shard_size
    frozen = parallel.put(pipe.params, parallel.fsdp_shardings(mesh, pipe.params, min_size))
    prompts, prompt_ids, uncond, reward = [], np.zeros((0, 1), np.int32), None, None
    if task:
        prompts = load_prompts(config)
        prompt_ids = pipe.encode_prompt_ids(prompts)
        neg = jnp.asarray(pipe.encode_prompt_ids([config.prompts.negative]))
        uncond = jax.jit(pipe.encode_text)(frozen["text_encoder"], neg)
        reward = rewards.get(config.reward.name, **dict(config.reward.options))
    return Model(
        pipe=pipe,
        flow=flow,
        lora=lora,
        schedule=make_schedule(pipe.scheduler_config, config.sample.steps),
        frozen=frozen,
        prompts=prompts,
        prompt_ids=prompt_ids,
        uncond=uncond,
        reward=reward,
        latent_shape=latent_shape,
        trainable_layout=parallel.TreeLayout(mesh, fsdp=trains_unet(config), min_size=min_size),
    )


def without_frozen_unet(model: Model) -> Model:
    """Return ``model`` without its frozen UNet when the UNet is trained (``train.trainable``).

    Call once ``init_trainable`` has taken it: the trainable tree then holds the only copy,
    and the UNet's memory is not spent twice. A LoRA model is returned as it is.
    """
    if not model.trainable_layout.fsdp or "unet" not in model.frozen:
        return model
    frozen = {k: v for k, v in model.frozen.items() if k != "unet"}
    return dataclasses.replace(model, frozen=frozen)


def make_flow(config, unet_config) -> FlowNetwork:
    """Return the flow network of ``config.flow`` for a UNet's latent channels and text width."""
    return FlowNetwork(
        FlowConfig(
            in_channels=unet_config.in_channels,
            cross_attention_dim=unet_config.cross_attention_dim,
            block_out_channels=tuple(config.flow.block_out_channels),
            down_block_types=_flow_blocks(len(config.flow.block_out_channels)),
            layers_per_block=config.flow.layers_per_block,
            attention_heads=config.flow.attention_heads,
            norm_num_groups=min(32, min(config.flow.block_out_channels)),
        ),
        dtype=jnp.dtype(config.dtype),
    )


def _flow_blocks(n: int) -> tuple[str, ...]:
    """Return the flow's down-block types: cross-attention except in the last block."""
    return ("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",) if n > 1 else ("DownBlock2D",)


def load_prompts(config) -> list[str]:
    """Return the training prompts of the config (a named set's or TFDS source's train split,
    or inline)."""
    if config.prompts.name == "inline":
        prompts = [str(p) for p in config.prompts.inline]
        if not prompts:
            raise ConfigError("config.prompts.inline is empty")
        return prompts
    from dag_jax.data import prompts as prompt_sets

    return list(prompt_sets.from_config(config.prompts).train)


def init_trainable(model: Model, config, key: jax.Array) -> dict:
    """Return the trainable tree {"lora": …, "flow": …} (flow only for DAG objectives).

    ``train.trainable=unet``: {"unet": the frozen UNet's params (the same arrays), …}.
    """
    k_lora, k_flow = jax.random.split(key)
    if "unet" not in model.frozen:
        raise ValueError(
            "init_trainable needs the model's frozen UNet, which without_frozen_unet removed"
        )
    if trains_unet(config):
        out = {"unet": model.frozen["unet"]}
    else:
        out = {"lora": init_lora(k_lora, model.frozen["unet"], model.lora)}
    if objective_of(config).startswith("dag"):
        c, s = model.latent_shape[0], model.latent_shape[1]
        d = model.pipe.unet.config.cross_attention_dim
        out["flow"] = model.flow.init(
            k_flow, jnp.zeros((1, c, s, s)), jnp.zeros((1,), jnp.int32), jnp.zeros((1, 1, d))
        )["params"]
        if config.dag.anchor_initial_flow:
            out["log_z"] = jnp.zeros((), jnp.float32)
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), out)


def checkpoint_template(model: Model, config) -> dict:
    """Return the abstract {"trainable", "opt_state"[, "ema"]} tree of a run's checkpoints
    (no compute; "ema" when ``train.ema_decay`` > 0)."""

    def build(frozen):  # the frozen tree as an argument: shapes only, nothing computed
        trainable = init_trainable(dataclasses.replace(model, frozen=frozen), config, key)
        out = {"trainable": trainable, "opt_state": make_tx(config, trainable).init(trainable)}
        return {**out, "ema": trainable} if config.train.ema_decay > 0 else out

    key = jax.random.key(0)
    template = jax.eval_shape(build, model.frozen)
    # with a mesh, every leaf carries its trainable_layout sharding: where a restore places
    # it (a full fine-tune's UNet and moments sharded, as training saved them)
    layout = model.trainable_layout
    return template if layout.mesh is None else layout.abstract(template)


def init_opt_state(model: Model, tx, trainable: dict):
    """Return ``tx.init(trainable)`` laid out by ``model.trainable_layout`` (made in place)."""
    layout = model.trainable_layout
    if layout.mesh is None:
        return tx.init(trainable)
    shardings = layout.shardings(jax.eval_shape(tx.init, trainable))
    return jax.jit(tx.init, out_shardings=shardings)(trainable)


def make_tx(config, trainable: dict):
    """Return AdamW with per-group clipping (LoRA and flow separately, as the DAG release).

    A full fine-tune's "unet" group takes the LoRA's settings (``train.learning_rate`` …).
    """
    t = config.train
    policy = "unet" if "unet" in trainable else "lora"
    groups = {policy: GroupConfig(t.learning_rate, t.weight_decay, t.max_grad_norm or None)}
    if "flow" in trainable:
        groups["flow"] = GroupConfig(
            config.train.flow_learning_rate,
            config.train.flow_weight_decay,
            config.train.flow_max_grad_norm or None,
        )
    if "log_z" in trainable:
        groups["log_z"] = GroupConfig(config.train.flow_learning_rate, 0.0, None)
    return make_optimizer(groups)


# --------------------------------------------------------------------------- compiled phases


def put_batch(mesh, array: np.ndarray, batch_axis: bool = True) -> jax.Array:
    """Return a global array of a host array every process holds in full.

    Split on the batch axis over all devices when it divides evenly (a ragged last window,
    or a B² selection, is replicated instead).
    """
    batch_axis = batch_axis and array.ndim > 0 and array.shape[0] % mesh.size == 0
    sharding = parallel.batch_sharding(mesh, array.ndim) if batch_axis else None
    return parallel.put(array, sharding or parallel.replicated(mesh))
