"""Prompt-image alignment (DDPO's BERTScore of LLaVA captions); tiny world: tiny CLIPScore.

    python -m dag_jax.train --config=configs/alignment.py --workdir=runs/align \
        --config.reward.options.url=http://localhost:8085
    python -m dag_jax.train --config=configs/alignment.py:demo --workdir=runs/demo

Reward: a captioning server (DDPO's LLaVA + BERTScore recall, JSON protocol, see
``dag_jax/rewards/captioning.py``) scores how well an image shows its prompt. Prompts: DDPO's
``nouns_activities`` ("a dog riding a bike", 135). Default objective DAG-DB;
--config.algo=ddpo|dag_kl|b2 for the others. The :tiny / :demo variants align the built-in tiny
world to ``tiny_clipscore`` (the judge's cosine of image and caption) on its captions: :tiny
~1 min, :demo 5–11 min on 2 CPU cores. On the first tiny world the held-out score rose a little
with DDPO, DAG-DB and DAG-KL, and with B² once its branches part early (``b2.low`` = 9). On the
world shipped since 2026-12-07 it does not rise: its base model already scores 0.83 of real
scenes' 0.89, and with batches of 256 or 1024 no step size of the policy gradient gains
(BENCHMARKS.md, "Alignment with the judge", "Policy-gradient line search"). :demo here steps
at lr 1e-3, not compressibility's 5e-3, and scales DDPO's and B²'s group baselines by one pooled
std (``ddpo.group_scale`` = "pooled"): the paired line search on the first world found a step
at lr 1e-2 costing alignment more than it gains, and two batches' gradients nearly orthogonal,
so steps must be small; and groups whose samples the judge scores alike would otherwise get
unit-size advantages of pure noise.
"""

from dag_jax.configs import base


def get_config(arg: str | None = None):
    c = base.get_config()
    c.reward.name = "bertscore"
    c.prompts.name = "nouns_activities"
    c = base.finish(c, "alignment", arg)
    if base.parse_arg(arg, algo=("dag_db", base.ALGOS), size=("", base.SIZES)).size == "demo":
        c.train.learning_rate = 1e-3
        c.ddpo.group_scale = "pooled"
        c.b2.low = 9  # B² branches part by step 1 of 10: count and colour are settled early
    return c
