"""Evaluate a run: reward and diversity on train and held-out prompts, and image grids.

    python -m dag_jax.eval --workdir=RUN [--step=N | --base] [--ema] --prompts=test|train|both \
        --num_per_prompt=K --seed=S [--extra_rewards=a,b] [--feature_model=PATH] [--batch_size=B]

What it does (SPEC §9):

1. rebuilds the run from ``RUN/config.json`` (``dag_jax.train.workdir.restore_run``: the
   training builders, then ``build_phases``) and restores the LoRA of checkpoint ``--step``
   (default: the latest) from ``RUN/checkpoints``; ``--base`` evaluates the base model instead
   (the initial LoRA, whose B = 0, adds nothing), ``--ema`` the checkpoint's EMA weights
   (``train.ema_decay`` > 0; written to ``RUN/eval/<step>-ema/``);
2. samples K images for every prompt of each split with the run's sampler (DDIM steps, η,
   guidance, negative prompt; ``--eta`` overrides η). Noise is fixed: image j of prompt p of
   split s comes from the per-sample key ``fold_in(fold_in(key(seed), s), p·2¹⁶ + j)``, the
   same for the base model and every checkpoint, whatever K, the batch size or the device
   count;
3. scores every image with the run's reward (``config.reward``) and any ``--extra_rewards``;
   embeds it with the feature extractor (``dag_jax.eval.features``: CLIP image embeddings; the
   tiny CLIP for tiny-world runs);
4. writes ``RUN/eval/<step>/`` (or ``RUN/eval/base/``): ``eval.json``, ``samples.npz``
   (features, rewards and the grid images), ``grid_<split>.png`` (prompts × seeds) and, for a
   checkpoint, ``compare_<split>.png`` (for each prompt a base row above an aligned row).

A checkpoint's Fréchet distance to the base model needs the base model's samples: they are
read from ``RUN/eval/base/`` when that was evaluated with the same settings, else sampled
(and written there) first.

Splits: a named prompt set's ``train`` / ``test`` (``dag_jax.data.prompts``; sets without a
held-out split skip ``test`` with a note). Inline prompt sets (the ``:tiny`` configs) have no
split of their own: their held-out prompts are ``TINY_TEST_PROMPTS``, recombinations of the
colours, counts and shapes of the tiny training prompts (minus any the run trained on).
``--test_prompt`` (repeatable) replaces the test prompts of any run; ``--max_prompts`` keeps the
first N of each split.

``eval.json``::

    {"workdir", "tag", "step" (null for base), "base", "ema", "label", "algo", "objective", "model",
     "reward" (the run's reward name), "trajectories_seen", "unique_trajectories",
     "feature_model", "settings": {num_per_prompt, seed, steps, eta, guidance, negative_prompt,
     resolution, batch_size, feature_model},
     "splits": {"train"|"test": {"prompts", "num_images",
        "rewards": {name: {"mean", "std", "per_prompt_mean": [...],
                           "change", "change_se" (checkpoints: paired_change to the base)}},
        "diversity": {"pairwise", "vendi", "pairwise_per_prompt", "vendi_per_prompt"},
        "frechet_to_base" (null for base)}},
     "skipped": {split: reason}}

Pairwise diversity and Vendi score are per prompt (over its K images), then averaged over
prompts; the Fréchet distance pools all images of a split. Non-finite numbers are ``null``.
Runs in one process (the images are gathered on the host); the batch is split over its local
devices. The training loop evaluates with the same code (``LoopEvaluator``, ``config.eval``).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from etils import epath

from dag_jax import rewards
from dag_jax.eval import diversity
from dag_jax.eval.features import FeatureExtractor, default_feature_model, load_feature_extractor
from dag_jax.infra import console, cpu_tuning, parallel
from dag_jax.infra.captions import captioned_grid, compare_captions
from dag_jax.infra.metrics import to_json_number
from dag_jax.rewards.base import scorer
from dag_jax.rewards.mix import named_parts
from dag_jax.train.config import ConfigError, objective_of
from dag_jax.train.phases import Phases, build_phases
from dag_jax.train.run import load_prompts, put_batch
from dag_jax.train.workdir import Run, restore_run, url_scheme, workdir_path

log = logging.getLogger("dag_jax.eval.evaluate")

SPLITS = ("train", "test")
# Held-out prompts of inline (tiny-world) prompt sets: the :tiny training prompts' colours,
# counts and shapes recombined.
TINY_TEST_PROMPTS = (
    "a blue circle",
    "a red square",
    "two yellow triangles",
    "a green star",
    "two red circles",
    "a yellow square",
)
SEED_STRIDE = 1 << 16  # sample index of (prompt p, seed j) = p * SEED_STRIDE + j
EVAL_DIR = "eval"
BASE_TAG = "base"
SETTINGS_THAT_FIX_SAMPLES = (
    "num_per_prompt",
    "seed",
    "steps",
    "eta",
    "guidance",
    "negative_prompt",
    "resolution",
    "model",
    "feature_model",
)


# --------------------------------------------------------------------------- prompts


def prompt_splits(
    config, test_prompts: Sequence[str] | None = None, max_prompts: int = 0
) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Return ({split: prompts}, {split: why it is empty}) of a run's config.

    See the module docstring for the rules; ``max_prompts`` > 0 keeps the first N per split.
    """
    train_prompts = load_prompts(config)
    if config.prompts.name == "inline":
        trained = set(train_prompts)
        test = [p for p in TINY_TEST_PROMPTS if p not in trained]
    else:
        from dag_jax.data import prompts as prompt_sets

        test = list(prompt_sets.from_config(config.prompts).test)
    if test_prompts:
        test = [str(p) for p in test_prompts]
    splits = {"train": list(train_prompts), "test": test}
    if max_prompts > 0:
        splits = {k: v[:max_prompts] for k, v in splits.items()}
    skipped = {}
    if not splits["test"]:
        skipped["test"] = (
            f"prompt set {config.prompts.name!r} has no held-out prompts (pass --test_prompt)"
        )
    return splits, skipped


