"""JPEG compressibility (DDPO/DAG): make SD1.5 images compress well, on ImageNet animal prompts.

    python -m dag_jax.train --config=configs/compressibility.py --workdir=runs/compress
    python -m dag_jax.train --config=configs/compressibility.py:tiny --workdir=/tmp/compress

Reward: −(JPEG size in kB at quality 95), a host reward (PIL). Prompts: DDPO's ImageNet animal
classes (``imagenet_animals``: set --config.prompts.root to a folder with imagenet_classes.txt
when offline). Default objective DAG-DB; --config.algo=ddpo|dag_kl|b2 for the others.
Expected time: ~3 h on a TPU v4-32 / 8×A100 at the released 100 epochs × 512 trajectories;
the :tiny variant ~1 min on a laptop CPU (the built-in tiny world and its captions);
:demo 4–8 min on 2 idle cores (20 × 128 trajectories), where the held-out reward rises with
DAG-DB and DAG-KL about 1.5× as much as with DDPO and B², and a little with GRPO (KL 0.04)
(BENCHMARKS.md, "Demo runs", 3 seeds).
"""

from dag_jax.configs import base


def get_config(arg: str | None = None):
    c = base.get_config()
    c.reward.name = "jpeg_compressibility"
    c.prompts.name = "imagenet_animals"
    return base.finish(c, "compressibility", arg)
