"""Pretrain the tiny world: tokenizer, CLIP, autoencoder, UNet — with the project's own modules.

Stages, each a pure function of (recipe, what earlier stages produced):

1. ``train_tokenizer``: a byte-level BPE on the training captions (``bpe.py``).
2. ``train_clip``: a two-tower CLIP, contrastive (InfoNCE with every identical caption in the
   batch counted as a positive).
3. ``train_judge``: the reward CLIP (shipped as ``tiny_clip``): stage 2's CLIP trained further
   on scenes of *every* (colour, kind, background) triple, each image against all captions.
   The SD keeps stage 2's text tower, as SD1.x keeps the CLIP it was trained with.
4. ``train_vae``: an AutoencoderKL (4× down; SD's 8× on request), a foreground-weighted L1
   plus an edge term (``reconstruction_loss``) and a perceptual term on the judge's image tower
   (``perceptual_loss``) + a small KL (SD's 1e-6 per image sum),
   decoding a posterior sample; its ``scaling_factor`` is then set to 1 / std of the latents.
5. ``train_unet``: an ε-prediction UNet on SD's noise schedule, conditioned on the frozen CLIP
   text tower's last hidden state, captions dropped 10 % of the time (for classifier-free
   guidance), EMA weights kept and shipped.

Why a separate judge: stage 2 sees only training triples and in-batch negatives, and at its
budget learns colour and background but not kind or count (zero-shot at chance); on training
triples it can guess the kind from colour and background, a shortcut that held-out triples
punish. A reward model is not bound to the generator's split (a real CLIPScore model has seen
far more than the generator's fine-tuning prompts), and scoring every image against the whole
caption set makes kind and count the only way to lower the loss once colour is known.

Every stage draws its examples from ``shapes.batch`` with its own stream seed, so a recipe and a
seed give the same weights on the same software (XLA may differ across machines in the last
bits). With ``Recipe.data`` set, the stages read a prepared TFDS dataset instead (``examples``;
``tinyworld/tfds_dataset.py``), each stream a fresh order of it per pass.
``python -m dag_jax.tinyworld`` runs all stages and writes the shipped folders.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dag_jax.diffusion.schedule import alphas_cumprod_from_config
from dag_jax.models.clip import CLIPModel, l2_normalize
from dag_jax.models.unet import UNet2DConditionModel, UNetConfig
from dag_jax.models.vae import AutoencoderKL, VAEConfig
from dag_jax.rewards.preprocess import normalize
from dag_jax.tinyworld import bpe, models, shapes
from dag_jax.weights.clip_loader import build_clip

log = logging.getLogger(__name__)

# stream seeds of the stages: example i of stage s is shapes.example(seed * 16 + s, i)
# (stream 5 is measuring's zero-shot images, in ``pretrain_tiny.measure``)
_CLIP_STREAM, _VAE_STREAM, _UNET_STREAM, _EVAL_STREAM, _JUDGE_STREAM = 1, 2, 3, 4, 6


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Steps, batch sizes and learning rates of every stage (defaults: the shipped weights).

    The first shipped world (until 2026-12-07) was ``vae_down=8``, ``vae_foreground_weight=0``,
    ``vae_edge_weight=0``, ``vae_perceptual_weight=0``, ``vae_steps=2000``, ``unet_steps=3000``;
    the second (2026-12-07, one session) these defaults with ``unet_steps=6000``.
    """

    seed: int = 0
    clip_steps: int = 2000
    clip_batch: int = 128
    clip_lr: float = 1e-3
    vae_steps: int = 1000
    vae_batch: int = 16
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    vae_down: int = 4  # 4: 4×16×16 latents (shipped); 8: 4×8×8, SD's (``models.vae_config``)
    # the reconstruction term (``reconstruction_loss``; 0, 0: plain L1, the first world's VAE):
    # shape pixels count 1 + ``vae_foreground_weight`` times; ``vae_edge_weight`` weighs an L1
    # on horizontal and vertical differences; ``vae_perceptual_weight`` weighs
    # ``perceptual_loss`` (the judge's image tower; the judge is trained first). Each measured
    # on the judge's and on geometry's reading of reconstructions: BENCHMARKS.md, "The tiny world"
    vae_foreground_weight: float = 10.0
    vae_edge_weight: float = 1.0
    vae_perceptual_weight: float = 0.3
    # on 16×16 latents: 3000 drew wrong backgrounds 40 % of the time; 6000 drew the right count
    # 63 % of the time, 12000 76 % (judge, held-out captions; BENCHMARKS.md, "The tiny world")
    unet_steps: int = 12000
    unet_batch: int = 64
    unet_lr: float = 5e-4
    unet_uncond_prob: float = 0.1
    unet_ema: float = 0.999
    latent_pool: int = 16384  # encoded training images the UNet stage draws from
    judge_steps: int = 1500
    judge_batch: int = 128
    judge_lr: float = 1e-3
    warmup: int = 200
    log_every: int = 100
    # where examples come from: "" the procedural stream (shapes.batch, the shipped weights);
    # else a prepared TFDS scenes dataset (e.g. "tiny_shapes/scenes") in ``data_dir``
    data: str = ""
    data_dir: str = ""

    def __post_init__(self):
        models.vae_config(self.vae_down)  # a clear error before anything trains

    def override(self, items: list[str] | tuple[str, ...]) -> Recipe:
        """Return the recipe with ``key=value`` items applied (``--recipe`` of the CLI).

        Values take the type of the field's default; an unknown key or a bad value raises
        ValueError naming it (with the closest field for a misspelt key).
        """
        from dag_jax.configs.base import did_you_mean

        fields = {f.name: f for f in dataclasses.fields(self)}
        changes: dict[str, Any] = {}
        for item in items:
            key, sep, value = item.partition("=")
            key = key.strip()
            if not sep or key not in fields:
                hint = did_you_mean(key, fields) if sep else " (expected key=value)"
                raise ValueError(f"--recipe: unknown item {item!r}{hint}")
            kind = type(fields[key].default)
            try:
                changes[key] = kind(value.strip())
            except ValueError:
                raise ValueError(
                    f"--recipe: {key}={value.strip()!r}: expected type {kind.__name__}"
                ) from None
        return dataclasses.replace(self, **changes)

    def scaled(self, factor: float) -> Recipe:
        """Return the recipe with every stage's steps (and the latent pool) times ``factor``.

        Steps stay ≥ 1; a small factor gives a quick smoke run of the whole pipeline.
        """
        if factor == 1.0:
            return self

        def n(v: int) -> int:
            return max(1, round(v * factor))

        return dataclasses.replace(
            self,
            clip_steps=n(self.clip_steps),
            vae_steps=n(self.vae_steps),
            unet_steps=n(self.unet_steps),
            judge_steps=n(self.judge_steps),
            latent_pool=max(self.unet_batch, n(self.latent_pool)),
            log_every=n(self.log_every),
        )

    def stream(self, stage: int) -> int:
        """Return the shapes-dataset seed of a stage."""
        return self.seed * 16 + stage


