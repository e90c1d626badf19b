"""The PyTorch reference train step for ``python -m dag_jax.bench train``.

Imported only when torch, diffusers and peft are installed. What a PyTorch user would write
(DDPO/DAG-release style), eager: a diffusers ``UNet2DConditionModel`` with a peft LoRA on the
attention projections (to_q, to_k, to_v, to_out.0), the DDIM-with-η log-prob of SPEC §2 in
torch ops (``torch_ref``), the DDPO clipped surrogate, and for DAG a flow network built from
diffusers blocks with the shapes of ``dag_jax.models.flow`` (weights copied from the Linen
flow), forward-looking rewards through a diffusers ``AutoencoderKL``; gradients accumulated
over micro-batches, clipped per group, one ``torch.optim.AdamW`` step. Inputs, weights, the
transition order and the rows' weights are those of the dag_jax run it is compared with.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
import torch
from diffusers import AutoencoderKL
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.unets.unet_2d_blocks import CrossAttnDownBlock2D, DownBlock2D
from flax import traverse_util

from dag_jax.bench import torch_ref
from dag_jax.models.flow import FlowConfig
from dag_jax.weights.convert import linen_to_torch, torch_key


def build_vae(config: Mapping, seed: int, device: torch.device) -> AutoencoderKL:
    """Return an eval-mode fp32 diffusers AutoencoderKL with random weights."""
    return torch_ref.build_random(AutoencoderKL, config, seed + 100, device)


class TorchFlow(torch.nn.Module):
    """F̃_φ(x, t, c) of ``dag_jax.models.flow`` from diffusers blocks, same parameter names."""

    def __init__(self, cfg: FlowConfig):
        super().__init__()
        ch0 = cfg.block_out_channels[0]
        self.time_proj = Timesteps(ch0, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(ch0, ch0 * 4)
        self.conv_in = torch.nn.Conv2d(cfg.in_channels, ch0, 3, padding=1)
        blocks, prev, n = [], ch0, len(cfg.block_out_channels)
        for i, (ch, kind) in enumerate(zip(cfg.block_out_channels, cfg.down_block_types)):
            common = dict(
                in_channels=prev,
                out_channels=ch,
                temb_channels=ch0 * 4,
                num_layers=cfg.layers_per_block,
                resnet_eps=1e-5,
                resnet_act_fn="silu",
                resnet_groups=cfg.norm_num_groups,
                add_downsample=i < n - 1,
                downsample_padding=1,
            )
            if kind == "CrossAttnDownBlock2D":
                block = CrossAttnDownBlock2D(
                    **common,
                    num_attention_heads=cfg.attention_heads,
                    cross_attention_dim=cfg.cross_attention_dim,
                )
            else:
                block = DownBlock2D(**common)
            blocks.append(block)
            prev = ch
        self.down_blocks = torch.nn.ModuleList(blocks)
        self.norm_out = torch.nn.GroupNorm(cfg.norm_num_groups, prev, eps=1e-5)
        self.head = torch.nn.Linear(prev, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Return the (B,) fp32 flow of NCHW latents at integer timesteps t."""
        temb = self.time_embedding(self.time_proj(t))
        h = self.conv_in(x)
        for block in self.down_blocks:
            if isinstance(block, CrossAttnDownBlock2D):
                h, _ = block(h, temb, encoder_hidden_states=context)
            else:
                h, _ = block(h, temb)
        pooled = torch.nn.functional.silu(self.norm_out(h)).float().mean(dim=(2, 3))
        with torch.autocast(x.device.type, enabled=False):  # the head is fp32, as in Linen
            return self.head(pooled)[:, 0]


def torch_flow(cfg: FlowConfig, params: Mapping, device: torch.device) -> TorchFlow:
    """Return the torch flow with the Linen flow's weights (every name must match)."""
    flow = TorchFlow(cfg)
    state = {k: torch.from_numpy(np.array(v)) for k, v in linen_to_torch(params).items()}
    flow.load_state_dict(state, strict=True)
    return flow.to(device)


