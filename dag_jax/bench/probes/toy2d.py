"""The 2-D proof: do the objectives sample ∝ R (GFlowNets) or collapse on the best mode (RL)?

    python -m dag_jax.bench toy2d --json=/tmp/toy2d.json     # ~10 min on 2 CPU cores

A small MLP ε-model is pretrained on a Gaussian mixture with equal weights; the reward is
r(x) = log p*(x), the log-density of the *same* modes with unequal weights, so the GFlowNet
target ∝ exp(β·r) with β = 1 is exactly p*. Each objective then fine-tunes the MLP through the
same sampler (``diffusion.sampler.rollout``), transitions and loss code used for images, with
``logprob_reduction=sum``. GRPO trains groups of ``grpo_group`` trajectories sharing x_T, with
the per-step KL to the pretrained model (the reference) weighted by ``grpo_kl``. Reported per
method: total variation to p* on a grid histogram, modes holding ≥ 1 % of samples, mean reward.
"""

from __future__ import annotations

import dataclasses
import math
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dag_jax.algos import b2, dag, ddpo, grpo
from dag_jax.algos.stats import PerPromptStatTracker, group_advantages
from dag_jax.algos.transitions import from_trajectory, take
from dag_jax.bench.common import Settings, machine_info, record
from dag_jax.diffusion.sampler import branch_rollout, rollout, sample_keys
from dag_jax.diffusion.schedule import make_schedule
from dag_jax.models.layers import timestep_embedding

ALGOS = ("base", "ddpo", "dag_db", "dag_kl", "b2", "grpo")
EVAL_KEY = jax.random.PRNGKey(99)
SCHEDULER = dict(beta_schedule="scaled_linear", steps_offset=1, set_alpha_to_one=False)


@dataclasses.dataclass(frozen=True)
class Toy2DConfig:
    """Settings of the 2-D experiment (defaults run in a few minutes on 2 CPU cores)."""

    num_modes: int = 8
    background_weight: float = 0.05
    background_std: float = 3.0
    radius: float = 2.0
    mode_std: float = 0.2
    steps: int = 50
    pretrain_steps: int = 4000
    pretrain_batch: int = 512
    epochs: int = 150
    trajectories: int = 512
    minibatch: int = 1024
    learning_rate: float = 3e-4
    flow_learning_rate: float = 3e-3
    beta: float = 1.0
    anneal_fraction: float = 0.0
    reg_coef: float = 0.0
    kl_coef: float = 1.0
    ppo_clip: float = 0.2
    flow_warmup_epochs: int = 30
    baseline_group: int = 8
    b2_branches: int = 5
    grpo_group: int = 16  # trajectories per group (GRPO), sharing x_T
    grpo_kl: float = 0.04  # GRPO's per-step KL to the pretrained model (Flow-GRPO's 0.04)
    eval_samples: int = 20000
    grid: int = 60
    seed: int = 0
    forward_looking: bool = True  # False: plain DB/KL (state rewards 0 but the terminal r)
    anchor_initial_flow: bool = True  # log F(x_T) = log Z + log N(x_T) (False: the release)

    @property
    def weights(self) -> np.ndarray:
        """Return the target mixture weights ∝ 1, 2, …, K."""
        w = np.arange(1, self.num_modes + 1, dtype=np.float64)
        return w / w.sum()

    @property
    def centers(self) -> np.ndarray:
        """Return the (K, 2) mode centres on a circle."""
        a = 2 * np.pi * np.arange(self.num_modes) / self.num_modes
        return self.radius * np.stack([np.cos(a), np.sin(a)], axis=1)


class MLP(nn.Module):
    """ε-model or flow on 2-D points: x and a sinusoidal timestep embedding → ``out`` values."""

    out: int
    hidden: int = 128
    depth: int = 3

    @nn.compact
    def __call__(self, x, t):
        h = jnp.concatenate([x, timestep_embedding(t, 32)], axis=-1)
        for _ in range(self.depth):
            h = nn.silu(nn.Dense(self.hidden)(h))
        return nn.Dense(self.out)(h)


