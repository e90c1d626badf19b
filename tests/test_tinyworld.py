"""The built-in tiny world: dataset, tokenizer, pretraining pipeline, shipped weights."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dag_jax.tinyworld import bpe, models, shapes

# --------------------------------------------------------------------------- dataset


def test_examples_are_pure_functions_of_seed_split_and_index():
    a, caps_a, lab_a = shapes.batch(3, 10, 6)
    b, caps_b, lab_b = shapes.batch(3, 12, 2)  # a different cut of the same stream
    np.testing.assert_array_equal(a[2:4], b)
    assert caps_a[2:4] == caps_b
    c, _, _ = shapes.batch(4, 10, 6)
    assert not np.array_equal(a, c)
    assert a.dtype == np.uint8 and a.shape == (6, 64, 64, 3)
    assert set(lab_a) == {"kind", "colour", "background", "count", "caption"}


def test_splits_hold_out_whole_triples():
    train, test = set(shapes.triples("train")), set(shapes.triples("test"))
    assert train and test and not train & test
    assert len(train | test) == len(shapes.SHAPE_COLOURS) * len(shapes.KINDS) * (
        len(shapes.BACKGROUNDS)
    ) - len(shapes.KINDS) * len(shapes.SHAPE_COLOURS)  # no shape on its own colour
    _, captions, labels = shapes.batch(0, 0, 64, "test")
    for caption in captions:
        p = shapes.parse(caption)
        assert (p["colour"], p["kind"], p["background"]) in test
    assert set(captions) <= set(shapes.captions("test"))
    with pytest.raises(ValueError, match="unknown split"):
        shapes.triples("val")


def test_images_show_their_caption():
    """The colours in an image are its caption's, and the count is right (from the pixels)."""
    from scipy import ndimage

    images, captions, labels = shapes.batch(1, 0, 32)
    for image, caption in zip(images, captions, strict=True):
        p = shapes.parse(caption)
        fg = np.asarray(shapes.PALETTE[p["colour"]], np.float32)
        bg = np.asarray(shapes.PALETTE[p["background"]], np.float32)
        px = image.reshape(-1, 3).astype(np.float32)
        near_fg = np.abs(px - fg).max(axis=1) <= shapes.COLOUR_JITTER + 1
        near_bg = np.abs(px - bg).max(axis=1) <= shapes.COLOUR_JITTER + 1
        assert near_bg.mean() > 0.4  # mostly background
        assert near_fg.sum() >= 20  # and some shape (the smallest: a triangle of ~45 px)
        _, blobs = ndimage.label(near_fg.reshape(64, 64))
        assert blobs == p["count"], caption


def test_geometry_reads_kind_and_count_of_rendered_scenes_and_not_of_blobs():
    images, _, labels = shapes.batch(5, 0, 200, "test")
    kinds, counts = shapes.read(images)
    np.testing.assert_array_equal(kinds, labels["kind"])
    np.testing.assert_array_equal(counts, labels["count"])
    # the same scenes drawn as round blobs read as circles, at the same counts
    import dataclasses

    scenes = [shapes.example(5, i, "test")[1] for i in range(40)]
    blobs = np.stack([shapes.render(dataclasses.replace(s, kind="circle")) for s in scenes])
    blob_kinds, blob_counts = shapes.read(blobs)
    assert blob_kinds.tolist() == [0] * 40
    assert blob_counts.tolist() == [s.count for s in scenes]
    assert shapes.read(np.full((1, 64, 64, 3), 128, np.uint8))[1].tolist() == [0]


def test_captions_parse_back():
    for caption in shapes.all_captions():
        p = shapes.parse(caption)
        assert shapes.caption(p["kind"], p["colour"], p["background"], p["count"]) == caption
    assert shapes.parse("a photo of a cat") is None
    assert shapes.parse("two red circle on a blue background") is None  # plural mismatch


# --------------------------------------------------------------------------- tokenizer


