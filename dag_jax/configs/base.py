"""Every config key, the releases' settings per algorithm, and the size variants.

Not run on its own: each experiment file builds ``get_config()``, sets its reward and prompts,
and calls ``finish(c, task, arg)``, which applies the chosen algorithm's released settings
(``release``) and then the size variant. Every key a run may set exists here, so a misspelt
override (``--config.train.learnig_rate=…``) is an error, not a silently ignored value.

The config argument (``configs/aesthetic.py:ARG``) is parsed by ``parse_arg``: comma-separated
``key=value`` items, or bare values that name their key unambiguously::

    configs/aesthetic.py                     DAG-DB, released SD1.5 settings
    configs/aesthetic.py:algo=b2             B²-DiffuRL's released settings on that task
    configs/aesthetic.py:algo=ddpo,size=tiny DDPO on the built-in tiny world
    configs/compressibility.py:demo          the same as size=demo

``--config.algo=X`` on the command line is the same as ``algo=X`` in the argument: the CLI
rebuilds the config with it before applying the other overrides (``dag_jax.configs.load``).

Sizes: "" the released sizes (a TPU pod slice or a large GPU); ``tiny`` the built-in tiny world
on a CPU (same math, batch and epochs scaled down, about a minute); ``demo`` the tiny world at
a size where the reward measurably rises, with the project's measured improvements turned on.
"""

from __future__ import annotations

import difflib

import ml_collections

ALGOS = ("ddpo", "dag_db", "dag_kl", "b2", "grpo")
SIZES = ("", "tiny", "demo")
DAG_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # the maintained SD1.5 copy
B2_MODEL = "CompVis/stable-diffusion-v1-4"  # B²-DiffuRL's release
JPEG_TASKS = ("compressibility", "incompressibility")


