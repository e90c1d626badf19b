"""Prompt-image alignment served by a captioning VLM: DDPO's ``llava_bertscore`` (SPEC §8).

The reward of an image is the BERTScore *recall* between what a VLM (LLaVA) answers to
"Answer concisely: what is going on in this image?" and the reference
``"The image contains {prompt}"``. Both models run in a separate server process (in DDPO, on
GPUs set aside for it); this module is only the client.

The reference client (ddpo-pytorch ``ddpo_pytorch/rewards.py::llava_bertscore``, server
``kvablack/LLaVA-server`` ``app.py``) POSTs a *pickled* dict to ``http://127.0.0.1:8085`` and
*unpickles* the answer. Unpickling bytes from a socket runs arbitrary code, so this client speaks
the same protocol with JSON instead of pickle and never unpickles anything. A reference server
becomes compatible by swapping its two (de)serialisation lines (``pickle.loads(data)`` →
``json.loads`` plus base64-decoding the images; ``pickle.dumps(response)`` →
``json.dumps(response).encode()``); nothing else changes.

Server contract (JSON over HTTP)
--------------------------------
Request: ``POST <url>`` (path taken from the URL, default ``/``), headers
``Content-Type: application/json``, body a UTF-8 JSON object::

    {
      "images":  ["<base64 JPEG>", ...],          # n images, standard base64 (RFC 4648, padded)
                                                   # of a quality-80 PIL JPEG of the uint8 RGB image
      "queries": [["Answer concisely: what is going on in this image?"], ...],   # (n, 1)
      "answers": [["The image contains <prompt>"], ...]                          # (n, 1)
    }

Response: status 200, a JSON object with one entry per image and per query (shape (n, 1))::

    {
      "outputs":   [["<VLM answer>"], ...],   # optional, for logging
      "precision": [[float], ...],            # optional
      "recall":    [[float], ...],            # required: the reward
      "f1":        [[float], ...]             # optional
    }

``recall`` entries may also be plain floats (shape (n,)). Any other status is an error; its
body (the reference server sends the Python traceback as text with status 500) is quoted in the
RewardError. Status 5xx is retried ``retries`` times with exponential backoff (DDPO retries
status 500 up to 1000 times). Images are sent in batches of ``batch_size`` (DDPO: 16), one
request each.

Each request is bounded: ``timeout`` is one deadline for all of it (connecting, sending, the
status line, headers and body), however slowly the server trickles bytes, and the response is
read in pieces and abandoned past ``max_response_bytes`` (or at once when its Content-Length
says so). Every failure is a RewardError naming the URL and what went wrong: unreachable
(refused, no route, connect timeout), no complete answer before the deadline, too large, not
JSON, or JSON of the wrong shape.

Defaults follow DDPO: port 8085, JPEG quality 80 for the transfer, the query and template above.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import math
import socket
import threading
import time
import urllib.parse
from collections.abc import Sequence

import numpy as np
from PIL import Image

from dag_jax.rewards.base import Reward, RewardError, host_reward

DEFAULT_URL = "http://127.0.0.1:8085"
DEFAULT_QUERY = "Answer concisely: what is going on in this image?"
DEFAULT_TEMPLATE = "The image contains {prompt}"
MAX_RESPONSE_BYTES = 16 * 2**20  # an answer is ~100 bytes per image; 16 MiB is far above it
READ_CHUNK = 64 * 1024


def bertscore(
    url: str = DEFAULT_URL,
    timeout: float = 120.0,
    connect_timeout: float = 5.0,
    template: str = DEFAULT_TEMPLATE,
    query: str = DEFAULT_QUERY,
    batch_size: int = 16,
    jpeg_quality: int = 80,
    retries: int = 3,
    check: bool = True,
    max_response_bytes: int = MAX_RESPONSE_BYTES,
) -> Reward:
    """Return the LLaVA + BERTScore-recall reward, a client of the JSON server described above.

    ``timeout`` is the deadline of each request as a whole, from connecting to the last byte
    of the answer (LLaVA inference is slow: DDPO uses 120 s); ``connect_timeout`` bounds
    opening the connection, so a server that is not there fails fast with a RewardError naming
    ``url``. An answer longer than ``max_response_bytes`` is a RewardError, read no further.
    ``check`` opens (and closes) one connection now, at construction, so a missing server is
    reported before any sampling is done.
    """
    target = parse_url(url)
    if "{prompt}" not in template:
        raise RewardError(f"bertscore template must contain '{{prompt}}', got {template!r}")
    try:
        template.format(prompt="x")
    except (KeyError, IndexError, ValueError) as e:
        raise RewardError(f"bertscore template {template!r} is not a valid format string") from e
    if batch_size < 1:
        raise RewardError(f"bertscore batch_size must be >= 1, got {batch_size}")
    if not 1 <= jpeg_quality <= 100:
        raise RewardError(f"bertscore jpeg_quality must be in [1, 100], got {jpeg_quality}")
    for name, value in (("timeout", timeout), ("connect_timeout", connect_timeout)):
        if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
            raise RewardError(f"bertscore {name} must be a finite number > 0 (s), got {value!r}")
    if not (isinstance(max_response_bytes, int) and max_response_bytes >= 1):
        raise RewardError(f"bertscore max_response_bytes must be >= 1, got {max_response_bytes!r}")
    if check:
        check_server(url, connect_timeout)

    def fn(images: np.ndarray, prompts: list[str]) -> np.ndarray:
        scores = []
        for start in range(0, len(prompts), batch_size):
            payload = make_request(
                images[start : start + batch_size],
                prompts[start : start + batch_size],
                template=template,
                query=query,
                jpeg_quality=jpeg_quality,
            )
            answer = post_json(
                target, payload, timeout, connect_timeout, retries, max_response_bytes
            )
            scores.append(parse_recall(answer, len(payload["images"]), url))
        return np.concatenate(scores) if scores else np.zeros((0,), np.float32)

    config = dict(
        url=url,
        timeout=timeout,
        connect_timeout=connect_timeout,
        template=template,
        query=query,
        batch_size=batch_size,
        jpeg_quality=jpeg_quality,
        retries=retries,
        max_response_bytes=max_response_bytes,
    )
    return host_reward("bertscore", fn, config)


def parse_url(url: str) -> tuple[str, str, int, str]:
    """Return (scheme, host, port, path) of an http(s) URL, or raise RewardError."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RewardError(f"bertscore url must be http(s)://host[:port][/path], got {url!r}")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as e:
        raise RewardError(f"bertscore url {url!r} has a bad port") from e
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return parts.scheme, parts.hostname, port, path