def log_target(cfg: Toy2DConfig, x: jax.Array) -> jax.Array:
    """Return log p*(x) (B,): the reward, whose exp is the (normalised) target density.

    p* = (1 − w_bg)·Σ_k w_k N(c_k, σ²I) + w_bg·N(0, σ_bg²I): the unequal-weight modes plus a
    broad background that keeps r bounded below where samples go (between modes r would
    otherwise fall like −d²/2σ², and the forward-looking reward of noisy states with it).
    """
    c = jnp.asarray(cfg.centers, jnp.float32)
    d2 = jnp.sum((x[:, None, :] - c[None]) ** 2, axis=-1)
    log_norm = -math.log(2 * math.pi * cfg.mode_std**2)
    weights = jnp.asarray(cfg.weights * (1 - cfg.background_weight), jnp.float32)
    comp = jnp.log(weights) + log_norm - d2 / (2 * cfg.mode_std**2)
    parts = [comp]
    if cfg.background_weight > 0:
        bg_var = cfg.background_std**2
        bg = (
            math.log(cfg.background_weight)
            - math.log(2 * math.pi * bg_var)
            - jnp.sum(x**2, axis=-1) / (2 * bg_var)
        )
        parts.append(bg[:, None])
    return jax.scipy.special.logsumexp(jnp.concatenate(parts, axis=1), axis=1)


def sample_target(cfg: Toy2DConfig, rng: np.random.Generator, n: int) -> np.ndarray:
    """Return n exact samples of p* (modes with weights ∝ k, plus the background)."""
    x = sample_mixture(cfg, rng, n, cfg.weights)
    bg = rng.random(n) < cfg.background_weight
    x[bg] = cfg.background_std * rng.standard_normal((int(bg.sum()), 2))
    return x


def sample_mixture(cfg: Toy2DConfig, rng: np.random.Generator, n: int, weights=None):
    """Return n points of the mixture (equal weights unless given)."""
    w = np.full(cfg.num_modes, 1 / cfg.num_modes) if weights is None else weights
    k = rng.choice(cfg.num_modes, size=n, p=w)
    return (cfg.centers[k] + cfg.mode_std * rng.standard_normal((n, 2))).astype(np.float32)


def pretrain(cfg: Toy2DConfig) -> tuple[MLP, dict]:
    """Return the ε-MLP and its params, trained by denoising on the equal-weight mixture."""
    model = MLP(2)
    acp = jnp.asarray(make_schedule(SCHEDULER, cfg.steps).alphas_cumprod)
    params = model.init(jax.random.PRNGKey(cfg.seed), jnp.zeros((1, 2)), jnp.zeros((1,)))
    tx = optax.adam(optax.cosine_decay_schedule(2e-3, cfg.pretrain_steps))
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, x0, key):
        k1, k2 = jax.random.split(key)
        t = jax.random.randint(k1, (x0.shape[0],), 0, acp.shape[0])
        noise = jax.random.normal(k2, x0.shape)
        a = acp[t][:, None]
        xt = jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * noise

        def loss(p):
            return jnp.mean((model.apply(p, xt, t) - noise) ** 2)

        val, g = jax.value_and_grad(loss)(params)
        upd, opt = tx.update(g, opt)
        return optax.apply_updates(params, upd), opt, val

    rng = np.random.default_rng(cfg.seed)
    key = jax.random.PRNGKey(cfg.seed + 1)
    for i in range(cfg.pretrain_steps):
        x0 = sample_mixture(cfg, rng, cfg.pretrain_batch)
        params, opt, _ = step(params, opt, x0, jax.random.fold_in(key, i))
    return model, params


def mode_shares(cfg: Toy2DConfig, samples: np.ndarray) -> np.ndarray:
    """Return the fraction of samples nearest to each mode centre (K,)."""
    nearest = np.argmin(((samples[:, None] - cfg.centers[None]) ** 2).sum(-1), axis=1)
    return np.bincount(nearest, minlength=cfg.num_modes) / len(samples)


def target_mode_shares(cfg: Toy2DConfig, n: int = 400_000) -> np.ndarray:
    """Return p*'s nearest-mode shares, estimated from n exact samples (fixed seed)."""
    return mode_shares(cfg, sample_target(cfg, np.random.default_rng(2024), n))


