"""Rewards: registry, base, JPEG sizes, the BERTScore client (ImageReward: test_imagereward.py)."""

from __future__ import annotations

import base64
import http.server
import io
import json
import socket
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import dag_jax.rewards as R
from dag_jax.rewards import captioning
from dag_jax.rewards.base import RewardError, host_reward, jax_reward

RNG = np.random.default_rng(0)


def _images(b=3, h=32, w=40, seed=0):
    return np.random.default_rng(seed).random((b, h, w, 3)).astype(np.float32)


def _pil_kb(u8, quality=95):
    buffer = io.BytesIO()
    Image.fromarray(u8).save(buffer, format="JPEG", quality=quality)
    return buffer.tell() / 1000


# ---------------------------------------------------------------------------------------------
# Registry and base


def test_registry_names_and_unknown_reward():
    assert {"jpeg_compressibility", "jpeg_incompressibility", "imagereward", "bertscore"} <= set(
        R.names()
    )
    with pytest.raises(RewardError, match=r"unknown reward 'jpeg'.*jpeg_compressibility"):
        R.get("jpeg")


def test_unknown_option_is_named_with_the_valid_ones():
    with pytest.raises(RewardError, match=r"no option\(s\) qualty.*quality"):
        R.get("jpeg_compressibility", qualty=90)


def test_broken_factory_module_is_a_reward_error(monkeypatch):
    monkeypatch.setitem(R._FACTORIES, "broken", "dag_jax.rewards._no_such_module:f")
    with pytest.raises(RewardError, match="'broken' could not be loaded"):
        R.get("broken")
    with pytest.raises(RewardError, match="module:function"):
        R.register("x", "no_colon")


def test_host_reward_checks_the_scores_shape_and_surfaces_errors_eagerly():
    bad = host_reward("bad", lambda im, p: np.zeros(len(p) + 1))
    with pytest.raises(RewardError, match=r"'bad' returned scores of shape \(3,\) for 2 images"):
        bad(_images(2), ["a", "b"])

    def boom(images, prompts):
        raise RewardError("boom")

    with pytest.raises(RewardError, match="boom"):  # eager: the error itself, not a JaxRuntimeError
        host_reward("boom", boom)(_images(1), ["a"])


def test_host_reward_sees_quantised_uint8_images_and_the_right_prompts():
    seen = {}

    def fn(images, prompts):
        seen["images"], seen["prompts"] = images, prompts
        return np.arange(len(prompts), dtype=np.float32)

    reward = host_reward("spy", fn)
    x = _images(3)
    fn_jit = jax.jit(reward.bind(["p0", "p1"]))
    out = fn_jit(jnp.asarray(x), jnp.array([1, 0, 1]))
    np.testing.assert_array_equal(out, [0, 1, 2])
    assert seen["prompts"] == ["p1", "p0", "p1"]
    assert seen["images"].dtype == np.uint8
    np.testing.assert_array_equal(seen["images"], np.round(x * 255).astype(np.uint8))


def test_jax_reward_runs_under_jit_on_quantised_images():
    reward = jax_reward("brightness", lambda x, idx: x.mean(axis=(1, 2, 3)))
    x = _images(2)
    expected = np.round(x * 255).mean(axis=(1, 2, 3)) / 255
    np.testing.assert_allclose(reward(x, ["a", "b"]), expected, rtol=1e-5)
    with pytest.raises(RewardError, match="NHWC"):
        jax.jit(reward.bind(["a"]))(jnp.zeros((2, 3, 8, 8)), jnp.zeros(2, jnp.int32))


# ---------------------------------------------------------------------------------------------
# JPEG


@pytest.mark.parametrize("kind", ["random", "flat", "gradient"])
def test_jpeg_sizes_equal_pil_at_quality_95(kind):
    if kind == "random":
        x = _images(3, 48, 64)
    elif kind == "flat":
        x = np.full((3, 48, 64, 3), 0.3, np.float32)
    else:
        x = np.broadcast_to(
            np.linspace(0, 1, 64, dtype=np.float32)[None, None, :, None], (3, 48, 64, 3)
        )
    u8 = np.round(x * 255).astype(np.uint8)
    sizes = np.array([_pil_kb(im) for im in u8], np.float32)
    inc = R.get("jpeg_incompressibility")
    comp = R.get("jpeg_compressibility")
    np.testing.assert_allclose(inc(x, ["a"] * 3), sizes, rtol=1e-6)
    np.testing.assert_allclose(comp(x, ["a"] * 3), -sizes, rtol=1e-6)
    assert inc.config == {"quality": 95} and not inc.jittable


def test_flat_images_compress_far_better_than_noise():
    comp = R.get("jpeg_compressibility")
    flat = comp(np.full((1, 64, 64, 3), 0.5, np.float32), ["a"])
    noise = comp(_images(1, 64, 64), ["a"])
    assert float(flat[0]) > float(noise[0]) + 3  # ~0.7 kB vs ~5.4 kB


def test_jpeg_inside_jit_and_vmap_matches_eager():
    reward = R.get("jpeg_incompressibility")
    x = _images(4, 32, 32)
    eager = reward(x, ["a", "b", "a", "b"])
    bound = reward.bind(["a", "b"])
    idx = jnp.array([0, 1, 0, 1])
    np.testing.assert_allclose(jax.jit(bound)(jnp.asarray(x), idx), eager)
    vm = jax.jit(jax.vmap(bound))(jnp.asarray(x).reshape(2, 2, 32, 32, 3), idx.reshape(2, 2))
    np.testing.assert_allclose(vm.reshape(-1), eager)
    grad = jax.grad(lambda im: bound(im, idx).sum())(jnp.asarray(x))
    np.testing.assert_array_equal(grad, 0.0)  # black box: no gradient flows


