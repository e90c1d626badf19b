"""Nothing lost, nothing mixed: export never destroys a run, damaged checkpoints are caught and
kept, bad configs and workdirs fail before anything compiles, and the captioning client is
bounded in time and in memory."""

from __future__ import annotations

import http.server
import json
import logging
import math
import os
import socket
import stat
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from flax import traverse_util

from dag_jax import export, train
from dag_jax.infra.checkpoint import DAMAGED_DIR, Checkpointer, NoUsableCheckpointError
from dag_jax.infra.metrics import SUPERSEDED_FILE, MetricsWriter, read_metrics
from dag_jax.models.lora import LoRAConfig, init_lora
from dag_jax.rewards import RewardError, captioning
from dag_jax.train import config as train_config
from dag_jax.train.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
LORA = LoRAConfig(rank=2, alpha=2.0)
MARKER = ".dag_jax_export"  # what export writes into every folder it makes

# --------------------------------------------------------------------------- export: the output


@pytest.fixture
def fake_run(tmp_path):
    """Return a folder laid out as a training run (config, checkpoints, metrics)."""
    run = tmp_path / "runs" / "demo"
    (run / "checkpoints" / "1").mkdir(parents=True)
    (run / "checkpoints" / "1" / "state").write_text("weights")
    (run / "config.json").write_text("{}")
    (run / "metrics.jsonl").write_text('{"epoch": 1}\n')
    return run


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def no_load(monkeypatch):
    """Make loading a run fail loudly: refusals must come before the (long) load."""

    def loaded(*args, **kwargs):
        raise AssertionError("the run was loaded before the output was checked")

    monkeypatch.setattr(export, "load_run", loaded)


def _where(run: Path, name: str) -> Path:
    """Return the output folder of a refusal case (see test_overwrite_never_replaces_...)."""
    tmp = run.parents[1]
    other = tmp / "other_run"
    other.mkdir(exist_ok=True)
    (other / "metrics.jsonl").write_text("{}\n")
    ckpts = tmp / "ckpt_only"
    (ckpts / "checkpoints").mkdir(parents=True, exist_ok=True)
    notes = tmp / "notes"
    notes.mkdir(exist_ok=True)
    (notes / "keep.txt").write_text("precious")
    (tmp / "a_file").write_text("precious")
    return {
        "workdir": run,
        "inside": run / "checkpoints",
        "inside_new": run / "export",
        "contains": run.parent,
        "contains_2": tmp,
        "other_run": other,
        "checkpoints_only": ckpts,
        "not_an_export": notes,
        "file": tmp / "a_file",
    }[name]


REFUSALS = {
    "workdir": "is the run's workdir",
    "inside": "is inside the run's workdir",
    "inside_new": "is inside the run's workdir",
    "contains": "contains the run's workdir",
    "contains_2": "contains the run's workdir",
    "other_run": "holds metrics.jsonl: it is a training run",
    "checkpoints_only": "holds checkpoints: it is a training run",
    "not_an_export": r"not a folder that dag_jax.export wrote \(it has no .dag_jax_export",
    "file": "is an existing file, not a folder",
}


@pytest.mark.parametrize("fmt", export.FORMATS)
@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_overwrite_never_replaces_a_run_or_a_folder_export_did_not_write(
    fake_run, no_load, case, fmt
):
    out = _where(fake_run, case)
    root = fake_run.parents[1]
    before = _snapshot(root)
    with pytest.raises(FileExistsError, match=REFUSALS[case]) as err:
        export.export(fake_run, out, fmt, overwrite=True)
    assert str(out) in str(err.value)
    assert _snapshot(root) == before
    assert not [p for p in root.rglob(".*tmp-*")]


def test_cli_export_out_run_overwrite_is_refused_with_the_reason(fake_run, no_load):
    from absl import flags

    before = _snapshot(fake_run)
    fv = flags.FlagValues()
    export.define_flags(fv)
    fv(["export", f"--workdir={fake_run}", f"--out={fake_run}", "--overwrite"])
    with pytest.raises(SystemExit, match=f"error: output {fake_run} is the run's workdir"):
        export.main([], fv)
    assert _snapshot(fake_run) == before


def test_without_overwrite_the_workdir_inside_and_run_folders_are_refused_too(fake_run, no_load):
    for case in ("workdir", "inside_new", "other_run"):
        with pytest.raises(FileExistsError, match=REFUSALS[case]):
            export.export(fake_run, _where(fake_run, case), "lora")


