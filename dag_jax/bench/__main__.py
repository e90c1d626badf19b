"""The benchmark CLI: ``python -m dag_jax.bench WHAT [flags]``; figures go to BENCHMARKS.md.

``WHAT`` names an entry of ``BENCHES``, a function of ``common.Settings`` returning records
(``common.record``), imported only when it runs (the PyTorch references load torch only then):

  sampler    rollout throughput and MFU, dag_jax vs an eager diffusers loop (``sampler``)
  reward     images/s of each reward of ``dag_jax.rewards`` (``reward``)
  memory     per-device bytes of the sharded DAG-DB train step per fsdp size (``train_step``;
             ``--trainable=unet``: full fine-tuning, params and AdamW state sharded)
  train      one optimizer step per algorithm, dag_jax vs a PyTorch reference (``train_step``)
  ops        the kernels of a tiny-model step alone, dag_jax vs PyTorch (``ops``)
  tinyworld  reward and diversity before and after demo training runs (``tinyworld``)
  toy2d      the 2-D proof: sampling ∝ R or collapse on the best mode (``probes.toy2d``)
  ascent     is DDPO's gradient an ascent direction in the tiny world (``probes.ascent``)
  dbterms    the DB residual's parts per denoising step (``probes.dbterms``)
  epoch      a full DAG-DB epoch (sampling, in-graph rewards, update windows) at SD1.5 or
             tiny shapes: seconds, transitions/s, MFU, peak memory (``epoch``)

Each module's docstring gives its command and metrics. The records print as a table and, with
``--json=PATH``, are written there as a JSON list. For example:

    python -m dag_jax.bench sampler --model=tiny --batch=8 --steps=20 --repeats=3 \
        --json=/tmp/bench_tiny.json
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable

from absl import app, flags

from dag_jax.bench.common import IMPLS, Settings, format_table, write_json
from dag_jax.bench.unets import MODELS
from dag_jax.infra import cpu_tuning
from dag_jax.models.attention import ATTENTION_IMPLS

BENCHES: dict[str, str] = {
    "sampler": "dag_jax.bench.sampler:bench_sampler",
    "reward": "dag_jax.bench.reward:bench_reward",
    "memory": "dag_jax.bench.train_step:bench_memory",
    "train": "dag_jax.bench.train_step:bench_train",
    "ops": "dag_jax.bench.ops:bench_ops",
    "tinyworld": "dag_jax.bench.tinyworld:bench_tinyworld",
    "toy2d": "dag_jax.bench.probes.toy2d:bench_toy2d",
    "ascent": "dag_jax.bench.probes.ascent:bench_ascent",
    "dbterms": "dag_jax.bench.probes.dbterms:bench_dbterms",
    "epoch": "dag_jax.bench.epoch:bench_epoch",
}


def resolve(what: str) -> Callable[[Settings], list[dict]]:
    """Return the function of bench ``what``, importing its module (a ValueError if unknown)."""
    if what not in BENCHES:
        raise ValueError(f"unknown benchmark {what!r}; known: {', '.join(sorted(BENCHES))}")
    module, name = BENCHES[what].split(":")
    return getattr(importlib.import_module(module), name)


def run(what: str, settings: Settings) -> list[dict]:
    """Run bench ``what``, print its table, write ``settings.json`` if set; return the records."""
    records = resolve(what)(settings)
    print(format_table(records))
    if settings.json:
        print(f"[bench] wrote {write_json(records, settings.json)}")
    return records


FLAGS = flags.FLAGS


def settings_from_flags() -> Settings:
    """Return Settings from the parsed command-line flags."""
    names = [f.name for f in dataclasses.fields(Settings)]
    return Settings(**{name: FLAGS[name].value for name in names})


def define_flags() -> None:
    """Define this entry point's command-line flags (only when run as a program)."""
    flags.DEFINE_enum("model", "tiny", sorted(MODELS), "UNet shapes (random weights)")
    flags.DEFINE_integer("batch", 8, "trajectories per rollout")
    flags.DEFINE_integer("steps", 20, "DDIM steps")
    flags.DEFINE_integer("resolution", 0, "latent side length; 0 = the model's sample_size")
    flags.DEFINE_integer("repeats", 3, "timed runs")
    flags.DEFINE_integer("warmup", 1, "untimed runs before timing (after compilation)")
    flags.DEFINE_enum(
        "dtype", "float32", ["float32", "bfloat16"], "compute dtype (torch_ref: autocast)"
    )
    flags.DEFINE_enum("attention", "xla", list(ATTENTION_IMPLS), "dag_jax attention kernel")
    flags.DEFINE_enum("impl", "both", ["both", *IMPLS], "implementations to run")
    flags.DEFINE_float("guidance", 5.0, "classifier-free guidance scale")
    flags.DEFINE_float("eta", 1.0, "DDIM eta")
    flags.DEFINE_integer("seed", 0, "random seed")
    flags.DEFINE_bool("check", False, "assert both implementations give the same first-step eps")
    flags.DEFINE_float("check_tol", 0.0, "--check tolerance (relative L2 of eps); 0 = by dtype")
    flags.DEFINE_string("reward", "all", "reward bench: 'all' or comma-separated reward names")
    flags.DEFINE_integer("image_size", 0, "reward bench: image side; 0 = by --model")
    flags.DEFINE_string("tasks", "compressibility,alignment", "tinyworld: configs/<task>.py:demo")
    flags.DEFINE_string("algos", "ddpo,dag_db,dag_kl,b2", "tinyworld, train: algorithms")
    flags.DEFINE_integer("seeds", 1, "tinyworld: number of seeds, from --seed")
    flags.DEFINE_integer("epochs", 0, "tinyworld: epochs per run (0 = the demo config's)")
    flags.DEFINE_string("workdir", "", "tinyworld: folder for the runs (default: temporary)")
    flags.DEFINE_string(
        "groups", "1,8", "ascent: sample.group sizes (trajectories sharing x_T); dbterms: the last"
    )
    flags.DEFINE_string("lrs", "1e-3,3e-3,1e-2", "ascent: step sizes of the line search")
    flags.DEFINE_integer(
        "micro_batch", 0, "memory/train: transitions per train step (0: memory 64, train 16)"
    )
    flags.DEFINE_string("fsdp", "1,2,4,8", "memory: fsdp sizes of the (data, fsdp) mesh")
    flags.DEFINE_enum(
        "trainable",
        "lora",
        ["lora", "unet"],
        "memory: train.trainable (unet: the whole UNet and its AdamW state sharded on fsdp)",
    )
    flags.DEFINE_enum(
        "fl_source",
        "current",
        ["current", "sampling"],
        "train: where DAG's forward-looking x̂₀ come from (dag.fl_source; sampling: kept by "
        "the sampler, no UNet pass in the step)",
    )
    flags.DEFINE_enum("size", "tiny", ["tiny", "sd15"], "epoch: model shapes (random weights)")
    flags.DEFINE_float(
        "timeout",
        540.0,
        "epoch: seconds the whole command may take (checked up front on "
        "GPU/TPU from the FLOP count, and before every timed epoch)",
    )
    flags.DEFINE_string("json", None, "write the records to this JSON file")
    cpu_tuning.define_flag()


def main(argv: list[str]) -> None:
    """Run the bench named by the one positional argument with the flags' settings."""
    if len(argv) != 2:
        raise app.UsageError(
            f"usage: python -m dag_jax.bench <{'|'.join(sorted(BENCHES))}> [flags]"
        )
    cpu_tuning.apply_if_requested(FLAGS.cpu_tuning)
    run(argv[1], settings_from_flags())


def cli() -> None:
    """Console entry point: parse the flags and run ``main``."""
    define_flags()
    app.run(main)


if __name__ == "__main__":
    cli()