def test_jpeg_quality_option():
    x = _images(2, 32, 32)
    u8 = np.round(x * 255).astype(np.uint8)
    got = R.get("jpeg_incompressibility", quality=50)(x, ["a", "a"])
    np.testing.assert_allclose(got, [_pil_kb(im, 50) for im in u8], rtol=1e-6)
    with pytest.raises(RewardError, match=r"\[1, 100\]"):
        R.get("jpeg_compressibility", quality=101)


def test_wrong_image_ranges_dtypes_and_shapes_are_explained():
    reward = R.get("jpeg_compressibility")
    x = _images(2)
    with pytest.raises(RewardError, match=r"\[-1, 1\].*\(x \+ 1\) / 2"):
        reward(x * 2 - 1, ["a", "b"])
    with pytest.raises(RewardError, match="divide by 255"):
        reward(x * 255, ["a", "b"])
    with pytest.raises(RewardError, match="dtype uint8"):
        reward(np.round(x * 255).astype(np.uint8), ["a", "b"])
    with pytest.raises(RewardError, match=r"\(B, H, W, 3\).*\(2, 3, 32, 40\)"):
        reward(x.transpose(0, 3, 1, 2), ["a", "b"])
    with pytest.raises(RewardError, match=r"\(B, H, W, 3\)"):
        reward(x[0], ["a"])
    with pytest.raises(RewardError, match="2 images but 1 prompts"):
        reward(x, ["a"])
    with pytest.raises(RewardError, match="NHWC"):  # also at trace time inside jit
        jax.jit(reward.bind(["a"]))(jnp.asarray(x.transpose(0, 3, 1, 2)), jnp.zeros(2, jnp.int32))


# ---------------------------------------------------------------------------------------------
# BERTScore client against a local JSON server


def _recall_of(answer: str) -> float:
    return (len(answer) % 17) / 17


class _Handler(http.server.BaseHTTPRequestHandler):
    requests: list = []

    def do_POST(self):  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.path == "/fail":
            return self._send(500, b"Traceback: CUDA out of memory")
        if self.path == "/garbage":
            return self._send(200, b"\x80\x04pickle")
        data = json.loads(body)
        type(self).requests.append(data)
        sizes = [
            Image.open(io.BytesIO(base64.b64decode(s)), formats=["JPEG"]).size
            for s in data["images"]
        ]
        answers = [a[0] for a in data["answers"]]
        n = len(answers) - (1 if self.path == "/short" else 0)
        response = {
            "outputs": [[f"{w}x{h} image"] for w, h in sizes][:n],
            "precision": [[0.5]] * n,
            "recall": [[_recall_of(a)] for a in answers][:n],
            "f1": [[0.5]] * n,
        }
        self._send(200, json.dumps(response).encode())

    def _send(self, status, body):
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bertscore_reads_back_recall_per_image(server):
    _Handler.requests.clear()
    reward = R.get("bertscore", url=server, batch_size=2)
    prompts = ["a cat riding a bike", "a dog", "an ant playing chess"]
    scores = reward(_images(3, 24, 40), prompts)
    expected = [_recall_of(f"The image contains {p}") for p in prompts]
    np.testing.assert_allclose(scores, expected, rtol=1e-6)
    assert [len(r["images"]) for r in _Handler.requests] == [2, 1]  # batches of batch_size
    first = _Handler.requests[0]
    assert first["queries"] == [["Answer concisely: what is going on in this image?"]] * 2
    assert first["answers"] == [
        ["The image contains a cat riding a bike"],
        ["The image contains a dog"],
    ]
    image = Image.open(io.BytesIO(base64.b64decode(first["images"][0])))
    assert image.format == "JPEG" and image.size == (40, 24)


def test_bertscore_inside_jit_and_with_a_custom_template(server):
    reward = R.get("bertscore", url=server + "/", template="A photo of {prompt}.", check=False)
    bound = jax.jit(reward.bind(["cat", "two dogs"]))
    scores = bound(jnp.asarray(_images(3)), jnp.array([1, 0, 1]))
    expected = [_recall_of(f"A photo of {p}.") for p in ("two dogs", "cat", "two dogs")]
    np.testing.assert_allclose(scores, expected, rtol=1e-6)


def test_unreachable_server_is_named_at_construction_or_first_use():
    url = f"http://127.0.0.1:{_closed_port()}"
    with pytest.raises(RewardError, match=f"{url}.*unreachable"):
        R.get("bertscore", url=url, connect_timeout=2.0)
    reward = R.get("bertscore", url=url, check=False, connect_timeout=2.0)
    with pytest.raises(RewardError, match=f"{url}.*unreachable"):
        reward(_images(1), ["a cat"])


def test_server_errors_and_bad_answers_are_reward_errors(server):
    with pytest.raises(RewardError, match="HTTP 500.*CUDA out of memory"):
        R.get("bertscore", url=server + "/fail", retries=0)(_images(1), ["a"])
    with pytest.raises(RewardError, match="not JSON.*pickle"):
        R.get("bertscore", url=server + "/garbage")(_images(1), ["a"])
    with pytest.raises(RewardError, match="'recall' has 2 entries.*got 1 entries"):
        R.get("bertscore", url=server + "/short")(_images(2), ["a", "b"])
    with pytest.raises(RewardError, match="finite number"):
        captioning.parse_recall({"recall": [["x"]]}, 1, "u")


def test_bertscore_rejects_bad_options():
    with pytest.raises(RewardError, match="http"):
        R.get("bertscore", url="ftp://host/", check=False)
    with pytest.raises(RewardError, match="'\\{prompt\\}'"):
        R.get("bertscore", template="The image contains", check=False)
    with pytest.raises(RewardError, match="batch_size"):
        R.get("bertscore", batch_size=0, check=False)