def lora_module_names(lora: Mapping) -> dict[str, dict[str, np.ndarray]]:
    """Return {diffusers module name: {"A": (in, r), "B": (r, out)}} of a Linen LoRA tree."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for path, value in traverse_util.flatten_dict(dict(lora)).items():
        name = torch_key(path[:-1] + ("weight",)).removesuffix(".weight")
        out.setdefault(name, {})[path[-1]] = np.asarray(value, np.float32)
    return out


def set_lora(unet, lora: Mapping, rank: int, alpha: float) -> list[torch.nn.Parameter]:
    """Give the (frozen) UNet a peft LoRA holding ``lora``'s values; return its parameters.

    peft keeps lora_A.weight = Aᵀ (r, in) and lora_B.weight = Bᵀ (out, r) and scales by α/r,
    as the Linen adapter computes x W + (α/r)·(x A) B. The adapter is added once and refilled.
    """
    from peft import LoraConfig

    modules = lora_module_names(lora)
    if not getattr(unet, "peft_config", None):
        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=sorted(modules)))
    params = []
    with torch.no_grad():
        for name, ab in modules.items():
            layer = unet.get_submodule(name)
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            a.copy_(torch.from_numpy(ab["A"].T.copy()))
            b.copy_(torch.from_numpy(ab["B"].T.copy()))
            params += [a, b]
    return params


def rloo_advantages(
    signal: torch.Tensor, group: int, clip: float, present: torch.Tensor | None = None
) -> torch.Tensor:
    """Return leave-one-out normalised advantages over consecutive groups (SPEC §5).

    ``present`` (B,) bool leaves the other rows (padding, empty slots of DAG-KL's groups of
    distinct trajectories) out of their group's sums; they, and a row with no present peer,
    get advantage 0 (as ``dag.leave_one_out_advantages``).
    """
    b = signal.reshape(-1, group)
    p = torch.ones_like(b, dtype=torch.bool) if present is None else present.reshape(b.shape)
    b = torch.where(p, b, 0.0)
    peers = p.sum(1, keepdim=True) - p.to(torch.int64)
    denom = torch.clamp(peers, min=1).to(b.dtype)
    m = (b.sum(1, keepdim=True) - b) / denom
    u = torch.where(p, b - m, 0.0)
    v = ((u**2).sum(1, keepdim=True) - u**2) / denom
    adv = torch.clamp(u / (torch.sqrt(torch.clamp(v, min=0.0)) + 1e-8), -clip, clip)
    return torch.where(p & (peers > 0), adv, 0.0).reshape(-1)


def ppo_surrogate(log_p, old_log_p, advantage, clip_range: float) -> torch.Tensor:
    """Return the per-sample max(−A·ρ, −A·clip(ρ, 1±ε)), ρ = exp(log p − log p_old)."""
    ratio = torch.exp(log_p - old_log_p)
    clipped = torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(-advantage * ratio, -advantage * clipped)


def weighted_mean(values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Return Σ w·v / max(Σ w, 1)."""
    return (weight * values).sum() / torch.clamp(weight.sum(), min=1.0)


