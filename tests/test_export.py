"""Export to PyTorch diffusers: merged pipeline and LoRA files match dag_jax's adapted model."""

from __future__ import annotations

import json
import re
import runpy
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from absl import flags
from flax import traverse_util
from safetensors import safe_open

import dag_jax
from dag_jax import export, train
from dag_jax.diffusion.sampler import rollout, sample_keys
from dag_jax.diffusion.schedule import make_schedule
from dag_jax.models.lora import LoRAConfig, init_lora, merge
from dag_jax.tinyworld.random_tiny import random_tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a cat on the mat", "the dog"]
LORA = LoRAConfig(rank=2, alpha=3.0)  # α/r = 1.5: a loader that ignores α would scale by 1


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Run the PyTorch oracles on one thread: its thread pool spins when cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _random_b(lora: dict, seed: int = 1) -> dict:
    """Return ``lora`` with B ~ N(0, 0.1²) so that the adapter changes the model."""
    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(lora)
    return traverse_util.unflatten_dict(
        {
            k: 0.1 * rng.standard_normal(v.shape).astype(np.float32) if k[-1] == "B" else v
            for k, v in sorted(flat.items())
        }
    )


@pytest.fixture(scope="module")
def adapted():
    """Return (tiny pipeline whose UNet applies the LoRA scale, random LoRA with non-zero B)."""
    pipe = random_tiny_pipeline(0)
    lora = init_lora(jax.random.PRNGKey(0), pipe.params["unet"], LORA)
    lora = jax.tree.map(np.asarray, _random_b(lora))
    pipe.unet = pipe.unet.clone(lora_scale=LORA.scale)
    return pipe, lora


@pytest.fixture(scope="module")
def exported(adapted, tmp_path_factory):
    """Return {"merged", "base", "lora"} folders written by the export functions."""
    pipe, lora = adapted
    root = tmp_path_factory.mktemp("export")
    return {
        "merged": export.save_merged_pipeline(pipe, lora, LORA, root / "merged"),
        "base": dag_jax.save_pipeline(pipe, root / "base"),
        "lora": export.save_lora(lora, LORA, root / "lora"),
    }


@pytest.fixture(scope="module")
def torch_merged(exported):
    """Return the exported merged pipeline loaded by diffusers (PyTorch, CPU)."""
    return _torch_pipeline(exported["merged"])


def _torch_pipeline(folder: Path, lora_dir: Path | None = None):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None)
    if lora_dir is not None:
        pipe.load_lora_weights(str(lora_dir))
    return pipe


@pytest.fixture(scope="module")
def unet_inputs():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 16, 16)).astype(np.float32)
    ctx = rng.standard_normal((2, 77, 32)).astype(np.float32)
    return x, np.array([5, 901]), ctx


@pytest.fixture(scope="module")
def jax_unet(adapted, unet_inputs):
    """Return dag_jax's adapted UNet output on ``unet_inputs`` (compiled once)."""
    pipe, lora = adapted

    @jax.jit
    def apply(variables, x, t, ctx):
        return pipe.unet.apply(variables, x, t, ctx).sample

    with_lora = apply({"params": pipe.params["unet"], "lora": lora}, *unet_inputs)
    zero = jax.tree.map(np.zeros_like, lora)
    base = apply({"params": pipe.params["unet"], "lora": zero}, *unet_inputs)
    return np.asarray(with_lora), np.asarray(base)


def _torch_unet(tp, x, t, ctx) -> np.ndarray:
    with torch.no_grad():
        out = tp.unet(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx))
    return out.sample.numpy()


def test_exported_pipeline_unet_matches_the_adapted_model(
    jax_unet, exported, torch_merged, unet_inputs
):
    ours, base = jax_unet
    assert np.abs(ours - base).max() > 1e-2  # the adapter matters
    ref = _torch_unet(torch_merged, *unet_inputs)
    assert not list(exported["merged"].rglob("*.bin"))
    assert np.abs(ours - ref).max() <= 1e-4


