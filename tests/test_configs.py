"""Configs: every experiment × algorithm gives that release's settings; arguments; unknown keys."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from absl import flags
from ml_collections import config_flags

from dag_jax import configs
from dag_jax.configs import base
from dag_jax.train import config as train_config

ROOT = Path(__file__).resolve().parents[1]
SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SD14 = "CompVis/stable-diffusion-v1-4"

# The releases' settings, written out from their papers and code (SPEC §10; ddpo-pytorch's
# config/dgx.py per task: JPEG 8 GPUs × 8 × 4 = 256 sampled, 4 × 2 × 8 = 64 per update;
# aesthetic 128 per update; alignment 8 × 6 × 6 = 288 sampled, 144 per update).
DAG = {
    "model": SD15,
    "sample.steps": 50,
    "sample.eta": 1.0,
    "sample.guidance": 5.0,
    "sample.trajectories": 512,
    "sample.group": 1,
    "train.trajectories_per_step": 256,
    "train.epochs": 100,
    "train.learning_rate": 3e-4,
    "train.weight_decay": 1e-4,
    "train.max_grad_norm": 1.0,
    "train.flow_learning_rate": 3e-4,
    "lora.rank": 4,
    "lora.alpha": 4.0,
    "dag.beta": 100.0,
    "dag.anneal_fraction": 0.5,
    "dag.reg_coef": 1.0,
    "dag.kl_coef": 1.0,
    "dag.clip_range": 1e-4,
    "dag.adv_clip": 5.0,
    "dag.baseline_group": 8,
    "dag.baseline": "rows",
    "dag.anchor_initial_flow": False,
    "dag.flow_warmup_epochs": 0,
    "dag.fl_source": "current",
}
DDPO = {
    "model": SD15,
    "sample.steps": 50,
    "sample.eta": 1.0,
    "sample.guidance": 5.0,
    "sample.group": 1,
    "train.learning_rate": 3e-4,
    "train.weight_decay": 1e-4,
    "train.max_grad_norm": 1.0,
    "lora.rank": 4,
    "ddpo.clip_range": 1e-4,
    "ddpo.adv_clip": 5.0,
    "ddpo.inner_epochs": 1,
    "ddpo.tracker_min_count": 16,
    "ddpo.group_scale": "group",
}
DDPO_TASK = {  # (sampled per epoch, per update, epochs, tracker buffer)
    "compressibility": (256, 64, 100, 16),
    "incompressibility": (256, 64, 100, 16),
    "aesthetic": (256, 128, 200, 32),
    "alignment": (288, 144, 200, 32),
}
B2 = {
    "model": SD14,
    "sample.steps": 20,
    "sample.eta": 1.0,
    "sample.guidance": 5.0,
    "b2.prefixes": 256,
    "b2.branches": 5,
    "b2.stages": 100,
    "b2.low": 14,
    "b2.high": 20,
    "b2.passes": 2,
    "b2.history": 8,
    "b2.threshold": 0.5,
    "b2.clip_range": 0.1,
    "b2.adv_clip": 5.0,
    "b2.select": True,
    "b2.baseline": "prompt",
    "b2.objective": "ddpo",
    "train.trajectories_per_step": 128,
    "train.learning_rate": 1e-4,
    "train.weight_decay": 1e-4,
    "lora.rank": 4,
}

# GRPO has no release on SD1.5 DDIM: DanceGRPO's SD script (fastvideo/config_sd/dgx.py:hpsv2,
# train_grpo_sd.py): 50 steps, η 1, guidance 5, 8 GPUs × 4 prompts × 16 = 512 sampled, groups
# of 16 sharing x_T, 4 × 8 × 8 = 256 per update, 300 epochs, clip 1e-4, no KL; LoRA lr 3e-4.
GRPO = {
    "model": SD15,
    "sample.steps": 50,
    "sample.eta": 1.0,
    "sample.guidance": 5.0,
    "sample.trajectories": 512,
    "train.trajectories_per_step": 256,
    "train.epochs": 300,
    "train.learning_rate": 3e-4,
    "grpo.group": 16,
    "grpo.share_noise": True,
    "grpo.clip_range": 1e-4,
    "grpo.adv_clip": 5.0,
    "grpo.kl": 0.0,
}


def expected(algo: str, task: str) -> dict:
    """Return the release table's values for ``algo`` on ``task``."""
    if algo in ("dag_db", "dag_kl"):
        return DAG
    if algo == "b2":
        return B2
    if algo == "grpo":
        return GRPO
    sampled, per_update, epochs, buffer = DDPO_TASK.get(task, DDPO_TASK["aesthetic"])
    return {
        **DDPO,
        "sample.trajectories": sampled,
        "train.trajectories_per_step": per_update,
        "train.epochs": epochs,
        "ddpo.tracker_buffer": buffer,
    }


