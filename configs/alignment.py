"""Prompt-image alignment (DDPO's BERTScore of LLaVA captions); tiny world: tiny CLIPScore.

    python -m dag_jax.train --config=configs/alignment.py --workdir=runs/align \
        --config.reward.options.url=http://localhost:8085
    python -m dag_jax.train --config=configs/alignment.py:demo --workdir=runs/demo

Reward: a captioning server (DDPO's LLaVA + BERTScore recall, JSON protocol, see
``dag_jax/rewards/captioning.py``) scores how well an image shows its prompt. Prompts: DDPO's
``nouns_activities`` ("a dog riding a bike", 135). Default objective DAG-DB;
--config.algo=ddpo|dag_kl|b2 for the others. The :tiny / :demo variants align the built-in tiny
world to ``tiny_clipscore`` (the tiny CLIP's cosine of image and caption) on its captions:
:tiny ~1 min, :demo 7–11 min on 2 CPU cores; at :demo's settings the tiny CLIPScore does not
rise yet with any objective (BENCHMARKS.md, "Demo runs": the tiny CLIP reads little beyond
colour and background, which the base model mostly gets right).
"""

import runpy
from pathlib import Path

base = runpy.run_path(str(Path(__file__).with_name("base.py")))


def get_config(arg: str | None = None):
    c = base["get_config"]()
    c.reward.name = "bertscore"
    c.prompts.name = "nouns_activities"
    return base["variant"](c, arg)
