"""Reward throughput: ``python -m dag_jax.bench reward``.

    python -m dag_jax.bench reward --model=tiny --batch=8 --repeats=3 [--reward=all|NAME[,NAME]]
    python -m dag_jax.bench reward --model=sd15-random --batch=32 --dtype=bfloat16

Images/s of each reward of ``dag_jax.rewards`` on one batch of ``--batch`` uniform-noise images
(``--image_size`` px square; 0 = 64 for ``tiny``, 512 = Stable Diffusion 1.5's output for
``sd15-random``) with cycling prompts. JAX-native rewards (aesthetic, clipscore, hpsv2,
imagereward, pickscore) run
jitted, lowered and compiled once up front (``compile_s``, recorded apart): the same program as
``jax.jit(reward.bind(prompts))`` (quantise, token-table gather, score) except that the weights
enter as arguments (``aesthetic.aesthetic_parts``, ``clipscore.similarity_parts``,
``imagereward.imagereward_parts``) rather than as closed-over constants, which JAX would embed in
the program (GBs for the real towers; see ``rewards/aesthetic.py``). Host rewards (JPEG,
BERTScore) run eagerly, as ``reward(images, prompts)``.

Towers, all with random weights and built without any download or weight file:

- ``--model=tiny``: the shapes of ``tests/test_reward_models.py`` (``TINY_CLIP``: a CLIP with a
  32 px, 2-layer, 48-wide vision tower and a 768-d projection, so the LAION-shaped head
  applies; ``TINY_OPEN_CLIP``: a 32 px OpenCLIP ViT with the full 49408-token vocabulary) and
  the small ImageReward of ``tests/imagereward_torch.py`` (2-layer BLIP ViT at 32 px and BERT;
  its BERT tokenizer reads a small ``vocab.txt`` written to a temporary folder).
- ``--model=sd15-random`` (the name the sampler bench uses for real shapes with random
  weights): CLIP ViT-L/14 at 224 px (``VIT_L14_CLIP``, aesthetic), OpenCLIP ViT-H-14 at 224
  px (clipscore; hpsv2 shares the same random tower, having the same architecture) and
  ImageReward-v1.0's BLIP ViT-L/16 at 224 px + BERT-base with cross-attention + head (its
  tokenizer reads a made-up 30522-token ``vocab.txt``).

The JAX towers are Flax-default random inits (``module.init``) handed to the rewards' building
blocks; the aesthetic head is a random init of its 768→…→1 stack, ImageReward's head is part of
its ``ImageRewardModel``. The compute dtype is ``--dtype`` (params fp32).
The prompts are tokenized with OpenCLIP's BPE when the ``open_clip`` package is installed,
else with made-up ids (the throughput does not depend on them).

bertscore needs its captioning server: it is skipped with a message unless the environment
variable ``DAG_JAX_BERTSCORE_URL`` gives the server's URL.

pickscore also runs its PyTorch reference in the same timed loop (``--impl=both``, the default;
``--impl=dag_jax`` or ``torch_ref`` runs one side): PickScore's own scoring code on a random
transformers ``CLIPModel`` of the same shapes (``torch_pickscore``: ``CLIPImageProcessor`` PIL
path, tokenizer, both towers, ``logit_scale.exp()`` · cosine), fp32, torch's default threads.
Its towers: ``--model=sd15-random`` a CLIP ViT-H/14 with PickScore_v1's shapes
(``PICKSCORE_CLIP``), ``tiny`` the tiny CLIP with GELU; both tokenize with the tiny world's BPE
(the ids do not change the cost). ``mix`` is not benchmarked (its parts are).

Records ``{"bench": "reward", "impl": "dag_jax" | "torch_ref", "metric", "value", "unit",
"config"}`` per reward and implementation, ``config["reward"]`` naming it:
  images_per_s  batch / mean seconds of one scoring call (after ``--warmup`` untimed calls;
                the rewards take turns, so load changes hit all alike)
  batch_s       mean seconds of one call on the batch
  compile_s     (JAX-native rewards) seconds to lower and compile the jitted scorer
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dag_jax import rewards
from dag_jax.bench.common import Settings, record, settings_config, timed_runs
from dag_jax.rewards.base import Reward, RewardError, quantize

REWARD_MODELS = ("tiny", "sd15-random")
IMAGE_SIDE = {"tiny": 64, "sd15-random": 512}
BERTSCORE_URL_ENV = "DAG_JAX_BERTSCORE_URL"
PROMPTS = (
    "a photo of a cat",
    "an astronaut riding a horse on the moon, highly detailed",
    "a red bicycle leaning against a brick wall",
    "a watercolor painting of a lighthouse at dawn",
)

# transformers CLIPConfig dicts (text_config / vision_config / projection_dim).
TINY_CLIP = {
    "projection_dim": 768,
    "text_config": dict(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        vocab_size=49408,  # CLIP's, so transformers' default BOS/EOS ids are in range
        hidden_act="quick_gelu",
    ),
    "vision_config": dict(
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        hidden_act="quick_gelu",
    ),
}
VIT_L14_CLIP = {  # openai/clip-vit-large-patch14
    "projection_dim": 768,
    "text_config": dict(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        vocab_size=49408,
        hidden_act="quick_gelu",
    ),
    "vision_config": dict(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=224,
        patch_size=14,
        hidden_act="quick_gelu",
    ),
}
# PickScore_v1 (yuvalkirstain/PickScore_v1): a transformers CLIP ViT-H/14 with exact GELU, and
# the same family at the tiny sizes (vocabulary of the tiny world's BPE, which tokenizes it).
PICKSCORE_CLIP = {
    "projection_dim": 1024,
    "logit_scale_init_value": 4.6052,  # ln 100, PickScore's trained value to 4 digits
    "text_config": dict(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        max_position_embeddings=77,
        vocab_size=49408,
        hidden_act="gelu",
        eos_token_id=2,  # pool at the highest id (CLIP's EOS), as transformers' legacy rule
    ),
    "vision_config": dict(
        hidden_size=1280,
        intermediate_size=5120,
        num_hidden_layers=32,
        num_attention_heads=16,
        image_size=224,
        patch_size=14,
        hidden_act="gelu",
    ),
}
TINY_PICKSCORE = {
    "projection_dim": 16,
    "logit_scale_init_value": 4.6052,
    "text_config": {
        **TINY_CLIP["text_config"],
        "vocab_size": 578,
        "hidden_act": "gelu",
        "bos_token_id": 576,  # the tiny BPE's BOS; EOS (577, also its pad) is the highest id
        "eos_token_id": 2,
        "pad_token_id": 577,
    },
    "vision_config": {**TINY_CLIP["vision_config"], "hidden_act": "gelu"},
}
# Rewards with a PyTorch reference in this bench (``--impl=both|torch_ref``).
TORCH_REFS = ("pickscore",)
# OpenCLIP model configs: ViT-H-14's settings with tiny sizes (full vocabulary, so OpenCLIP's
# real tokenizer applies), and ViT-H-14 itself.
TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "vision_cfg": dict(image_size=32, layers=2, width=48, head_width=12, patch_size=8),
    "text_cfg": dict(context_length=77, vocab_size=49408, width=32, heads=4, layers=2),
}
FULL_OPEN_CLIP = "ViT-H-14"
# ImageReward (BLIP ViT + BERT with cross-attention + MLP head) sizes; ``vocab`` None: a vocab.txt
# of the prompts' words (the embedding gets its size + BLIP's 2 extra tokens).
TINY_IMAGEREWARD = dict(
    vit_width=64,
    vit_layers=2,
    image_size=32,
    patch_size=16,
    bert_width=32,
    bert_layers=2,
    bert_heads=2,
    bert_intermediate=48,
    max_positions=40,
    vocab=None,
    head=(24, 16, 8, 4, 1),
)
FULL_IMAGEREWARD = dict(  # ImageReward-v1.0: BLIP ViT-L/16 at 224 px + bert-base
    vit_width=1024,
    vit_layers=24,
    image_size=224,
    patch_size=16,
    bert_width=768,
    bert_layers=12,
    bert_heads=12,
    bert_intermediate=3072,
    max_positions=512,
    vocab=30522,
    head=(1024, 128, 64, 16, 1),
)


def reward_names(selection: str) -> list[str]:
    """Return the rewards named by ``--reward``: "all" or comma-separated registered names."""
    if selection == "all":
        return rewards.names()
    names = [n.strip() for n in selection.split(",") if n.strip()]
    unknown = [n for n in names if n not in rewards.names()]
    if unknown or not names:
        raise ValueError(
            f"--reward must be 'all' or comma-separated names of {rewards.names()}, "
            f"got {selection!r}"
        )
    return names


def image_side(settings: Settings) -> int:
    """Return the side of the benchmark images (``--image_size``, else by model)."""
    return settings.image_size or IMAGE_SIDE[settings.model]


def random_clip(config, dtype: str, seed: int):
    """Return (Linen CLIPModel, random params on device) of a CLIPConfig dict (or OpenCLIP cfg).

    ``config`` is a transformers CLIPConfig dict, or an OpenCLIP model config (name or dict,
    with ``embed_dim``) converted by ``weights.open_clip.clip_config_from_open_clip``.
    """
    from dag_jax.weights.clip_loader import build_clip
    from dag_jax.weights.open_clip import clip_config_from_open_clip

    if isinstance(config, str) or "embed_dim" in config:
        config = clip_config_from_open_clip(config)
    module, _ = build_clip(config, jnp.dtype(dtype))
    cfg = module.config
    ids = jnp.zeros((1, cfg.text.max_position_embeddings), jnp.int32)
    size = cfg.vision.image_size
    pixels = jnp.zeros((1, 3, size, size), jnp.float32)
    params = jax.jit(module.init)(jax.random.key(seed), ids, pixels)["params"]
    return module, params


def random_head(seed: int) -> dict:
    """Return random params of the aesthetic head (the LAION head's shapes)."""
    from dag_jax.rewards.aesthetic_head import AestheticHead

    return AestheticHead().init(jax.random.key(seed), jnp.zeros((1, 768)))["params"]


def synthetic_tokenizer(context_length: int = 77, vocab: int = 49408) -> Callable:
    """Return a stand-in for OpenCLIP's tokenizer: BOS, made-up ids by word, EOS, 0-padding."""

    def tokenize(prompts):
        out = np.zeros((len(prompts), context_length), np.int32)
        for row, prompt in enumerate(prompts):
            words = prompt.split()[: context_length - 2]
            ids = [vocab - 2, *(1 + (sum(map(ord, w)) % (vocab - 3)) for w in words), vocab - 1]
            out[row, : len(ids)] = ids
        return out

    return tokenize


def clip_tokenizer(vocab: int):
    """Return OpenCLIP's tokenizer (from the installed package's BPE) or a synthetic one."""
    from dag_jax.rewards import clipscore

    if clipscore.open_clip_bpe_path() is not None:
        return clipscore.load_tokenizer(None)
    print("[bench] open_clip is not installed: clipscore/hpsv2 get made-up token ids")
    return synthetic_tokenizer(vocab=vocab)


# --------------------------------------------------------------------------- ImageReward


def random_imagereward(sizes: dict, vocab_rows: int, dtype: str, seed: int):
    """Return (Linen ImageRewardModel, random params on device) of the given sizes."""
    from dag_jax.models.blip import (
        VIT_HEAD_DIM,
        BlipTextConfig,
        BlipVisionConfig,
        ImageRewardConfig,
        ImageRewardModel,
    )

    width = sizes["vit_width"]
    vision = BlipVisionConfig(
        hidden_size=width,
        num_hidden_layers=sizes["vit_layers"],
        num_attention_heads=max(width // VIT_HEAD_DIM, 1),
        intermediate_size=4 * width,
        image_size=sizes["image_size"],
        patch_size=sizes["patch_size"],
    )
    text = BlipTextConfig(
        vocab_size=vocab_rows,
        hidden_size=sizes["bert_width"],
        num_hidden_layers=sizes["bert_layers"],
        num_attention_heads=sizes["bert_heads"],
        intermediate_size=sizes["bert_intermediate"],
        max_position_embeddings=sizes["max_positions"],
        encoder_width=width,
    )
    config = ImageRewardConfig(vision, text, tuple(sizes["head"]))
    module = ImageRewardModel(config, jnp.dtype(dtype))
    size = vision.image_size
    pixels = jnp.zeros((1, size, size, 3), jnp.float32)
    ids = jnp.zeros((1, 8), jnp.int32)
    params = jax.jit(module.init)(jax.random.key(seed), pixels, ids, ids)["params"]
    return module, params


def _write_vocab(folder: Path, size: int | None) -> int:
    """Write a BERT ``vocab.txt`` (a few words, or ``size`` made-up tokens); return its size."""
    folder.mkdir(parents=True, exist_ok=True)
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = {w for prompt in PROMPTS for w in prompt.replace(",", " ").split()}
    tokens += sorted(words) + [",", *"abcdefghijklmnopqrstuvwxyz"]
    tokens = list(dict.fromkeys(tokens))  # a word may also be a letter
    if size is not None:
        tokens += [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"]
        tokens += [f"[unused{i}]" for i in range(size - len(tokens))]
    (folder / "vocab.txt").write_text("\n".join(tokens) + "\n")
    return len(tokens)


# --------------------------------------------------------------------------- building rewards


@dataclasses.dataclass(frozen=True)
class JaxScorer:
    """A JAX-native reward's score with explicit weights (see ``aesthetic_parts``)."""

    fn: Callable  # (weights, quantised images, tokens) -> (B,) scores
    weights: object
    tokenize: Callable | None  # prompts -> (P, L) ids; None: prompts play no part
    config: dict
    jittable: bool = True


def build_reward(
    name: str, settings: Settings, tmp: Path, cache: dict
) -> Reward | JaxScorer | None:
    """Return reward ``name`` with random weights in the ``settings.model`` shapes, or None.

    None (with a printed reason) when it cannot run here. ``cache`` shares the random ViT-H
    tower between clipscore and hpsv2.
    """
    full = settings.model == "sd15-random"
    dtype = settings.dtype
    if name in ("jpeg_compressibility", "jpeg_incompressibility"):
        return rewards.get(name)
    if name == "aesthetic":
        from dag_jax.rewards.aesthetic import aesthetic_parts

        module, params = random_clip(VIT_L14_CLIP if full else TINY_CLIP, dtype, settings.seed)
        config = {"towers": "random CLIP ViT-L/14" if full else "random tiny CLIP"}
        fn, weights = aesthetic_parts(module, params, random_head(settings.seed), "pil")
        return JaxScorer(fn, weights, None, config)
    if name in ("clipscore", "hpsv2"):
        from dag_jax.rewards.clipscore import similarity_parts

        if "open_clip" not in cache:
            spec = FULL_OPEN_CLIP if full else TINY_OPEN_CLIP
            module, params = random_clip(spec, dtype, settings.seed + 1)
            cache["open_clip"] = (module, params, clip_tokenizer(module.config.text.vocab_size))
        module, params, tok = cache["open_clip"]
        config = {"towers": "random OpenCLIP ViT-H-14" if full else "random tiny OpenCLIP"}
        fn, weights, tokenize = similarity_parts(name, module, params, tok, "pil")
        return JaxScorer(fn, weights, tokenize, config)
    if name == "imagereward":
        if importlib.util.find_spec("transformers") is None:
            print("[bench] skipping imagereward: transformers (its BERT tokenizer) not installed")
            return None
        from dag_jax.rewards.imagereward import imagereward_parts, load_tokenizer

        sizes = FULL_IMAGEREWARD if full else TINY_IMAGEREWARD
        folder = tmp / "imagereward_tok"
        rows = _write_vocab(folder, sizes["vocab"]) + 2  # + BLIP's [DEC], [ENC]
        module, params = random_imagereward(sizes, rows, dtype, settings.seed + 2)
        fn, weights, tokenize = imagereward_parts(module, params, load_tokenizer(folder), "pil")
        what = "BLIP ViT-L/16 + BERT-base" if full else "tiny BLIP ViT + BERT"
        return JaxScorer(fn, weights, tokenize, {"towers": f"random {what}"})
    if name == "pickscore":
        from dag_jax.rewards.pickscore import pickscore_parts

        module, params = random_clip(
            PICKSCORE_CLIP if full else TINY_PICKSCORE, dtype, settings.seed
        )
        fn, weights, tokenize = pickscore_parts(module, params, pickscore_tokenizer(), "pil")
        what = "random CLIP ViT-H/14 (PickScore_v1's shapes)" if full else "random tiny CLIP"
        return JaxScorer(fn, weights, tokenize, {"towers": what})
    if name == "bertscore":
        url = os.environ.get(BERTSCORE_URL_ENV)
        if not url:
            print(
                f"[bench] skipping bertscore: it needs its captioning server; set "
                f"{BERTSCORE_URL_ENV}=http://host:port to benchmark it"
            )
            return None
        return rewards.get("bertscore", url=url)
    print(f"[bench] skipping {name}: no random-weight setup for it in the reward bench")
    return None


def pickscore_tokenizer():
    """Return a CLIP tokenizer for the PickScore bench: the tiny world's BPE (578 tokens; the
    throughput does not depend on the ids, and its files ship with the package)."""
    from dag_jax.rewards.pickscore import load_tokenizer
    from dag_jax.tinyworld.assets import TINY_CLIP as TINY_CLIP_FOLDER

    return load_tokenizer(TINY_CLIP_FOLDER)


def torch_pickscore(settings: Settings, images: np.ndarray, prompts: list[str]) -> Callable:
    """Return a blocking call scoring the batch as PickScore's own PyTorch code does.

    A random transformers ``CLIPModel`` of the bench's shapes; per call: ``CLIPImageProcessor``
    (PIL path) on the uint8 images, the tokenizer (``padding=True, truncation=True,
    max_length=77``), ``get_image_features`` / ``get_text_features``, L2 norm and
    ``logit_scale.exp()`` times the cosine of each image with its prompt. fp32, eval mode,
    ``torch.no_grad``, torch's default threads.
    """
    import torch
    import transformers
    from PIL import Image

    full = settings.model == "sd15-random"
    torch.manual_seed(settings.seed)
    model = transformers.CLIPModel(
        transformers.CLIPConfig(**(PICKSCORE_CLIP if full else TINY_PICKSCORE))
    ).eval()
    size = model.config.vision_config.image_size
    cls = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)
    processor = cls(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    tok = pickscore_tokenizer()
    pil = [Image.fromarray(im) for im in np.round(np.clip(images, 0, 1) * 255).astype(np.uint8)]

    def run():
        with torch.no_grad():
            pixels = processor(images=pil, return_tensors="pt")["pixel_values"]
            text = tok(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
            img = model.get_image_features(pixel_values=pixels)
            txt = model.get_text_features(**text)
            img = img if isinstance(img, torch.Tensor) else img.pooler_output
            txt = txt if isinstance(txt, torch.Tensor) else txt.pooler_output
            img = img / img.norm(dim=-1, keepdim=True)
            txt = txt / txt.norm(dim=-1, keepdim=True)
            return (model.logit_scale.exp() * (img * txt).sum(-1)).numpy()

    return run


def prepare(reward: Reward | JaxScorer, images: np.ndarray, prompts: list[str]):
    """Return (blocking call scoring the batch, compile seconds or None for host rewards)."""
    if isinstance(reward, Reward):
        return (lambda: np.asarray(reward(images, prompts))), None
    unique = sorted(set(prompts))
    idx = jnp.asarray([unique.index(p) for p in prompts], jnp.int32)
    table = None if reward.tokenize is None else jnp.asarray(reward.tokenize(unique))
    x = jax.device_put(jnp.asarray(images))

    def run(weights, images, table, idx):  # what reward.bind(unique) does, weights as an arg
        tokens = idx if table is None else table[idx]
        return reward.fn(weights, quantize(images), tokens)

    args = (reward.weights, x, table, idx)
    start = time.perf_counter()
    compiled = jax.jit(run).lower(*args).compile()
    compile_s = time.perf_counter() - start
    return (lambda: jax.block_until_ready(compiled(*args))), compile_s


def bench_reward(settings: Settings) -> list[dict]:
    """Return images/s (and compile time) records of the rewards named by ``settings.reward``."""
    if settings.model not in REWARD_MODELS:
        raise ValueError(f"--model must be one of {REWARD_MODELS}, got {settings.model!r}")
    names = reward_names(settings.reward)
    side = image_side(settings)
    rng = np.random.default_rng(settings.seed)
    images = rng.random((settings.batch, side, side, 3), dtype=np.float32)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(settings.batch)]
    base = {**settings_config(settings), "image_size": side}

    calls, compile_s, configs = {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="dag_jax_bench_reward_") as tmp:
        cache: dict = {}
        for name in names:
            try:
                reward = build_reward(name, settings, Path(tmp), cache)
            except RewardError as err:
                print(f"[bench] skipping {name}: {err}")
                continue
            if reward is None:
                continue
            config = {**base, "reward": name, "jittable": reward.jittable}
            config.update({k: v for k, v in reward.config.items() if k == "towers"})
            if "dag_jax" in settings.impls():
                key = (name, "dag_jax")
                calls[key], compile_s[key] = prepare(reward, images, prompts)
                configs[key] = config
            if name in TORCH_REFS and "torch_ref" in settings.impls():
                if importlib.util.find_spec("torch") is None:
                    print(f"[bench] no PyTorch reference for {name}: torch is not installed")
                    continue
                key = (name, "torch_ref")
                calls[key], compile_s[key] = torch_pickscore(settings, images, prompts), None
                configs[key] = {**config, "jittable": False}
        base["loadavg_1min_before"] = os.getloadavg()[0]
        runs = timed_runs(calls, settings.repeats, settings.warmup) if calls else {}
        loadavg_after = os.getloadavg()[0]

    records = []
    for key, times in runs.items():
        impl = key[1]
        config = {
            **configs[key],
            "loadavg_1min_before": base["loadavg_1min_before"],
            "loadavg_1min_after": loadavg_after,
        }
        mean = float(np.mean(times))
        records.append(
            record("reward", impl, "images_per_s", settings.batch / mean, "img/s", config)
        )
        records.append(record("reward", impl, "batch_s", mean, "s", config))
        if compile_s[key] is not None:
            records.append(record("reward", impl, "compile_s", compile_s[key], "s", config))
    print(summary(records))
    return records


def summary(records: list[dict]) -> str:
    """Return a per-reward table (reward, impl, images/s, batch s, compile s) of the records."""
    by_reward: dict[tuple[str, str], dict[str, float]] = {}
    for r in records:
        by_reward.setdefault((r["config"]["reward"], r["impl"]), {})[r["metric"]] = r["value"]
    rows = [("reward", "impl", "images/s", "batch s", "compile s")]
    for (name, impl), m in by_reward.items():
        comp = f"{m['compile_s']:.3g}" if "compile_s" in m else "-"
        rows.append((name, impl, f"{m['images_per_s']:.4g}", f"{m['batch_s']:.4g}", comp))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "[bench] reward summary\n" + "\n".join(lines)
