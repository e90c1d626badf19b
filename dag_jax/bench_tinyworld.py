"""Reward rise in the tiny world: ``python -m dag_jax.bench tinyworld`` (see ``dag_jax/bench.py``).

    python -m dag_jax.bench tinyworld --algos=ddpo,dag_db,dag_kl,b2 \
        --tasks=compressibility,alignment --seeds=3 --json=tinyworld.json

Trains the ``:demo`` variant of each task's config (``configs/<task>.py:demo``: the built-in
tiny world, its captions, ``jpeg_compressibility`` or ``tiny_clipscore``) with each algorithm
and seed, in a fresh workdir under ``--workdir`` (default: a temporary folder), and records
from its ``metrics.jsonl``:

  reward_before  mean reward of the first epoch's trajectories (sampled by the base model)
  reward_after   mean reward of the last epoch's trajectories
  reward_rise    after − before
  seconds        wall time of the run (compilation included)

``impl`` is the algorithm (``b2`` = B² with its PPO objective); ``config`` holds the task, the
seed and the epochs. ``format_rise`` turns the records into a mean ± std table over seeds.
"""

from __future__ import annotations

import runpy
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("compressibility", "alignment")
ALGOS = ("ddpo", "dag_db", "dag_kl", "b2")


def demo_config(task: str, algo: str, seed: int, epochs: int = 0):
    """Return ``configs/<task>.py:demo`` with ``algo`` and ``seed`` (and ``epochs`` if > 0)."""
    path = ROOT / "configs" / f"{task}.py"
    if not path.is_file():
        raise ValueError(f"unknown task {task!r}: no {path}; known: {', '.join(TASKS)}")
    if algo not in ALGOS:
        raise ValueError(f"unknown algorithm {algo!r}; known: {', '.join(ALGOS)}")
    c = runpy.run_path(str(path))["get_config"]("demo")
    c.algo = algo
    c.seed = seed
    if epochs:
        c.train.epochs = epochs
        c.b2.stages = epochs
    c.log.grid_every_epochs = 0
    return c


def run_one(task: str, algo: str, seed: int, workdir: Path, epochs: int = 0) -> dict:
    """Train one demo run in ``workdir``; return its before/after rewards and seconds."""
    from dag_jax import train
    from dag_jax.metrics import read_metrics

    config = demo_config(task, algo, seed, epochs)
    t0 = time.time()
    train.train_and_evaluate(config, str(workdir))
    seconds = time.time() - t0
    rows = read_metrics(workdir)
    return {
        "reward_before": float(rows[0]["reward_mean"]),
        "reward_after": float(rows[-1]["reward_mean"]),
        "epochs": int(rows[-1]["epoch"]),
        "seconds": seconds,
    }


def bench_tinyworld(settings) -> list[dict]:
    """Return ``dag_jax.bench`` records for every (task, algorithm, seed) of ``settings``."""
    from dag_jax.bench import machine_info, record

    tasks = [t for t in settings.tasks.split(",") if t]
    algos = [a for a in settings.algos.split(",") if a]
    for task in tasks:  # fail on a bad name before hours of training
        for algo in algos:
            demo_config(task, algo, 0)
    root = Path(settings.workdir) if settings.workdir else Path(tempfile.mkdtemp("tinyworld"))
    records = []
    for task in tasks:
        for algo in algos:
            for seed in range(settings.seed, settings.seed + settings.seeds):
                out = run_one(task, algo, seed, root / f"{task}_{algo}_{seed}", settings.epochs)
                config = {"task": task, "seed": seed, "epochs": out["epochs"], **machine_info()}
                rise = out["reward_after"] - out["reward_before"]
                for metric, value, unit in (
                    ("reward_before", out["reward_before"], "reward"),
                    ("reward_after", out["reward_after"], "reward"),
                    ("reward_rise", rise, "reward"),
                    ("seconds", out["seconds"], "s"),
                ):
                    records.append(record("tinyworld", algo, metric, value, unit, config))
                print(
                    f"[tinyworld] {task} {algo} seed {seed}: {out['reward_before']:.4f} -> "
                    f"{out['reward_after']:.4f} in {out['seconds']:.0f}s",
                    flush=True,
                )
    return records


def format_rise(records: list[dict]) -> str:
    """Return a markdown table: per task and algorithm, mean ± std over seeds."""
    groups: dict[tuple[str, str], dict[str, list[float]]] = {}
    for r in records:
        if r["bench"] != "tinyworld":
            continue
        key = (r["config"]["task"], r["impl"])
        groups.setdefault(key, {}).setdefault(r["metric"], []).append(r["value"])
    lines = [
        "| task | algorithm | seeds | reward before | reward after | rise | s per run |",
        "|---|---|---|---|---|---|---|",
    ]

    def ms(values: list[float], digits: int = 4) -> str:
        v = np.asarray(values, np.float64)
        return f"{v.mean():.{digits}f} ± {v.std():.{digits}f}"

    for (task, algo), m in sorted(groups.items()):
        lines.append(
            f"| {task} | {algo} | {len(m['reward_rise'])} | {ms(m['reward_before'])} | "
            f"{ms(m['reward_after'])} | {ms(m['reward_rise'])} | {np.mean(m['seconds']):.0f} |"
        )
    return "\n".join(lines)
