"""HPS v2.1 (DAG): SD1.5 on the HPDv2 benchmark prompts of four styles (10 per style held out).

    python -m dag_jax.train --config=configs/hpsv2.py --workdir=runs/hpsv2 \
        --config.reward.options.checkpoint=/path/to/HPS_v2.1_compressed.pt
    python -m dag_jax.train --config=configs/hpsv2.py:tiny --workdir=/tmp/hpsv2

Reward: cosine of the HPS-fine-tuned OpenCLIP ViT-H-14 image and prompt embeddings, jitted.
Default objective DAG-DB; --config.algo=dag_kl|ddpo|b2. Expected time: ~4 h on a TPU v4-32 /
8×A100; :tiny (~1 min, CPU) uses the tiny world and ``tiny_clipscore``.
"""

from dag_jax.configs import base


def get_config(arg: str | None = None):
    c = base.get_config()
    c.reward.name = "hpsv2"
    c.reward.options.checkpoint = ""
    c.prompts.name = "hpdv2"
    return base.finish(c, "hpsv2", arg)
