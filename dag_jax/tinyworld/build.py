"""Pretrain and write the built-in tiny text-to-image world (``tinyworld/assets``).

    python -m dag_jax.tinyworld --workdir=runs/pretrain_tiny --out=dag_jax/tinyworld/assets

Runs the stages of ``dag_jax.tinyworld.pretrain`` (tokenizer, CLIP, judge, VAE, UNet; about
an hour on 2 CPU cores), then writes ``<out>/tiny_clip`` (the judge: a transformers CLIPModel
folder with its tokenizer) and ``<out>/tiny_sd`` (a diffusers StableDiffusionPipeline folder
whose text encoder is stage 2's CLIP text tower), and measures them (``report.json`` in the
workdir): the judge's zero-shot accuracy on fresh images of both splits, on the VAE's
reconstructions of them, and the SD's prompt alignment judged by it; kind and count are also
read by geometry (``shapes.read``). Finished stages are kept in the workdir and
reused when the command is run again (``--restart`` retrains everything).

``--data=tiny_shapes/scenes --data_dir=DIR`` trains every stage on that prepared TFDS dataset
(``python -m dag_jax.tinyworld.tfds_dataset --data_dir=DIR`` writes it) instead of the
procedural stream; measuring still uses fresh procedural scenes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dag_jax.infra import cpu_tuning
from dag_jax.infra.captions import captioned_grid
from dag_jax.models.unet import UNet2DConditionModel, UNetConfig
from dag_jax.models.vae import AutoencoderKL, VAEConfig
from dag_jax.tinyworld import bpe, models, pretrain, shapes
from dag_jax.weights import diffusers as folder
from dag_jax.weights.clip_loader import load_clip, save_clip

log = logging.getLogger(__name__)
SAMPLE_STEPS = 20
SAMPLE_GUIDANCE = 5.0


def _tokenizer_stage(work: Path, restart: bool) -> pretrain.Tokenizer:
    from dag_jax.pipeline import load_tokenizer

    path = work / "tokenizer"
    if not restart and (path / "merges.txt").is_file():
        merges = (path / "merges.txt").read_text().splitlines()[1:]
        return pretrain.Tokenizer([m for m in merges if m], load_tokenizer(path))
    return pretrain.train_tokenizer(path)


def _write_clip_folder(path: Path, config: dict, params: dict, tok: pretrain.Tokenizer) -> None:
    with folder.AtomicDir(path, overwrite=True) as tmp:
        save_clip(tmp, params, config)
        bpe.write_clip_tokenizer(tmp, tok.merges, models.TOKEN_LENGTH)
        (tmp / "preprocessor_config.json").write_text(
            json.dumps(models.PREPROCESSOR_CONFIG, indent=2, sort_keys=True)
        )


def _clip_stage(work: Path, name: str, train, tok, restart: bool) -> tuple[dict, dict]:
    """Train (or reload) a CLIP kept as ``work/name``; ``train()`` returns (config, params)."""
    path = work / name
    if restart or not (path / "model.safetensors").is_file():
        config, params = train()
        _write_clip_folder(path, config, params, tok)
    _, params, config = load_clip(path)
    return config, params


def _part_stage(work: Path, name: str, train, module_of, restart: bool) -> tuple[dict, dict]:
    """Train (or reload) a diffusers part (vae/unet) kept as ``work/name``."""
    path = work / name
    weights = "diffusion_pytorch_model.safetensors"
    if restart or not (path / weights).is_file():
        config, params = train()
        with folder.AtomicDir(path, overwrite=True) as tmp:
            folder.save_params(tmp, params, config, weights)
    config = folder.read_json(path / "config.json")
    module = module_of(config)
    shapes_tree = _param_shapes(module)
    return config, folder.load_params(path, shapes_tree, name)


def _param_shapes(module) -> dict:
    if isinstance(module, AutoencoderKL):
        from dag_jax.pipeline import vae_shapes

        return vae_shapes(module)
    from dag_jax.pipeline import unet_shapes

    return unet_shapes(module)


def build_world(work: Path, recipe: pretrain.Recipe, restart: bool = False) -> dict:
    """Run (or reuse) every stage in ``work``; return the parts for writing and measuring."""
    pretrain.examples(recipe)  # a TFDS dataset is opened and checked before anything compiles
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    tok = _tokenizer_stage(work, restart)
    clip_config, clip_params = _clip_stage(
        work, "clip", lambda: pretrain.train_clip(recipe, tok), tok, restart
    )
    # the judge before the VAE: the VAE's perceptual term reads its image tower
    judge = _clip_stage(
        work,
        "judge",
        lambda: pretrain.train_judge(recipe, tok, clip_config, clip_params),
        tok,
        restart,
    )
    vae_config, vae_params = _part_stage(
        work,
        "vae",
        lambda: pretrain.train_vae(recipe, judge),
        lambda c: AutoencoderKL(VAEConfig.from_dict(c)),
        restart,
    )
    vae_module = AutoencoderKL(VAEConfig.from_dict(vae_config))
    text_params = {"text_model": clip_params["text_model"]}
    from dag_jax.models.clip import CLIPTextConfig, CLIPTextModel

    text_config = models.sd_text_encoder_config(clip_config)
    text_module = CLIPTextModel(CLIPTextConfig.from_dict(text_config))

    def encode(ids):
        return text_module.apply({"params": text_params}, ids).last_hidden_state

    unet_config, unet_params = _part_stage(
        work,
        "unet",
        lambda: pretrain.train_unet(recipe, tok, encode, (vae_module, vae_params, vae_config)),
        lambda c: UNet2DConditionModel(UNetConfig.from_dict(c)),
        restart,
    )
    log.info("all stages ready after %.0fs", time.time() - t0)
    return {
        "tokenizer": tok,
        "clip": judge,
        "text_encoder": (text_config, text_params),
        "vae": (vae_config, vae_params),
        "unet": (unet_config, unet_params),
    }


def write_world(world: dict, out: Path, overwrite: bool = True) -> tuple[Path, Path]:
    """Write ``out/tiny_clip`` and ``out/tiny_sd`` (each atomically); return both paths."""
    from dag_jax.pipeline import Pipeline, build_modules, save_pipeline

    tok = world["tokenizer"]
    _write_clip_folder(out / "tiny_clip", *world["clip"], tok)
    configs = {part: world[part][0] for part in ("unet", "vae", "text_encoder")}
    unet, vae, text_encoder = build_modules(configs)
    pipe = Pipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        params={part: world[part][1] for part in ("unet", "vae", "text_encoder")},
        tokenizer=tok.tokenizer,
        scheduler_config=dict(models.SCHEDULER_CONFIG),
        configs=configs,
        model_index=dict(models.MODEL_INDEX),
    )
    sd = save_pipeline(pipe, out / "tiny_sd", overwrite=overwrite)
    # ship the slow-tokenizer files (vocab.json + merges.txt), readable by any transformers
    tokenizer_dir = sd / "tokenizer"
    shutil.rmtree(tokenizer_dir)
    bpe.write_clip_tokenizer(tokenizer_dir, tok.merges, models.TOKEN_LENGTH)
    return out / "tiny_clip", sd


# --------------------------------------------------------------------------- measuring


def measure(sd_path: Path, clip_path: Path, seed: int, per_caption: int = 4) -> dict:
    """Return the zero-shot accuracies of the CLIP and the prompt alignment of the SD."""
    from dag_jax.pipeline import load_pipeline, load_tokenizer
    from dag_jax.sample import generate

    module, params, _ = load_clip(clip_path)
    tok = pretrain.Tokenizer([], load_tokenizer(clip_path))
    pipe = load_pipeline(sd_path)
    report: dict = {"zero_shot": {}, "vae_reconstruction": {}, "sd_alignment": {}}
    for split in shapes.SPLITS:
        images, captions, labels = shapes.batch(seed * 16 + 5, 0, 1000, split)
        report["zero_shot"][split] = pretrain.zero_shot(module, params, tok, images, labels)
        # tiny_clipscore's ceiling: what the judge gives real scenes of their own captions
        report["zero_shot"][split]["clipscore"] = clipscore(module, params, tok, images, captions)
        # the autoencoder's ceiling: what the judge still reads after encoding and decoding
        recon = reconstruct(pipe, images)
        acc = pretrain.zero_shot(module, params, tok, recon, labels)
        acc.update(geometry(recon, labels))
        acc["l1"] = float(np.mean(np.abs(recon.astype(np.float32) - images)) / 127.5)
        report["vae_reconstruction"][split] = acc
    index = {c: i for i, c in enumerate(shapes.all_captions())}
    for split in shapes.SPLITS:
        captions = list(shapes.captions(split))
        if split == "train":  # a fixed subset, as many as the test split has
            rng = np.random.default_rng(seed)
            captions = [captions[i] for i in rng.choice(len(captions), 45, replace=False)]
        prompts = [c for c in captions for _ in range(per_caption)]
        images = generate(
            pipe, prompts, steps=SAMPLE_STEPS, guidance=SAMPLE_GUIDANCE, eta=0.0, seed=seed
        )
        images_u8 = np.rint(images * 255).astype(np.uint8)
        parsed = [shapes.parse(p) for p in prompts]
        labels = {
            "caption": np.array([index[p] for p in prompts]),
            "kind": np.array([shapes.KINDS.index(p["kind"]) for p in parsed]),
            "colour": np.array([shapes.SHAPE_COLOURS.index(p["colour"]) for p in parsed]),
            "background": np.array([shapes.BACKGROUNDS.index(p["background"]) for p in parsed]),
            "count": np.array([p["count"] for p in parsed]),
        }
        acc = pretrain.zero_shot(module, params, tok, images_u8, labels)
        acc.update(geometry(images_u8, labels))
        acc["clipscore"] = clipscore(module, params, tok, images_u8, prompts)
        report["sd_alignment"][split] = acc
        report.setdefault("samples", {})[split] = (images_u8, prompts)
    return report


def geometry(images_u8: np.ndarray, labels: dict) -> dict:
    """Return the kind and count accuracy of images read by geometry (``shapes.read``), a
    reading the judge's features cannot sway (the VAE trains on them)."""
    kinds, counts = shapes.read(images_u8)
    return {
        "geometry_kind": float(np.mean(kinds == labels["kind"])),
        "geometry_count": float(np.mean(counts == labels["count"])),
    }