def check_server(url: str, connect_timeout: float = 5.0) -> None:
    """Raise RewardError naming ``url`` unless a TCP connection to it opens in time."""
    _, host, port, _ = parse_url(url)
    try:
        with socket.create_connection((host, port), timeout=connect_timeout):
            pass
    except OSError as e:
        raise RewardError(_unreachable(url, e)) from e


def encode_jpeg(image: np.ndarray, quality: int = 80) -> bytes:
    """Return the PIL JPEG bytes (at ``quality``) of one uint8 (H, W, 3) RGB image."""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def make_request(
    images: np.ndarray,
    prompts: Sequence[str],
    template: str = DEFAULT_TEMPLATE,
    query: str = DEFAULT_QUERY,
    jpeg_quality: int = 80,
) -> dict:
    """Return the JSON request body (a dict) for uint8 (n, H, W, 3) images and their prompts."""
    return {
        "images": [
            base64.b64encode(encode_jpeg(image, jpeg_quality)).decode("ascii") for image in images
        ],
        "queries": [[query] for _ in prompts],
        "answers": [[template.format(prompt=prompt)] for prompt in prompts],
    }


def post_json(
    target: tuple[str, str, int, str],
    payload: dict,
    timeout: float,
    connect_timeout: float,
    retries: int = 0,
    max_response_bytes: int = MAX_RESPONSE_BYTES,
) -> object:
    """POST ``payload`` as JSON to ``target`` (from ``parse_url``) and return the decoded answer.

    Each attempt must complete within ``timeout`` seconds and answer at most
    ``max_response_bytes``. Connection failures, the deadline and too large an answer raise
    RewardError at once; status 5xx is retried ``retries`` times (backoff 1, 2, 4, ... s);
    other statuses and bodies that are not JSON raise RewardError.
    """
    body = json.dumps(payload).encode("utf-8")
    url = _url_of(target)
    for attempt in range(retries + 1):
        status, data = _post_once(target, body, timeout, connect_timeout, max_response_bytes)
        if status == 200:
            try:
                return json.loads(data.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise RewardError(
                    f"bertscore server at {url} answered with something that is not JSON "
                    f"({_excerpt(data)}); it must speak the JSON protocol of "
                    "dag_jax.rewards.captioning, not the pickle one of the reference server"
                ) from e
        if status < 500 or attempt == retries:
            break
        time.sleep(2.0**attempt)
    raise RewardError(f"bertscore server at {url} answered HTTP {status}: {_excerpt(data)}")


def parse_recall(answer: object, n: int, url: str = "") -> np.ndarray:
    """Return the (n,) float32 recall scores of a server answer, or raise RewardError."""
    recall = answer.get("recall") if isinstance(answer, dict) else None
    if not isinstance(recall, list) or len(recall) != n:
        got = "no 'recall' list" if not isinstance(recall, list) else f"{len(recall)} entries"
        raise RewardError(
            f"bertscore server at {url} must answer a JSON object whose 'recall' has {n} entries "
            f"(one per image), got {got}"
        )
    out = []
    for entry in recall:
        value = entry[0] if isinstance(entry, list) and len(entry) == 1 else entry
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise RewardError(
                f"bertscore server at {url}: each recall must be a finite number or [number], "
                f"got {entry!r}"
            )
        out.append(float(value))
    return np.asarray(out, np.float32)


def _post_once(
    target: tuple[str, str, int, str],
    body: bytes,
    timeout: float,
    connect_timeout: float,
    max_bytes: int = MAX_RESPONSE_BYTES,
) -> tuple[int, bytes]:
    """Send one POST within ``timeout`` s in all; return (status, body of <= ``max_bytes``).

    Every socket operation waits at most for the time left, and a timer shuts the socket down
    at the deadline, so a server that sends a byte now and then (each read alone would be in
    time) cannot stretch the request. Any failure raises RewardError.
    """
    scheme, host, port, path = target
    url = _url_of(target)
    deadline = time.monotonic() + timeout
    cls = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
    conn = cls(host, port, timeout=min(connect_timeout, timeout))
    expired = threading.Event()
    timer = None
    try:
        try:
            conn.connect()
        except OSError as e:
            raise RewardError(_unreachable(url, e)) from e
        sock = conn.sock  # kept: http.client drops conn.sock when the response closes

        def left() -> float:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            return remaining

        def expire() -> None:
            expired.set()
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes a blocked read or write
            except OSError:
                pass

        timer = threading.Timer(max(deadline - time.monotonic(), 0.0), expire)
        timer.daemon = True
        timer.start()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        try:
            sock.settimeout(left())
            conn.request("POST", path, body=body, headers=headers)
            sock.settimeout(left())
            response = conn.getresponse()
            declared = response.getheader("Content-Length")
            if declared is not None and declared.strip().isdigit() and int(declared) > max_bytes:
                raise RewardError(_too_large(url, max_bytes, f"it declares {int(declared)} bytes"))
            chunks, size = [], 0
            while True:
                sock.settimeout(left())
                chunk = response.read1(min(READ_CHUNK, max_bytes + 1 - size))
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
                if size > max_bytes:
                    raise RewardError(_too_large(url, max_bytes, "stopped reading there"))
            if expired.is_set():  # the shutdown may look like the end of a close-framed body
                raise TimeoutError
            if response.length:  # read1 answers b"" when the server hangs up before the end
                raise http.client.IncompleteRead(b"".join(chunks), response.length)
            return response.status, b"".join(chunks)
        except (OSError, http.client.HTTPException) as e:
            if expired.is_set() or isinstance(e, TimeoutError) or time.monotonic() >= deadline:
                raise RewardError(
                    f"bertscore server at {url} did not answer completely within the request's "
                    f"deadline of {timeout} s (timeout=...)"
                ) from e
            raise RewardError(f"bertscore request to {url} failed: {e!r}") from e
    finally:
        if timer is not None:
            timer.cancel()
        conn.close()


def _too_large(url: str, max_bytes: int, detail: str) -> str:
    """Return the message for an answer longer than ``max_bytes``."""
    return (
        f"bertscore server at {url} answered more than max_response_bytes={max_bytes} bytes "
        f"({detail}); an answer is about 100 bytes per image"
    )


def _unreachable(url: str, error: Exception) -> str:
    """Return the message for a server that cannot be reached."""
    return (
        f"bertscore server at {url} is unreachable ({error}); start a LLaVA + BERTScore server "
        "speaking the JSON protocol of dag_jax.rewards.captioning there, or pass url=..."
    )


def _url_of(target: tuple[str, str, int, str]) -> str:
    """Return the URL string of a parsed target."""
    scheme, host, port, path = target
    return f"{scheme}://{host}:{port}{path}"


def _excerpt(data: bytes, limit: int = 300) -> str:
    """Return the start of a response body as text, for error messages."""
    text = data.decode("utf-8", errors="replace").strip()
    return repr(text if len(text) <= limit else text[:limit] + " ...")
