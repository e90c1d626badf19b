"""Export a run's aligned weights back to PyTorch diffusers (safetensors, no torch needed).

    python -m dag_jax.export --workdir=RUN --out=DIR --format=pipeline   # full folder, LoRA merged
    python -m dag_jax.export --workdir=RUN --out=DIR --format=lora       # the LoRA alone
    [--step=N]       an epoch of RUN/checkpoints (default: the latest)
    [--overwrite]    replace a non-empty DIR

RUN is a local folder or a URL such as ``gs://bucket/run`` (read through ``etils.epath``, as
training wrote it; ``gs://`` needs ``pip install 'dag_jax[gcs]'``); DIR is a local folder.

``pipeline`` writes a complete diffusers folder: the UNet with W + (α/r)·A·B in every adapted
projection, the VAE, text encoder, tokenizer and scheduler of the run's base model. Load it with
``StableDiffusionPipeline.from_pretrained(DIR)``.

``lora`` writes ``DIR/pytorch_lora_weights.safetensors`` in the PEFT layout diffusers'
``pipe.load_lora_weights(DIR)`` reads (needs ``peft``): ``unet.<module>.lora_A.weight`` = Aᵀ
(r, in) and ``unet.<module>.lora_B.weight`` = Bᵀ (out, r), with the rank, α and target modules
in the file's ``lora_adapter_metadata`` so that diffusers scales the adapter by α/r.

Both are written into a temp folder beside DIR and renamed into place: a failure leaves
nothing half-written, and an existing non-empty DIR is refused unless ``overwrite``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import jax
import numpy as np

from dag_jax.infra import parallel
from dag_jax.models.lora import LoRAConfig, merge, pairs
from dag_jax.pipeline import Pipeline, save_pipeline
from dag_jax.train.workdir import Run, restore_run
from dag_jax.weights.convert import torch_key
from dag_jax.weights.diffusers import AtomicDir

FORMATS = ("pipeline", "lora")
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base
UNET_PREFIX = "unet"  # StableDiffusionLoraLoaderMixin.unet_name


# --------------------------------------------------------------------------- reading a run


def load_run(workdir: str | os.PathLike, step: int | None = None) -> Run:
    """Return the run of ``workdir`` (no prompts or reward) with checkpoint ``step`` restored.

    ``step`` None restores the latest; one device holds it all. Raises FileNotFoundError
    naming the missing workdir, config.json or checkpoint (``train.workdir.restore_run``).
    """
    mesh = parallel.make_mesh(devices=jax.devices()[:1])
    return restore_run(workdir, step, task=False, mesh=mesh)


def host_lora(run: Run) -> dict:
    """Return the restored checkpoint's LoRA tree as fp32 host arrays."""
    return jax.tree.map(lambda a: np.asarray(a, np.float32), run.trainable["lora"])


# --------------------------------------------------------------------------- writing


def refuse_non_empty(out: str | os.PathLike, overwrite: bool) -> None:
    """Raise FileExistsError early (before a long load) if ``out`` would be refused."""
    out = Path(out).expanduser().absolute()
    if not overwrite and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(
            f"output {out} exists and is not empty; pass overwrite=True (--overwrite) to replace it"
        )


def save_merged_pipeline(
    pipe: Pipeline,
    lora: Mapping,
    lora_config: LoRAConfig,
    out: str | os.PathLike,
    overwrite: bool = False,
) -> Path:
    """Write a diffusers folder of ``pipe`` with the LoRA merged into its UNet; return it."""
    merged = merge(pipe.params["unet"], lora, lora_config.scale)
    return save_pipeline(pipe, out, params={"unet": merged}, overwrite=overwrite)


def lora_modules(lora: Mapping) -> dict[tuple[str, ...], tuple[np.ndarray, np.ndarray]]:
    """Return {Linen module path: (A (in, r), B (r, out))} of a LoRA tree, sorted by path."""
    return {path: (np.asarray(a), np.asarray(b)) for path, (a, b) in pairs(lora).items()}


def lora_module_name(path: tuple[str, ...]) -> str:
    """Return the diffusers module name of a Linen module path (``to_out_0`` → ``to_out.0``)."""
    return torch_key(path + ("weight",)).removesuffix(".weight")