def test_exported_pipeline_ddim_sample_matches(adapted, torch_merged):
    pipe, lora = adapted
    z = np.random.default_rng(1).standard_normal((2, 4, 16, 16)).astype(np.float32)
    steps, guidance = 4, 7.5

    schedule = make_schedule(pipe.scheduler_config, steps)

    def eps_fn(policy, x, t, ctx):
        return pipe.unet.apply({"params": policy["base"], "lora": policy["lora"]}, x, t, ctx).sample

    @jax.jit
    def sample(params, lora, z, ids, neg_ids):
        """Return the project's DDIM η=0 sample with CFG (as dag_jax.sample) of the adapted UNet."""
        traj = rollout(
            eps_fn,
            {"base": params["unet"], "lora": lora},
            z,
            pipe.encode_text(params["text_encoder"], ids),
            pipe.encode_text(params["text_encoder"], neg_ids),
            schedule,
            sample_keys(jax.random.key(0), jnp.arange(z.shape[0])),
            guidance=guidance,
            eta=0.0,
        )
        return traj.final, pipe.decode_images(params["vae"], traj.final)

    ids, neg = pipe.encode_prompt_ids(PROMPTS), pipe.encode_prompt_ids([""])
    latents, images = jax.device_get(sample(pipe.params, lora, z, ids, neg))
    kwargs = dict(num_inference_steps=steps, guidance_scale=guidance, eta=0.0, height=32, width=32)
    ref = {
        kind: torch_merged(PROMPTS, latents=torch.from_numpy(z), output_type=kind, **kwargs).images
        for kind in ("latent", "np")
    }
    assert images.shape == ref["np"].shape == (2, 32, 32, 3)
    assert np.abs(latents - ref["latent"].numpy()).max() <= 1e-3
    assert np.abs(images - ref["np"]).max() <= 1e-3


def test_exported_lora_loads_in_diffusers_with_alpha_over_rank(
    adapted, jax_unet, exported, unet_inputs
):
    lora = adapted[1]
    tp = _torch_pipeline(exported["base"], exported["lora"])
    to_q = tp.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    assert list(to_q.scaling.values()) == [pytest.approx(LORA.scale)]
    assert np.abs(jax_unet[0] - _torch_unet(tp, *unet_inputs)).max() <= 1e-4

    with safe_open(str(exported["lora"] / export.LORA_WEIGHT_NAME), "np") as f:
        keys, meta = set(f.keys()), json.loads(f.metadata()[export.LORA_ADAPTER_METADATA_KEY])
        name = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0"
        a_t = f.get_tensor(f"{name}.lora_A.weight")
    modules = export.lora_modules(lora)
    assert len(keys) == 2 * len(modules)
    assert meta["unet.r"] == LORA.rank and meta["unet.lora_alpha"] == LORA.alpha
    a = modules[("down_blocks_1", "attentions_0", "transformer_blocks_0", "attn1", "to_out_0")][0]
    np.testing.assert_array_equal(a_t, a.T)


def test_a_failed_export_leaves_nothing(adapted, tmp_path, monkeypatch):
    import safetensors.numpy

    pipe, lora = adapted
    with pytest.raises(ValueError, match="ranks"):
        export.save_lora(lora, LoRAConfig(rank=4, alpha=3.0), tmp_path / "bad_rank")

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", disk_full)
    with pytest.raises(OSError, match="disk full"):
        export.save_lora(lora, LORA, tmp_path / "lora")
    with pytest.raises(OSError, match="disk full"):
        export.save_merged_pipeline(pipe, lora, LORA, tmp_path / "merged")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- from a training run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Return (workdir, config, final LoRA/flow) of a 1-epoch tiny DAG-DB run (α/r = 2).

    compressibility.py:tiny on the random tiny SD (no shipped assets needed), made smaller.
    """
    cfg = runpy.run_path(str(ROOT / "configs" / "compressibility.py"))["get_config"]("tiny")
    cfg.model, cfg.resolution = "random-tiny", 8
    cfg.prompts.name, cfg.prompts.inline = "inline", ("a red circle", "two blue squares")
    cfg.log.grid_every_epochs = 0
    cfg.lora.alpha = 8.0
    cfg.sample.steps = 2
    cfg.sample.trajectories = cfg.sample.chunk = cfg.train.trajectories_per_step = 4
    cfg.train.micro_batch, cfg.train.epochs = 8, 1
    workdir = tmp_path_factory.mktemp("run")
    state = train.train_and_evaluate(cfg, str(workdir))
    return workdir, cfg, jax.device_get(state.trainable)


@pytest.fixture(scope="module")
def restored(run):
    """Return export.load_run of the run's latest checkpoint."""
    return export.load_run(run[0])


