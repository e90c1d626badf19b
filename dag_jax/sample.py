"""Sample images from a Stable Diffusion model with the trajectory sampler.

    python -m dag_jax.sample --model=PATH_OR_HUB_ID --prompt="a photo of a cat" \
        --num_images=4 --steps=50 --guidance=7.5 --eta=0.0 --seed=0 --out=DIR

``--model=tiny`` (the default) is the built-in tiny world (64-px coloured shapes, prompts like
"two red circles on a blue background"); ``--model=random-tiny`` a randomly initialised SD in
diffusers' tiny test shapes (noise-like images, for plumbing checks).
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from dag_jax.diffusion.sampler import rollout, sample_keys
from dag_jax.diffusion.schedule import make_schedule
from dag_jax.infra import console, cpu_tuning
from dag_jax.pipeline import Pipeline, load_pipeline
from dag_jax.tinyworld.random_tiny import random_tiny_pipeline


def generate(
    pipe: Pipeline,
    prompts: list[str],
    *,
    steps: int = 50,
    guidance: float = 7.5,
    eta: float = 0.0,
    seed: int = 0,
    latents: np.ndarray | None = None,
    negative_prompt: str = "",
    params: dict | None = None,
    index_offset: int = 0,
) -> np.ndarray:
    """Return (B, H, W, 3) float32 images in [0, 1], one per prompt.

    Initial latents come from ``latents`` (B, C, h, w) when given, else from the seed; sample i
    (global index ``index_offset + i``) uses its own key, so an image does not depend on the
    batch it was drawn in.
    """
    params = pipe.params if params is None else params
    ids = jnp.asarray(pipe.encode_prompt_ids(list(prompts)))
    neg = jnp.asarray(pipe.encode_prompt_ids([negative_prompt]))
    schedule = make_schedule(pipe.scheduler_config, steps)
    key = jax.random.PRNGKey(seed)
    keys = sample_keys(key, index_offset + jnp.arange(len(prompts)))
    if latents is None:
        shape = pipe.latent_shape
        x_T = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 1 << 30), shape))(keys)
    else:
        x_T = jnp.asarray(latents, jnp.float32)
        if x_T.shape[0] != len(prompts) or x_T.shape[1] != pipe.unet.config.in_channels:
            raise ValueError(
                f"latents of shape {x_T.shape} do not fit {len(prompts)} prompts and "
                f"{pipe.unet.config.in_channels} latent channels"
            )
    run = _compiled_generate(pipe, steps, float(guidance), float(eta))
    return np.asarray(run(params, ids, neg, x_T, keys, schedule))


_CACHE: dict = {}


def _compiled_generate(pipe: Pipeline, steps: int, guidance: float, eta: float):
    """Return a jitted (params, ids, neg_ids, x_T, keys, schedule) -> images function."""
    cache_key = (id(pipe), steps, guidance, eta)
    if cache_key not in _CACHE or _CACHE[cache_key][0] is not pipe:

        def run(params, ids, neg_ids, x_T, keys, schedule):
            context = pipe.encode_text(params["text_encoder"], ids)
            uncond = pipe.encode_text(params["text_encoder"], neg_ids)
            traj = rollout(
                pipe.eps_fn,
                params["unet"],
                x_T,
                context,
                uncond,
                schedule,
                keys,
                guidance=guidance,
                eta=eta,
            )
            return pipe.decode_images(params["vae"], traj.final)

        _CACHE[cache_key] = (pipe, jax.jit(run))
    return _CACHE[cache_key][1]


def save_images(images: np.ndarray, out_dir: Path, prefix: str = "") -> list[Path]:
    """Write float [0, 1] NHWC images as PNGs (quantised like diffusers); return the paths."""
    from PIL import Image

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images):
        path = out_dir / f"{prefix}{i:04d}.png"
        Image.fromarray((np.asarray(img) * 255).round().astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def write_grid(
    path: Path,
    images: list[np.ndarray],
    per_row: int,
    scale: int = 1,
    prompts: list[str] | None = None,
) -> Path:
    """Write one PNG of all images, one prompt per row, each pixel repeated ``scale``×.

    ``prompts`` (one per row) caption the rows (``dag_jax.infra.captions``).
    """
    from PIL import Image

    from dag_jax.infra.captions import captioned_grid

    array = np.concatenate(images)
    if scale > 1:
        array = array.repeat(scale, axis=1).repeat(scale, axis=2)
    rows = len(array) // per_row
    Image.fromarray(captioned_grid(array, rows=rows, row_captions=prompts)).save(path)
    return path


FLAGS = flags.FLAGS


def define_flags() -> None:
    """Define this entry point's command-line flags (only when run as a program)."""
    flags.DEFINE_string("model", "tiny", "diffusers folder, hub repo id, tiny or random-tiny")
    flags.DEFINE_multi_string(
        "prompt", ["two red circles on a blue background"], "prompt (repeat for several)"
    )
    flags.DEFINE_integer("num_images", 4, "images per prompt")
    flags.DEFINE_integer("steps", 50, "DDIM steps")
    flags.DEFINE_float("guidance", 7.5, "classifier-free guidance scale")
    flags.DEFINE_float("eta", 0.0, "DDIM eta (0 = deterministic, 1 = DDPM posterior)")
    flags.DEFINE_integer("seed", 0, "random seed")
    flags.DEFINE_integer("batch_size", 8, "images per compiled call")
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "compute dtype")
    flags.DEFINE_string("out", "samples", "output folder for PNGs")
    flags.DEFINE_integer("grid_scale", 0, "also write grid.png (prompts × images), upscaled ×N")
    cpu_tuning.define_flag()


def main(argv):
    del argv
    console.configure(FLAGS.verbosity)
    cpu_tuning.apply_if_requested(FLAGS.cpu_tuning)
    dtype = jnp.dtype(FLAGS.dtype)
    if FLAGS.model == "random-tiny":
        pipe = random_tiny_pipeline(FLAGS.seed)
    else:
        pipe = load_pipeline(FLAGS.model, dtype=dtype)
    prompts = [p for p in FLAGS.prompt for _ in range(FLAGS.num_images)]
    out = Path(FLAGS.out)
    start = time.time()
    written, all_images = [], []
    for b in range(0, len(prompts), FLAGS.batch_size):
        chunk = prompts[b : b + FLAGS.batch_size]
        imgs = generate(
            pipe,
            chunk,
            steps=FLAGS.steps,
            guidance=FLAGS.guidance,
            eta=FLAGS.eta,
            seed=FLAGS.seed,
            index_offset=b,
        )
        written += save_images(imgs, out, prefix=f"{b:04d}_")
        all_images.append(imgs)
        print(f"[sample] {len(written)}/{len(prompts)} images, {time.time() - start:.1f}s")
    if FLAGS.grid_scale:
        grid = out / "grid.png"
        write_grid(grid, all_images, FLAGS.num_images, FLAGS.grid_scale, list(FLAGS.prompt))
    (out / "prompts.txt").write_text("\n".join(f"{p.name}\t{q}" for p, q in zip(written, prompts)))
    print(f"[sample] wrote {len(written)} PNGs to {out}")


def cli() -> None:
    """Console entry point: parse the flags and run ``main``."""
    define_flags()
    app.run(main)


if __name__ == "__main__":
    cli()