# --------------------------------------------------------------------------- sampling


@dataclasses.dataclass
class SplitSamples:
    """What the evaluation keeps of one split's images (P prompts × K seeds)."""

    prompts: list[str]
    rewards: dict[str, np.ndarray]  # name -> (P, K) float32
    features: np.ndarray  # (P, K, D) float32
    grid: np.ndarray  # (grid prompts, grid seeds, H, W, 3) uint8


def split_key(seed: int, split: str) -> jax.Array:
    """Return the evaluation key of a split: ``fold_in(key(seed), index of split)``."""
    return jax.random.fold_in(jax.random.key(seed), SPLITS.index(split))


def sample_indices(num_prompts: int, num_per_prompt: int) -> np.ndarray:
    """Return the (P·K,) sample indices p·2¹⁶ + j, prompt-major (the per-sample key salts)."""
    if num_per_prompt >= SEED_STRIDE or num_prompts * SEED_STRIDE >= 1 << 32:
        raise ValueError(f"too many prompts ({num_prompts}) or seeds ({num_per_prompt})")
    p, j = np.meshgrid(np.arange(num_prompts), np.arange(num_per_prompt), indexing="ij")
    return (p * SEED_STRIDE + j).reshape(-1).astype(np.uint32)


@dataclasses.dataclass
class Evaluator:
    """Samples, scores and embeds the images of one run's model, base or aligned."""

    run: Run
    phases: Phases
    extractor: FeatureExtractor
    rewards: dict[str, rewards.Reward]
    num_per_prompt: int
    seed: int
    batch_size: int
    grid_prompts: int = 4
    grid_seeds: int = 4
    progress: bool = True

    def sample_split(self, trainable: dict, split: str, prompts: Sequence[str]) -> SplitSamples:
        """Return the SplitSamples of ``trainable``'s LoRA on ``prompts``."""
        from tqdm.auto import tqdm

        model, mesh, k = self.run.model, self.run.mesh, self.num_per_prompt
        ids = model.pipe.encode_prompt_ids(list(prompts))
        salts = sample_indices(len(prompts), k)
        n, bs = salts.size, self.batch_size
        ekey = split_key(self.seed, split)
        scorers = {
            name: scorer(r, prompts, to_host=parallel.gather) for name, r in self.rewards.items()
        }
        scores: dict[str, list[np.ndarray]] = {name: [] for name in scorers}
        feats: list[np.ndarray] = []
        gp, gs = min(self.grid_prompts, len(prompts)), min(self.grid_seeds, k)
        grid = None
        batches = range(0, n, bs)
        bar = tqdm(batches, desc=f"{split} ({n} images)", unit="batch", disable=not self.progress)
        for lo in bar:
            rows = np.minimum(np.arange(lo, lo + bs), n - 1)  # the last batch repeats its end
            valid = min(bs, n - lo)
            prompt_idx = rows // k
            _, images = self.phases.sample(
                model.frozen,
                trainable,
                put_batch(mesh, ids[prompt_idx]),
                put_batch(mesh, salts[rows].astype(np.int32)),
                ekey,
            )
            for name, score in scorers.items():
                scores[name].append(score(images, prompt_idx)[:valid])
            host = parallel.gather(images)  # every process holds every image
            feats.append(self.extractor(host)[:valid])
            host = host[:valid]
            if grid is None:
                grid = np.zeros((gp, gs, *host.shape[1:]), np.uint8)
            for i, row in enumerate(rows[:valid]):
                p, j = divmod(int(row), k)
                if p < gp and j < gs:
                    grid[p, j] = np.round(np.clip(host[i], 0, 1) * 255).astype(np.uint8)
        p = len(prompts)
        return SplitSamples(
            prompts=list(prompts),
            rewards={name: np.concatenate(v).reshape(p, k) for name, v in scores.items()},
            features=np.concatenate(feats).reshape(p, k, -1),
            grid=grid,
        )


