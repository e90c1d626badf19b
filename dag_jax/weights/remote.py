"""Model folders in a bucket (``gs://bucket/models/PickScore_v1``): copied once to a local cache.

    root = local_copy("gs://bucket/models/PickScore_v1")   # a local folder, ready for load_clip

The loaders read local files (safetensors are memory-mapped, tokenizers read by transformers),
so a bucket folder is first copied, its plain files only (not its sub-folders), through
``etils.epath`` (``gs://`` needs ``gcsfs``: ``pip install 'dag_jax[gcs]'``). The copy lives in
``$XDG_CACHE_HOME/dag_jax/remote`` (default ``~/.cache/dag_jax/remote``) under a name derived
from the URL; a file already there with the bucket's size is not fetched again. Each file is
written beside its final name and renamed into place, so an interrupted copy leaves no
truncated file behind.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

_URL = re.compile(r"^([a-z][a-z0-9+.-]*)://(.+)$")
# Schemes etils.epath reads (through gcsfs / s3fs); http(s) model files are the hub's business.
SCHEMES = ("gs", "s3")
_CHUNK = 1 << 24


def is_url(text: str) -> bool:
    """Return whether ``text`` is a URL (``scheme://…``) rather than a path or a hub id."""
    return _URL.match(str(text)) is not None


def cache_root() -> Path:
    """Return the folder holding local copies of bucket folders."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dag_jax" / "remote"


def cache_folder(url: str, root: Path | None = None) -> Path:
    """Return the local folder a copy of ``url`` goes to (stable for the URL)."""
    url = str(url).rstrip("/")
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9._-]", "_", url.rsplit("/", 1)[-1]) or "root"
    return (root or cache_root()) / f"{name}-{digest}"


def local_copy(url: str, root: Path | None = None) -> Path:
    """Return a local folder holding the plain files of the bucket folder ``url``.

    Raises ValueError for a scheme other than ``SCHEMES``, FileNotFoundError when the folder
    does not exist or holds no file, and OSError/ImportError from the bucket client as they come
    (e.g. gcsfs not installed).
    """
    match = _URL.match(str(url))
    if match is None or match.group(1) not in SCHEMES:
        raise ValueError(f"{url!r} is not a bucket URL; supported schemes: {SCHEMES}")
    from etils import epath

    return copy_folder(epath.Path(str(url)), cache_folder(url, root))


def copy_folder(src, dest: Path) -> Path:
    """Copy the plain files of folder ``src`` (an ``epath.Path`` or a path) into ``dest``.

    Files already in ``dest`` with the source's size are kept. Returns ``dest``.
    """
    from etils import epath

    src = epath.Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"model folder {str(src)!r} does not exist")
    files = [f for f in src.iterdir() if f.is_file()]
    if not files:
        raise FileNotFoundError(f"model folder {str(src)!r} holds no file")
    dest.mkdir(parents=True, exist_ok=True)
    for f in files:
        target = dest / f.name
        size = f.stat().length
        if target.is_file() and target.stat().st_size == size:
            continue
        partial = dest / f".{f.name}.partial"
        with f.open("rb") as reader, open(partial, "wb") as writer:
            while block := reader.read(_CHUNK):
                writer.write(block)
        os.replace(partial, target)
    return dest