@dataclasses.dataclass
class Tokenizer:
    """The trained tokenizer: its BPE merges and the loaded CLIPTokenizer."""

    merges: list[str]
    tokenizer: Any

    def ids(self, texts: list[str] | tuple[str, ...]) -> np.ndarray:
        """Return (N, TOKEN_LENGTH) int32 ids, padded like the SD pipeline pads."""
        out = self.tokenizer(
            list(texts),
            padding="max_length",
            max_length=models.TOKEN_LENGTH,
            truncation=True,
            return_tensors="np",
        )
        return np.asarray(out["input_ids"], np.int32)


def examples(recipe: Recipe) -> Callable[..., tuple[np.ndarray, list[str], dict]]:
    """Return the ``batch(seed, start, n, split)`` the stages draw from (see ``shapes.batch``).

    ``recipe.data`` "" → the procedural stream; else ``tfds_dataset.Scenes`` of that prepared
    TFDS dataset (opened, and checked, once per recipe).
    """
    if not recipe.data:
        return shapes.batch
    return _scenes(recipe.data, recipe.data_dir).batch


@functools.cache
def _scenes(dataset: str, data_dir: str):
    from dag_jax.tinyworld import tfds_dataset

    return tfds_dataset.Scenes(dataset, data_dir)


def _schedule(lr: float, steps: int, warmup: int) -> optax.Schedule:
    warmup = min(warmup, max(steps // 4, 1))
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), lr / 10)


def _adamw(lr: float, steps: int, warmup: int, weight_decay: float = 0.01):
    return optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(_schedule(lr, steps, warmup), 0.9, 0.99, 1e-8, weight_decay),
    )