def sample_model(
    ev: Evaluator, trainable: dict, splits: Mapping[str, Sequence[str]]
) -> dict[str, SplitSamples]:
    """Return {split: SplitSamples} of ``trainable``'s LoRA on every split's prompts."""
    return {split: ev.sample_split(trainable, split, p) for split, p in splits.items()}


def evaluation_config(config, eta: float | None = None):
    """Return a copy of a run's config as the evaluation samples with it: every seed draws
    its own x_T (no ``sample.group`` or GRPO groups); ``eta`` (None: the run's) for DDIM's η."""
    config = config.copy_and_resolve_references()
    if eta is not None:
        config.sample.eta = float(eta)
    config.sample.group = 1  # every evaluation seed draws its own x_T
    config.grpo.share_noise = False  # (GRPO's groups too, train.config.noise_group)
    return config


def make_evaluator(
    run: Run,
    *,
    num_per_prompt: int,
    seed: int,
    extra_rewards: Sequence[str] = (),
    reward_options: Mapping[str, Mapping[str, Any]] | None = None,
    feature_model: str | None = None,
    batch_size: int = 0,
    grid_prompts: int = 4,
    grid_seeds: int = 4,
    progress: bool = True,
) -> Evaluator:
    """Return the Evaluator of ``run`` (whose config is an ``evaluation_config``): the run's
    reward and ``extra_rewards``, the feature extractor (None: the model's default) and the
    sampler; ``batch_size`` 0 uses the run's ``sample.chunk``. What ``evaluate`` and the
    training loop's evaluation (``LoopEvaluator``) both sample with."""
    extractor = load_feature_extractor(
        feature_model or default_feature_model(str(run.config.model))
    )
    named_rewards = {str(run.config.reward.name): run.model.reward}
    options = dict(reward_options or {})
    for name in extra_rewards:
        named_rewards.setdefault(name, rewards.get(name, **dict(options.get(name, {}))))
    for name, reward in list(named_rewards.items()):  # a mix's parts too, as "<mix>/<part>"
        named_rewards.update(named_parts(name, reward))
    return Evaluator(
        run=run,
        phases=build_phases(run.model, run.config, run.tx),
        extractor=extractor,
        rewards=named_rewards,
        num_per_prompt=num_per_prompt,
        seed=seed,
        batch_size=batch_size or int(run.config.sample.chunk),
        grid_prompts=grid_prompts,
        grid_seeds=grid_seeds,
        progress=progress,
    )


# --------------------------------------------------------------------------- metrics


def paired_change(values: np.ndarray, base: np.ndarray) -> tuple[float, float]:
    """Return (mean change, its standard error) of (P, K) rewards against the base model's.

    Paired: image j of prompt p has the same noise in both. The standard error is over
    prompts (each prompt's K differences averaged first, as a prompt's images share it):
    std(d_p, ddof=1) / √P; NaN for one prompt.
    """
    diff = np.mean(np.asarray(values, np.float64) - np.asarray(base, np.float64), axis=1)
    se = float(np.std(diff, ddof=1) / np.sqrt(diff.size)) if diff.size > 1 else float("nan")
    return float(np.mean(diff)), se


