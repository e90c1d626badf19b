"""PickScore (DAG): SD1.5 on the HPDv2 benchmark prompts of four styles (10 per style held out).

    python -m dag_jax.train --config=configs/pickscore.py --workdir=runs/pickscore \
        --config.reward.options.model=/path/to/PickScore_v1
    python -m dag_jax.train --config=configs/pickscore.py:tiny --workdir=/tmp/pickscore

Reward: PickScore_v1 (yuvalkirstain/PickScore_v1, a CLIP ViT-H/14 fine-tuned on Pick-a-Pic
preferences), exp(logit_scale) · cosine of image and prompt embeddings, jitted in the Linen CLIP
(dag_jax/rewards/pickscore.py). ``model`` is a transformers CLIPModel folder holding its
tokenizer files, a gs:// URL of one, or the hub id (the default, fetched when online). No
release trains on PickScore: the settings are the DAG release's, and the prompts those of the
nearest released task, HPS v2 (also a CLIP ViT-H/14 human-preference reward). Default
objective DAG-DB; --config.algo=dag_kl|ddpo|b2. Expected time: like hpsv2 (~4 h on a TPU
v4-32 / 8×A100); :tiny (~1 min, CPU) uses the tiny world and ``tiny_clipscore``.
"""

from dag_jax.configs import base


def get_config(arg: str | None = None):
    c = base.get_config()
    c.reward.name = "pickscore"
    c.reward.options.model = "yuvalkirstain/PickScore_v1"
    c.prompts.name = "hpdv2"
    return base.finish(c, "pickscore", arg)