def test_bpe_learns_whole_words_and_loads_as_clip_tokenizer(tmp_path):
    from transformers import CLIPTokenizer

    merges = bpe.train_bpe(shapes.captions("train"))
    assert merges == bpe.train_bpe(shapes.captions("train"))  # deterministic
    bpe.write_clip_tokenizer(tmp_path, merges, models.TOKEN_LENGTH)
    tok = CLIPTokenizer.from_pretrained(str(tmp_path))
    assert tok.model_max_length == models.TOKEN_LENGTH
    words = {w for c in shapes.all_captions() for w in c.split()}
    for word in words:
        assert tok.tokenize(word) == [word + "</w>"], word
    ids = tok("three blue squares on a white background")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and len(ids) == 9
    # an unseen word still tokenizes (into bytes and learnt pieces), never to an unknown id
    assert tok.unk_token_id not in tok("a zebra")["input_ids"][1:-1]


# --------------------------------------------------------------------------- pretraining


@pytest.fixture(scope="module")
def smoke_world(tmp_path_factory):
    """Run the whole pretraining CLI at a tiny scale (a few steps per stage)."""
    from dag_jax.tinyworld import build as pretrain_tiny
    from dag_jax.tinyworld import pretrain

    work = tmp_path_factory.mktemp("pretrain")
    recipe = pretrain.Recipe(
        clip_steps=2, clip_batch=16, vae_steps=2, vae_batch=4, unet_steps=3, unet_batch=8,
        latent_pool=16, judge_steps=2, judge_batch=16, log_every=1,
    )  # fmt: skip
    world = pretrain_tiny.build_world(work / "stages", recipe)
    clip_path, sd_path = pretrain_tiny.write_world(world, work / "out")
    return work, recipe, world, clip_path, sd_path


def test_pretraining_writes_loadable_folders(smoke_world):
    from dag_jax.pipeline import load_pipeline
    from dag_jax.weights.clip_loader import load_clip

    work, _, world, clip_path, sd_path = smoke_world
    pipe = load_pipeline(sd_path)
    assert pipe.latent_shape == (4, 16, 16) and pipe.vae_scale_factor == 4
    assert pipe.tokenizer.model_max_length == models.TOKEN_LENGTH
    scale = pipe.vae.config.scaling_factor
    assert scale > 0 and scale != 1.0  # set from the encoder's latents
    _, judge, _ = load_clip(clip_path)  # the shipped CLIP is the judge (stage 5)
    _, stage2, _ = load_clip(work / "stages" / "clip")

    def token_table(params):
        return params["text_model"]["embeddings"]["token_embedding"]["embedding"]

    # the SD text encoder is stage 2's CLIP text tower; the judge trained on from it
    np.testing.assert_array_equal(token_table(stage2), token_table(pipe.params["text_encoder"]))
    assert not np.array_equal(token_table(judge), token_table(stage2))
    assert (clip_path / "vocab.json").is_file() and (sd_path / "tokenizer" / "merges.txt").is_file()
    assert json.loads((clip_path / "preprocessor_config.json").read_text())["crop_size"] == {
        "height": 64,
        "width": 64,
    }


def test_pretraining_reuses_finished_stages(smoke_world, monkeypatch):
    from dag_jax.tinyworld import build as pretrain_tiny
    from dag_jax.tinyworld import pretrain

    work, recipe, world, _, _ = smoke_world

    def fail(*a, **k):
        raise AssertionError("a finished stage was retrained")

    for stage in ("train_clip", "train_vae", "train_unet", "train_judge"):
        monkeypatch.setattr(pretrain, stage, fail)
    again = pretrain_tiny.build_world(work / "stages", recipe)
    np.testing.assert_array_equal(
        again["unet"][1]["conv_in"]["kernel"], world["unet"][1]["conv_in"]["kernel"]
    )
    np.testing.assert_array_equal(
        again["clip"][1]["visual_projection"]["kernel"],
        world["clip"][1]["visual_projection"]["kernel"],
    )


