"""LAION aesthetic score (DDPO/DAG): SD1.5 on DDPO's 45 simple animal prompts.

    python -m dag_jax.train --config=configs/aesthetic.py --workdir=runs/aesthetic \
        --config.reward.options.head=/path/to/sac+logos+ava1-l14-linearMSE.pth
    python -m dag_jax.train --config=configs/aesthetic.py:tiny --workdir=/tmp/aesthetic

Reward: CLIP ViT-L/14 image embedding → LAION linear head (SPEC §8), jitted on the accelerator.
The head file is published with LAION's improved-aesthetic-predictor. Default objective DAG-DB
(β = 100, annealed over the first half); --config.algo=ddpo|dag_kl|b2 for the others.
Expected time: ~3 h on a TPU v4-32 / 8×A100 (100 epochs × 512 trajectories × 50 steps); the
:tiny variant (~1 min, CPU) runs the built-in tiny world with its ``tiny_clipscore`` reward.
"""

from dag_jax.configs import base


def get_config(arg: str | None = None):
    c = base.get_config()
    c.reward.name = "aesthetic"
    c.reward.options.clip = "openai/clip-vit-large-patch14"
    c.reward.options.head = ""
    c.prompts.name = "simple_animals"
    return base.finish(c, "aesthetic", arg)