def reward_stats(values: np.ndarray) -> dict[str, Any]:
    """Return {"mean", "std", "per_prompt_mean"} of (P, K) rewards."""
    return {
        "mean": float(np.mean(values)),
        "std": float(np.std(values)),
        "per_prompt_mean": [float(v) for v in np.mean(values, axis=1)],
    }


def diversity_stats(features: np.ndarray) -> dict[str, Any]:
    """Return per-prompt pairwise diversity and Vendi score of (P, K, D) features, and means."""
    out: dict[str, Any] = {"vendi_per_prompt": [diversity.vendi_score(f) for f in features]}
    out["vendi"] = float(np.mean(out["vendi_per_prompt"]))
    if features.shape[1] >= 2:
        out["pairwise_per_prompt"] = [diversity.pairwise_diversity(f) for f in features]
        out["pairwise"] = float(np.mean(out["pairwise_per_prompt"]))
    else:  # one image per prompt: no pairs
        out["pairwise_per_prompt"], out["pairwise"] = [], None
    return out


def split_metrics(samples: SplitSamples, base: SplitSamples | None) -> dict[str, Any]:
    """Return the eval.json entry of one split (``base``: the base model's samples, or None)."""
    flat = samples.features.reshape(-1, samples.features.shape[-1])
    frechet = None
    if base is not None and flat.shape[0] >= 2:
        base_flat = base.features.reshape(-1, base.features.shape[-1])
        frechet = diversity.frechet_distance(flat, base_flat)
    stats = {name: reward_stats(v) for name, v in samples.rewards.items()}
    for name, v in samples.rewards.items():  # paired: the same prompts and noise as the base
        if base is not None and name in base.rewards and base.rewards[name].shape == v.shape:
            change, se = paired_change(v, base.rewards[name])
            stats[name].update(change=change, change_se=se)
    return {
        "prompts": samples.prompts,
        "num_images": int(flat.shape[0]),
        "rewards": stats,
        "diversity": diversity_stats(samples.features),
        "frechet_to_base": frechet,
    }


def model_metrics(
    samples: Mapping[str, SplitSamples], base: Mapping[str, SplitSamples] | None
) -> dict[str, Any]:
    """Return eval.json's "splits": {split: split_metrics} (``base``: the base model's samples)."""
    return {
        split: split_metrics(s, None if base is None else base[split])
        for split, s in samples.items()
    }


# --------------------------------------------------------------------------- files


def _write_whole(path: epath.Path, data: bytes) -> None:
    """Write ``path`` at once: locally to a temporary name renamed into place; on an object
    store (``gs://``) as one upload, which replaces the object when it completes."""
    if url_scheme(path) is not None:
        path.write_bytes(data)
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def save_samples(path: epath.Path, samples: Mapping[str, SplitSamples]) -> None:
    """Write the splits' features, rewards, prompts and grid images to an .npz file."""
    arrays = {}
    for split, s in samples.items():
        arrays[f"{split}__features"] = s.features
        arrays[f"{split}__grid"] = s.grid
        arrays[f"{split}__prompts"] = np.asarray(s.prompts, dtype=np.str_)
        for name, v in s.rewards.items():
            arrays[f"{split}__reward__{name}"] = v
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    _write_whole(epath.Path(path), buffer.getvalue())


def load_samples(path: epath.Path) -> dict[str, SplitSamples]:
    """Read what ``save_samples`` wrote."""
    out = {}
    with np.load(io.BytesIO(epath.Path(path).read_bytes())) as data:
        for split in SPLITS:
            if f"{split}__features" not in data:
                continue
            prefix = f"{split}__reward__"
            out[split] = SplitSamples(
                prompts=[str(p) for p in data[f"{split}__prompts"]],
                rewards={k[len(prefix) :]: data[k] for k in data.files if k.startswith(prefix)},
                features=data[f"{split}__features"],
                grid=data[f"{split}__grid"],
            )
    return out


def write_grid(path: epath.Path, grid: np.ndarray, captions: Sequence[str] | None = None) -> None:
    """Write a (rows, cols, H, W, 3) uint8 image array as one PNG grid, each row under its
    caption (``captions``: one per row, e.g. its prompt; None: no captions)."""
    from PIL import Image

    rows, cols = grid.shape[:2]
    images = grid.reshape(rows * cols, *grid.shape[2:])
    tiled = captioned_grid(images, rows=rows, row_captions=captions)
    png = io.BytesIO()
    Image.fromarray(tiled).save(png, format="PNG")
    _write_whole(epath.Path(path), png.getvalue())