def test_reconstruction_loss_is_l1_by_default_and_weights_shapes_and_edges_on_request():
    import jax.numpy as jnp

    from dag_jax.tinyworld import pretrain

    images, _, _ = shapes.batch(5, 0, 2, "test")
    x = pretrain.vae_input(images)
    blurred = (x + jnp.roll(x, 1, axis=2) + jnp.roll(x, 1, axis=3)) / 3
    plain = pretrain.reconstruction_loss(blurred, x)
    assert float(plain) == float(jnp.mean(jnp.abs(blurred - x)))
    # an error on shape pixels only: foreground weighting raises it, an error on the
    # background only: lowers it
    corner = x[:, :, :1, :1]
    shape = jnp.max(jnp.abs(x - corner), axis=1, keepdims=True) > 0.08
    on_shapes, on_background = jnp.where(shape, x + 0.5, x), jnp.where(shape, x, x + 0.5)
    for recon, grows in ((on_shapes, True), (on_background, False)):
        weighted = pretrain.reconstruction_loss(recon, x, foreground_weight=10.0)
        assert (weighted > pretrain.reconstruction_loss(recon, x)) == grows
    # a constant offset has no edges; a blur has
    assert float(pretrain.reconstruction_loss(x + 0.1, x, edge_weight=1.0)) == pytest.approx(0.1)
    assert pretrain.reconstruction_loss(blurred, x, edge_weight=1.0) > plain


def test_perceptual_loss_is_zero_on_the_image_and_grows_with_blur():
    import jax.numpy as jnp

    from dag_jax.tinyworld import pretrain
    from dag_jax.tinyworld.assets import TINY_CLIP
    from dag_jax.weights.clip_loader import load_clip

    _, params, config = load_clip(TINY_CLIP)
    features = pretrain.perceptual_features(config, params)
    images, _, _ = shapes.batch(5, 0, 2, "test")
    x = pretrain.vae_input(images)
    assert len(features(x)) == config["vision_config"]["num_hidden_layers"] + 1
    assert float(pretrain.perceptual_loss(features, x, x)) == pytest.approx(0.0, abs=1e-6)
    blur = lambda a: (a + jnp.roll(a, 1, axis=2) + jnp.roll(a, 1, axis=3)) / 3
    small, large = (pretrain.perceptual_loss(features, y, x) for y in (blur(x), blur(blur(x))))
    assert 0 < float(small) < float(large)
    with pytest.raises(ValueError, match="needs the judge"):
        pretrain.train_vae(pretrain.Recipe(vae_steps=1, vae_perceptual_weight=0.3))


def test_the_4x_vae_trains_with_every_term_and_its_unet_takes_16x16_latents():
    import jax
    import jax.numpy as jnp

    from dag_jax.models.unet import UNet2DConditionModel, UNetConfig
    from dag_jax.tinyworld import pretrain
    from dag_jax.tinyworld.assets import TINY_CLIP
    from dag_jax.weights.clip_loader import load_clip

    _, params, config = load_clip(TINY_CLIP)
    recipe = pretrain.Recipe(
        vae_steps=2, vae_batch=2, vae_down=4, vae_foreground_weight=10.0, vae_edge_weight=1.0,
        vae_perceptual_weight=0.3, log_every=1,
    )  # fmt: skip
    vae_config, vae_params = pretrain.train_vae(recipe, (config, params))
    assert len(vae_config["block_out_channels"]) == 3 and vae_config["scaling_factor"] > 0
    from dag_jax.models.vae import AutoencoderKL, VAEConfig

    module = AutoencoderKL(VAEConfig.from_dict(vae_config))
    images, _, _ = shapes.batch(5, 0, 2, "test")
    assert pretrain.encode_means(module, vae_params, images).shape == (2, 4, 16, 16)
    unet = UNet2DConditionModel(UNetConfig.from_dict(models.unet_config(16)))
    x, ctx = jnp.zeros((1, 4, 16, 16)), jnp.zeros((1, models.TOKEN_LENGTH, models.HIDDEN))
    out = unet.init_with_output(jax.random.key(0), x, jnp.zeros((1,), jnp.int32), ctx)[0]
    assert out.sample.shape == x.shape
    with pytest.raises(ValueError, match="8× or 4×"):
        pretrain.Recipe(vae_down=2)


def test_recipe_overrides_take_the_field_types_and_name_bad_items():
    from dag_jax.tinyworld.pretrain import Recipe

    r = Recipe().override(["vae_down=8", "vae_perceptual_weight=0", " vae_steps = 10"])
    assert (r.vae_down, r.vae_perceptual_weight, r.vae_steps) == (8, 0.0, 10)
    assert Recipe().override([]) == Recipe()
    with pytest.raises(ValueError, match="did you mean 'vae_steps'"):
        Recipe().override(["vae_step=10"])
    with pytest.raises(ValueError, match="expected type int"):
        Recipe().override(["vae_steps=1e3"])
    with pytest.raises(ValueError, match="expected key=value"):
        Recipe().override(["vae_steps"])
    with pytest.raises(ValueError, match="8× or 4×"):
        Recipe().override(["vae_down=2"])