def get_config() -> ml_collections.ConfigDict:
    """Return every key with its default: DAG-DB's released settings for SD1.5."""
    c = ml_collections.ConfigDict()
    c.algo = "dag_db"  # ddpo | dag_db | dag_kl | b2 | grpo
    c.seed = 0
    c.model = DAG_MODEL  # diffusers folder, hub id, tiny, random-tiny
    c.revision = ""  # hub revision (branch, tag or commit) of the model
    c.variant = ""  # hub weight variant, e.g. "fp16" ("" = the full-precision files)
    c.dtype = "bfloat16"  # compute dtype; params, trajectories, flows, rewards stay fp32
    c.attention = "xla"  # xla | jax | cudnn (NVIDIA, bf16) | pallas_tpu | auto (models/attention)
    c.remat = True  # gradient checkpointing of the UNet blocks in the train step
    c.resolution = 0  # latent side; 0 = the UNet's sample_size

    c.reward = ml_collections.ConfigDict()
    c.reward.name = "aesthetic"
    c.reward.options = ml_collections.ConfigDict()  # keyword options of rewards.get

    c.prompts = ml_collections.ConfigDict()
    c.prompts.name = "simple_animals"  # a dag_jax.data.prompts set, "tfds:...", or "inline"
    c.prompts.root = ""  # folder with the canonical prompt files ("" = $DAG_JAX_PROMPTS/cache)
    c.prompts.inline = ()  # the prompts when name == "inline"
    # name "tfds:<dataset>[/<config>][:<split>]": a TFDS dataset (dag_jax.data.tfds, extra tfds)
    c.prompts.field = ""  # its text feature, e.g. "prompt" or "meta/text" (tfds: names only)
    c.prompts.data_dir = ""  # its TFDS data_dir, may be gs:// ("" = TFDS's default)
    c.prompts.negative = ""  # the unconditional prompt of CFG

    c.sample = ml_collections.ConfigDict()
    c.sample.steps = 50
    c.sample.eta = 1.0
    c.sample.guidance = 5.0
    c.sample.trajectories = 512  # unique trajectories per epoch (global, over all hosts)
    c.sample.chunk = 64  # trajectories per compiled sampling call (global)
    # Improvement (1 = release): G consecutive trajectories share prompt and initial noise
    # x_T, and DDPO standardises rewards within the group instead of its per-prompt tracker.
    # Why: prompt and x_T fix 93 % of the tiny sampler's reward variance; without groups
    # DDPO's demo did not rise (BENCHMARKS.md, "Demo runs"). B² ignores it (its branches
    # share a prefix), and GRPO (its groups are grpo.group and grpo.share_noise).
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
    # What θ is: "lora" (the releases: a LoRA on the attention projections, the UNet frozen) or
    # "unet" (full fine-tuning: every UNet weight, sharded with its AdamW state on mesh.fsdp).
    c.train.trainable = "lora"
    # Improvement (0 = release: no EMA). d in (0, 1): an exponential moving average of the
    # trainable tree, ema <- d·ema + (1 - d)·θ after every accepted update, checkpointed; what
    # `python -m dag_jax.eval --ema` and `python -m dag_jax.export --ema` read.
    c.train.ema_decay = 0.0

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
    # Improvement ("rows" = release: DAG-KL's leave-one-out groups of baseline_group distinct
    # trajectories, no baseline in DB's θ-gradient). "step": a group is one denoising step of
    # baseline_group trajectories sharing prompt and x_T (sample.group, or a B² prefix), and
    # DB's θ-gradient and KL's advantages are centred within it. Why: per-step offsets of
    # log p_θ − log P_B drown the reward signal (BENCHMARKS.md, "Demo runs", "DB terms").
    c.dag.baseline = "rows"
    # Improvement (False = release): log F(x_T) = log Z + log N(x_T; 0, I) with a learned
    # log Z. Why: the 2-D proof keeps more modes with it (BENCHMARKS.md, "2-D proof").
    c.dag.anchor_initial_flow = False
    # Improvement (0 = release): epochs in which only the flow (and log Z) learn. Why: DB
    # against an untrained flow moved the 2-D proof's policy the wrong way ("2-D proof").
    c.dag.flow_warmup_epochs = 0
    # Improvement ("current" = release, SPEC §4): where the forward-looking rewards' x̂₀ come
    # from. "sampling": the sampler's own conditional branch, kept per state; no extra UNet
    # pass, exact for the first update after sampling (BENCHMARKS.md, "Train step").
    c.dag.fl_source = "current"

    c.ddpo = ml_collections.ConfigDict()
    c.ddpo.clip_range = 1e-4
    c.ddpo.adv_clip = 5.0
    c.ddpo.tracker_buffer = 32
    c.ddpo.tracker_min_count = 16
    c.ddpo.inner_epochs = 1
    # Improvement ("group" = each group by its own std, as GRPO). "pooled": within-group
    # deviations (sample.group's groups, B²'s prefixes) divided by one std over all groups, so
    # a group the reward scores alike gets near-zero advantages (BENCHMARKS.md, "Demo runs").
    c.ddpo.group_scale = "group"

    # GRPO (no release on SD1.5 DDIM here): defaults from DanceGRPO's SD script (its
    # fastvideo/config_sd/dgx.py:hpsv2 and train_grpo_sd.py), KL from Flow-GRPO's option.
    c.grpo = ml_collections.ConfigDict()
    c.grpo.group = 16  # G trajectories per prompt, standardised within (DanceGRPO: 16)
    # the G share their initial noise x_T (DanceGRPO); False: each its own (Flow-GRPO)
    c.grpo.share_noise = True
    c.grpo.clip_range = 1e-4  # PPO ratio clip per denoising step (DanceGRPO, Flow-GRPO)
    c.grpo.adv_clip = 5.0
    # coefficient of the per-step KL(π_θ ‖ π_ref) to the base UNet (DanceGRPO: none;
    # Flow-GRPO: 0.004–0.04); needs sample.eta > 0 (σ_t = 0 has no KL)
    c.grpo.kl = 0.0

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
    # Improvement (True = release best/worst selection). False: PPO on every branch with its
    # clipped z-score. Why: at the demo's 128 branches a stage selection kept 32, and the
    # held-out reward rose +0.03 with it (one seed) against +0.20 ± 0.03 without (3 seeds;
    # BENCHMARKS.md, "Demo runs").
    c.b2.select = True
    # Improvement ("prompt" = release: z-scores against the prompt's pooled history).
    # "prefix": within its prefix's branches, which share prompt, x_T and the prefix
    # (BENCHMARKS.md, "Demo runs").
    c.b2.baseline = "prompt"

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1: all devices not used by fsdp
    c.mesh.fsdp = 1
    c.mesh.min_shard_size = 2**18  # leaves with fewer elements stay whole on every device

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_epochs = 1
    c.checkpoint.max_to_keep = 3

    c.log = ml_collections.ConfigDict()
    c.log.grid_every_epochs = 10  # sample grids of fixed prompts and seeds (0: never)
    c.log.grid_prompts = 4
    c.log.grid_seeds = 4

    # evaluation inside the loop, with `python -m dag_jax.eval`'s protocol (fixed noise per
    # prompt and seed): `eval/<split>/…` in metrics.jsonl and TensorBoard, compare grids
    c.eval = ml_collections.ConfigDict()
    c.eval.every_epochs = 0  # 0: never; else every N epochs and after the last one
    c.eval.prompts = "test"  # train | test | both (test: held-out prompts)
    c.eval.test_prompts = ()  # replace the held-out prompts (sets without a held-out split)
    c.eval.max_prompts = 0  # the first N prompts of each split (0: all)
    c.eval.num_per_prompt = 4  # images (seeds) per prompt
    c.eval.seed = 0  # the evaluation noise (not the run's seed): the same at every epoch
    c.eval.batch_size = 0  # images per compiled sampling call (0: sample.chunk)
    c.eval.feature_model = ""  # diversity features, as eval's --feature_model ("": auto)
    c.eval.grid_prompts = 4  # compare grids (base row above current row): prompts
    c.eval.grid_seeds = 4  # … and seeds
    c.eval.ema = False  # evaluate the EMA weights (needs train.ema_decay > 0)
    return c