def compare_grid(base: np.ndarray, aligned: np.ndarray) -> np.ndarray:
    """Return (2·P, K, H, W, 3): for each prompt its base row, then its aligned row."""
    return np.stack([base, aligned], axis=1).reshape(-1, *base.shape[1:])


def _json_ready(value: Any) -> Any:
    """Return ``value`` with non-finite floats as None and NumPy scalars as Python numbers."""
    if isinstance(value, Mapping):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    if isinstance(value, float | np.floating | np.integer):
        return to_json_number(value)
    return value


def write_json(path: epath.Path, data: Mapping[str, Any]) -> None:
    """Write ``data`` as indented JSON (atomically)."""
    text = json.dumps(_json_ready(data), indent=2, allow_nan=False)
    _write_whole(epath.Path(path), text.encode("utf-8"))


# --------------------------------------------------------------------------- evaluate


def run_label(config: Mapping[str, Any]) -> str:
    """Return the algorithm label of a run: ``algo``, or ``b2/<objective>`` for B² runs."""
    from dag_jax.eval.plot import run_label as label

    return label(config)


def _settings(run: Run, ev: Evaluator) -> dict[str, Any]:
    c = run.config
    return {
        "num_per_prompt": ev.num_per_prompt,
        "seed": ev.seed,
        "steps": int(c.sample.steps),
        "eta": float(c.sample.eta),
        "guidance": float(c.sample.guidance),
        "negative_prompt": str(c.prompts.negative),
        "resolution": int(c.resolution),
        "model": str(c.model),
        "feature_model": ev.extractor.name,
        "batch_size": ev.batch_size,
    }


def _cached_base(
    eval_root: epath.Path, settings: Mapping[str, Any], splits: Mapping[str, list[str]]
) -> dict[str, SplitSamples] | None:
    """Return the base model's samples in ``eval_root/base`` if they fit, else None."""
    folder = eval_root / BASE_TAG
    try:
        stored = json.loads((folder / "eval.json").read_text(encoding="utf-8"))
        samples = load_samples(folder / "samples.npz")
    except (OSError, ValueError):
        return None
    same = all(stored.get("settings", {}).get(k) == settings[k] for k in SETTINGS_THAT_FIX_SAMPLES)
    fits = all(split in samples and samples[split].prompts == p for split, p in splits.items())
    return samples if same and fits else None


def _evaluate_model(
    ev: Evaluator,
    trainable: dict,
    tag: str,
    splits: Mapping[str, list[str]],
    skipped: Mapping[str, str],
    out: epath.Path,
    base: Mapping[str, SplitSamples] | None,
) -> dict[str, Any]:
    """Sample, score and embed one model; write its eval folder; return its eval.json dict."""
    log.info("evaluating %s of %s", tag, ev.run.workdir)
    return _write_model(ev, tag, sample_model(ev, trainable, splits), skipped, out, base)


def _write_model(
    ev: Evaluator,
    tag: str,
    samples: Mapping[str, SplitSamples],
    skipped: Mapping[str, str],
    out: epath.Path,
    base: Mapping[str, SplitSamples] | None,
) -> dict[str, Any]:
    """Write one model's eval folder ``out/tag`` from its samples; return its eval.json dict."""
    run, c = ev.run, ev.run.config
    folder = out / tag
    folder.mkdir(parents=True, exist_ok=True)
    save_samples(folder / "samples.npz", samples)
    for split, s in samples.items():
        rows = len(s.grid)
        write_grid(folder / f"grid_{split}.png", s.grid, list(s.prompts[:rows]))
        if base is not None:
            pair = compare_grid(base[split].grid, s.grid)
            write_grid(folder / f"compare_{split}.png", pair, compare_captions(s.prompts, rows))
    extra = run.extra if tag != BASE_TAG else {}
    result = {
        "workdir": str(run.workdir),
        "tag": tag,
        "step": None if tag == BASE_TAG else run.step,
        "base": tag == BASE_TAG,
        "ema": run.ema and tag != BASE_TAG,
        "label": run_label(c.to_dict()),
        "algo": str(c.algo),
        "objective": objective_of(c),
        "model": str(c.model),
        "reward": str(c.reward.name),
        "trajectories_seen": extra.get("trajectories_seen", 0),
        "unique_trajectories": extra.get("unique_trajectories", 0),
        "feature_model": ev.extractor.name,
        "settings": _settings(run, ev),
        "splits": model_metrics(samples, base),
        "skipped": dict(skipped),
    }
    write_json(folder / "eval.json", result)
    log.info("wrote %s", folder / "eval.json")
    return result