def metrics(cfg: Toy2DConfig, samples: np.ndarray) -> dict:
    """Return distances to p*, modes holding ≥ 1 % of samples, mean reward, best-mode share.

    target_distance: total variation between the samples' and p*'s histograms on a grid over
    the modes (both conditioned on the grid), which also counts mode *shape* errors of the
    pretrained model; mode_weight_distance: total variation between nearest-mode shares, i.e.
    how well the mixture weights themselves are matched.
    """
    lim = cfg.radius + 4 * cfg.mode_std
    edges = np.linspace(-lim, lim, cfg.grid + 1)
    hist, _, _ = np.histogram2d(samples[:, 0], samples[:, 1], bins=[edges, edges])
    hist = hist / max(hist.sum(), 1.0)  # both distributions conditioned on the grid
    mid = (edges[:-1] + edges[1:]) / 2
    gx, gy = np.meshgrid(mid, mid, indexing="ij")
    grid_pts = jnp.asarray(np.stack([gx.ravel(), gy.ravel()], 1), jnp.float32)
    dens = np.exp(np.asarray(log_target(cfg, grid_pts))).reshape(gx.shape)
    dens = dens / dens.sum()
    share = mode_shares(cfg, samples)
    return {
        "target_distance": float(0.5 * np.abs(hist - dens).sum()),
        "mode_weight_distance": float(0.5 * np.abs(share - target_mode_shares(cfg)).sum()),
        "modes_covered": int((share >= 0.01).sum()),
        "mean_reward": float(np.mean(np.asarray(log_target(cfg, jnp.asarray(samples))))),
        "best_mode_share": float(share[-1]),
    }


class _Toy:
    """The model-agnostic pieces (eps_fn, flow_fn, context) the objectives need."""

    def __init__(self, cfg: Toy2DConfig, model: MLP):
        self.cfg, self.model, self.flow = cfg, model, MLP(1, hidden=128, depth=3)
        self.schedule = make_schedule(SCHEDULER, cfg.steps)
        self.context = jnp.zeros((1, 1, 1), jnp.float32)

    def eps_fn(self, params, x, t, ctx):
        return self.model.apply(params, x, t)

    def flow_fn(self, params, x, t, ctx):
        return self.flow.apply(params, x, t)[:, 0]

    def ctx(self, n):
        return jnp.broadcast_to(self.context, (n, 1, 1))

    def initial(self, keys):
        """Return x_T for each sample key."""
        return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 1 << 30), (2,)))(keys)

    def sample(self, params, keys, x, start=0, num_steps=None):
        """Return the trajectories from states x at step ``start`` (η = 1, no guidance)."""
        return rollout(
            self.eps_fn,
            params,
            x,
            self.ctx(x.shape[0]),
            None,
            self.schedule,
            keys,
            guidance=1.0,
            eta=1.0,
            start=start,
            num_steps=num_steps,
            reduction="sum",
        )

    def sample_final(self, params, key, n):
        """Return n final samples from fresh noise."""
        keys = sample_keys(key, jnp.arange(n))
        return self.sample(params, keys, self.initial(keys)).final


