"""The PyTorch reference of ``python -m dag_jax.bench sampler``: an eager diffusers sampling loop.

Imported only when torch and diffusers are installed (the core install has neither). It is the
baseline a PyTorch user would write (DDPO-style): diffusers ``UNet2DConditionModel`` in eager
mode, ``torch.no_grad``, fp32, CFG on the concatenated [uncond; cond] batch, and the DDIM-with-η
step and Gaussian log-prob of SPEC §2 in torch ops. The train bench's reference
(``torch_ref_train``) builds on its models and DDIM math.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np
import torch
from diffusers import UNet2DConditionModel

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def pick_device() -> torch.device:
    """Return CUDA when torch sees a GPU, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def describe(device: torch.device) -> dict[str, str]:
    """Return the torch device (GPU name, or cpu with its thread count) and torch version."""
    if device.type == "cuda":
        name = f"cuda:{torch.cuda.get_device_name(device)}"
    else:
        name = f"cpu ({torch.get_num_threads()} threads)"
    return {"torch_device": name, "torch_version": torch.__version__}


def autocast(device: torch.device, dtype: str):
    """Return the autocast context for a compute dtype (fp32: a no-op context).

    bf16 runs the UNet's matmuls and convs in bf16 with fp32 weights, as the JAX side does
    with ``dtype=bfloat16``; the DDIM step and log-prob stay fp32.
    """
    if dtype == "float32":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=getattr(torch, dtype))


def synchronize(device: torch.device) -> None:
    """Wait for queued device work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_random(cls, config: Mapping, seed: int, device: torch.device) -> torch.nn.Module:
    """Return an eval-mode fp32 diffusers model of ``cls`` with random weights.

    Zero-initialised tensors (biases, zero-init output convs) get small noise: zeros would
    hide conversion errors.
    """
    torch.manual_seed(seed)
    model = cls(**{k: v for k, v in config.items() if not k.startswith("_")})
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.add_(0.02 * torch.randn(p.shape, generator=gen))
    return model.to(device).eval()  # parameters are fp32 as built


def build_unet(config: Mapping, seed: int, device: torch.device) -> UNet2DConditionModel:
    """Return an eval-mode fp32 diffusers UNet with random weights (zero biases given noise)."""
    return build_random(UNet2DConditionModel, config, seed, device)


def state_dict_numpy(unet: UNet2DConditionModel) -> dict[str, np.ndarray]:
    """Return the UNet's state dict as host numpy arrays (PyTorch names and layouts)."""
    return {k: v.detach().cpu().numpy() for k, v in unet.state_dict().items()}


def guided_eps(
    unet: UNet2DConditionModel,
    x: torch.Tensor,  # (B, C, H, W) fp32
    t: torch.Tensor,  # () or (B,) int
    context: torch.Tensor,  # (B, L, D)
    uncond: torch.Tensor,  # (B, L, D)
    guidance: float,
) -> torch.Tensor:
    """Return ε̃ = ε(∅) + w·(ε(c) − ε(∅)) from one UNet call on the [uncond; cond] batch."""
    b = x.shape[0]
    t = t.expand(b) if t.ndim == 0 else t
    out = unet(
        torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=torch.cat([uncond, context])
    ).sample
    e_u, e_c = out[:b], out[b:]
    e_u, e_c = e_u.float(), e_c.float()
    return e_u + guidance * (e_c - e_u)