# --------------------------------------------------------------------------- the releases


def release(c: ml_collections.ConfigDict, algo: str, task: str) -> ml_collections.ConfigDict:
    """Return ``c`` with ``algo``'s released settings on ``task`` (SPEC §10).

    DAG-DB / DAG-KL: the DAG release (50 steps, 512 unique trajectories per epoch, 256 per
    update, 100 epochs, lr 3e-4). DDPO: ddpo-pytorch's per-task sizes (JPEG: 256 sampled, 64
    per update, 100 epochs, tracker 16/16; alignment: 288 sampled, 144 per update, 200 epochs;
    other rewards as aesthetic: 256 sampled, 128 per update, 200 epochs; tracker 32/16).
    B²: its release (SD1.4, 20 steps, 256 prefixes × 5 branches, 128 kept per update,
    100 stages of 2 passes, lr 1e-4). GRPO (no release here): DanceGRPO's SD settings
    (50 steps, η 1, guidance 5, 512 trajectories per epoch in groups of 16 sharing x_T, 256
    per update, 300 epochs, clip 1e-4, no KL) with the LoRA learning rate 3e-4 of the others
    (DanceGRPO trains the whole UNet at 1e-5).
    """
    if algo not in ALGOS:
        raise ValueError(f"unknown algo {algo!r}{did_you_mean(algo, ALGOS)}; one of {ALGOS}")
    c.algo = algo
    c.model = B2_MODEL if algo == "b2" else DAG_MODEL
    c.sample.steps = 20 if algo == "b2" else 50
    c.sample.chunk = 64
    c.train.learning_rate = 1e-4 if algo == "b2" else 3e-4
    c.train.trajectories_per_step = 256
    c.train.epochs = 100
    if algo == "ddpo":
        jpeg = task in JPEG_TASKS
        c.sample.trajectories = 288 if task == "alignment" else 256
        c.sample.chunk = 32 if task == "alignment" else 64
        c.train.trajectories_per_step = 64 if jpeg else (144 if task == "alignment" else 128)
        c.train.epochs = 100 if jpeg else 200
        c.ddpo.tracker_buffer = 16 if jpeg else 32
        c.ddpo.tracker_min_count = 16
    elif algo == "b2":
        c.sample.chunk = 32
        c.train.trajectories_per_step = 128
    elif algo == "grpo":
        c.sample.trajectories = 512
        c.train.epochs = 300
    else:
        c.sample.trajectories = 512
    return c


# --------------------------------------------------------------------------- sizes


def tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Return ``c`` scaled down to the built-in tiny world on a CPU (same math, ~1 minute).

    The model is the shipped tiny SD (64-px images, 16×16 latents) and the prompts its captions
    (``tiny_shapes``). JPEG rewards stay; every other reward becomes ``tiny_clipscore``, the
    tiny world's prompt alignment (the real reward models need weights a CPU run lacks); a
    ``mix`` keeps its part names and weights, its non-JPEG parts becoming ``tiny_clipscore``.
    """
    c.model = "tiny"
    c.prompts.name = "tiny_shapes"
    if c.reward.name == "mix":
        c.reward.options = ml_collections.ConfigDict({"parts": tiny_mix_parts(c.reward.options)})
    elif not c.reward.name.startswith("jpeg_"):
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
    c.grpo.group = 4
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


def tiny_mix_parts(options) -> dict:
    """Return a mix's ``parts`` for the tiny world: names and weights kept, JPEG parts as they
    are, every other part ``tiny_clipscore`` with its default options."""
    options = options.to_dict() if hasattr(options, "to_dict") else dict(options)
    parts = options.get("parts") or {
        k: {"weight": w} for k, w in options.get("weights", {}).items()
    }
    out = {}
    for name, part in parts.items():
        reward = part.get("reward") or name
        if str(reward).startswith("jpeg_"):
            out[name] = dict(part)
        else:
            out[name] = {"reward": "tiny_clipscore", "weight": part.get("weight"), "options": {}}
    return out


def demo(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Return the tiny world at a size where the reward measurably rises (4–8 min, 2 cores).

    It turns on the project's measured improvements (see their comments in ``get_config``):
    ``sample.group`` = 8 (shared x_T), ``dag.baseline`` = "step", the anchored initial flow,
    ``b2.baseline`` = "prefix" and ``b2.select`` = False. 128 trajectories make one update per
    epoch (the PPO ratio is 1, so the tight clip range costs nothing), at a learning rate the
    paired line search put near the best step (BENCHMARKS.md, "Policy-gradient line search").
    β stays 100.
    GRPO: groups of 8 sharing x_T, as ``sample.group``, with Flow-GRPO's KL coefficient 0.04
    (without the KL it would be DDPO's demo exactly). The loop evaluates the 45 held-out
    captions × 4 seeds on fixed noise before training, every 4 epochs and at the end
    (``config.eval``), so the run's last lines show base → trained with the paired SE.
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
    c.dag.baseline = "step"
    c.dag.anchor_initial_flow = True
    c.b2.baseline = "prefix"
    c.b2.select = False
    c.ddpo.tracker_min_count = 4
    c.grpo.group = 8
    c.grpo.kl = 0.04
    c.b2.prefixes = 16
    c.b2.branches = 8
    c.b2.stages = 20
    c.b2.low = 6
    c.b2.high = 10
    c.log.grid_every_epochs = 10
    c.log.grid_prompts = 4
    c.log.grid_seeds = 4
    # the held-out reward on fixed noise: the base model before the first epoch, then every 4
    # epochs and after the last; the run ends with base -> trained ± the paired SE
    c.eval.every_epochs = 4
    return c


VARIANTS = {"": lambda c: c, "tiny": tiny, "demo": demo}


# --------------------------------------------------------------------------- the argument


def did_you_mean(word: str, choices) -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest of ``choices``, or ""."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def parse_arg(arg: str | None, **spec: tuple) -> ml_collections.ConfigDict:
    """Return the config argument as a ConfigDict of the keys in ``spec``.

    ``spec`` maps each key to (default, allowed values). ``arg`` is "k=v,k=v" (big_vision's
    style); a bare item sets the one key whose allowed values contain it ("tiny" → size).
    """
    out = ml_collections.ConfigDict({k: default for k, (default, _) in spec.items()})
    for item in filter(None, (s.strip() for s in (arg or "").split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            owners = [k for k, (_, allowed) in spec.items() if item in allowed]
            if len(owners) != 1:
                known = sorted({v for _, allowed in spec.values() for v in allowed if v})
                hint = did_you_mean(item, known)
                raise ValueError(f"config argument {item!r} is not one of {known}{hint}")
            key, value = owners[0], item
        if key not in spec:
            hint = did_you_mean(key, spec)
            raise ValueError(f"unknown config argument {key!r}{hint}; known: {sorted(spec)}")
        if value not in spec[key][1]:
            hint = did_you_mean(value, spec[key][1])
            raise ValueError(f"{key}={value!r} is not one of {spec[key][1]}{hint}")
        out[key] = value
    return out


def finish(
    c: ml_collections.ConfigDict, task: str, arg: str | None, default_algo: str = "dag_db"
) -> ml_collections.ConfigDict:
    """Return ``c`` with the argument's algorithm (its release settings) and size applied."""
    a = parse_arg(arg, algo=(default_algo, ALGOS), size=("", SIZES))
    return VARIANTS[a.size](release(c, a.algo, task))
