"""A full DAG-DB training epoch at SD1.5 shapes: ``python -m dag_jax.bench epoch``.

    python -m dag_jax.bench epoch --size=sd15 --dtype=bfloat16 --batch=16 --steps=20 \
        --repeats=2 --json=/tmp/epoch_sd15.json                 # GPU/TPU, under 9 minutes
    python -m dag_jax.bench epoch --size=tiny --batch=4 --steps=2 --repeats=1   # CPU smoke

What runs is the training loop's own epoch, ``train.loop.run_epoch``: the objective's
``collect`` (``--batch`` trajectories of ``--steps`` DDIM steps, sampled in chunks, each chunk's
final images scored by the jitted reward), then ``train.update.train_epoch``: per update window
of ``--batch``/2 trajectories the forward-looking rewards of every state (x̂₀ by the UNet, VAE
decode, the reward, all in the graph), F̃ of every state, the micro-batch gradient steps, the
flow's VJP and one AdamW ``apply`` (donating the state it replaces). The Context is built as
``train.loop.run`` builds it (``phases.build_phases`` on the run's mesh of all devices), around
random weights; nothing is downloaded or read:

- ``--size=sd15``: Stable Diffusion 1.5's UNet (``unets.SD15_UNET_CONFIG``), VAE
  (``train_step.SD15_VAE_CONFIG``, 512-px images) and CLIP ViT-L/14 text encoder
  (``SD15_TEXT_CONFIG``); the aesthetic reward (CLIP ViT-L/14 vision tower at 224 px, the LAION
  head's shapes); the release's flow network, LoRA rank 4, remat on.
- ``--size=tiny``: the tiny world's shapes, a tiny CLIP (``bench.reward.TINY_CLIP``) under the
  head, the tiny config's flow, remat off: a CPU smoke run in seconds.

The config is ``configs/base.py``'s DAG-DB release with the sizes above: two update windows,
``--micro_batch`` transitions per gradient step (0: 16 for sd15, 8 for tiny), sampling chunks
of up to 16 trajectories, compute dtype ``--dtype`` (the release: bfloat16; params fp32),
``--attention``, ``--guidance``, ``--eta``. Every weight, the trainable LoRA and flow too, is
drawn on the host (fan-in scaled normals, so activations stay finite; no init program to
compile); LoRA's B is not zero, so the adapter is live from the first step.

One warm-up epoch compiles every program; ``--repeats`` timed epochs follow. ``--timeout``
(seconds, default 540) bounds the whole command: on an accelerator the run is refused up front
when its estimate (the epoch's model FLOPs at ``ASSUMED_MFU`` of the published peak, times
warm-up + repeats, plus ``COMPILE_ALLOWANCE_S``) exceeds it, and on every backend a timed
epoch is skipped when the time left would not hold another epoch as long as the last one.

Records (``bench="epoch"``, ``impl="dag_jax"``):
  epoch_s, epoch_min_s   mean and fastest wall seconds of a timed epoch
  sample_s, reward_s, fl_rewards_s, update_s   seconds per epoch in each compiled phase: the
                         sampling chunks, the reward on the final images, the forward-looking
                         rewards, and F̃ + gradient steps + flow VJP + apply; each call blocks
                         until its outputs are ready (the loop itself overlaps dispatch)
  host_s                 the rest of the epoch: host work, transfers, gathers
  transitions_per_s      trajectories × steps / epoch_s (every transition is trained once)
  trajectories_per_s     trajectories / epoch_s
  warmup_epoch_s         the first epoch, compilation included
  epoch_tflop            the epoch's model FLOPs (``dag_jax.bench.flops``: matmuls and
                         convolutions, loop bodies × trip counts, ``xla`` attention, no remat,
                         on abstract inputs: ``epoch_flops``)
  achieved_tflops        epoch_tflop / epoch_s
  mfu                    achieved over the published dense bf16 peak of the GPU/TPU (``common``;
                         not recorded on CPU: "n/a")
  peak_memory_bytes      the largest ``peak_bytes_in_use`` of the local devices over the whole
                         run, warm-up included (not recorded where ``memory_stats`` gives none)
  estimated_total_s      (accelerators) the up-front estimate the timeout guard checked
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from collections import Counter
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dag_jax.algos.transitions import Transitions
from dag_jax.bench import flops
from dag_jax.bench.common import PUBLISHED_BF16_PEAK, Settings, record, settings_config
from dag_jax.bench.reward import PROMPTS, TINY_CLIP, VIT_L14_CLIP
from dag_jax.bench.train_step import SD15_VAE_CONFIG, AbstractStep, trajectory_shapes
from dag_jax.bench.unets import CONTEXT_LEN, SD15_UNET_CONFIG
from dag_jax.diffusion.schedule import make_schedule
from dag_jax.infra import parallel
from dag_jax.models.lora import LoRAConfig
from dag_jax.pipeline import (
    Pipeline,
    build_modules,
    load_tokenizer,
    text_encoder_shapes,
    unet_shapes,
    vae_shapes,
)
from dag_jax.tinyworld import random_tiny as tiny
from dag_jax.train import objectives
from dag_jax.train.config import default_config, flow_per_state, validate
from dag_jax.train.loop import run_epoch
from dag_jax.train.phases import Context, Phases, build_phases
from dag_jax.train.run import Model, init_trainable, make_flow, make_tx
from dag_jax.train.state import TrainState

SD15_TEXT_CONFIG = dict(  # openai/clip-vit-large-patch14's text tower, as in SD1.5
    tiny.TEXT_CONFIG,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    vocab_size=49408,
)
ASSUMED_MFU = 0.2  # of the published bf16 peak, for the up-front time estimate only
COMPILE_ALLOWANCE_S = 180.0  # the warm-up's compilation, for the estimate (SD1.5 programs)
MAX_CHUNK = 16  # trajectories per compiled sampling call


@dataclasses.dataclass(frozen=True)
class Size:
    """The model shapes of one ``--size`` (random weights)."""

    unet: dict
    vae: dict
    text: dict
    clip: dict  # transformers CLIPConfig dict of the aesthetic reward's tower
    flow_channels: tuple[int, ...]
    flow_heads: int
    micro_batch: int  # default transitions per gradient step
    remat: bool
    towers: str  # a description for the records


SIZES = {
    "tiny": Size(
        tiny.UNET_CONFIG,
        tiny.VAE_CONFIG,
        tiny.TEXT_CONFIG,
        TINY_CLIP,
        (32, 32),
        4,
        8,
        False,
        "tiny-world UNet, VAE, text encoder; tiny CLIP + LAION head (aesthetic)",
    ),
    "sd15": Size(
        SD15_UNET_CONFIG,
        SD15_VAE_CONFIG,
        SD15_TEXT_CONFIG,
        VIT_L14_CLIP,
        (64, 128, 256, 256),
        8,
        16,
        True,
        "SD1.5 UNet, VAE, CLIP ViT-L/14 text; CLIP ViT-L/14 + LAION head (aesthetic)",
    ),
}
# phase function -> the bucket of the epoch's time it counts in
BUCKETS = {
    "sample": "sample",
    "reward": "reward",
    "fl_rewards": "fl_rewards",
    "state_flows": "update",
    "grad_step": "update",
    "grad_step_per_state": "update",
    "flow_grad": "update",
    "apply": "update",
}


# --------------------------------------------------------------------------- config


def size_of(settings: Settings) -> Size:
    """Return the shapes of ``settings.size`` (a ValueError naming --size if unknown)."""
    if settings.size not in SIZES:
        raise ValueError(f"--size must be one of {sorted(SIZES)}, got {settings.size!r}")
    return SIZES[settings.size]


def epoch_config(settings: Settings, mesh_size: int = 1):
    """Return the DAG-DB release config at the bench's sizes (see the module docstring).

    Raises ValueError naming the flag for sizes the epoch cannot be cut into.
    """
    size = size_of(settings)
    n, k = settings.batch, settings.steps
    if n < 2 or n % 2:
        raise ValueError(f"--batch (trajectories per epoch) must be even and >= 2, got {n}")
    if k < 1:
        raise ValueError(f"--steps must be >= 1, got {k}")
    if settings.timeout <= 0:
        raise ValueError(f"--timeout must be > 0 seconds, got {settings.timeout}")
    c = default_config()
    c.algo = "dag_db"
    c.model = f"random {settings.size}"  # built here, never loaded
    c.seed = settings.seed
    c.dtype = settings.dtype
    c.remat = size.remat
    c.attention = settings.attention
    c.sample.steps = k
    c.sample.guidance = settings.guidance
    c.sample.eta = settings.eta
    c.sample.trajectories = n
    c.sample.chunk = math.gcd(n, MAX_CHUNK)
    c.train.trajectories_per_step = n // 2  # two update windows
    c.train.micro_batch = settings.micro_batch or size.micro_batch
    c.train.epochs = 1 + settings.repeats
    c.train.max_nonfinite = 1 << 30  # random weights: a skipped update is still timed
    c.dag.baseline_group = math.gcd(c.dag.baseline_group, c.train.micro_batch)
    c.flow.block_out_channels = size.flow_channels
    c.flow.attention_heads = size.flow_heads
    c.prompts.name = "inline"
    c.prompts.inline = PROMPTS
    c.mesh.data, c.mesh.fsdp = -1, 1
    c.log.grid_every_epochs = 0
    try:
        validate(c, mesh_size)
    except ValueError as err:
        raise ValueError(f"bench epoch: --batch/--steps/--micro_batch: {err}") from err
    return c


def epoch_calls(config, per_state: bool) -> Counter:
    """Return how many times one epoch of ``config`` calls each phase function.

    ``sample`` and ``reward`` once per sampling chunk; per window ``fl_rewards``, ``apply``
    and the micro-batch steps over its rows (padded to whole micro-batches), and with F̃ per
    state (``per_state``) ``state_flows`` and ``flow_grad`` in chunks of 2·micro-batch.
    """
    c = config
    n, k = c.sample.trajectories, c.sample.steps
    windows = n // c.train.trajectories_per_step
    rows = c.train.trajectories_per_step * k
    micro = -(-rows // c.train.micro_batch)
    calls = Counter(sample=n // c.sample.chunk, reward=n // c.sample.chunk)
    calls.update(fl_rewards=windows, apply=windows)
    if per_state:
        chunks = -(-rows // (2 * c.train.micro_batch))
        calls.update(state_flows=windows, grad_step_per_state=windows * micro)
        calls.update(flow_grad=windows * chunks)
    else:
        calls.update(grad_step=windows * micro)
    return calls


# --------------------------------------------------------------------------- the model


def init_like(shapes, seed: int):
    """Return seeded random fp32 host arrays of a param shape tree (no compilation).

    Kernels and embeddings (rank ≥ 2) are N(0, 1/fan-in), fan-in being all axes but the
    last (Flax layouts); norm scales are 1; biases and scalars 0.
    """
    rng = np.random.default_rng(seed)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    out = []
    for path, spec in leaves:
        if len(spec.shape) >= 2:
            std = np.float32(1.0 / math.sqrt(math.prod(spec.shape[:-1])))
            x = rng.standard_normal(spec.shape, dtype=np.float32)
            out.append(np.multiply(x, std, out=x))
        else:
            fill = 1.0 if getattr(path[-1], "key", "") == "scale" else 0.0
            out.append(np.full(spec.shape, fill, np.float32))
    return jax.tree_util.tree_unflatten(treedef, out)


def place(shapes, shardings, seed: int, abstract: bool):
    """Return random params of ``shapes`` with ``shardings``, or ShapeDtypeStructs of them."""
    if abstract:
        return parallel.abstract(shapes, shardings)
    return parallel.put(init_like(shapes, seed), shardings)


def aesthetic_on(module, clip_params, head_params, abstract: bool):
    """Return the aesthetic Reward of a CLIP tower and head (abstract: shapes only).

    The abstract reward is the same ``aesthetic_reward`` built under ``jax.eval_shape``, so
    its weights are ShapeDtypeStructs and nothing is allocated.
    """
    from dag_jax.rewards.aesthetic import aesthetic_reward

    config = {"towers": "random"}
    if not abstract:
        return aesthetic_reward(module, clip_params, head_params, "pil", config)
    made = {}

    def build(clip, head):
        made["reward"] = aesthetic_reward(module, clip, head, "pil", config)
        return made["reward"].params

    weights = jax.eval_shape(build, clip_params, head_params)
    return dataclasses.replace(made["reward"], params=weights)


def build_model(settings: Settings, config, mesh, abstract: bool = False) -> Model:
    """Return the run's ``Model`` at ``--size``'s shapes with random weights on ``mesh``.

    As ``train.run.load_model`` builds it: frozen UNet, VAE and text encoder FSDP-sharded
    (on ``mesh``'s fsdp axis), the prompts' token ids, the negative prompt's embedding, the
    reward. ``abstract``: every weight a ShapeDtypeStruct (for FLOP counts; nothing computed).
    """
    from dag_jax.rewards.aesthetic_head import AestheticHead
    from dag_jax.weights.clip_loader import build_clip

    size, dtype = size_of(settings), jnp.dtype(config.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = load_tokenizer(tiny.write_byte_tokenizer(Path(tmp) / "tokenizer"))
    text = dict(size.text, vocab_size=size.text.get("vocab_size", len(tokenizer)))
    configs = {"unet": size.unet, "vae": size.vae, "text_encoder": text}
    unet, vae, text_encoder = build_modules(configs, dtype, remat=config.remat)
    lora = LoRAConfig(rank=config.lora.rank, alpha=config.lora.alpha)
    unet = unet.clone(lora_scale=lora.scale, attention_impl=config.attention)
    shapes = {
        "unet": unet_shapes(unet),
        "vae": vae_shapes(vae),
        "text_encoder": text_encoder_shapes(text_encoder),
    }
    min_size = config.mesh.get("min_shard_size", parallel.DEFAULT_MIN_SHARD_SIZE)
    frozen = place(shapes, parallel.fsdp_shardings(mesh, shapes, min_size), config.seed, abstract)
    pipe = Pipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        params={},
        tokenizer=tokenizer,
        scheduler_config=dict(tiny.SCHEDULER_CONFIG),  # SD1.5's DDIM settings
        configs={part: dict(c) for part, c in configs.items()},
        model_index=dict(tiny.MODEL_INDEX),
    )
    clip, clip_shapes = build_clip(size.clip, dtype)
    head_shapes = jax.eval_shape(
        AestheticHead().init, jax.random.key(0), jax.ShapeDtypeStruct((1, 768), jnp.float32)
    )["params"]
    rep = parallel.replicated(mesh)
    rep_of = lambda tree: jax.tree.map(lambda _: rep, tree)
    clip_params = place(clip_shapes, rep_of(clip_shapes), config.seed + 1, abstract)
    head_params = place(head_shapes, rep_of(head_shapes), config.seed + 2, abstract)
    prompts = list(config.prompts.inline)
    neg = jnp.asarray(pipe.encode_prompt_ids([config.prompts.negative]))
    if abstract:  # a closed-over constant of the programs: concrete zeros (small)
        uncond = jnp.zeros((1, neg.shape[1], unet.config.cross_attention_dim), jnp.float32)
    else:
        uncond = jax.jit(pipe.encode_text)(frozen["text_encoder"], neg)
    side = config.resolution or unet.config.sample_size
    return Model(
        pipe=pipe,
        flow=make_flow(config, unet.config),
        lora=lora,
        schedule=make_schedule(pipe.scheduler_config, config.sample.steps),
        frozen=frozen,
        prompts=prompts,
        prompt_ids=pipe.encode_prompt_ids(prompts),
        uncond=uncond,
        reward=aesthetic_on(clip, clip_params, head_params, abstract),
        latent_shape=(unet.config.in_channels, side, side),
    )


def build_context(settings: Settings, config, mesh) -> tuple[Context, TrainState]:
    """Return (the run's Context, its initial TrainState), as ``train.loop.run`` builds them
    (the trainable tree drawn by ``init_like`` instead of its init)."""
    model = build_model(settings, config, mesh)
    rep = parallel.replicated(mesh)
    replicate = lambda tree: parallel.put(tree, jax.tree.map(lambda _: rep, tree))
    # the run's trainable tree (LoRA, flow), drawn as the frozen weights are: no program to
    # compile, and LoRA's B is not zero, so the adapter is live from the first step
    shapes = jax.eval_shape(lambda: init_trainable(model, config, jax.random.key(0)))
    trainable = replicate(init_like(shapes, config.seed + 3))
    tx = make_tx(config, trainable)
    objective = objectives.get(config)
    ctx = Context(model, config, mesh, objective, build_phases(model, config, tx, mesh))
    state = TrainState(
        trainable=trainable,
        opt_state=replicate(tx.init(trainable)),
        trackers=objective.trackers(config),
    )
    return ctx, state


# --------------------------------------------------------------------------- FLOPs


def epoch_flops(settings: Settings) -> tuple[dict[str, float], Counter]:
    """Return ({phase: model FLOPs of one call}, the calls per phase of one epoch).

    Each phase function is counted once on abstract inputs of the shapes the epoch calls it
    with (``dag_jax.bench.flops``), times ``epoch_calls``. Counted with the ``xla`` attention
    and without remat (model FLOPs: no recomputation, the same count whatever kernel runs),
    on one device of this host: the jaxpr does not depend on the backend with ``xla``
    attention, and the count follows loops' trip counts, so CPU blocking changes nothing.
    """
    config = epoch_config(settings)
    config.attention, config.remat = "xla", False
    mesh = parallel.make_mesh(1, 1, jax.devices()[:1])
    model = build_model(settings, config, mesh, abstract=True)
    rep = parallel.replicated(mesh)
    trainable = jax.eval_shape(lambda: init_trainable(model, config, jax.random.key(0)))
    trainable = parallel.abstract(trainable, jax.tree.map(lambda _: rep, trainable))
    phases = build_phases(model, config, make_tx(config, trainable), mesh)
    per_state = flow_per_state(config, model.schedule, 0, config.sample.steps)
    calls = epoch_calls(config, per_state)
    i32 = jnp.int32
    chunk, window = config.sample.chunk, config.train.trajectories_per_step
    ids = jax.ShapeDtypeStruct((chunk, model.prompt_ids.shape[1]), i32)
    idx = jax.ShapeDtypeStruct((chunk,), i32)
    per = {
        "sample": flops.model_flops(
            phases.sample, model.frozen, trainable, ids, idx, jax.random.key(0)
        )
    }
    side = model.latent_shape[1] * model.pipe.vae_scale_factor
    images = jax.ShapeDtypeStruct((chunk, side, side, 3), jnp.float32)
    per["reward"] = flops.model_flops(phases.reward, model.reward.params, images, idx)
    traj = trajectory_shapes(dataclasses.replace(settings, batch=window), model)
    widx = jax.ShapeDtypeStruct((window,), i32)
    per["fl_rewards"] = flops.model_flops(
        phases.fl_rewards, model.frozen, trainable, model.reward.params, traj, widx
    )
    batch = micro_batch(model, config, mesh)
    step = AbstractStep(model, phases, trainable, model.frozen, batch, config)
    fn, args = step.grad_step_call()
    per["grad_step_per_state" if per_state else "grad_step"] = flops.model_flops(fn, *args)
    if per_state:
        per["state_flows"] = flops.model_flops(phases.state_flows, trainable, traj)
        fn, args = step.flow_grad_call()
        per["flow_grad"] = flops.model_flops(fn, *args)
    return per, calls  # apply: no matmuls


def total_flops(per_call: dict[str, float], calls: Counter) -> float:
    """Return the FLOPs of an epoch: each phase's per call × its calls."""
    return sum(calls[name] * per_call.get(name, 0.0) for name in calls)


def micro_batch(model: Model, config, mesh) -> Transitions:
    """Return an abstract micro-batch of transitions sharded on ``mesh`` as the step gets it."""
    from dag_jax.bench.train_step import transition_shapes
    from dag_jax.train.update import micro_batch_shardings

    d = model.pipe.unet.config.cross_attention_dim
    batch = transition_shapes(
        config.train.micro_batch,
        model.latent_shape,
        config.train.trajectories_per_step,
        (CONTEXT_LEN, d),
    )
    return parallel.abstract(batch, micro_batch_shardings(mesh, batch))


# --------------------------------------------------------------------------- timing


class PhaseClock:
    """Times the phase functions of an epoch (each call blocks until done) and counts calls."""

    def __init__(self):
        self.seconds: Counter = Counter()
        self.calls: Counter = Counter()

    def reset(self) -> None:
        """Forget the seconds and calls so far."""
        self.seconds, self.calls = Counter(), Counter()

    def wrap(self, phases: Phases) -> Phases:
        """Return ``phases`` with every function of ``BUCKETS`` timed by this clock."""
        timed = {
            name: self._timed(name, getattr(phases, name))
            for name in BUCKETS
            if getattr(phases, name) is not None
        }
        return dataclasses.replace(phases, **timed)

    def _timed(self, name: str, fn):
        def run(*args, **kwargs):
            start = time.perf_counter()
            out = jax.block_until_ready(fn(*args, **kwargs))
            self.seconds[BUCKETS[name]] += time.perf_counter() - start
            self.calls[name] += 1
            return out

        run.__name__ = name
        return run


def check_estimate(estimate_s: float, timeout_s: float) -> None:
    """Raise ValueError (naming the flags to change) when the estimate exceeds the timeout."""
    if estimate_s > timeout_s:
        raise ValueError(
            f"bench epoch: the estimated {estimate_s:.0f} s exceed --timeout={timeout_s:.0f} s; "
            "lower --batch, --steps or --repeats (or raise --timeout)"
        )


def another_fits(elapsed_s: float, last_epoch_s: float, timeout_s: float) -> bool:
    """Return whether one more epoch as long as the last one ends within the timeout."""
    return elapsed_s + last_epoch_s <= timeout_s


def peak_memory() -> tuple[int | None, int | None]:
    """Return (the largest peak bytes in use, its device's byte limit) of the local devices."""
    best = None
    for dev in jax.local_devices():
        try:
            stats = dev.memory_stats()
        except Exception:  # backends without memory stats raise or return None
            stats = None
        if stats and "peak_bytes_in_use" in stats:
            if best is None or stats["peak_bytes_in_use"] > best[0]:
                best = (int(stats["peak_bytes_in_use"]), stats.get("bytes_limit"))
    return best if best is not None else (None, None)


def published_peak() -> tuple[float | None, str]:
    """Return (published dense bf16 peak FLOP/s of the default device, its name) or (None, why)."""
    dev = jax.devices()[0]
    if dev.platform == "cpu":
        return None, "n/a on CPU"
    for name, peak in PUBLISHED_BF16_PEAK:
        if name.lower() in dev.device_kind.lower():
            return peak, f"published dense bf16 peak of {name}"
    return None, f"no published peak for {dev.device_kind}"


# --------------------------------------------------------------------------- the bench


def bench_epoch(settings: Settings) -> list[dict]:
    """Return the records of a warm-up and ``--repeats`` timed DAG-DB epochs (see above)."""
    start = time.perf_counter()
    elapsed = lambda: time.perf_counter() - start
    mesh = parallel.make_mesh(-1, 1)
    config = epoch_config(settings, mesh.size)  # bad flags fail before any work
    per_call, calls = epoch_flops(settings)
    epoch_tflop = total_flops(per_call, calls)
    peak, peak_source = published_peak()
    estimate = None
    if peak is not None:
        per_epoch = epoch_tflop / (peak * ASSUMED_MFU)
        estimate = elapsed() + COMPILE_ALLOWANCE_S + (1 + settings.repeats) * per_epoch
        check_estimate(estimate, settings.timeout)
    print(
        f"[bench] epoch: {epoch_tflop / 1e12:.3g} TFLOP per epoch; "
        + (f"estimated {estimate:.0f} s in all" if estimate else "no estimate on CPU"),
        flush=True,
    )
    ctx, state = build_context(settings, config, mesh)
    clock = PhaseClock()
    ctx = dataclasses.replace(ctx, phases=clock.wrap(ctx.phases))
    key = jax.random.key(config.seed)
    never = lambda: False

    t0 = time.perf_counter()
    state, _, _ = run_epoch(ctx, state, key, never, keep_input=False)
    warmup_s = time.perf_counter() - t0
    if dict(clock.calls) != dict(calls):
        raise RuntimeError(f"bench epoch: the epoch called {dict(clock.calls)}, counted {calls}")
    print(f"[bench] epoch: warm-up (compilation included) {warmup_s:.1f} s", flush=True)

    epochs, phases, last = [], [], warmup_s
    for i in range(settings.repeats):
        if not another_fits(elapsed(), last, settings.timeout):
            print(
                f"[bench] epoch: stopping after {i} timed epoch(s): another would pass "
                f"--timeout={settings.timeout:.0f} s",
                flush=True,
            )
            break
        clock.reset()
        t0 = time.perf_counter()
        state, _, _ = run_epoch(ctx, state, key, never, keep_input=False)
        last = time.perf_counter() - t0
        epochs.append(last)
        phases.append(dict(clock.seconds))
        print(f"[bench] epoch {i + 1}: {last:.2f} s {dict(clock.seconds)}", flush=True)
    memory, memory_limit = peak_memory()

    n, k = config.sample.trajectories, config.sample.steps
    cfg = {
        **settings_config(settings),
        "mesh": parallel.mesh_str(mesh),
        "trajectories": n,
        "steps": k,
        "windows": n // config.train.trajectories_per_step,
        "trajectories_per_step": config.train.trajectories_per_step,
        "micro_batch": config.train.micro_batch,
        "sample_chunk": config.sample.chunk,
        "latent_side": ctx.model.latent_shape[1],
        "compute_dtype": config.dtype,
        "remat": config.remat,
        "attention": config.attention,
        "towers": size_of(settings).towers,
        "phase_calls": dict(calls),
        "phase_tflop": {k: calls[k] * v / 1e12 for k, v in per_call.items()},
        "timed_epochs": len(epochs),
        "peak_source": peak_source,
        "memory_bytes_limit": memory_limit,
        "assumed_mfu_for_estimate": ASSUMED_MFU,
    }
    rec = lambda metric, value, unit: record("epoch", "dag_jax", metric, value, unit, cfg)
    out = [rec("warmup_epoch_s", warmup_s, "s"), rec("epoch_tflop", epoch_tflop / 1e12, "TFLOP")]
    if estimate is not None:
        out.append(rec("estimated_total_s", estimate, "s"))
    if memory is not None:
        out.append(rec("peak_memory_bytes", memory, "bytes"))
    if not epochs:
        return out
    mean = float(np.mean(epochs))
    out += [
        rec("epoch_s", mean, "s"),
        rec("epoch_min_s", min(epochs), "s"),
        rec("transitions_per_s", n * k / mean, "transitions/s"),
        rec("trajectories_per_s", n / mean, "trajectories/s"),
    ]
    in_phases = 0.0
    for bucket in dict.fromkeys(BUCKETS.values()):
        seconds = float(np.mean([p.get(bucket, 0.0) for p in phases]))
        in_phases += seconds
        out.append(rec(f"{bucket}_s", seconds, "s"))
    out.append(rec("host_s", mean - in_phases, "s"))
    out.append(rec("achieved_tflops", epoch_tflop / mean / 1e12, "TFLOP/s"))
    if peak is not None:
        out.append(rec("mfu", epoch_tflop / mean / peak, "fraction"))
    else:
        print(f"[bench] epoch: mfu {peak_source}", flush=True)
    return out