@pytest.fixture(scope="module")
def tiny():
    """Return (random tiny pipeline, a LoRA on its UNet with non-zero B)."""
    from dag_jax.tinyworld.random_tiny import random_tiny_pipeline

    pipe = random_tiny_pipeline(0)
    lora = init_lora(jax.random.PRNGKey(0), pipe.params["unet"], LORA)
    flat = traverse_util.flatten_dict(jax.tree.map(np.asarray, lora))
    flat = {k: np.full_like(v, 0.01) if k[-1] == "B" else v for k, v in flat.items()}
    return pipe, traverse_util.unflatten_dict(flat)


def _with(lora: dict, value: float, which: str = "B", count: int = 1) -> dict:
    """Return ``lora`` with ``value`` in the first ``count`` arrays named ``which``."""
    flat = traverse_util.flatten_dict(lora)
    out, done = {}, 0
    for k, v in sorted(flat.items()):
        if k[-1] == which and done < count:
            v = np.array(v, copy=True)
            v.flat[0] = value
            done += 1
        out[k] = v
    return traverse_util.unflatten_dict(out)


def test_overwrite_replaces_an_earlier_export_and_only_that(tiny, tmp_path):
    pipe, lora = tiny
    out = tmp_path / "lora"
    export.save_lora(lora, LORA, out)
    marker = json.loads((out / MARKER).read_text())
    assert marker == {"written_by": "dag_jax.export", "format": "lora"}
    with pytest.raises(FileExistsError, match=f"{out} exists and is not empty.*overwrite"):
        export.save_lora(lora, LORA, out)
    export.save_lora(lora, LORA, out, overwrite=True, source={"workdir": "runs/x", "step": 3})
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, export.LORA_WEIGHT_NAME])
    assert json.loads((out / MARKER).read_text())["step"] == 3

    merged = tmp_path / "merged"
    export.save_merged_pipeline(pipe, lora, LORA, merged)
    assert json.loads((merged / MARKER).read_text())["format"] == "pipeline"
    assert (merged / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    export.save_merged_pipeline(pipe, lora, LORA, merged, overwrite=True)  # its own export
    (merged / MARKER).unlink()  # no marker: not an export (any more)
    with pytest.raises(FileExistsError, match="not a folder that dag_jax.export wrote"):
        export.save_merged_pipeline(pipe, lora, LORA, merged, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora", "merged"]


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_exported_folders_and_files_follow_the_umask(tiny, tmp_path, mask):
    pipe, lora = tiny
    old = os.umask(mask)
    try:
        folders = [
            export.save_lora(lora, LORA, tmp_path / "lora"),
            export.save_merged_pipeline(pipe, lora, LORA, tmp_path / "merged"),
        ]
    finally:
        os.umask(old)
    for folder in folders:
        for path in (folder, *folder.rglob("*")):
            mode = stat.S_IMODE(path.stat().st_mode)
            want = (0o777 if path.is_dir() else 0o666) & ~mask
            assert mode == want, f"{path}: {oct(mode)} != {oct(want)}"


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_export_refuses_a_lora_with_nan_or_inf_and_writes_nothing(tiny, tmp_path, value):
    pipe, lora = tiny
    bad = _with(lora, value, "B", count=2)
    for save, out in (
        (lambda o: export.save_lora(bad, LORA, o), tmp_path / "lora"),
        (lambda o: export.save_merged_pipeline(pipe, bad, LORA, o), tmp_path / "merged"),
    ):
        with pytest.raises(ValueError, match=r"the LoRA: 2 of \d+ arrays"):
            save(out)
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_a_merged_unet_that_overflows(tiny, tmp_path):
    pipe, lora = tiny
    huge = _with(_with(lora, 3e38, "A", count=1), 3e38, "B", count=1)  # finite; W + AB is not
    with pytest.raises(ValueError, match="the merged UNet.*inf"):
        export.save_merged_pipeline(pipe, huge, LORA, tmp_path / "merged")
    assert list(tmp_path.iterdir()) == []


def test_export_from_a_run_names_the_step_of_non_finite_weights(tiny, fake_run, monkeypatch):
    pipe, lora = tiny

    run = SimpleNamespace(
        step=7,
        ema=False,
        trainable={"lora": _with(lora, math.nan)},
        model=SimpleNamespace(pipe=pipe, lora=LORA),
    )
    monkeypatch.setattr(export, "load_run", lambda workdir, step, ema=False: run)
    out = fake_run.parents[1] / "exported"
    with pytest.raises(ValueError, match=f"LoRA of {fake_run} at step 7"):
        export.export(fake_run, out, "lora")
    assert not out.exists()


# --------------------------------------------------------------------------- checkpoints

# orbax/tensorstore leave a callback on a closed event loop after a failed read of a damaged file
_unraisable = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _arrays(epoch: int) -> dict:
    """Return a state whose largest array (random, so stored nearly uncompressed) is ``w``."""
    w = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    return {"w": jax.numpy.asarray(w + epoch), "b": jax.numpy.arange(5.0) + epoch}


def _tree_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _flip_bytes_in_array_data(step_dir: Path) -> None:
    """Flip three bytes in the middle of the largest array data file of a checkpoint."""
    data = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    path = max(data, key=lambda p: p.stat().st_size)
    raw = bytearray(path.read_bytes())
    assert len(raw) > 10_000  # w's data, not an index or metadata file
    for offset in (len(raw) // 2, len(raw) // 2 + 1, len(raw) // 3):
        raw[offset] ^= 0xFF
    path.write_bytes(bytes(raw))


@_unraisable
def test_flipped_bytes_inside_array_data_are_caught_and_the_checkpoint_set_aside(tmp_path, caplog):
    import orbax.checkpoint as ocp

    with Checkpointer(tmp_path) as ckpt:
        for epoch in (1, 2, 3):
            ckpt.save(epoch, _arrays(epoch), {"epoch": epoch})
    _flip_bytes_in_array_data(tmp_path / "3")
    damaged = _tree_files(tmp_path / "3")
    template = jax.tree.map(jax.numpy.zeros_like, _arrays(0))
    # the damage is silent to orbax: the array file reads back without an error, wrong
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as raw:
        silent = raw.restore(tmp_path / "3" / "state", args=ocp.args.StandardRestore(template))
    assert 0 < int(np.sum(np.asarray(silent["w"]) != np.asarray(_arrays(3)["w"]))) < 64 * 64

    with Checkpointer(tmp_path) as ckpt:
        epoch, state, extra = ckpt.restore(template)
    assert (epoch, extra) == (2, {"epoch": 2})
    np.testing.assert_array_equal(np.asarray(state["w"]), np.asarray(_arrays(2)["w"]))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"{tmp_path / '3'} is damaged (array digest mismatch" in w for w in warnings)
    assert any("1 of 2 arrays differ: w" in w for w in warnings), warnings
    # moved aside whole, byte for byte, with a note of why; epochs 1 and 2 untouched
    (moved,) = [p for p in (tmp_path / DAMAGED_DIR).iterdir() if p.is_dir()]
    assert moved.name.startswith("3-") and _tree_files(moved) == damaged
    note = json.loads((tmp_path / DAMAGED_DIR / f"{moved.name}.json").read_text())
    assert note["epoch"] == 3 and "digest mismatch" in note["reason"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2", DAMAGED_DIR]


@_unraisable
def test_when_every_checkpoint_is_damaged_the_library_raises_and_keeps_everything(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        for epoch in (1, 2):
            ckpt.save(epoch, _arrays(epoch), {"epoch": epoch})
    for epoch in (1, 2):
        _flip_bytes_in_array_data(tmp_path / str(epoch))
    before = _tree_files(tmp_path)
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(NoUsableCheckpointError) as err:
            ckpt.restore(jax.tree.map(jax.numpy.zeros_like, _arrays(0)))
    assert [epoch for epoch, _ in err.value.tried] == [2, 1]
    assert all("digest mismatch" in why for _, why in err.value.tried)
    assert _tree_files(tmp_path) == before  # nothing moved, nothing deleted


def _write_rows(workdir: Path, epochs) -> list[dict]:
    with MetricsWriter(workdir, process_index=0, tensorboard=False) as writer:
        return [writer.write_scalars(e, {"epoch": e, "reward_mean": 0.1 * e}) for e in epochs]


def test_metrics_rows_no_checkpoint_holds_move_to_a_side_file(tmp_path):
    rows = _write_rows(tmp_path, [1, 2, 3, 4])
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "rew')  # a line cut by a crash: kept too, as it was
    with MetricsWriter(tmp_path, process_index=0, tensorboard=False) as writer:
        assert writer.truncate_after(2) == 3  # resumed from the checkpoint of epoch 2
        writer.write_scalars(3, {"epoch": 3, "reward_mean": 0.5})
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    side = (tmp_path / SUPERSEDED_FILE).read_text().splitlines()
    assert [json.loads(line) for line in side[:2]] == rows[2:]
    assert side[2] == '{"step": 5, "rew'
    # a later fresh start (no checkpoint left) appends every row; none is ever dropped
    with MetricsWriter(tmp_path, process_index=0, tensorboard=False) as writer:
        assert writer.truncate_after(0) == 3
    assert (tmp_path / "metrics.jsonl").read_text() == ""
    side = (tmp_path / SUPERSEDED_FILE).read_text().splitlines()
    assert [json.loads(line)["step"] for line in side[3:]] == [1, 2, 3]
    assert len(side) == 6


@_unraisable
def test_the_cli_stops_with_an_error_when_no_checkpoint_is_usable(tmp_path):
    """Training never starts over from a run whose checkpoints are all damaged (it used to)."""
    workdir = tmp_path / "run"
    with Checkpointer(workdir / "checkpoints") as ckpt:
        for epoch in (1, 2):
            ckpt.save(epoch, _arrays(epoch), {"epoch": epoch})
    for epoch in (1, 2):  # every state file garbled: unreadable whatever the model's tree
        for path in (workdir / "checkpoints" / str(epoch) / "state").rglob("*"):
            if path.is_file():
                path.write_bytes(bytes(b ^ 0x5A for b in path.read_bytes()))
    rows = _write_rows(workdir, [1, 2, 3])
    checkpoints = _tree_files(workdir / "checkpoints")
    cmd = [
        sys.executable,
        "-m",
        "dag_jax.train",
        f"--config={ROOT / 'configs' / 'compressibility.py'}:tiny",
        f"--workdir={workdir}",
        "--config.algo=ddpo",  # no flow network to initialise: the restore comes sooner
        "--config.model=random-tiny",
        "--config.resolution=8",
        "--config.log.grid_every_epochs=0",
    ]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
    assert out.returncode == 1, out.stderr[-3000:]
    error = out.stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: no usable checkpoint in {workdir / 'checkpoints'}"), error
    assert "epoch 2: unreadable" in error and "epoch 1: unreadable" in error
    assert "Nothing was moved or deleted" in error
    # the damaged checkpoints and every metrics row are still there, untouched
    assert _tree_files(workdir / "checkpoints") == checkpoints
    assert read_metrics(workdir) == rows
    assert not (workdir / "samples").exists()


# --------------------------------------------------------------------------- config ranges


def _config(arg: str = "tiny", **overrides):
    import runpy

    cfg = runpy.run_path(str(ROOT / "configs" / "compressibility.py"))["get_config"](arg)
    cfg.model, cfg.resolution = "random-tiny", 8
    cfg.prompts.name, cfg.prompts.inline = "inline", ("a red circle", "a blue square")
    for dotted, value in overrides.items():
        node = cfg
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


BAD_VALUES = [
    ("train.learning_rate", 0.0, "a finite number > 0"),
    ("train.learning_rate", -3e-4, "a finite number > 0"),
    ("train.learning_rate", math.nan, "a finite number > 0"),
    ("train.learning_rate", math.inf, "a finite number > 0"),
    ("train.flow_learning_rate", 0.0, "a finite number > 0"),
    ("train.flow_learning_rate", -math.inf, "a finite number > 0"),
    ("checkpoint.every_epochs", 0, "an integer >= 1"),
    ("checkpoint.max_to_keep", 0, "an integer >= 1"),
    ("sample.steps", 0, "an integer >= 1"),
    ("sample.trajectories", -8, "an integer >= 1"),  # was "not divisible by sample.chunk"
    ("sample.chunk", -8, "an integer >= 1"),
    ("train.epochs", -1, "an integer >= 1"),
    ("train.trajectories_per_step", -4, "an integer >= 1"),
    ("train.micro_batch", 0, "an integer >= 1"),
    ("train.max_nonfinite", 0, "an integer >= 1"),
    ("lora.rank", 0, "an integer >= 1"),
    ("log.grid_every_epochs", -1, "an integer >= 0"),
    ("log.grid_prompts", -2, "an integer >= 0"),
    ("log.grid_seeds", -1, "an integer >= 0"),
]
B2_BAD_VALUES = [
    ("b2.prefixes", -4, "an integer >= 1"),
    ("b2.branches", 0, "an integer >= 1"),
    ("b2.stages", 0, "an integer >= 1"),
    ("b2.passes", 0, "an integer >= 1"),
]


@pytest.mark.parametrize("key, value, allowed", BAD_VALUES)
def test_values_out_of_range_name_key_value_and_range(key, value, allowed):
    cfg = _config(**{"log.grid_every_epochs": 0, key: value})
    with pytest.raises(ConfigError, match=rf"config {key}={value!r} is out of range.*{allowed}"):
        train.validate(cfg, num_devices=1)


@pytest.mark.parametrize("key, value, allowed", B2_BAD_VALUES)
def test_b2_sizes_out_of_range_are_named(key, value, allowed):
    cfg = _config("algo=b2,size=tiny", **{key: value})
    with pytest.raises(ConfigError, match=rf"config {key}={value!r} is out of range.*{allowed}"):
        train.validate(cfg, num_devices=1)


def test_grid_sizes_must_be_positive_only_when_grids_are_written():
    train.validate(_config(**{"log.grid_every_epochs": 0, "log.grid_prompts": 0}), 1)
    cfg = _config(**{"log.grid_every_epochs": 2, "log.grid_prompts": 0})
    with pytest.raises(ConfigError, match="log.grid_prompts=0 .*>= 1 while log.grid_every"):
        train.validate(cfg, num_devices=1)
    for algo_arg in ("tiny", "algo=b2,size=tiny", "algo=ddpo,size=tiny", "algo=dag_kl,size=tiny"):
        train.validate(_config(algo_arg), num_devices=1)  # the shipped sizes pass


# --------------------------------------------------------------------------- the workdir


def test_a_workdir_that_is_a_file_is_a_clear_config_error(tmp_path):
    afile = tmp_path / "notes.txt"
    afile.write_text("precious")
    with pytest.raises(ConfigError, match=f"the workdir {afile} is an existing file"):
        train_config.check_workdir(str(afile))
    with pytest.raises(ConfigError, match=f"cannot be created: {afile} is a file"):
        train_config.check_workdir(afile / "run")
    assert afile.read_text() == "precious"
    for fine in (tmp_path, tmp_path / "new" / "run", str(tmp_path / "x"), "gs://bucket/runs/a"):
        train_config.check_workdir(fine)
    for bad, why in (
        ("gs:///runs/a", "names no bucket"),
        ("gs:/bucket/runs/a", "lost a slash.*gs://bucket/runs/a"),
        ("g-s://bucket/x", "not a URL"),
        ("", "empty"),
    ):
        with pytest.raises(ConfigError, match=why):
            train_config.check_workdir(bad)


# --------------------------------------------------------------------------- captioning client

BODY = json.dumps({"recall": [[0.25], [0.75]]}).encode()
BIG = 300 * 2**20  # what a misbehaving server offers


class _Faulty(http.server.BaseHTTPRequestHandler):
    """A server with one fault per path; ``sent`` counts the body bytes each path got out."""

    sent: dict = {}
    done: dict = {}
    stop = threading.Event()

    def do_POST(self):  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers["Content-Length"]))
        name = self.path.strip("/")
        type(self).sent[name] = 0
        try:
            getattr(self, "_" + name.replace("-", "_"))()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client hung up: what these faults expect
        finally:
            type(self).done.setdefault(name, threading.Event()).set()

    def _count(self, data: bytes) -> None:
        self.wfile.write(data)
        type(self).sent[self.path.strip("/")] += len(data)

    def _head(self, **headers) -> None:
        self.send_response(200)
        for k, v in headers.items():
            self.send_header(k.replace("_", "-"), str(v))
        self.end_headers()

    def _ok(self):
        self._head(Content_Length=len(BODY))
        self._count(BODY)

    def _drip_body(self):  # each byte well within a per-read timeout; all of them are not
        data = BODY + b" " * 100
        self._head(Content_Length=len(data))
        for i in range(len(data)):
            if self.stop.is_set():
                return
            self._count(data[i : i + 1])
            time.sleep(0.05)

    def _drip_head(self):
        data = f"HTTP/1.0 200 OK\r\nX-Padding: {'p' * 80}\r\nContent-Length: {len(BODY)}\r\n\r\n"
        for ch in data.encode() + BODY:
            if self.stop.is_set():
                return
            self.wfile.write(bytes([ch]))
            time.sleep(0.05)

    def _huge(self, framing: str):
        block = b" " * (64 * 1024)  # JSON whitespace: a client that reads it all parses it
        if framing == "length":
            self._head(Content_Length=BIG + len(BODY))
        elif framing == "close":
            self._head()
        else:
            self.wfile.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            self.close_connection = True
        for _ in range(BIG // len(block)):
            if self.stop.is_set():
                return
            data = block if framing != "chunked" else b"%x\r\n%s\r\n" % (len(block), block)
            self._count(data)
        self._count(BODY if framing != "chunked" else b"%x\r\n%s\r\n0\r\n\r\n" % (len(BODY), BODY))

    def _huge_length(self):
        self._huge("length")

    def _huge_close(self):
        self._huge("close")

    def _huge_chunked(self):
        self._huge("chunked")

    def _garbage(self):
        self._head(Content_Length=7)
        self._count(b"\x80pickle")

    def _shape(self):
        data = json.dumps({"recall": [[0.5]]}).encode()
        self._head(Content_Length=len(data))
        self._count(data)

    def _cut(self):
        self._head(Content_Length=len(BODY) + 50)
        self._count(BODY[:5])

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def faulty():
    """Start the faulty server on 127.0.0.1 (a thread); stop it and its drips afterwards."""
    _Faulty.stop.clear()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Faulty)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    _Faulty.stop.set()
    httpd.shutdown()
    httpd.server_close()
    thread.join(10)


def _images(n: int) -> np.ndarray:
    return np.random.default_rng(0).random((n, 8, 8, 3)).astype(np.float32)


def _score(url: str, **options) -> np.ndarray:
    reward = captioning.bertscore(url=url, check=False, retries=0, **options)
    return np.asarray(reward(_images(2), ["a cat", "a dog"]))


def test_a_normal_server_gives_scores_up_to_the_size_limit(faulty):
    np.testing.assert_allclose(_score(f"{faulty}/ok", timeout=5.0), [0.25, 0.75])
    np.testing.assert_allclose(_score(f"{faulty}/ok", max_response_bytes=len(BODY)), [0.25, 0.75])
    with pytest.raises(RewardError, match=f"more than max_response_bytes={len(BODY) - 1}"):
        _score(f"{faulty}/ok", max_response_bytes=len(BODY) - 1)


@pytest.mark.parametrize("path", ["drip-body", "drip-head"])
def test_a_slow_drip_server_fails_at_the_deadline(faulty, path):
    timeout = 1.0
    start = time.monotonic()
    with pytest.raises(RewardError, match=rf"/{path} did not answer completely within .* 1.0 s"):
        _score(f"{faulty}/{path}", timeout=timeout)
    elapsed = time.monotonic() - start
    assert timeout * 0.9 <= elapsed <= timeout + 0.75, elapsed  # the drip takes >= 5 s


@pytest.mark.parametrize("framing", ["length", "close", "chunked"])
def test_a_huge_answer_is_abandoned_at_the_limit(faulty, framing):
    path = f"huge-{framing}"
    _Faulty.done.pop(path, None)
    tracemalloc.start()
    try:
        with pytest.raises(RewardError, match="more than max_response_bytes=16777216"):
            _score(f"{faulty}/{path}", timeout=60.0)  # the default limit, 16 MiB
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert _Faulty.done.setdefault(path, threading.Event()).wait(10), "the server kept sending"
    sent = _Faulty.sent[path]
    assert sent < 64 * 2**20, sent  # 16 MiB read plus what the sockets buffer; of 300 MiB
    assert peak < 64 * 2**20, peak


def test_every_failure_is_a_clear_reward_error(faulty):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    cases = {
        closed: r"is unreachable \(.*[Cc]onnection refused",
        f"{faulty}/garbage": "answered with something that is not JSON",
        f"{faulty}/shape": "'recall' has 2 entries .*got 1 entries",
        f"{faulty}/cut": "request to .*/cut failed: IncompleteRead",
    }
    for url, message in cases.items():
        with pytest.raises(RewardError, match=message):
            _score(url, timeout=5.0)
    for bad in (dict(timeout=0), dict(timeout=math.inf), dict(max_response_bytes=0)):
        with pytest.raises(RewardError, match=next(iter(bad))):
            _score(f"{faulty}/ok", **bad)