def finetune(
    cfg: Toy2DConfig, algo: str, model: MLP, base_params: dict, on_epoch=None
) -> np.ndarray:
    """Return eval samples of the model after fine-tuning ``base_params`` with ``algo``.

    ``on_epoch(epoch, final_samples, update_metrics)``, if given, sees each epoch's on-policy
    final samples (before that epoch's updates) and the last update's loss metrics.
    """
    toy = _Toy(cfg, model)
    if algo == "base":
        return np.asarray(
            jax.jit(toy.sample_final, static_argnums=2)(base_params, EVAL_KEY, cfg.eval_samples)
        )
    key = jax.random.PRNGKey(cfg.seed + 7)
    flow_params = toy.flow.init(key, jnp.zeros((1, 2)), jnp.zeros((1,)))
    trainable = {"policy": base_params, "flow": flow_params}
    if cfg.anchor_initial_flow:
        trainable["log_z"] = jnp.zeros((), jnp.float32)
    tx = optax.multi_transform(
        {
            "policy": optax.chain(optax.clip_by_global_norm(1.0), optax.adam(cfg.learning_rate)),
            "flow": optax.chain(optax.clip_by_global_norm(1.0), optax.adam(cfg.flow_learning_rate)),
            "log_z": optax.adam(cfg.flow_learning_rate),
        },
        lambda p: {k: k for k in p},
    )
    opt = tx.init(trainable)
    policy_kw = dict(guidance=1.0, eta=1.0, reduction="sum")
    reward = lambda x: log_target(cfg, x)

    def loss_fn(params, batch, beta):
        args = (toy.eps_fn, toy.flow_fn, params, batch, None, beta)
        if algo == "dag_db":
            return dag.db_loss(*args, reg_coef=cfg.reg_coef, **policy_kw)
        if algo == "dag_kl":
            return dag.kl_loss(
                *args,
                reg_coef=cfg.reg_coef,
                kl_coef=cfg.kl_coef,
                clip_range=cfg.ppo_clip,
                baseline_group=cfg.baseline_group,
                **policy_kw,
            )
        if algo == "grpo":
            return grpo.grpo_loss(
                toy.eps_fn,
                params["policy"],
                base_params,
                batch,
                None,
                clip_range=cfg.ppo_clip,
                kl_coef=cfg.grpo_kl,
                **policy_kw,
            )
        clip = 0.1 if algo == "b2" else cfg.ppo_clip
        return ddpo.ddpo_loss(
            toy.eps_fn, params["policy"], batch, None, clip_range=clip, **policy_kw
        )

    @jax.jit
    def update(params, opt, batch, beta, train_policy):
        (_, m), g = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, beta)
        g["policy"] = jax.tree_util.tree_map(lambda x: x * train_policy, g["policy"])
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), opt, m

    def sample_fresh(policy, key):
        keys = sample_keys(key, jnp.arange(cfg.trajectories))
        return toy.sample(policy, keys, toy.initial(keys))

    @jax.jit
    def sample_dag(params, key):
        traj = sample_fresh(params["policy"], key)
        r = dag.forward_looking_rewards(
            toy.eps_fn,
            params["policy"],
            traj.latents,
            traj.timesteps,
            toy.schedule.alpha_t,
            toy.ctx(cfg.trajectories),
            reward,
        )
        if not cfg.forward_looking:
            r = r.at[:, :-1].set(0.0)
        batch = from_trajectory(traj, toy.schedule, jnp.zeros(cfg.trajectories), state_rewards=r)
        return batch, traj.final

    @jax.jit
    def sample_plain(params, key):
        traj = sample_fresh(params["policy"], key)
        return traj, reward(traj.final)

    @jax.jit
    def sample_groups(params, key):
        # grpo_group consecutive trajectories share x_T, each with its own step noise
        idx = jnp.arange(cfg.trajectories)
        keys = sample_keys(key, idx)
        x = toy.initial(sample_keys(key, idx // cfg.grpo_group * cfg.grpo_group))
        traj = toy.sample(params["policy"], keys, x)
        return traj, reward(traj.final)

    warmup = cfg.flow_warmup_epochs if algo.startswith("dag") else 0
    tracker = PerPromptStatTracker()
    history = b2.RewardHistory()
    n_prefix = max(cfg.trajectories // cfg.b2_branches, 1)
    for epoch in range(cfg.epochs):
        ekey = jax.random.fold_in(key, epoch)
        beta = dag.annealed_beta(cfg.beta, epoch, cfg.epochs, cfg.anneal_fraction)
        finals = None
        if algo.startswith("dag"):
            batch, finals = sample_dag(trainable, ekey)
        elif algo == "ddpo":
            traj, r = sample_plain(trainable, ekey)
            finals = traj.final
            adv = tracker.update(np.zeros(len(r), int), np.asarray(r))
            batch = from_trajectory(traj, toy.schedule, jnp.zeros(len(r)), advantage=adv)
        elif algo == "grpo":
            traj, r = sample_groups(trainable, ekey)
            finals = traj.final
            adv = group_advantages(np.asarray(r), cfg.grpo_group)
            batch = from_trajectory(traj, toy.schedule, jnp.zeros(len(r)), advantage=adv)
        else:
            batch = _b2_batch(cfg, toy, trainable["policy"], ekey, epoch, n_prefix, history, reward)
            if batch is None:
                continue
        perm = jax.random.permutation(jax.random.fold_in(ekey, 1), batch.size)
        batch = take(batch, perm)
        mb = min(cfg.minibatch, batch.size)
        mb -= mb % cfg.baseline_group
        for i in range(0, batch.size - mb + 1, mb):
            sub = take(batch, jnp.arange(i, i + mb))
            train_policy = jnp.float32(epoch >= warmup)
            trainable, opt, last = update(trainable, opt, sub, jnp.float32(beta), train_policy)
        if on_epoch is not None and finals is not None:
            on_epoch(epoch, np.asarray(finals), jax.device_get(last))
    final = jax.jit(toy.sample_final, static_argnums=2)(
        trainable["policy"], EVAL_KEY, cfg.eval_samples
    )
    return np.asarray(final)


def _b2_batch(cfg, toy, policy, key, stage, n_prefix, history, reward):
    """Return all branches' in-interval transitions, unselected ones with weight 0."""
    length = b2.interval_length(stage, cfg.epochs, low=max(cfg.steps * 7 // 10, 1), high=cfg.steps)
    start = cfg.steps - length
    keys = sample_keys(key, jnp.arange(n_prefix))
    x = toy.initial(keys)
    if start:
        x = toy.sample(policy, keys, x, num_steps=start).final
    traj = branch_rollout(
        toy.eps_fn,
        policy,
        x,
        toy.ctx(n_prefix),
        None,
        toy.schedule,
        keys,
        cfg.b2_branches,
        start=start,
        num_steps=length,
        guidance=1.0,
        eta=1.0,
        reduction="sum",
    )
    r = np.asarray(reward(traj.final)).reshape(n_prefix, cfg.b2_branches)
    prompts = np.zeros(n_prefix, int)
    history.add_stage(prompts, r)
    sel = b2.select(b2.group_zscores(prompts, r, history))
    if sel.num_selected == 0:
        return None
    return from_trajectory(
        traj,
        toy.schedule,
        jnp.zeros(r.size),
        advantage=sel.advantages.reshape(-1),
        weight=sel.mask.reshape(-1),
    )


def run(cfg: Toy2DConfig, algos=ALGOS) -> list[dict]:
    """Return one metrics dict per algorithm (plus seconds), all from one pretrained model."""
    t0 = time.time()
    model, base = pretrain(cfg)
    pretrain_s = time.time() - t0
    rows = []
    for algo in algos:
        t1 = time.time()
        samples = finetune(cfg, algo, model, base)
        rows.append({"algo": algo, **metrics(cfg, samples), "seconds": time.time() - t1})
    target = sample_target(cfg, np.random.default_rng(123), cfg.eval_samples)
    rows.append({"algo": "target_samples", **metrics(cfg, target), "seconds": 0.0})
    for r in rows:
        r["pretrain_seconds"] = pretrain_s
    return rows


METRIC_UNITS = {
    "target_distance": "total_variation",
    "mode_weight_distance": "total_variation",
    "modes_covered": "modes",
    "mean_reward": "log_density",
    "best_mode_share": "fraction",
    "seconds": "s",
}


def bench_toy2d(settings: Settings) -> list[dict]:
    """Return the records of ``run``: one per (algorithm, metric).

    impl is the algorithm (``target_samples`` = exact samples of p*, the floor set by finite
    samples and the grid), config the Toy2DConfig (seed from ``--seed``).
    """
    cfg = dataclasses.replace(Toy2DConfig(), seed=settings.seed)
    config = {**dataclasses.asdict(cfg), **machine_info()}
    records = []
    for row in run(cfg):
        for metric, unit in METRIC_UNITS.items():
            records.append(record("toy2d", row["algo"], metric, row[metric], unit, config))
    return records