def _log_progress(stage: str, step: int, total: int, loss: float, t0: float, every: int) -> None:
    if step % every and step != total:
        return
    elapsed = time.time() - t0
    eta = elapsed / step * (total - step)
    log.info(
        "%s %d/%d loss %.4f | %.2fs/step | ETA %.0fs", stage, step, total, loss, elapsed / step, eta
    )


def pixels_of(images_uint8: np.ndarray | jax.Array) -> jax.Array:
    """Return CLIP pixel_values (B, 3, 64, 64) of uint8 NHWC images (no resize at 64 px)."""
    x = normalize(jnp.asarray(images_uint8, jnp.float32) / 255.0)
    return jnp.transpose(x, (0, 3, 1, 2))


def vae_input(images_uint8: np.ndarray | jax.Array) -> jax.Array:
    """Return NCHW images in [-1, 1] of uint8 NHWC images."""
    x = jnp.asarray(images_uint8, jnp.float32) / 127.5 - 1.0
    return jnp.transpose(x, (0, 3, 1, 2))


# --------------------------------------------------------------------------- 1. tokenizer


def train_tokenizer(folder) -> Tokenizer:
    """Train the BPE on the training captions, write it to ``folder`` and load it back."""
    from dag_jax.pipeline import load_tokenizer

    merges = bpe.train_bpe(shapes.captions("train"))
    bpe.write_clip_tokenizer(folder, merges, models.TOKEN_LENGTH)
    return Tokenizer(merges, load_tokenizer(folder))


# --------------------------------------------------------------------------- 2. CLIP


def contrastive_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Return the symmetric InfoNCE loss; rows with equal ``labels`` are all positives."""
    same = (labels[:, None] == labels[None, :]).astype(jnp.float32)
    target = same / same.sum(axis=1, keepdims=True)
    i2t = optax.softmax_cross_entropy(logits, target)
    t2i = optax.softmax_cross_entropy(logits.T, target)
    return 0.5 * (i2t.mean() + t2i.mean())


def clip_logits(module: CLIPModel, params, pixels: jax.Array, ids: jax.Array) -> jax.Array:
    """Return (images, texts) logits: scaled cosine similarities (scale capped at 100)."""
    img = module.apply({"params": params}, pixels, method=CLIPModel.get_image_features)
    txt = module.apply({"params": params}, ids, method=CLIPModel.get_text_features)
    scale = jnp.exp(jnp.minimum(params["logit_scale"], jnp.log(100.0)))
    return scale * l2_normalize(img) @ l2_normalize(txt).T


def train_clip(recipe: Recipe, tok: Tokenizer) -> tuple[dict, dict]:
    """Return (transformers CLIPConfig dict, params) of the contrastively trained tiny CLIP."""
    t = tok.tokenizer
    config = models.clip_config(len(t), t.bos_token_id, t.eos_token_id, t.pad_token_id)
    module, _ = build_clip(config)
    caption_ids = jnp.asarray(tok.ids(shapes.all_captions()))
    key = jax.random.key(recipe.seed)
    px0 = jnp.zeros((1, 3, models.IMAGE_SIZE, models.IMAGE_SIZE))
    params = module.init(key, caption_ids[:1], px0)["params"]
    tx = _adamw(recipe.clip_lr, recipe.clip_steps, recipe.warmup, weight_decay=0.1)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, images, labels):
        def loss_fn(p):
            return contrastive_loss(
                clip_logits(module, p, pixels_of(images), caption_ids[labels]), labels
            )

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    batch = examples(recipe)
    t0 = time.time()
    for i in range(recipe.clip_steps):
        images, _, labels = batch(
            recipe.stream(_CLIP_STREAM), i * recipe.clip_batch, recipe.clip_batch
        )
        params, opt, loss = step(params, opt, images, labels["caption"])
        _log_progress("clip", i + 1, recipe.clip_steps, float(loss), t0, recipe.log_every)
    return config, jax.device_get(params)


def judge_batch(
    seed: int, step: int, n: int, batch: Callable = shapes.batch
) -> tuple[np.ndarray, np.ndarray]:
    """Return (images, caption labels) of step ``step``: both splits, in proportion to triples.

    The test split's share is its share of all triples (at least one image), so every
    caption of ``all_captions()`` is drawn about equally often. ``batch``: see ``examples``.
    """
    n_train, n_test = (len(shapes.triples(split)) for split in shapes.SPLITS)
    share = n_test / (n_train + n_test)
    n_test = max(1, round(n * share))
    parts = [
        batch(seed, step * size, size, split)
        for split, size in (("train", n - n_test), ("test", n_test))
    ]
    images = np.concatenate([p[0] for p in parts])
    return images, np.concatenate([p[2]["caption"] for p in parts])


def judge_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Return the judge's loss of (images, all captions) ``logits`` and true caption ``labels``.

    Each image is classified among every caption of the world (cross-entropy), plus the
    symmetric in-batch InfoNCE of stage 2 on the batch's own captions.
    """
    every = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return every + contrastive_loss(logits[:, labels], labels)


