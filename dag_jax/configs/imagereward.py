"""ImageReward (DAG): SD1.5 on the DrawBench training prompts (165; 18 held out for evaluation).

    python -m dag_jax.train --config=configs/imagereward.py --workdir=runs/imagereward \
        --config.reward.options.checkpoint=/path/to/ImageReward.pt \
        --config.reward.options.med_config=/path/to/med_config.json \
        --config.reward.options.tokenizer=/path/to/bert-base-uncased
    python -m dag_jax.train --config=configs/imagereward.py:tiny --workdir=/tmp/imagereward

Reward: ImageReward-v1.0, standardised, a Linen model (BLIP ViT-L/16 + BERT with
cross-attention + head) jitted on the accelerator beside the sampler (dag_jax/rewards/
imagereward.py; weights from ImageReward.pt, read with torch.load(weights_only=True), or a
safetensors copy, which needs no torch). Default objective DAG-DB; --config.algo=dag_kl|ddpo|b2.
Expected time: ~4 h on a TPU v4-32 / 8×A100; :tiny (~1 min, CPU) uses the tiny world and
``tiny_clipscore``.
"""

from dag_jax.configs import base


def get_config(arg: str | None = None):
    c = base.get_config()
    c.reward.name = "imagereward"
    c.reward.options.checkpoint = ""
    c.reward.options.med_config = ""
    c.reward.options.tokenizer = ""
    c.prompts.name = "drawbench"
    return base.finish(c, "imagereward", arg)
