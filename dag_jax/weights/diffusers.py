"""Read and write diffusers folders: model_index.json, per-part config.json and weight files.

Weights are read from ``*.safetensors`` (single or sharded), ``*.bin`` (only through
``torch.load(weights_only=True)``, only if torch is installed) or legacy Flax ``*.msgpack``, in
that order of preference; they are written as safetensors with PyTorch names, without torch.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
from flax import serialization, traverse_util

from dag_jax.weights.convert import (
    WeightsError,
    check_tree,
    linen_to_torch,
    rename_legacy_attention,
    torch_to_linen,
)

# Weight file stems, in order of preference, for diffusers parts and transformers parts.
_TORCH_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")
_FLAX_FILES = ("diffusion_flax_model.msgpack", "flax_model.msgpack")
HUB_CONFIG_SUFFIXES = (".json", ".txt", ".model")  # configs, tokenizer vocabularies, merges
HUB_WEIGHT_PARTS = ("unet", "vae", "text_encoder")  # the parts load_pipeline reads weights of


def hub_selection(
    files: list[str], variant: str | None = None, parts: tuple[str, ...] = HUB_WEIGHT_PARTS
) -> list[str]:
    """Return the files of a hub repo listing that a pipeline load needs.

    Every config and tokenizer file, and for each of the UNet, VAE and text encoder one
    precision of its weights: the ``variant`` ("fp16", …) if given, else the plain files;
    safetensors before ``.bin`` (single file, or the shards its index names). Never the
    repo's other variants (``fp16``, ``non_ema``, ``ema_only``), ``.ckpt`` files, or the
    weights of parts it does not load (``safety_checker``). ``parts`` ("" = the repo's root,
    a transformers model) are the folders whose weights are read. Raises FileNotFoundError
    naming a part without matching weights and what the repo has for it.
    """
    chosen = sorted(f for f in files if f.endswith(HUB_CONFIG_SUFFIXES))
    infix = f".{variant}" if variant else ""
    for part in parts:
        prefix = f"{part}/" if part else ""
        mine = [f for f in files if f.startswith(prefix) and f.count("/") == prefix.count("/")]
        if not mine:
            continue  # the folder's own checks name a missing part
        weights = part_weight_files(prefix, mine, infix)
        if not weights:
            have = sorted(f for f in mine if not f.endswith(HUB_CONFIG_SUFFIXES))
            raise FileNotFoundError(
                f"no {part or 'model'} weights{f' of variant {variant!r}' if variant else ''} "
                "in the hub "
                f"repo; it has {have}"
            )
        chosen += weights
    return chosen


def part_weight_files(prefix: str, files: list[str], infix: str) -> list[str]:
    """Return one precision's weight files under ``prefix`` (one file or its shards), or []."""
    for ext in (".safetensors", ".bin"):
        for stem in _TORCH_STEMS:
            single = f"{prefix}{stem}{infix}{ext}"
            if single in files:
                return [single]
            shard = f"{prefix}{stem}{infix}-"
            shards = [f for f in files if f.startswith(shard) and f.endswith(ext)]
            shards = [f for f in shards if "-of-" in f[len(shard) :]]
            if shards:
                return sorted(shards)
    return []


def resolve(
    path_or_id: str | os.PathLike,
    revision: str | None = None,
    variant: str | None = None,
    parts: tuple[str, ...] = HUB_WEIGHT_PARTS,
) -> Path:
    """Return a local folder for a path, or download what a hub repo id's load needs.

    A hub download takes the configs and one precision of the loaded parts' weights
    (``hub_selection``) at ``revision``.
    """
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_id)
    looks_local = text.startswith(("/", ".", "~")) or path.exists() or text.count("/") != 1
    if looks_local:
        raise FileNotFoundError(f"model folder {text!r} does not exist")
    try:
        from huggingface_hub import HfApi, snapshot_download

        files = HfApi().list_repo_files(text, revision=revision)
    except Exception as err:  # offline, private or unknown repo
        raise FileNotFoundError(
            f"{text!r} is not a local folder and could not be listed on the hub "
            f"({type(err).__name__}: {err}); pass a local diffusers folder (--config.model)"
        ) from err
    wanted = hub_selection(list(files), variant, parts)
    return Path(snapshot_download(text, revision=revision, allow_patterns=wanted))