def train_judge(recipe: Recipe, tok: Tokenizer, config: dict, params: dict) -> tuple[dict, dict]:
    """Return (config, params) of the reward CLIP: stage 2's ``params`` trained on every triple.

    No weight decay (stage 2 uses 0.1): in short probes a ViT of these shapes began to count
    only without it.
    """
    module, _ = build_clip(config)
    caption_ids = jnp.asarray(tok.ids(shapes.all_captions()))
    tx = _adamw(recipe.judge_lr, recipe.judge_steps, recipe.warmup, weight_decay=0.0)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, images, labels):
        def loss_fn(p):
            return judge_loss(clip_logits(module, p, pixels_of(images), caption_ids), labels)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    batch = examples(recipe)
    t0 = time.time()
    for i in range(recipe.judge_steps):
        images, labels = judge_batch(recipe.stream(_JUDGE_STREAM), i, recipe.judge_batch, batch)
        params, opt, loss = step(params, opt, images, labels)
        _log_progress("judge", i + 1, recipe.judge_steps, float(loss), t0, recipe.log_every)
    return config, jax.device_get(params)


def zero_shot(module: CLIPModel, params, tok: Tokenizer, images: np.ndarray, labels: dict) -> dict:
    """Return zero-shot accuracies of CLIP on images: the caption among all, and per attribute."""
    captions = shapes.all_captions()
    logits = np.asarray(
        jax.jit(lambda p, x, i: clip_logits(module, p, pixels_of(x), i))(
            params, images, jnp.asarray(tok.ids(captions))
        )
    )
    best = logits.argmax(axis=1)
    out = {"caption": float(np.mean(best == labels["caption"]))}
    parsed = [shapes.parse(captions[b]) for b in best]
    names = {"kind": shapes.KINDS, "colour": shapes.SHAPE_COLOURS, "background": shapes.BACKGROUNDS}
    for attr, values in names.items():
        pred = np.array([values.index(p[attr]) for p in parsed])
        out[attr] = float(np.mean(pred == labels[attr]))
    out["count"] = float(np.mean(np.array([p["count"] for p in parsed]) == labels["count"]))
    return out


# --------------------------------------------------------------------------- 3. VAE


def train_vae(recipe: Recipe, judge: tuple[dict, dict] | None = None) -> tuple[dict, dict]:
    """Return (diffusers AutoencoderKL config dict with scaling_factor set, params).

    ``judge``: (config, params) of the judge CLIP, whose image tower ``perceptual_loss`` reads;
    needed when ``recipe.vae_perceptual_weight`` > 0.
    """
    perceptual = None
    if recipe.vae_perceptual_weight:
        if judge is None:
            raise ValueError("Recipe.vae_perceptual_weight > 0 needs the judge (train it first)")
        perceptual = perceptual_features(*judge)
    config = models.vae_config(recipe.vae_down)
    module = AutoencoderKL(VAEConfig.from_dict(config))
    key = jax.random.key(recipe.seed + 1)
    x0 = jnp.zeros((1, 3, models.IMAGE_SIZE, models.IMAGE_SIZE))
    params = module.init(key, x0)["params"]
    tx = _adamw(recipe.vae_lr, recipe.vae_steps, recipe.warmup, weight_decay=0.0)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, images, key):
        x = vae_input(images)

        def loss_fn(p):
            post = module.apply({"params": p}, x, method=module.encode).latent_dist
            recon = module.apply({"params": p}, post.sample(key), method=module.decode).sample
            rec = jnp.mean(jnp.abs(recon - x))
            loss = reconstruction_loss(
                recon, x, recipe.vae_foreground_weight, recipe.vae_edge_weight
            )
            if perceptual is not None:
                loss = loss + recipe.vae_perceptual_weight * perceptual_loss(perceptual, recon, x)
            return loss + recipe.vae_kl_weight * jnp.mean(post.kl()) / x[0].size, rec

        (_, rec), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, rec

    batch = examples(recipe)
    t0 = time.time()
    for i in range(recipe.vae_steps):
        images, _, _ = batch(recipe.stream(_VAE_STREAM), i * recipe.vae_batch, recipe.vae_batch)
        params, opt, rec = step(params, opt, images, jax.random.fold_in(key, i))
        _log_progress("vae", i + 1, recipe.vae_steps, float(rec), t0, recipe.log_every)
    params = jax.device_get(params)
    images, _, _ = batch(recipe.stream(_EVAL_STREAM), 0, 512)
    means = encode_means(module, params, images)
    config["scaling_factor"] = round(float(1.0 / np.std(means)), 5)
    return config, params