def evaluate(
    workdir: str | os.PathLike,
    *,
    step: int | None = None,
    base: bool = False,
    prompts: str = "both",
    num_per_prompt: int = 4,
    seed: int = 0,
    extra_rewards: Sequence[str] = (),
    reward_options: Mapping[str, Mapping[str, Any]] | None = None,
    feature_model: str | None = None,
    batch_size: int = 0,
    test_prompts: Sequence[str] | None = None,
    max_prompts: int = 0,
    grid_prompts: int = 4,
    grid_seeds: int = 4,
    eta: float | None = None,
    out: str | os.PathLike | None = None,
    progress: bool = True,
    ema: bool = False,
) -> dict[str, Any]:
    """Evaluate checkpoint ``step`` (None: the latest) or the base model; return eval.json's dict.

    ``ema`` evaluates the checkpoint's EMA weights (``train.ema_decay`` > 0) into
    ``out/<step>-ema/``. Writes ``out/<step>/`` or ``out/base/`` (``out`` defaults to
    ``workdir/eval``); see the
    module docstring. ``prompts`` is "train", "test" or "both"; ``batch_size`` 0 uses the
    run's ``sample.chunk``; ``reward_options`` maps an extra reward's name to its options.
    """
    if prompts not in ("train", "test", "both"):
        raise ValueError(f"prompts must be train, test or both, got {prompts!r}")
    if num_per_prompt < 1:
        raise ValueError(f"num_per_prompt must be >= 1, got {num_per_prompt}")
    run = restore_run(workdir, step, restore=not base, ema=ema)
    run = dataclasses.replace(run, config=evaluation_config(run.config, eta))
    wanted = SPLITS if prompts == "both" else (prompts,)
    all_splits, skipped = prompt_splits(run.config, test_prompts, max_prompts)
    splits = {s: all_splits[s] for s in wanted if all_splits[s]}
    skipped = {s: why for s, why in skipped.items() if s in wanted}
    for split, why in skipped.items():
        log.warning("skipping the %s split: %s", split, why)
    if not splits:
        raise ValueError(f"nothing to evaluate: {'; '.join(skipped.values())}")
    ev = make_evaluator(
        run,
        num_per_prompt=num_per_prompt,
        seed=seed,
        extra_rewards=extra_rewards,
        reward_options=reward_options,
        feature_model=feature_model,
        batch_size=batch_size,
        grid_prompts=grid_prompts,
        grid_seeds=grid_seeds,
        progress=progress,
    )
    out = workdir_path(out) if out is not None else run.workdir / EVAL_DIR
    if base:
        return _evaluate_model(ev, run.initial, BASE_TAG, splits, skipped, out, None)
    base_samples = _cached_base(out, _settings(run, ev), splits)
    if base_samples is None:
        _evaluate_model(ev, run.initial, BASE_TAG, splits, skipped, out, None)
        base_samples = load_samples(out / BASE_TAG / "samples.npz")
    else:
        log.info("reusing the base model's samples in %s", out / BASE_TAG)
    tag = f"{run.step}-ema" if run.ema else str(run.step)
    return _evaluate_model(ev, run.trainable, tag, splits, skipped, out, base_samples)


# --------------------------------------------------------------------------- in the training loop