def lora_state_dict(lora: Mapping, prefix: str = UNET_PREFIX) -> dict[str, np.ndarray]:
    """Return the PEFT-style state dict of a LoRA tree: lora_A = Aᵀ (r, in), lora_B = Bᵀ."""
    out = {}
    for path, (a, b) in lora_modules(lora).items():
        name = f"{prefix}.{lora_module_name(path)}"
        out[f"{name}.lora_A.weight"] = np.ascontiguousarray(a.T, np.float32)
        out[f"{name}.lora_B.weight"] = np.ascontiguousarray(b.T, np.float32)
    return out


def lora_adapter_metadata(
    lora: Mapping, lora_config: LoRAConfig, prefix: str = UNET_PREFIX
) -> dict:
    """Return diffusers' adapter metadata: PEFT ``LoraConfig`` kwargs, keys ``<prefix>.<kw>``.

    ``target_modules`` lists every adapted module by its full name, so PEFT adapts exactly
    those; ``r`` and ``lora_alpha`` make the loaded adapter scale by α/r.
    """
    kwargs = {
        "r": lora_config.rank,
        "lora_alpha": lora_config.alpha,
        "target_modules": [lora_module_name(p) for p in lora_modules(lora)],
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
    }
    return {f"{prefix}.{k}": v for k, v in kwargs.items()}


def save_lora(
    lora: Mapping, lora_config: LoRAConfig, out: str | os.PathLike, overwrite: bool = False
) -> Path:
    """Write ``out/pytorch_lora_weights.safetensors`` (diffusers' LoRA layout); return ``out``."""
    from safetensors.numpy import save_file

    ranks = {a.shape[1] for a, _ in lora_modules(lora).values()}
    if ranks != {lora_config.rank}:
        raise ValueError(f"LoRA ranks {sorted(ranks)} differ from the config's {lora_config.rank}")
    metadata = {
        "format": "pt",
        LORA_ADAPTER_METADATA_KEY: json.dumps(
            lora_adapter_metadata(lora, lora_config), indent=2, sort_keys=True
        ),
    }
    with AtomicDir(out, overwrite) as tmp:
        save_file(lora_state_dict(lora), str(tmp / LORA_WEIGHT_NAME), metadata=metadata)
    return Path(out)


# --------------------------------------------------------------------------- from a workdir


def export_pipeline(
    workdir: str | os.PathLike,
    out: str | os.PathLike,
    step: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the run's model at ``step`` (None: latest) as a diffusers folder, LoRA merged."""
    refuse_non_empty(out, overwrite)
    run = load_run(workdir, step)
    return save_merged_pipeline(run.model.pipe, host_lora(run), run.model.lora, out, overwrite)


def export_lora(
    workdir: str | os.PathLike,
    out: str | os.PathLike,
    step: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the run's LoRA at ``step`` (None: latest) for diffusers' ``load_lora_weights``."""
    refuse_non_empty(out, overwrite)
    run = load_run(workdir, step)
    return save_lora(host_lora(run), run.model.lora, out, overwrite)


def export(
    workdir: str | os.PathLike,
    out: str | os.PathLike,
    fmt: str = "pipeline",
    step: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Export in format ``fmt`` ("pipeline" or "lora"); return the output folder."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    writer = export_pipeline if fmt == "pipeline" else export_lora
    return writer(workdir, out, step, overwrite)


# --------------------------------------------------------------------------- CLI


def define_flags(flag_values=None) -> None:
    """Define --workdir, --step, --out, --format and --overwrite (on absl's FLAGS by default)."""
    from absl import flags

    fv = flag_values if flag_values is not None else flags.FLAGS
    flags.DEFINE_string("workdir", None, "training run folder", flag_values=fv)
    flags.DEFINE_integer("step", None, "checkpoint epoch (default: the latest)", flag_values=fv)
    flags.DEFINE_string("out", None, "output folder", flag_values=fv)
    flags.DEFINE_enum("format", "pipeline", FORMATS, "what to write", flag_values=fv)
    flags.DEFINE_bool("overwrite", False, "replace a non-empty output folder", flag_values=fv)
    flags.mark_flags_as_required(["workdir", "out"], flag_values=fv)


def main(argv, flag_values=None) -> None:
    """absl entry point (``flag_values``: parsed flags, for calling it in-process)."""
    from absl import flags

    del argv
    fv = flag_values if flag_values is not None else flags.FLAGS
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        out = export(fv.workdir, fv.out, fv.format, fv.step, fv.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    print(f"[export] wrote the {fv.format} of {fv.workdir} to {out}", flush=True)


def cli() -> None:
    """Console entry point: parse the flags and run ``main``."""
    from absl import app

    define_flags()
    app.run(main)


if __name__ == "__main__":
    cli()