def reconstruction_loss(
    recon: jax.Array, x: jax.Array, foreground_weight: float = 0.0, edge_weight: float = 0.0
) -> jax.Array:
    """Return the VAE's reconstruction term of NCHW images in [-1, 1].

    Plain L1 when both weights are 0. ``foreground_weight`` w: an L1 weighted 1 + w on shape
    pixels (any channel more than 0.08 from the image's corner pixel, always background in
    ``shapes``), normalised by the mean weight, so small shapes are not averaged away by
    the background. ``edge_weight``: plus that times the L1 of the vertical and horizontal
    pixel differences, which a blurred edge or a rounded corner pays for.
    """
    error = jnp.abs(recon - x)
    if foreground_weight:
        corner = x[:, :, :1, :1]
        shape = jnp.max(jnp.abs(x - corner), axis=1, keepdims=True) > 0.08
        weight = 1.0 + foreground_weight * shape.astype(x.dtype)
        loss = jnp.mean(weight * error) / jnp.mean(weight)
    else:
        loss = jnp.mean(error)
    if edge_weight:
        dy = lambda a: a[:, :, 1:, :] - a[:, :, :-1, :]
        dx = lambda a: a[:, :, :, 1:] - a[:, :, :, :-1]
        edges = jnp.mean(jnp.abs(dy(recon) - dy(x))) + jnp.mean(jnp.abs(dx(recon) - dx(x)))
        loss = loss + edge_weight * edges
    return loss


def perceptual_features(config: dict, params: dict) -> Callable[[jax.Array], tuple]:
    """Return ``features(x)``: the judge's image-tower states of NCHW images in [-1, 1].

    The states are the tower's input (after ``pre_layrnorm``) and each layer's output,
    (B, tokens, width) each; ``perceptual_loss`` compares them.
    """
    from dag_jax.models.clip import CLIPVisionConfig, CLIPVisionModel

    tower = CLIPVisionModel(CLIPVisionConfig.from_dict(config))
    weights = {"vision_model": params["vision_model"]}

    def features(x: jax.Array) -> tuple:
        pixels = pixels_of(jnp.transpose((x + 1.0) * 127.5, (0, 2, 3, 1)))
        return tower.apply({"params": weights}, pixels, output_hidden_states=True).hidden_states

    return features


def perceptual_loss(features: Callable[[jax.Array], tuple], recon: jax.Array, x: jax.Array):
    """Return LPIPS's recipe with the world's own image model: per state of ``features``, the
    squared distance of unit-normalised token features of ``recon`` and ``x``, summed over
    channels, averaged over tokens and images, summed over states (no learned weights)."""
    total = jnp.zeros((), jnp.float32)
    for a, b in zip(features(recon), features(x), strict=True):
        a = a / (jnp.linalg.norm(a, axis=-1, keepdims=True) + 1e-6)
        b = b / (jnp.linalg.norm(b, axis=-1, keepdims=True) + 1e-6)
        total = total + jnp.mean(jnp.sum((a - b) ** 2, axis=-1))
    return total


def encode_means(module: AutoencoderKL, params, images: np.ndarray, chunk: int = 256) -> np.ndarray:
    """Return the posterior means (N, 4, h, w) of uint8 NHWC images."""
    fn = jax.jit(
        lambda p, x: (
            module.apply({"params": p}, vae_input(x), method=module.encode).latent_dist.mean
        )
    )
    return np.concatenate(
        [np.asarray(fn(params, images[i : i + chunk])) for i in range(0, len(images), chunk)]
    )