def _cli(*args: str) -> None:
    """Run the export CLI in-process (its own flag set)."""
    fv = flags.FlagValues()
    export.define_flags(fv)
    fv(["export", *args])
    export.main([], fv)


def _flat(tree) -> dict:
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def test_load_run_restores_the_trained_lora(run, restored):
    final = run[2]
    assert "flow" in final and restored.step == 1 and restored.model.lora.scale == 2.0
    assert restored.mesh.size == 1 and restored.model.reward is None  # no task for export
    want, got = _flat(final["lora"]), _flat(export.host_lora(restored))
    assert all(v.dtype == np.float32 for v in got.values())
    assert want.keys() == got.keys()
    assert all(np.array_equal(want[k], got[k]) for k in want)
    assert any(np.abs(want[k]).max() > 0 for k in want if k[-1] == "B")  # it trained


def test_cli_exports_the_merged_pipeline(run, tmp_path):
    workdir, cfg, final = run
    out = tmp_path / "pipe"
    _cli(f"--workdir={workdir}", f"--out={out}", "--format=pipeline")
    got = dag_jax.load_pipeline(out).params
    base = random_tiny_pipeline(cfg.seed).params
    want = merge(base["unet"], final["lora"], cfg.lora.alpha / cfg.lora.rank)
    for part, tree in (
        ("unet", want),
        ("vae", base["vae"]),
        ("text_encoder", base["text_encoder"]),
    ):
        a, b = _flat(tree), _flat(got[part])
        assert a.keys() == b.keys()
        assert max(np.abs(a[k] - b[k]).max() for k in a) <= 1e-6, part


def test_cli_refuses_a_non_empty_folder_and_overwrites_only_an_export(run, tmp_path):
    workdir = run[0]
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(SystemExit, match=f"{re.escape(str(out))}.*overwrite"):
        _cli(f"--workdir={workdir}", f"--out={out}", "--format=lora")
    with pytest.raises(SystemExit, match=f"{re.escape(str(out))} is not a folder that dag_jax"):
        _cli(f"--workdir={workdir}", f"--out={out}", "--format=lora", "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "precious"
    out = tmp_path / "export"
    _cli(f"--workdir={workdir}", f"--out={out}", "--format=pipeline")
    _cli(f"--workdir={workdir}", f"--out={out}", "--format=lora", "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == [export.EXPORT_MARKER, export.LORA_WEIGHT_NAME]
    marker = json.loads((out / export.EXPORT_MARKER).read_text())
    assert marker == {
        "written_by": "dag_jax.export",
        "format": "lora",
        "workdir": str(workdir),
        "step": 1,
    }
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".taken", ".export"))]


def test_cli_names_a_bad_step_a_missing_workdir_and_missing_checkpoints(run, tmp_path):
    workdir = run[0]
    with pytest.raises(SystemExit, match=r"step 7 .*available steps: \[1\]"):
        _cli(f"--workdir={workdir}", f"--out={tmp_path / 'a'}", "--step=7")
    with pytest.raises(SystemExit, match="absent does not exist"):
        _cli(f"--workdir={tmp_path / 'absent'}", f"--out={tmp_path / 'b'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="config.json not found"):
        _cli(f"--workdir={tmp_path / 'empty'}", f"--out={tmp_path / 'c'}")
    (tmp_path / "empty" / "config.json").write_text((workdir / "config.json").read_text())
    with pytest.raises(SystemExit, match="checkpoints not found"):
        _cli(f"--workdir={tmp_path / 'empty'}", f"--out={tmp_path / 'd'}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_python_m_exports_the_lora_of_a_step(run, restored, tmp_path):
    workdir, cfg, _ = run
    out = tmp_path / "lora"
    cmd = [sys.executable, "-m", "dag_jax.export", f"--workdir={workdir}", f"--out={out}"]
    res = subprocess.run(
        [*cmd, "--format=lora", "--step=1"], capture_output=True, text=True, cwd=ROOT, timeout=600
    )
    assert res.returncode == 0, res.stderr[-3000:]
    with safe_open(str(out / export.LORA_WEIGHT_NAME), "np") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()[export.LORA_ADAPTER_METADATA_KEY])
    want = export.lora_state_dict(export.host_lora(restored))
    assert state.keys() == want.keys()
    assert all(np.array_equal(state[k], want[k]) for k in want)
    assert (meta["unet.r"], meta["unet.lora_alpha"]) == (cfg.lora.rank, cfg.lora.alpha)
