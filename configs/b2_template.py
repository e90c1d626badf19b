"""B²-DiffuRL on its prompt templates: ``:1`` animal×activity, ``:2`` colour×fruit, ``:3`` spatial.

    python -m dag_jax.train --config=configs/b2_template.py:1 --workdir=runs/b2_t1 \
        --config.reward.options.checkpoint=/path/to/open_clip_vit_h14.safetensors
    python -m dag_jax.train --config=configs/b2_template.py:2,tiny --workdir=/tmp/b2_t2
    python -m dag_jax.train --config=configs/b2_template.py:1 --config.b2.objective=dag_kl ...

Released B² settings (SPEC §7): 100 stages of 256 prefixes × 5 branches, 20 DDIM steps,
intervals growing backward from 14 to 20 steps, history-pooled z-scores with ±0.5 best/worst
selection, PPO (ε = 0.1) 2 passes per stage, AdamW lr 1e-4. Reward: CLIPScore (OpenCLIP
ViT-H-14); ``--config.reward.name=bertscore`` for the captioning-server reward. With
``b2.objective=dag_db|dag_kl`` the branch sampler and intervals drive the DAG objectives
(selection off). Expected time: ~2 h on a TPU v4-32; :tiny ~1 min on a CPU (tiny world,
``tiny_clipscore``).
"""

import runpy
from pathlib import Path

base = runpy.run_path(str(Path(__file__).with_name("base.py")))


def get_config(arg: str | None = None):
    parts = [p.strip() for p in (arg or "1").split(",")]
    template, size = parts[0], (parts[1] if len(parts) > 1 else "")
    if template not in ("1", "2", "3"):
        raise ValueError(f"b2_template.py needs :1, :2 or :3 (then ,tiny), got {arg!r}")
    c = base["get_config"]()
    c.algo = "b2"
    c.reward.name = "clipscore"
    c.reward.options.checkpoint = ""
    c.prompts.name = f"b2_template{template}"
    c.sample.steps = 20
    c.sample.chunk = 32
    c.train.learning_rate = 1e-4
    c.train.trajectories_per_step = 128
    return base["variant"](c, size)