def _col(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Return per-row values (B,) shaped to broadcast against x (B, ...)."""
    return a.reshape(a.shape + (1,) * (x.ndim - a.ndim))


@dataclasses.dataclass
class Hyper:
    """The loss settings of one algorithm (from the dag_jax run's config)."""

    algo: str
    guidance: float
    eta: float
    beta: float
    micro_batch: int
    clip_range: float
    adv_clip: float
    reg_coef: float
    kl_coef: float
    baseline_group: int
    dtype: str

    @classmethod
    def from_config(cls, algo: str, c, beta: float) -> Hyper:
        """Return the settings a dag_jax config gives ``algo``."""
        d = c.ddpo if algo == "ddpo" else c.dag
        return cls(
            algo=algo,
            guidance=c.sample.guidance,
            eta=c.sample.eta,
            beta=beta,
            micro_batch=c.train.micro_batch,
            clip_range=d.clip_range,
            adv_clip=d.adv_clip,
            reg_coef=c.dag.reg_coef,
            kl_coef=c.dag.kl_coef,
            baseline_group=c.dag.baseline_group,
            dtype=c.dtype,
        )


class TorchTrainStep:
    """One optimizer step of DDPO / DAG-DB / DAG-KL on fixed trajectories, in eager PyTorch."""

    def __init__(self, unet, vae, flow, log_z, groups, hyper: Hyper, data: dict, device):
        self.unet, self.vae, self.flow, self.log_z = unet, vae, flow, log_z
        self.groups = groups  # [(params, lr, weight_decay, max_grad_norm)]
        self.hyper, self.data, self.device = hyper, data, device
        self.opt = torch.optim.AdamW(
            [dict(params=p, lr=lr, weight_decay=wd) for p, lr, wd, _ in groups],
            betas=(0.9, 0.999),
            eps=1e-8,
        )
        self.autocast = torch_ref.autocast(device, hyper.dtype)

    @classmethod
    def from_run(cls, run, weights, settings) -> TorchTrainStep:
        """Return the reference of a ``train_step.TrainRun`` on the same weights and data."""
        c, algo = run.config, run.algo
        device = next(weights.torch_unet.parameters()).device
        trainable = run.state.trainable
        lora = set_lora(weights.torch_unet, trainable["lora"], c.lora.rank, c.lora.alpha)
        t = c.train
        groups = [(lora, t.learning_rate, t.weight_decay, t.max_grad_norm)]
        flow = log_z = None
        if "flow" in trainable:
            flow = torch_flow(run.model.flow.config, trainable["flow"], device)
            fl = (t.flow_learning_rate, t.flow_weight_decay, t.flow_max_grad_norm)
            groups.append((list(flow.parameters()), *fl))
        if "log_z" in trainable:
            log_z = torch.nn.Parameter(torch.tensor(float(trainable["log_z"]), device=device))
            groups.append(([log_z], t.flow_learning_rate, 0.0, None))
        data = trajectory_tensors(run, device)
        hyper = Hyper.from_config(algo, c, run.beta)
        return cls(weights.torch_unet, weights.torch_vae, flow, log_z, groups, hyper, data, device)

    # ---------------------------------------------------------------- forward-looking rewards

    @torch.no_grad()
    def state_rewards(self) -> torch.Tensor:
        """Return (N, K+1) rewards r(x̂₀^cond(x_k)) for k < K and r(x_K) (DAG, SPEC §4)."""
        d = self.data
        latents, n, k = d["latents"], d["latents"].shape[0], d["latents"].shape[1] - 1
        out = []
        for step in range(k + 1):
            x = latents[:, step]
            if step < k:
                with self.autocast:
                    t = d["timesteps"][step].expand(n)
                    eps = self.unet(x, t, encoder_hidden_states=d["context"]).sample.float()
                a = d["alpha_t"][step]
                x = (x - torch.sqrt(1 - a) * eps) / torch.sqrt(a)
            out.append(self.reward(x))
        return torch.stack(out, dim=1)

    def reward(self, latents: torch.Tensor) -> torch.Tensor:
        """Return the (N,) mean brightness of the decoded, uint8-quantised images."""
        with self.autocast:
            images = self.vae.decode(latents / self.vae.config.scaling_factor).sample.float()
        images = torch.clamp(images / 2 + 0.5, 0.0, 1.0)
        return (torch.round(images * 255.0) / 255.0).mean(dim=(1, 2, 3))

    # ---------------------------------------------------------------- transitions and losses

    def transitions(self, state_rewards: torch.Tensor | None) -> dict:
        """Return the N·K transitions (row n·K + k = step k of trajectory n), as from_trajectory."""
        d = self.data
        n, k = d["log_probs"].shape
        flat = lambda a: a.reshape((n * k,) + a.shape[2:])
        per_step = lambda a: a.repeat(n)
        per_traj = lambda a: a.repeat_interleave(k, dim=0)
        steps = torch.arange(k, device=self.device)
        zeros = torch.zeros(n * k, device=self.device)
        return dict(
            x_t=flat(d["latents"][:, :-1]),
            x_s=flat(d["latents"][:, 1:]),
            t=per_step(d["timesteps"]),
            s=per_step(d["prev_timesteps"]),
            alpha_t=per_step(d["alpha_t"]),
            alpha_s=per_step(d["alpha_s"]),
            terminal=per_step(steps == k - 1),
            initial=per_step(steps == 0),
            log_prob=flat(d["log_probs"]),
            eps=flat(d["eps"]),
            traj=per_traj(torch.arange(n, device=self.device)),
            advantage=per_traj(d["advantage"]),
            reward_t=zeros if state_rewards is None else flat(state_rewards[:, :-1]),
            reward_s=zeros if state_rewards is None else flat(state_rewards[:, 1:]),
            weight=per_traj(d["weight"]),
        )

    def policy_terms(self, b: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (log p_θ(x_s | x_t) (B,), guided ε̃_θ(x_t)) under the current LoRA."""
        h = self.hyper
        ctx = self.data["context"][b["traj"]]
        uncond = self.data["uncond"].expand_as(ctx)
        with self.autocast:
            eps = torch_ref.guided_eps(self.unet, b["x_t"], b["t"], ctx, uncond, h.guidance)
        a_t, a_s = _col(b["alpha_t"], b["x_t"]), _col(b["alpha_s"], b["x_t"])
        mean, sigma = torch_ref.ddim_mean_sigma(b["x_t"], eps, a_t, a_s, h.eta)
        return torch_ref.gaussian_logprob(b["x_s"], mean, sigma), eps

    def log_flows(self, b: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (log F(x_t), log F(x_s)) with forward-looking rewards (and the log Z anchor)."""
        h, n = self.hyper, b["x_t"].shape[0]
        ctx = self.data["context"][b["traj"]]
        with self.autocast:
            f = self.flow(
                torch.cat([b["x_t"], b["x_s"]]),
                torch.cat([b["t"], b["s"]]),
                torch.cat([ctx, ctx]),
            ).float()
        log_f_t = f[:n] + h.beta * b["reward_t"]
        if self.log_z is not None:
            prior = torch_ref.gaussian_logprob(
                b["x_t"], torch.zeros_like(b["x_t"]), torch.ones((), device=self.device)
            )
            log_f_t = torch.where(b["initial"], self.log_z + prior, log_f_t)
        log_f_s = torch.where(b["terminal"], 0.0, f[n:]) + h.beta * b["reward_s"]
        return log_f_t, log_f_s

    def loss(self, b: dict) -> torch.Tensor:
        """Return the micro-batch loss of the algorithm (as ``dag_jax.algos``)."""
        h = self.hyper
        log_p, eps = self.policy_terms(b)
        if h.algo == "ddpo":
            adv = torch.clamp(b["advantage"], -h.adv_clip, h.adv_clip)
            return weighted_mean(
                ppo_surrogate(log_p, b["log_prob"], adv, h.clip_range), b["weight"]
            )
        ratio = b["alpha_t"] / b["alpha_s"]
        mean_b = _col(torch.sqrt(ratio), b["x_s"]) * b["x_s"]
        log_pb = torch_ref.gaussian_logprob(b["x_t"], mean_b, _col(torch.sqrt(1 - ratio), b["x_t"]))
        log_f_t, log_f_s = self.log_flows(b)
        reg = ((eps - b["eps"]) ** 2).mean(dim=tuple(range(1, eps.ndim)))
        if h.algo == "dag_db":
            delta = log_f_t + log_p - log_pb - log_f_s
            return weighted_mean(delta**2 + h.reg_coef * reg, b["weight"])
        residual = log_f_t + log_p.detach() - log_pb - log_f_s
        signal = (log_f_s + log_pb - log_p - log_f_t).detach()
        adv = rloo_advantages(signal, h.baseline_group, h.adv_clip, b["weight"] > 0)
        surrogate = ppo_surrogate(log_p, b["log_prob"], adv, h.clip_range)
        return weighted_mean(residual**2 + h.kl_coef * surrogate + h.reg_coef * reg, b["weight"])

    # ---------------------------------------------------------------- the step

    def step(self, order: np.ndarray, keep: np.ndarray | None = None) -> float:
        """Run one optimizer step over the transitions in ``order``; return the mean loss.

        ``keep`` (one weight per entry of ``order``, 1 or 0): dag_jax's row weights
        (``train.update.window_rows``: empty group slots and padding at 0); by default every
        row once at weight 1. ``order`` is padded to whole micro-batches at weight 0.
        """
        h = self.hyper
        rewards = self.state_rewards() if h.algo != "ddpo" else None
        rows = self.transitions(rewards)
        keep = np.ones(order.size, np.float32) if keep is None else np.asarray(keep, np.float32)
        pad = (-order.size) % h.micro_batch
        keep = np.concatenate([keep, np.zeros(pad, np.float32)])
        order = np.concatenate([order, np.full(pad, order[0])]).astype(np.int64)
        losses = []
        for lo in range(0, order.size, h.micro_batch):
            idx = torch.from_numpy(order[lo : lo + h.micro_batch]).to(self.device)
            b = {k: v[idx] for k, v in rows.items()}
            b["weight"] = b["weight"] * torch.from_numpy(keep[lo : lo + h.micro_batch]).to(
                self.device
            )
            loss = self.loss(b)
            loss.backward()
            losses.append(float(loss.detach()))
        self.update(len(losses))
        torch_ref.synchronize(self.device)
        return float(np.mean(losses))

    def update(self, count: int) -> None:
        """Average the accumulated gradients, clip each group, take one AdamW step."""
        for params, _, _, max_norm in self.groups:
            for p in params:
                if p.grad is not None:
                    p.grad.div_(count)
            if max_norm:
                torch.nn.utils.clip_grad_norm_(params, max_norm)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def trajectory_tensors(run, device: torch.device) -> dict:
    """Return the run's trajectories and schedule as torch tensors on ``device``."""
    traj, data, schedule = run.data.traj, run.data, run.model.schedule
    k = traj.log_probs.shape[1]
    steps = np.arange(traj.start, traj.start + k)
    f32 = lambda a: torch.from_numpy(np.array(a, np.float32)).to(device)
    i64 = lambda a: torch.from_numpy(np.array(a, np.int64)).to(device)
    return dict(
        latents=f32(traj.latents),
        log_probs=f32(traj.log_probs),
        eps=f32(traj.eps),
        context=f32(traj.context),
        uncond=f32(run.model.uncond),
        timesteps=i64(np.asarray(schedule.timesteps)[steps]),
        prev_timesteps=i64(np.asarray(schedule.prev_timesteps)[steps]),
        alpha_t=f32(np.asarray(schedule.alpha_t)[steps]),
        alpha_s=f32(np.asarray(schedule.alpha_s)[steps]),
        advantage=f32(data.advantage),
        weight=f32(data.weight),
    )