def test_contrastive_loss_counts_identical_captions_as_positives():
    import jax.numpy as jnp

    from dag_jax.tinyworld.pretrain import contrastive_loss

    labels = jnp.array([0, 0, 1])
    perfect = jnp.array([[9.0, 9.0, -9.0], [9.0, 9.0, -9.0], [-9.0, -9.0, 9.0]])
    assert float(contrastive_loss(perfect, labels)) == pytest.approx(np.log(2) * 2 / 3, abs=1e-3)
    wrong = -perfect
    assert float(contrastive_loss(wrong, labels)) > 10


def test_judge_batches_draw_every_triple_in_proportion():
    from dag_jax.tinyworld.pretrain import judge_batch

    images, labels = judge_batch(3, 5, 40)
    assert images.shape == (40, 64, 64, 3) and labels.shape == (40,)
    n_train = len(shapes.captions("train"))
    held_out = int(np.sum(labels >= n_train))  # test captions follow train ones
    n_triples = [len(shapes.triples(split)) for split in shapes.SPLITS]
    assert held_out == round(40 * n_triples[1] / sum(n_triples)) >= 1
    again, labels_again = judge_batch(3, 5, 40)
    np.testing.assert_array_equal(again, images)
    np.testing.assert_array_equal(labels_again, labels)
    assert not np.array_equal(judge_batch(3, 6, 40)[1], labels)


def test_judge_loss_classifies_among_every_caption():
    import jax.numpy as jnp

    from dag_jax.tinyworld.pretrain import contrastive_loss, judge_loss

    logits = jnp.asarray(np.random.default_rng(0).standard_normal((3, 7)), jnp.float32)
    labels = jnp.array([4, 1, 4])
    every = -np.mean([_log_softmax(np.asarray(logits[i]))[int(labels[i])] for i in range(3)])
    in_batch = float(contrastive_loss(logits[:, labels], labels))
    assert float(judge_loss(logits, labels)) == pytest.approx(every + in_batch, rel=1e-5)
    # a caption outside the batch still counts: raising it raises the loss
    worse = logits.at[:, 6].add(5.0)
    assert float(judge_loss(worse, labels)) > float(judge_loss(logits, labels)) + 1


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


# --------------------------------------------------------------------------- shipped world


def _shipped():
    from dag_jax.tinyworld.assets import TINY_CLIP, TINY_SD

    if not (TINY_SD / "model_index.json").is_file() or not (TINY_CLIP / "config.json").is_file():
        pytest.fail(f"the shipped tiny world is missing ({TINY_SD}, {TINY_CLIP})")
    return TINY_SD, TINY_CLIP


def test_shipped_world_is_small_and_loads_by_name():
    import dag_jax

    sd, clip = _shipped()
    size = sum(p.stat().st_size for d in (sd, clip) for p in d.rglob("*") if p.is_file())
    assert size < 30 * 2**20
    pipe = dag_jax.load_pipeline("tiny")
    assert pipe.unet.config.sample_size == 16 and pipe.vae_scale_factor == 4


def test_reconstructions_keep_the_background_and_roughly_the_image():
    """``build.reconstruct`` (the VAE's ceiling in ``measure``) decodes what it encoded."""
    import dag_jax
    from dag_jax.tinyworld import build

    images, _, _ = shapes.batch(5, 0, 6, "test")
    recon = build.reconstruct(dag_jax.load_pipeline("tiny"), images, chunk=4)
    assert recon.shape == images.shape and recon.dtype == np.uint8
    error = np.abs(recon.astype(np.float32) - images) / 255
    assert error.mean() < 0.06  # measured 0.033 (L1 0.066 on [-1, 1])
    median = lambda x: np.median(x.reshape(len(x), -1, 3).astype(int), axis=1)  # the background
    assert np.all(np.abs(median(recon) - median(images)) < 24)


