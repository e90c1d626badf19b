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

from dag_jax.configs import base

TEMPLATES = ("1", "2", "3")


def get_config(arg: str | None = None):
    a = base.parse_arg(
        arg, template=("1", TEMPLATES), algo=("b2", base.ALGOS), size=("", base.SIZES)
    )
    c = base.get_config()
    c.reward.name = "clipscore"
    c.reward.options.checkpoint = ""
    c.prompts.name = f"b2_template{a.template}"
    rest = ",".join(f"{k}={a[k]}" for k in ("algo", "size"))
    return base.finish(c, "b2_template", rest, default_algo="b2")
