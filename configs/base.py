"""Defaults shared by every experiment: the released settings of SPEC §10 for SD1.5.

Not run on its own: each experiment file starts from ``base.get_config()`` and sets its reward,
prompts and algorithm. Every key a run may set exists here, so a misspelt override
(``--config.train.learnig_rate=…``) is an error rather than a silently ignored value.

Size variants (applied by ``base.variant``):
  (none)  the released SD1.5 settings (a TPU pod slice or a large GPU)
  tiny    the built-in tiny world on a CPU: same math, batch and epochs scaled down (~1 min)
  demo    the tiny world at 20 × 128 trajectories (7–11 min on 2 CPU cores), where the
          reward measurably rises (BENCHMARKS.md "Demo runs")
"""

from __future__ import annotations

import ml_collections

ALGOS = ("ddpo", "dag_db", "dag_kl", "b2")


def get_config() -> ml_collections.ConfigDict:
    """Return the full default config (SD1.5, DAG-DB, released hyper-parameters)."""
    c = ml_collections.ConfigDict()
    c.algo = "dag_db"  # ddpo | dag_db | dag_kl | b2
    c.seed = 0
    c.model = "runwayml/stable-diffusion-v1-5"  # diffusers folder, hub id, tiny, random-tiny
    c.revision = ""
    c.variant = ""
    c.dtype = "bfloat16"  # compute dtype; params, trajectories, flows, rewards stay fp32
    c.attention = "xla"  # xla | jax | cudnn (fused flash attention on NVIDIA GPUs, bf16)
    c.remat = True  # gradient checkpointing of the UNet blocks in the train step
    c.resolution = 0  # latent side; 0 = the UNet's sample_size

    c.reward = ml_collections.ConfigDict()
    c.reward.name = "aesthetic"
    c.reward.options = ml_collections.ConfigDict()  # keyword options of rewards.get

    c.prompts = ml_collections.ConfigDict()
    c.prompts.name = "simple_animals"  # a dag_jax.data.prompts set, or "inline"
    c.prompts.root = ""  # folder with the canonical prompt files ("" = $DAG_JAX_PROMPTS/cache)
    c.prompts.inline = ()  # the prompts when name == "inline"
    c.prompts.negative = ""  # the unconditional prompt of CFG

    c.sample = ml_collections.ConfigDict()
    c.sample.steps = 50
    c.sample.eta = 1.0
    c.sample.guidance = 5.0
    c.sample.trajectories = 512  # unique trajectories per epoch (global, over all hosts)
    c.sample.chunk = 64  # trajectories per compiled sampling call (global)
    # trajectories per group sharing prompt and initial noise x_T (1: independent, as released);
    # DDPO then standardises rewards within each group instead of its per-prompt tracker.
    # B² ignores it: its branches already share a prefix (b2.branches).
    c.sample.group = 1

    c.train = ml_collections.ConfigDict()
    c.train.epochs = 100
    c.train.trajectories_per_step = 256  # trajectories (× their steps) per optimizer update
    c.train.micro_batch = 64  # transitions per compiled train-step call (global)
    c.train.learning_rate = 3e-4
    c.train.weight_decay = 1e-4
    c.train.max_grad_norm = 1.0
    c.train.flow_learning_rate = 3e-4
    c.train.flow_weight_decay = 1e-4
    c.train.flow_max_grad_norm = 1.0
    c.train.max_nonfinite = 5  # consecutive non-finite losses before the run stops

    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 4
    c.lora.alpha = 4.0

    c.flow = ml_collections.ConfigDict()
    c.flow.block_out_channels = (64, 128, 256, 256)
    c.flow.layers_per_block = 1
    c.flow.attention_heads = 8

    c.dag = ml_collections.ConfigDict()
    c.dag.beta = 100.0
    c.dag.anneal_fraction = 0.5
    c.dag.reg_coef = 1.0
    c.dag.kl_coef = 1.0
    c.dag.clip_range = 1e-4
    c.dag.adv_clip = 5.0
    c.dag.baseline_group = 8
    c.dag.reduction = "mean"  # log-prob reduction over latent elements (release: mean)
    # the groups of baseline_group rows that baselines are taken over. "rows": consecutive rows
    # of the shuffled window, and DAG-DB's θ-gradient has no baseline (release). "step": a
    # group is one denoising step of baseline_group trajectories (those sharing prompt and
    # x_T with sample.group, or one B² prefix's branches); DAG-KL's leave-one-out advantages
    # and DAG-DB's θ-gradient (dag.db_loss) are centred within it.
    c.dag.baseline = "rows"
    # log F(x_T) = log Z + log N(x_T; 0, I) with a learned log Z (False: F(x_T) free, as released)
    c.dag.anchor_initial_flow = True
    # epochs in which only the flow (and log Z) learn, the policy's gradient zeroed (0: as
    # released). The 2-D proof needed it: DB against an untrained flow moves the policy the
    # wrong way (issue 4's toy, BENCHMARKS.md).
    c.dag.flow_warmup_epochs = 0
    # F̃_φ of each state once per update window (forward at its start, one VJP over the
    # window's states at its end) instead of on [x_t; x_s] with the gradient in every
    # micro-batch: the same gradient, half the flow evaluations that need a backward pass.
    # Used where states chain exactly (DDIM "leading" spacing; transitions.states_are_shared).
    c.dag.flow_once_per_state = True
    # where the forward-looking rewards' x̂₀^cond(x_t) come from (SPEC §4). "current": a
    # conditional UNet pass over the window's states with the current θ at the window's start
    # (release). "sampling": the conditional branch of the sampler's own guided call, kept in
    # the trajectory: no extra UNet pass, and exact for the first update after sampling; later
    # windows of the same epoch (train.trajectories_per_step < sample.trajectories, B²'s
    # passes) then score x̂₀ of the sampling policy. Costs one more latent per state in memory.
    c.dag.fl_source = "current"

    c.ddpo = ml_collections.ConfigDict()
    c.ddpo.clip_range = 1e-4
    c.ddpo.adv_clip = 5.0
    c.ddpo.tracker_buffer = 32
    c.ddpo.tracker_min_count = 16
    c.ddpo.inner_epochs = 1
    # how rewards standardised within a group (sample.group's shared-x_T groups, or with
    # b2.baseline "prefix" one prefix's branches) are scaled: "group", each group by its own
    # std (as GRPO); "pooled", all by one std of the deviations from the group means, so a
    # group whose rewards are nearly equal gets nearly zero advantages, not unit-size noise
    c.ddpo.group_scale = "group"

    c.b2 = ml_collections.ConfigDict()
    c.b2.objective = "ddpo"  # ddpo | dag_db | dag_kl
    c.b2.branches = 5
    c.b2.prefixes = 256  # prefixes per stage (each grows `branches` branches)
    c.b2.stages = 100
    c.b2.low = 14  # shortest trained interval (steps)
    c.b2.high = 20  # longest trained interval (steps)
    c.b2.passes = 2  # optimisation passes over each stage's selected transitions
    c.b2.history = 8
    c.b2.threshold = 0.5
    c.b2.clip_range = 0.1
    c.b2.adv_clip = 5.0
    c.b2.select = True  # best/worst selection (off by default for DAG objectives: see train.py)
    # what a branch's reward z-score is taken against. "prompt": the prompt's rewards pooled
    # over this stage and b2.history previous ones (release). "prefix": the other branches of
    # its prefix, which share prompt, x_T and the prefix: what the trained interval did.
    c.b2.baseline = "prompt"

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1: all devices not used by fsdp
    c.mesh.fsdp = 1

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_epochs = 1
    c.checkpoint.max_to_keep = 3

    c.log = ml_collections.ConfigDict()
    c.log.grid_every_epochs = 10  # sample grids of fixed prompts and seeds (0: never)
    c.log.grid_prompts = 4
    c.log.grid_seeds = 4
    return c


def tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Scale ``c`` down to the built-in tiny world on a CPU (same math, about a minute).

    The model is the shipped tiny SD (64-px images, 8×8 latents) and the prompts its captions
    (``tiny_shapes``). JPEG rewards stay; every other reward becomes ``tiny_clipscore``, the
    tiny world's prompt alignment (the real reward models need weights a CPU run lacks).
    """
    c.model = "tiny"
    c.prompts.name = "tiny_shapes"
    if not c.reward.name.startswith("jpeg_"):
        c.reward.name = "tiny_clipscore"
        c.reward.options = ml_collections.ConfigDict()
    c.dtype = "float32"
    c.remat = False
    c.resolution = 0
    c.sample.steps = 4
    c.sample.trajectories = 8
    c.sample.chunk = 8
    c.train.epochs = 2
    c.train.trajectories_per_step = 4
    c.train.micro_batch = 16
    c.flow.block_out_channels = (32, 32)
    c.flow.attention_heads = 4
    c.dag.baseline_group = 4
    c.ddpo.tracker_min_count = 2
    c.b2.prefixes = 4
    c.b2.branches = 2
    c.b2.stages = 2
    c.b2.low = 3
    c.b2.high = 4
    c.b2.passes = 1
    c.log.grid_every_epochs = 1
    c.log.grid_prompts = 2
    c.log.grid_seeds = 2
    return c


def demo(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The tiny world at a size where the reward measurably rises: 7–11 min on 2 CPU cores.

    What makes the difference (BENCHMARKS.md "Demo runs"): 95 % of the tiny sampler's reward
    variance is fixed by the initial noise x_T, so independent samples give DDPO a gradient
    that is mostly noise. ``sample.group`` = 8 trajectories share prompt and x_T, and DDPO
    standardises rewards within the group (an unbiased baseline: x_T is no action of the
    policy). 128 trajectories make one update per epoch (the PPO ratio is 1, so the tight clip
    range costs nothing), at a learning rate the paired line search put near the best step.

    The DAG objectives take their baselines over one denoising step of such a group
    (``dag.baseline`` = "step"): log p_θ − log P_B has per-step offsets of 0.04 to 2.1 nats per
    element here, which a flow trained for 20 updates never learns, and without the baseline
    they drown the forward-looking reward in DB's and KL's policy gradients. B² standardises
    within each prefix's branches (``b2.baseline`` = "prefix") for the same reason as
    ``sample.group``, and trains every branch (``b2.select`` = False): at 128 trajectories a
    stage the released best/worst selection keeps 32 of them, and the held-out reward rose
    +0.03 with it against +0.18 without (one seed each). β stays the released 100.
    """
    c = tiny(c)
    c.sample.steps = 10
    c.sample.trajectories = 128
    c.sample.chunk = 64
    c.sample.group = 8
    c.train.epochs = 20
    c.train.trajectories_per_step = 128
    c.train.micro_batch = 64
    c.train.learning_rate = 5e-3
    c.train.flow_learning_rate = 3e-3  # the flow must keep up with the policy (2-D proof)
    c.dag.baseline_group = 8
    c.dag.baseline = "step"  # DAG's θ-gradients centred within one step of a shared-x_T group
    c.b2.baseline = "prefix"  # B²'s z-scores within each prefix's branches
    c.b2.select = False  # PPO on every branch (best/worst keeps 32 of 128: BENCHMARKS.md)
    c.ddpo.tracker_min_count = 4
    c.b2.prefixes = 16
    c.b2.branches = 8
    c.b2.stages = 20
    c.b2.low = 6
    c.b2.high = 10
    c.log.grid_every_epochs = 10
    c.log.grid_prompts = 4
    c.log.grid_seeds = 4
    return c


VARIANTS = {"": lambda c: c, "tiny": tiny, "demo": demo}


def variant(c: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
    """Return ``c`` with the size variant ``arg`` applied ("" or None: unchanged)."""
    name = (arg or "").strip()
    if name not in VARIANTS:
        raise ValueError(f"unknown config variant {name!r}; known: {sorted(VARIANTS)}")
    return VARIANTS[name](c)