def test_shipped_unet_and_text_encoder_match_diffusers_and_transformers():
    """The shipped folders are real diffusers/transformers folders: same outputs in PyTorch."""
    import jax.numpy as jnp
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPModel, CLIPTextModel

    import dag_jax
    from dag_jax.weights.clip_loader import load_clip

    sd, clip = _shipped()
    pipe = dag_jax.load_pipeline("tiny")
    ids = pipe.encode_prompt_ids(["two red circles on a blue background", ""])
    ctx = pipe.encode_text(pipe.params["text_encoder"], jnp.asarray(ids))
    with torch.no_grad():
        t_text = CLIPTextModel.from_pretrained(str(sd / "text_encoder")).eval()
        t_ctx = t_text(torch.from_numpy(ids.astype(np.int64))).last_hidden_state.numpy()
    np.testing.assert_allclose(np.asarray(ctx), t_ctx, atol=1e-4)

    x = np.random.default_rng(0).standard_normal((2, 4, 16, 16)).astype(np.float32)
    t = np.array([999, 10], np.int32)
    eps = pipe.eps_fn(pipe.params["unet"], jnp.asarray(x), jnp.asarray(t), ctx)
    with torch.no_grad():
        t_unet = UNet2DConditionModel.from_pretrained(str(sd / "unet")).eval()
        t_eps = t_unet(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(t_ctx)).sample
    np.testing.assert_allclose(np.asarray(eps), t_eps.numpy(), atol=1e-4)

    module, params, _ = load_clip(clip)
    images, captions, _ = shapes.batch(0, 0, 4)
    from dag_jax.tinyworld.pretrain import pixels_of

    px = pixels_of(images)
    ours = module.apply({"params": params}, px, method=type(module).get_image_features)
    with torch.no_grad():
        t_clip = CLIPModel.from_pretrained(str(clip)).eval()
        theirs = t_clip.get_image_features(pixel_values=torch.from_numpy(np.asarray(px)))
    theirs = getattr(theirs, "pooler_output", theirs)
    np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), atol=1e-4)


def test_tiny_clipscore_prefers_the_true_caption():
    from dag_jax import rewards

    _shipped()
    reward = rewards.get("tiny_clipscore")
    images, captions, _ = shapes.batch(7, 0, 16, "test")  # held-out combinations
    right = reward(images / 255.0, captions)
    wrong = reward(images / 255.0, captions[1:] + captions[:1])
    assert right.shape == (16,) and np.all(np.abs(right) <= 1)
    assert np.mean(right > wrong) >= 0.75


def test_load_pipeline_tiny_names_the_fix_when_missing(monkeypatch, tmp_path):
    import dag_jax.tinyworld.assets
    from dag_jax.pipeline import builtin_path

    monkeypatch.setattr(dag_jax.tinyworld.assets, "TINY_SD", tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match=r"python -m dag_jax\.tinyworld"):
        builtin_path("tiny")
    assert builtin_path("some/folder") == "some/folder"


# --------------------------------------------------------------------------- demo bench


def test_tinyworld_bench_configs_and_table():
    from dag_jax.bench import tinyworld as tw

    c = tw.demo_config("alignment", "dag_kl", 3, epochs=5)
    assert (c.model, c.reward.name, c.prompts.name) == ("tiny", "tiny_clipscore", "tiny_shapes")
    assert (c.algo, c.seed, c.train.epochs, c.b2.stages) == ("dag_kl", 3, 5, 5)
    assert tw.demo_config("compressibility", "ddpo", 0).reward.name == "jpeg_compressibility"
    from dag_jax import train

    for task in ("compressibility", "alignment"):  # every demo run the table needs is valid
        for algo in tw.ALGOS:
            train.validate(tw.demo_config(task, algo, 0), num_devices=1)
    with pytest.raises(ValueError, match="unknown task"):
        tw.demo_config("beauty", "ddpo", 0)
    with pytest.raises(ValueError, match="unknown algorithm"):
        tw.demo_config("alignment", "ppo", 0)

    def metrics(before, after):
        return {
            "reward_before_test": before,
            "reward_after_test": after,
            "reward_rise_test": after - before,
            "reward_rise_train": 0.5,
            "diversity_before_test": 0.2,
            "diversity_test": 0.1,
            "vendi_before_test": 3.0,
            "vendi_test": 2.0,
            "seconds": 10.0,
        }

    records = [
        {"bench": "tinyworld", "impl": "ddpo", "metric": m, "value": v, "unit": "", "config": {
            "task": "alignment", "seed": s}}
        for s, (before, after) in enumerate([(0.1, 0.3), (0.1, 0.2)])
        for m, v in metrics(before, after).items()
    ]  # fmt: skip
    table = tw.format_rise(records)
    row = (
        "| alignment | ddpo | 2 | 0.1000 → 0.2500 ± 0.0500 | 0.1500 ± 0.0500 | 0.5000 ± 0.0000 "
        "| 0.200 → 0.100 ± 0.000 | 3.00 → 2.00 ± 0.00 | 10 |"
    )
    assert row in table