def reconstruct(pipe, images_u8: np.ndarray, chunk: int = 250) -> np.ndarray:
    """Return uint8 NHWC images decoded from the VAE posterior means of ``images_u8``."""
    vae = pipe.vae

    @jax.jit
    def fn(p, x):
        z = vae.apply({"params": p}, pretrain.vae_input(x), method=vae.encode).latent_dist.mean
        y = vae.apply({"params": p}, z, method=vae.decode).sample
        return jnp.transpose(jnp.clip(y / 2 + 0.5, 0.0, 1.0), (0, 2, 3, 1))

    out = [
        np.asarray(fn(pipe.params["vae"], images_u8[i : i + chunk]))
        for i in range(0, len(images_u8), chunk)
    ]
    return np.rint(np.concatenate(out) * 255).astype(np.uint8)


def clipscore(module, params, tok: pretrain.Tokenizer, images_u8, prompts) -> float:
    """Return the mean cosine of the tiny CLIP's image and prompt embeddings."""
    from dag_jax.models.clip import CLIPModel, l2_normalize

    img = module.apply(
        {"params": params}, pretrain.pixels_of(images_u8), method=CLIPModel.get_image_features
    )
    txt = module.apply(
        {"params": params}, jnp.asarray(tok.ids(prompts)), method=CLIPModel.get_text_features
    )
    return float(jnp.mean(jnp.sum(l2_normalize(img) * l2_normalize(txt), axis=-1)))