class LoopEvaluator:
    """The evaluation inside the training loop (``config.eval``), with ``evaluate``'s code.

    Built once per run, before the first epoch (a split with no prompts, e.g. a prompt set
    without a held-out split and no ``eval.test_prompts``, raises ConfigError then), when it
    also takes the base model's samples (from ``initial``, before training donates it) and
    keeps them in memory: read from ``workdir/eval/base`` when a run of ``python -m
    dag_jax.eval`` (or an earlier stretch of this run) left them there with the same
    settings, else sampled and written there, as ``evaluate`` would. Calling it with a
    trainable tree returns (scalars, compare grids). Every process must build and call it
    (sampling gathers the images); only process 0 writes.
    """

    def __init__(self, model, config, mesh, tx, initial: dict, workdir: str | os.PathLike):
        e = config.eval
        test_prompts = [str(p) for p in e.test_prompts] or None
        wanted = SPLITS if e.prompts == "both" else (e.prompts,)
        all_splits, skipped = prompt_splits(config, test_prompts, int(e.max_prompts))
        self.splits = {s: all_splits[s] for s in wanted if all_splits[s]}
        self.skipped = {s: why for s, why in skipped.items() if s in wanted}
        if not self.splits:
            raise ConfigError(
                f"config.eval: nothing to evaluate ({'; '.join(self.skipped.values())}); set "
                "eval.test_prompts or eval.prompts=train"
            )
        for split, why in self.skipped.items():
            log.warning("eval in the loop skips the %s split: %s", split, why)
        run = Run(workdir_path(workdir), evaluation_config(config), mesh, model, tx, initial)
        self.ev = make_evaluator(
            run,
            num_per_prompt=int(e.num_per_prompt),
            seed=int(e.seed),
            feature_model=str(e.feature_model) or None,
            batch_size=int(e.batch_size),
            grid_prompts=int(e.grid_prompts),
            grid_seeds=int(e.grid_seeds),
            progress=False,
        )
        self.reward = str(config.reward.name)
        self.base = self._base_samples()

    def _base_samples(self) -> dict[str, SplitSamples]:
        """Return the base model's samples: read if they fit, else taken and written."""
        ev, run = self.ev, self.ev.run
        out = run.workdir / EVAL_DIR
        cached = _cached_base(out, _settings(run, ev), self.splits)
        grid = lambda p: (min(ev.grid_prompts, len(p)), min(ev.grid_seeds, ev.num_per_prompt))
        if cached is not None and all(
            cached[s].grid.shape[:2] == grid(p) and self.reward in cached[s].rewards
            for s, p in self.splits.items()
        ):
            log.info("eval: reusing the base model's samples in %s", out / BASE_TAG)
            return {s: cached[s] for s in self.splits}
        log.info("eval: sampling the base model")
        base = sample_model(ev, run.initial, self.splits)
        if jax.process_index() == 0:
            _write_model(ev, BASE_TAG, base, self.skipped, out, None)
        return base

    def __call__(self, trainable: dict) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        """Return ({"eval/<split>/<metric>": value}, {split: compare grid}) of ``trainable``.

        Metrics (the run's reward): ``reward_mean``, ``reward_std``, ``base_reward_mean``,
        ``reward_change`` and ``reward_change_se`` (paired with the base model, the standard
        error over prompts), ``pairwise``, ``vendi``, ``frechet_to_base`` (NaN where eval.json
        has null). Grids are (2·prompts, seeds, H, W, 3) uint8: base row above current row.
        """
        base = self.base
        samples = sample_model(self.ev, trainable, self.splits)
        return loop_scalars(model_metrics(samples, base), self.reward), {
            split: compare_grid(base[split].grid, s.grid) for split, s in samples.items()
        }


def loop_scalars(splits: Mapping[str, Any], reward: str) -> dict[str, float]:
    """Return the ``eval/<split>/<metric>`` scalars of eval.json's "splits" (see LoopEvaluator)."""
    nan = lambda v: float("nan") if v is None else float(v)
    out = {}
    for split, m in splits.items():
        r, d = m["rewards"][reward], m["diversity"]
        change = r.get("change")
        values = {
            "reward_mean": r["mean"],
            "reward_std": r["std"],
            "base_reward_mean": None if change is None else r["mean"] - change,
            "reward_change": change,
            "reward_change_se": r.get("change_se"),
            "pairwise": d["pairwise"],
            "vendi": d["vendi"],
            "frechet_to_base": m["frechet_to_base"],
        }
        out.update({f"eval/{split}/{k}": nan(v) for k, v in values.items()})
    return out