def ddim_step_logprob(
    x_t: torch.Tensor,
    eps: torch.Tensor,
    alpha_t: torch.Tensor,
    alpha_s: torch.Tensor,
    eta: float,
    noise: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (x_s, (B,) mean-reduced log N(x_s; μ, σ²I)) of one DDIM step with η (ε-prediction)."""
    mean, sigma = ddim_mean_sigma(x_t, eps, alpha_t, alpha_s, eta)
    x_s = mean + sigma * noise
    return x_s, gaussian_logprob(x_s, mean, sigma)


def ddim_mean_sigma(
    x_t: torch.Tensor,
    eps: torch.Tensor,
    alpha_t: torch.Tensor,  # () or broadcastable against x_t
    alpha_s: torch.Tensor,
    eta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (μ, σ) of the DDIM-with-η policy N(μ, σ²I) at x_t (ε-prediction, SPEC §2)."""
    x0 = (x_t - torch.sqrt(1 - alpha_t) * eps) / torch.sqrt(alpha_t)
    var = (1 - alpha_s) / (1 - alpha_t) * (1 - alpha_t / alpha_s)
    sigma = eta * torch.sqrt(torch.clamp(var, min=0.0))
    mean = torch.sqrt(alpha_s) * x0 + torch.sqrt(torch.clamp(1 - alpha_s - sigma**2, min=0.0)) * eps
    return mean, sigma


def gaussian_logprob(x: torch.Tensor, mean, std) -> torch.Tensor:
    """Return the (B,) mean over elements of log N(x; mean, std²)."""
    logp = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - _HALF_LOG_2PI
    return logp.mean(dim=tuple(range(1, x.ndim)))


@torch.no_grad()
def rollout(
    unet: UNet2DConditionModel,
    x: torch.Tensor,  # (B, C, H, W) fp32 initial latents
    context: torch.Tensor,  # (B, L, D)
    uncond: torch.Tensor,  # (B, L, D)
    timesteps: np.ndarray,  # (K,) int
    alpha_t: np.ndarray,  # (K,) fp32
    alpha_s: np.ndarray,  # (K,) fp32
    generator: torch.Generator,
    *,
    guidance: float,
    eta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (latents (B, K+1, ...), log-probs (B, K), guided ε (B, K, ...)) of a rollout.

    Stores the same per-step outputs as ``dag_jax.diffusion.sampler.rollout``.
    """
    dev = x.device
    states, logps, epss = [x], [], []
    for i, t in enumerate(timesteps):
        a_t = torch.tensor(alpha_t[i], dtype=torch.float32, device=dev)
        a_s = torch.tensor(alpha_s[i], dtype=torch.float32, device=dev)
        t = torch.tensor(int(t), device=dev)
        eps = guided_eps(unet, x, t, context, uncond, guidance)
        noise = torch.randn(x.shape, generator=generator, device=dev, dtype=x.dtype)
        x, logp = ddim_step_logprob(x, eps, a_t, a_s, eta, noise)
        states.append(x)
        logps.append(logp)
        epss.append(eps)
    return torch.stack(states, 1), torch.stack(logps, 1), torch.stack(epss, 1)


def rollout_call(
    unet: UNet2DConditionModel,
    x_T: np.ndarray,
    context: np.ndarray,
    uncond: np.ndarray,
    grid: Mapping[str, np.ndarray],
    *,
    seed: int,
    dtype: str,
    guidance: float,
    eta: float,
) -> Callable[[], None]:
    """Return a blocking call of one eager ``rollout`` from host arrays on the UNet's device.

    ``grid`` holds the schedule's ``timesteps``, ``alpha_t`` and ``alpha_s``; the compute
    dtype applies through ``autocast``.
    """
    dev = next(unet.parameters()).device
    x, c, u = (torch.from_numpy(a).to(dev) for a in (x_T, context, uncond))
    gen = torch.Generator(device=dev).manual_seed(seed)
    cast = autocast(dev, dtype)

    def once() -> None:
        with cast:
            rollout(unet, x, c, u, generator=gen, guidance=guidance, eta=eta, **grid)
        synchronize(dev)

    return once


@torch.no_grad()
def guided_eps_numpy(
    unet: UNet2DConditionModel,
    x: np.ndarray,
    t: int,
    context: np.ndarray,
    uncond: np.ndarray,
    guidance: float,
) -> np.ndarray:
    """Return ``guided_eps`` at timestep ``t`` of host arrays, as fp64 NumPy (fp32 compute)."""
    dev = next(unet.parameters()).device
    x, c, u = (torch.from_numpy(a).to(dev) for a in (x, context, uncond))
    eps = guided_eps(unet, x, torch.tensor(t, device=dev), c, u, guidance)
    return eps.cpu().numpy().astype(np.float64)