def sample_grid(
    images_u8: np.ndarray, rows: int, cols: int, captions: list[str] | None = None, scale: int = 2
) -> np.ndarray:
    """Return a grid of the first rows·cols images, row-major, each pixel repeated ``scale``×,
    each image over its caption (``captions``: one per image; ``dag_jax.infra.captions``)."""
    n = rows * cols
    images = np.asarray(images_u8[:n]).repeat(scale, axis=1).repeat(scale, axis=2)
    cells = None if captions is None else [str(c) for c in captions[:n]]
    return captioned_grid(images, rows=rows, cell_captions=cells, max_lines=3)


# --------------------------------------------------------------------------- CLI


def define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("workdir", "runs/pretrain_tiny", "where stages are kept between runs")
    flags.DEFINE_string(
        "out", "dag_jax/tinyworld/assets", "where tiny_sd/ and tiny_clip/ are written"
    )
    flags.DEFINE_integer("seed", 0, "seed of every stage")
    flags.DEFINE_float("scale", 1.0, "multiply every stage's steps (tests use tiny values)")
    flags.DEFINE_list(
        "recipe",
        [],
        "overrides of pretrain.Recipe, key=value,… (e.g. vae_down=4,vae_perceptual_weight=0.3); "
        "finished stages in --workdir are reused, so use a fresh workdir or --restart",
    )
    flags.DEFINE_bool("restart", False, "retrain every stage even if the workdir has it")
    flags.DEFINE_bool("measure", True, "measure the written world (report.json, grid)")
    flags.DEFINE_string(
        "data",
        "",
        "a prepared TFDS scenes dataset to train on (e.g. tiny_shapes/scenes); "
        "empty: the procedural stream",
    )
    flags.DEFINE_string("data_dir", "", "the TFDS data_dir of --data (default: TFDS's own)")
    cpu_tuning.define_flag()


def main(argv) -> None:
    from absl import flags
    from PIL import Image

    del argv
    f = flags.FLAGS
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        recipe = pretrain.Recipe(seed=f.seed, data=f.data, data_dir=f.data_dir)
        recipe = recipe.override(f.recipe).scaled(f.scale)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    cpu_tuning.apply_if_requested(f.cpu_tuning)
    log.info("recipe %s on %s", dataclasses.asdict(recipe), jax.devices()[0].platform)
    work, out = Path(f.workdir), Path(f.out)
    t0 = time.time()
    world = build_world(work, recipe, f.restart)
    clip_path, sd_path = write_world(world, out)
    seconds = time.time() - t0
    log.info("wrote %s and %s", clip_path, sd_path)
    if not f.measure:
        return
    report = measure(sd_path, clip_path, f.seed)
    samples = report.pop("samples")
    images, prompts = samples["test"]
    grid = sample_grid(images[::4], 5, 9, list(prompts[::4]))
    Image.fromarray(grid).save(work / "samples_test.png")
    report["pretrain_seconds"] = seconds
    report["recipe"] = dataclasses.asdict(recipe)
    files = [p for d in (clip_path, sd_path) for p in d.rglob("*") if p.is_file()]
    report["megabytes"] = sum(p.stat().st_size for p in files) / 2**20
    (work / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


def cli() -> None:
    """Console entry point: parse the flags and run ``main``."""
    from absl import app

    define_flags()
    app.run(main)