def read_json(path: Path) -> dict:
    """Return a JSON file's contents, with an error that names the file when it is bad."""
    if not path.is_file():
        raise FileNotFoundError(f"missing {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


def find_weights(part_dir: Path, variant: str | None = None) -> tuple[str, list[Path]]:
    """Return (format, files) of a part's weights: "safetensors", "bin" or "msgpack"."""
    if not part_dir.is_dir():
        raise FileNotFoundError(f"missing model part folder {part_dir}")
    infix = f".{variant}" if variant else ""
    for ext, fmt in ((".safetensors", "safetensors"), (".bin", "bin")):
        for stem in _TORCH_STEMS:
            single = part_dir / f"{stem}{infix}{ext}"
            if single.is_file():
                return fmt, [single]
            index = part_dir / f"{stem}{infix}{ext}.index.json"
            if index.is_file():
                shards = sorted(set(read_json(index).get("weight_map", {}).values()))
                files = [part_dir / s for s in shards]
                absent = [str(f) for f in files if not f.is_file()]
                if absent:
                    raise FileNotFoundError(f"{index} lists missing shard files: {absent}")
                return fmt, files
    for name in _FLAX_FILES:
        if (part_dir / name).is_file():
            return "msgpack", [part_dir / name]
    present = sorted(p.name for p in part_dir.iterdir())
    raise FileNotFoundError(
        f"no weight file in {part_dir} (looked for "
        f"{', '.join(s + infix + '.safetensors' for s in _TORCH_STEMS)}, .bin and Flax .msgpack; "
        f"found {present})"
    )


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except Exception as err:
        raise WeightsError(
            f"cannot read {path}: the safetensors file is truncated or corrupt ({err})"
        ) from err


def _read_bin(path: Path) -> dict[str, np.ndarray]:
    """Return the tensors of a PyTorch pickle (``.bin``/``.pt``/``.pth``), read with
    ``torch.load(weights_only=True)``; a training checkpoint's ``state_dict`` is unwrapped."""
    try:
        import torch
    except ImportError as err:
        raise WeightsError(
            f"{path} is a PyTorch checkpoint and torch is not installed; install torch or "
            f"convert the checkpoint to safetensors"
        ) from err
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:
        raise WeightsError(f"cannot read {path} safely (weights_only=True): {err}") from err
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]  # HPS v2 / OpenCLIP training checkpoints
    if not isinstance(state, Mapping):
        raise WeightsError(f"{path} holds a {type(state).__name__}, not a state dict")
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise WeightsError(f"{path} holds no tensors (keys: {sorted(state)[:20]})")
    return {
        k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in tensors.items()
    }


def read_weights_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Return the flat state dict (numpy) of one ``.safetensors`` file or PyTorch pickle.

    Raises FileNotFoundError naming a missing file and WeightsError for an unreadable one.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    return _read_bin(path)


def read_state_dict(files: list[Path], fmt: str) -> dict[str, np.ndarray]:
    """Return the merged flat PyTorch-named state dict of safetensors or .bin files."""
    reader = _read_safetensors if fmt == "safetensors" else _read_bin
    state: dict[str, np.ndarray] = {}
    for f in files:
        state.update(reader(f))
    return state


def _as_fp32(tree: Mapping) -> dict:
    flat = traverse_util.flatten_dict(dict(tree))
    return traverse_util.unflatten_dict(
        {
            k: np.asarray(v, np.float32) if np.issubdtype(np.asarray(v).dtype, np.floating) else v
            for k, v in flat.items()
        }
    )


def _read_msgpack(path: Path) -> dict:
    try:
        tree = serialization.msgpack_restore(path.read_bytes())
    except Exception as err:
        raise WeightsError(f"cannot read {path}: the msgpack file is truncated or corrupt") from err
    if set(tree) == {"params"}:
        tree = tree["params"]
    return rename_legacy_attention(tree)


def load_params(
    part_dir: Path,
    target: Mapping,
    what: str,
    variant: str | None = None,
    fix_keys: Callable[[dict], dict] | None = None,
) -> dict:
    """Return a part's params (fp32 numpy tree) checked against the model's ``target`` shapes.

    ``fix_keys`` maps a PyTorch state dict to the model's key convention before conversion.
    """
    fmt, files = find_weights(part_dir, variant)
    if fmt == "msgpack":
        params = check_tree(_read_msgpack(files[0]), target, f"{what} ({files[0]})")
    else:
        where = files[0] if len(files) == 1 else part_dir
        state = read_state_dict(files, fmt)
        if fix_keys is not None:
            state = fix_keys(state)
        params = torch_to_linen(state, target, f"{what} ({where})")
    return _as_fp32(params)


def save_params(part_dir: Path, params: Mapping, config: Mapping, weights_name: str) -> None:
    """Write ``config.json`` and ``weights_name`` (safetensors, PyTorch names) into part_dir."""
    from safetensors.numpy import save_file

    part_dir.mkdir(parents=True, exist_ok=True)
    state = {k: np.asarray(v) for k, v in linen_to_torch(params).items()}
    save_file(state, str(part_dir / weights_name), metadata={"format": "pt"})
    (part_dir / "config.json").write_text(json.dumps(dict(config), indent=2, sort_keys=True))


class AtomicDir:
    """Context manager: write into a temp folder beside ``out``, then rename it into place.

    An existing non-empty ``out`` is refused unless ``overwrite``; on error nothing of ``out``
    is touched and the temp folder is removed.
    """

    def __init__(self, out: str | os.PathLike, overwrite: bool = False):
        self.out = Path(out).expanduser().absolute()
        self.overwrite = overwrite

    def __enter__(self) -> Path:
        if self.out.exists() and (not self.out.is_dir() or any(self.out.iterdir())):
            if not self.overwrite:
                raise FileExistsError(
                    f"output {self.out} exists and is not empty; pass overwrite=True "
                    f"(--overwrite) to replace it"
                )
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        try:
            default_permissions(self.tmp)
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        old = None
        if self.out.exists():
            old = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
            os.replace(self.out, old)
        os.replace(self.tmp, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def current_umask() -> int:
    """Return the process's umask (from /proc where it is shown, else by setting it back)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_permissions(root: Path) -> None:
    """Give ``root`` and everything below it the modes a plain ``open``/``mkdir`` would.

    ``tempfile.mkdtemp`` makes the folder 0700, and some writers (safetensors writes a temp
    file and renames it) leave files 0600: the written folder would be private to its owner
    whatever the umask. Folders become 0777 and files 0666 (executable bits kept), less the
    umask.
    """
    mask = current_umask()
    for path in (root, *root.rglob("*")):
        if path.is_symlink():
            continue
        mode = path.stat().st_mode
        wanted = 0o777 if path.is_dir() else 0o666 | (mode & 0o111)
        os.chmod(path, wanted & ~mask)