def test_ascent_line_search_on_the_tiny_world():
    from dag_jax.bench.probes import ascent as bench_ascent

    m = bench_ascent.ascent("compressibility", group=4, batch=8, lrs=[1e-2], seed=0)
    assert set(m) >= {"reward_std", "reward_std_within_group", "grad_cosine"}
    assert -1.0 <= m["grad_cosine"] <= 1.0 and m["reward_std"] > 0
    assert m["reward_std_within_group"] <= 2 * m["reward_std"]
    plus, minus = m["gain_plus_lr0.01"], m["gain_minus_lr0.01"]
    assert plus != 0.0 and minus != 0.0  # the steps moved the model
    np.testing.assert_allclose(m["linear_gain_lr0.01"], (plus - minus) / 2, rtol=1e-6)
    np.testing.assert_allclose(m["curvature_loss_lr0.01"], -(plus + minus) / 2, rtol=1e-6)
    with pytest.raises(ValueError, match="groups of 3"):
        bench_ascent.ascent("compressibility", group=3, batch=8, lrs=[1e-2], seed=0)


# --------------------------------------------------------------------------- end to end


def test_tiny_world_trains_evaluates_and_exports(tmp_path):
    """alignment.py:tiny on the shipped world: train, evaluate with the tiny CLIP, export."""
    import runpy
    from pathlib import Path

    from dag_jax import export, train
    from dag_jax.eval import evaluate

    _shipped()
    root = Path(__file__).resolve().parents[1]
    cfg = runpy.run_path(str(root / "configs" / "alignment.py"))["get_config"]("tiny")
    assert (cfg.model, cfg.reward.name) == ("tiny", "tiny_clipscore")
    cfg.train.epochs, cfg.log.grid_every_epochs = 1, 0
    workdir = tmp_path / "run"
    train.train_and_evaluate(cfg, str(workdir))
    result = evaluate.evaluate(
        workdir, num_per_prompt=2, max_prompts=2, grid_seeds=2, progress=False
    )
    test = result["splits"]["test"]
    assert test["num_images"] == 4
    assert -1 <= test["rewards"]["tiny_clipscore"]["mean"] <= 1
    assert "tiny_clip" in result["feature_model"]
    assert (workdir / "eval" / "1" / "eval.json").is_file()
    out = export.export_pipeline(workdir, tmp_path / "exported")
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_dbterms_splits_the_db_residual_per_step():
    from dag_jax.bench.probes import dbterms as bench_dbterms

    m = bench_dbterms.dbterms("compressibility", group=4, batch=8, seed=0)
    steps = sum(name.startswith("logratio_mean_k") for name in m)
    assert steps == 10  # the :demo sampler's steps
    for k in range(steps):
        assert np.isfinite(m[f"logratio_mean_k{k}"]) and m[f"logratio_std_k{k}"] > 0
        assert 0 <= m[f"reward_change_std_within_group_k{k}"] <= 2 * m[f"reward_change_std_k{k}"]
    # the step before the last (t = 101 → 1 of 10 steps) has the largest offset
    means = [m[f"logratio_mean_k{k}"] for k in range(steps)]
    assert int(np.argmax(means)) == steps - 2
    with pytest.raises(ValueError, match="groups of 3"):
        bench_dbterms.dbterms("compressibility", group=3, batch=8, seed=0)