# --------------------------------------------------------------------------- 4. UNet


def train_unet(
    recipe: Recipe,
    tok: Tokenizer,
    text_encoder: Callable[[jax.Array], jax.Array],
    vae: tuple[AutoencoderKL, dict, dict],
) -> tuple[dict, dict]:
    """Return (diffusers UNet config dict, EMA params) of the text-conditioned latent UNet.

    ``text_encoder`` maps (N, L) ids to (N, L, D) last hidden states (the frozen CLIP text
    tower); ``vae`` is (module, params, config) of the trained autoencoder.
    """
    config = models.unet_config(models.IMAGE_SIZE // recipe.vae_down)
    module = UNet2DConditionModel(UNetConfig.from_dict(config))
    vae_module, vae_params, vae_config = vae
    scale = vae_config["scaling_factor"]
    # frozen parts, computed once: the text states of every caption (and of ""), the latent pool
    captions = shapes.all_captions()
    context = jnp.asarray(text_encoder(jnp.asarray(tok.ids(captions + ("",)))))
    empty = len(captions)
    images, _, labels = examples(recipe)(recipe.stream(_UNET_STREAM), 0, recipe.latent_pool)
    post = jax.jit(
        lambda p, x: (
            vae_module.apply({"params": p}, vae_input(x), method=vae_module.encode).latent_dist
        )
    )
    stats = [post(vae_params, images[i : i + 256]) for i in range(0, len(images), 256)]
    pool_mean = jnp.concatenate([s.mean for s in stats])
    pool_std = jnp.concatenate([s.std for s in stats])
    pool_caption = jnp.asarray(labels["caption"])
    del images, stats
    alphas = jnp.asarray(alphas_cumprod_from_config(models.SCHEDULER_CONFIG), jnp.float32)

    key = jax.random.key(recipe.seed + 2)
    s = config["sample_size"]
    params = module.init(key, jnp.zeros((1, 4, s, s)), jnp.zeros((1,), jnp.int32), context[:1])[
        "params"
    ]
    ema = params
    tx = _adamw(recipe.unet_lr, recipe.unet_steps, recipe.warmup, weight_decay=0.0)
    opt = tx.init(params)

    @jax.jit
    def step(params, ema, opt, key):
        k_idx, k_z, k_t, k_eps, k_drop = jax.random.split(key, 5)
        idx = jax.random.randint(k_idx, (recipe.unet_batch,), 0, pool_mean.shape[0])
        z0 = (pool_mean[idx] + pool_std[idx] * jax.random.normal(k_z, pool_mean[idx].shape)) * scale
        t = jax.random.randint(k_t, (recipe.unet_batch,), 0, alphas.shape[0])
        eps = jax.random.normal(k_eps, z0.shape)
        a = alphas[t][:, None, None, None]
        zt = jnp.sqrt(a) * z0 + jnp.sqrt(1.0 - a) * eps
        drop = jax.random.uniform(k_drop, (recipe.unet_batch,)) < recipe.unet_uncond_prob
        ctx = context[jnp.where(drop, empty, pool_caption[idx])]

        def loss_fn(p):
            pred = module.apply({"params": p}, zt, t, ctx).sample
            return jnp.mean((pred - eps) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt = tx.update(grads, opt, params)
        params = optax.apply_updates(params, updates)
        ema = jax.tree_util.tree_map(
            lambda e, p: recipe.unet_ema * e + (1 - recipe.unet_ema) * p, ema, params
        )
        return params, ema, opt, loss

    t0 = time.time()
    for i in range(recipe.unet_steps):
        params, ema, opt, loss = step(params, ema, opt, jax.random.fold_in(key, i))
        _log_progress("unet", i + 1, recipe.unet_steps, float(loss), t0, recipe.log_every)
    # early in a short run the EMA is still mostly the initialisation: debias it
    debias = 1.0 - recipe.unet_ema**recipe.unet_steps
    init = module.init(key, jnp.zeros((1, 4, s, s)), jnp.zeros((1,), jnp.int32), context[:1])[
        "params"
    ]
    ema = jax.tree_util.tree_map(lambda e, p0: (e - (1 - debias) * p0) / debias, ema, init)
    return config, jax.device_get(ema)