def cli_config(argv: list[str]):
    """Return the config the train CLI builds from ``--config…`` arguments."""
    values, argv = flags.FlagValues(), ["train", *argv]
    config_flags.DEFINE_config_file("config", flag_values=values, sys_argv=argv)
    values(argv)
    return configs.from_flag(values["config"])


@pytest.mark.parametrize("algo", base.ALGOS)
@pytest.mark.parametrize("name", configs.NAMES)
def test_an_algo_override_gives_that_release_on_every_config(name, algo):
    path = str(ROOT / "configs" / f"{name}.py")
    cfg = cli_config([f"--config={path}", f"--config.algo={algo}"])
    assert cfg.algo == algo
    flat = train_config.flat_keys(cfg)
    for key, value in expected(algo, name).items():
        assert flat[key] == value, (name, algo, key, flat[key], value)
    train_config.validate(cfg, num_devices=8)


def test_the_argument_and_the_override_agree():
    by_arg = configs.load("compressibility:algo=b2")
    by_override = configs.load("compressibility", {"algo": "b2"})
    assert by_arg.to_dict() == by_override.to_dict()


def test_other_overrides_apply_after_the_release():
    path = str(ROOT / "configs" / "aesthetic.py")
    cfg = cli_config([f"--config={path}", "--config.algo=b2", "--config.train.learning_rate=0.5"])
    assert cfg.train.learning_rate == 0.5 and cfg.sample.steps == 20


def test_bare_items_name_their_key_and_sizes_keep_the_math():
    tiny = configs.load("aesthetic:tiny")
    assert tiny.model == "tiny" and tiny.algo == "dag_db" and tiny.dag.beta == 100.0
    assert configs.load("b2_template:2").prompts.name == "b2_template2"
    assert configs.load("b2_template:2,tiny").algo == "b2"
    assert configs.load("b2_template:template=3,algo=dag_kl").algo == "dag_kl"


def test_demo_keeps_its_measured_improvements():
    demo = configs.load("compressibility:demo")
    assert (demo.sample.group, demo.dag.baseline, demo.dag.anchor_initial_flow) == (8, "step", True)
    assert (demo.b2.baseline, demo.b2.select) == ("prefix", False)
    assert demo.eval.every_epochs == 4  # base before training, the held-out change at the end


@pytest.mark.parametrize(
    "arg, message",
    [
        ("algo=dagdb", "did you mean 'dag_db'"),
        ("tinny", "did you mean 'tiny'"),
        ("alog=b2", "did you mean 'algo'"),
    ],
)
def test_a_bad_argument_says_what_it_meant(arg, message):
    with pytest.raises(ValueError, match=message):
        configs.load(f"aesthetic:{arg}")


def test_a_misspelt_key_is_refused_with_a_suggestion():
    cfg = configs.load("aesthetic:tiny")
    with cfg.ignore_type(), cfg.unlocked():
        cfg.train.learnig_rate = 1e-3
    with pytest.raises(train_config.ConfigError, match="did you mean 'train.learning_rate'"):
        train_config.validate(cfg, num_devices=1)


def test_a_misspelt_algo_is_refused_with_a_suggestion():
    cfg = configs.load("aesthetic:tiny")
    cfg.algo = "dagdb"
    with pytest.raises(train_config.ConfigError, match="did you mean 'dag_db'"):
        train_config.validate(cfg, num_devices=1)


CHECK_INSTALLED = """
import sys
import dag_jax
from dag_jax import configs
from dag_jax.train import config
assert dag_jax.__file__.startswith(sys.argv[1]), dag_jax.__file__
cfg = configs.load("compressibility:tiny")
with cfg.unlocked():
    cfg.sample.trajectoriez = 3
try:
    config.validate(cfg, num_devices=1)
except config.ConfigError as err:
    print("refused:", err)
"""


def test_unknown_keys_are_refused_from_an_installed_wheel(tmp_path):
    # The wheel, unpacked outside the repository and first on sys.path: the defaults come
    # from the package itself, not from a configs/ folder beside it.
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w"]
        + [str(tmp_path / "dist"), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("dag_jax-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        z.extractall(site)
    assert "dag_jax/configs/base.py" in names and "dag_jax/configs/aesthetic.py" in names
    assert any(n.startswith("dag_jax/tinyworld/assets/tiny_sd/unet/") for n in names)
    out = subprocess.run(
        [sys.executable, "-c", CHECK_INSTALLED, str(site)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "refused: unknown config key(s): sample.trajectoriez" in out.stdout
    assert "did you mean 'sample.trajectories'" in out.stdout