def summary_lines(result: Mapping[str, Any]) -> list[str]:
    """Return human-readable lines of an eval.json dict: per reward and split the base and
    trained means and the paired change ± its standard error (for a checkpoint; the base model
    alone: mean ± std over images), then the diversity of each split."""
    lines = [f"{result['tag']} ({result['label']}) of {result['workdir']}"]
    splits = result["splits"]
    names = list(dict.fromkeys(name for m in splits.values() for name in m["rewards"]))
    for name in names:
        rows = [(split, m["rewards"][name]) for split, m in splits.items() if name in m["rewards"]]
        if not any(r.get("change") is not None for _, r in rows):
            lines.append(f"  {name} (mean ± std over images):")
            lines += [f"    {s:5s} {r['mean']:.4g} ± {r['std']:.4g}" for s, r in rows]
            continue
        lines.append(f"  {name}: base -> trained, change ± SE (paired: same prompts and noise)")
        for split, r in rows:
            change, se = r.get("change"), r.get("change_se")
            if change is None:
                lines.append(f"    {split:5s} trained {r['mean']:.4g} (no paired base samples)")
                continue
            se_text = "n/a" if se is None else f"{se:.2g}"
            lines.append(
                f"    {split:5s} {r['mean'] - change:.4g} -> {r['mean']:.4g}   "
                f"{change:+.4g} ± {se_text}"
            )
    for split, m in splits.items():
        d = m["diversity"]
        pairwise = "n/a" if d["pairwise"] is None else f"{d['pairwise']:.4g}"
        fd = m["frechet_to_base"]
        lines.append(
            f"  {split:5s} diversity: pairwise {pairwise}, Vendi {d['vendi']:.4g}"
            + ("" if fd is None else f", Fréchet to base {fd:.4g}")
        )
    return lines


# --------------------------------------------------------------------------- CLI


def define_flags() -> None:
    """Define the command-line flags (only when run as a program)."""
    from absl import flags

    flags.DEFINE_string("workdir", None, "the training run's folder")
    flags.DEFINE_integer("step", None, "checkpoint epoch to evaluate (default: the latest)")
    flags.DEFINE_bool("base", False, "evaluate the base model (no LoRA) instead")
    flags.DEFINE_bool("ema", False, "evaluate the checkpoint's EMA weights (train.ema_decay > 0)")
    flags.DEFINE_enum("prompts", "both", ["train", "test", "both"], "prompt splits")
    flags.DEFINE_integer("num_per_prompt", 4, "images (seeds) per prompt")
    flags.DEFINE_integer("seed", 0, "evaluation seed (the same noise for every checkpoint)")
    flags.DEFINE_list("extra_rewards", [], "more rewards to score, e.g. aesthetic,hpsv2")
    flags.DEFINE_string(
        "reward_options", "{}", 'JSON options of extra rewards: {"aesthetic": {"head": "…"}}'
    )
    flags.DEFINE_string(
        "feature_model",
        "",
        "CLIP folder or hub id, pixels[:S], inception:FILE (FID), module:factory (default: auto)",
    )
    flags.DEFINE_integer("batch_size", 0, "images per compiled sampling call (0: sample.chunk)")
    flags.DEFINE_multi_string("test_prompt", None, "held-out prompt (repeat; replaces the split)")
    flags.DEFINE_integer("max_prompts", 0, "evaluate only the first N prompts of each split")
    flags.DEFINE_integer("grid_prompts", 4, "prompts (rows) in the image grids")
    flags.DEFINE_integer("grid_seeds", 4, "seeds (columns) in the image grids")
    flags.DEFINE_float("eta", None, "DDIM η (default: the run's sample.eta)")
    flags.DEFINE_string("out", None, "output folder (default: WORKDIR/eval)")
    flags.mark_flags_as_required(["workdir"])
    cpu_tuning.define_flag()


def main(argv) -> None:
    """absl entry point."""
    from absl import flags

    del argv
    console.configure(flags.FLAGS.verbosity)
    f = flags.FLAGS
    cpu_tuning.apply_if_requested(f.cpu_tuning)
    try:
        result = evaluate(
            f.workdir,
            step=f.step,
            base=f.base,
            prompts=f.prompts,
            num_per_prompt=f.num_per_prompt,
            seed=f.seed,
            extra_rewards=f.extra_rewards,
            reward_options=json.loads(f.reward_options),
            feature_model=f.feature_model or None,
            batch_size=f.batch_size,
            test_prompts=f.test_prompt,
            max_prompts=f.max_prompts,
            grid_prompts=f.grid_prompts,
            grid_seeds=f.grid_seeds,
            eta=f.eta,
            out=f.out,
            ema=f.ema,
        )
    except (FileNotFoundError, ValueError, ConfigError, rewards.RewardError) as err:
        raise SystemExit(f"error: {err}") from None
    print("\n".join(summary_lines(result)), flush=True)


def cli() -> None:
    """Console entry point: parse the flags and run ``main``."""
    from absl import app

    define_flags()
    app.run(main)
