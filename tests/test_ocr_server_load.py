"""Our OCR server under overload, as a real process on 127.0.0.1 (its app around a slow recording stand-in engine,
tests/servers/slow_ocr_server.py): requests served whole and first in first out, the work of a client that gave up
dropped, and a body-size limit checked before the body is read."""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from deepgen_rl.rewards.http_utils import encode_png_base64
from tests.reward_servers import REPO_ROOT, ServerProcess, free_port

pytestmark = pytest.mark.timeout(180)

SLOW_SERVER = REPO_ROOT / "tests" / "servers" / "slow_ocr_server.py"
TAG_WIDTH_OFFSET = 16  # tests/servers/slow_ocr_server.py reads request i's tag from its images' width
BODY_LIMIT_MB = 1


def _server(tmp_path: Path, delay_s: float) -> tuple[ServerProcess, Path]:
    log = tmp_path / f"read_{delay_s}.log"
    log.touch()
    port = free_port()
    argv = [sys.executable, str(SLOW_SERVER), "--port", str(port), "--delay", str(delay_s), "--log", str(log),
            "--max-body-mb", str(BODY_LIMIT_MB)]
    return ServerProcess(argv, port), log


def _request(tag: int, num_images: int) -> dict:
    image = encode_png_base64(Image.new("RGB", (TAG_WIDTH_OFFSET + tag, 16), "white"))
    return {"items": [{"image": image, "prompt": f'a sign "req{tag}"'} for _ in range(num_images)]}


def _read_tags(log: Path) -> list[int]:
    return [int(line) for line in log.read_text().split()]


def _wait_for(condition, what: str, timeout_s: float = 60.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_requests_are_served_whole_and_first_in_first_out(tmp_path):
    """Four requests of eight images, sent in order while the first runs: read as four unbroken blocks, in order
    (interleaved image by image, every request would end only when the last one does)."""
    server, log = _server(tmp_path, delay_s=0.05)
    replies: dict[int, httpx.Response] = {}
    with server:
        threads = []
        for tag in range(4):
            thread = threading.Thread(target=lambda t=tag: replies.__setitem__(
                t, httpx.post(server.url + "/score", json=_request(t, 8), timeout=120)))
            thread.start()
            threads.append(thread)
            _wait_for(lambda n=tag + 1: server.stats()["requests_received"] >= n, f"request {tag} to arrive")
        for thread in threads:
            thread.join(timeout=120)
        stats = server.stats()
    assert _read_tags(log) == [0] * 8 + [1] * 8 + [2] * 8 + [3] * 8
    for tag, reply in replies.items():
        assert reply.status_code == 200
        results = reply.json()["results"]
        assert [r["recognized_text"] for r in results] == [f"req{tag}"] * 8 and all(r["score"] == 1.0 for r in results)
    assert stats["requests_completed"] == 4 and stats["images_scored"] == 32 and stats["requests_dropped"] == 0


def test_overload_first_request_answers_in_time_and_abandoned_work_is_dropped(tmp_path):
    """The field report: 4 concurrent requests of 8 images, clients time out after 6 s, the server needs 4 s per
    request. The first one served answers (~4 s); the others' clients give up at 6 s, and then the running one stops
    after its current image and the queued ones are never read."""
    server, log = _server(tmp_path, delay_s=0.5)
    outcomes: dict[int, str] = {}

    def client(tag: int) -> None:
        try:
            reply = httpx.post(server.url + "/score", json=_request(tag, 8), timeout=6.0)
            outcomes[tag] = f"HTTP {reply.status_code}"
        except httpx.TimeoutException:
            outcomes[tag] = "timeout"

    with server:
        threads = [threading.Thread(target=client, args=(tag,)) for tag in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        stats = _wait_for(lambda: (s := server.stats())["queue_depth"] == 0 and s, "the queue to drain")
        time.sleep(1.0)  # an image still being read when the queue drained has been logged by now
        tags = _read_tags(log)
    assert sorted(outcomes.values()) == ["HTTP 200", "timeout", "timeout", "timeout"], outcomes
    served = next(tag for tag, outcome in outcomes.items() if outcome == "HTTP 200")
    assert tags[:8] == [served] * 8  # served whole, first
    assert stats["requests_completed"] == 1 and stats["requests_dropped"] == 3
    # 4 s served + 2 s of the next request before its client left: far fewer than the 32 images asked for.
    assert len(tags) < 16 and stats["images_scored"] == len(tags)
    assert stats["images_dropped"] == 32 - len(tags)


@pytest.fixture(scope="module")
def limit_server(tmp_path_factory):
    server, _ = _server(tmp_path_factory.mktemp("ocr_limit"), delay_s=0.0)
    with server:
        yield server


def _raw_exchange(port: int, head: bytes, body_parts: list[bytes]) -> bytes:
    """Send a request head and some body bytes, never the rest, and read the reply: a server that waited for the whole
    body would never answer (the socket timeout fails the test)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head)
        for part in body_parts:
            sock.sendall(part)
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    return reply


def test_oversized_body_is_refused_from_its_content_length_before_reading(limit_server):
    head = (f"POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {300 * 2**20}\r\n\r\n").encode()
    reply = _raw_exchange(limit_server.port, head, [b'{"items": ['])  # 300 MB announced, 11 bytes sent
    status, _, body = reply.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 413")
    detail = json.loads(body)["detail"]
    assert f"{300 * 2**20} bytes" in detail and f"{BODY_LIMIT_MB * 2**20} bytes" in detail
    assert "--max-body-mb" in detail and "--reward_request_batch_size" in detail


def test_client_leaving_during_the_upload_is_not_an_error(limit_server):
    received = limit_server.stats()["requests_received"]
    head = b"POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    with socket.create_connection(("127.0.0.1", limit_server.port), timeout=30) as sock:
        sock.sendall(head + b'{"items": [')  # 11 of the 1000 bytes announced, then the client is gone
        time.sleep(0.5)  # (while the server waits for the rest of the body)
    # A full request made after it is served (so the server has long seen the first one go).
    assert httpx.post(limit_server.url + "/score", json=_request(2, 1), timeout=60).status_code == 200
    assert limit_server.stats()["requests_received"] == received + 1  # the abandoned upload queued nothing
    assert "ClientDisconnect" not in limit_server.log()  # the tail of the traceback it used to log


def test_oversized_chunked_body_is_refused_once_past_the_limit(limit_server):
    head = (b"POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    chunk = b"x" * (256 * 1024)
    parts = [b"%x\r\n%s\r\n" % (len(chunk), chunk)] * (4 * BODY_LIMIT_MB + 1)  # just past the limit, no final chunk
    reply = _raw_exchange(limit_server.port, head, parts)
    status, _, body = reply.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 413")
    assert "chunked" in json.loads(body)["detail"]
    # The server is still healthy and serves a normal request afterwards.
    reply = httpx.post(limit_server.url + "/score", json=_request(1, 2), timeout=60)
    assert reply.status_code == 200 and [r["recognized_text"] for r in reply.json()["results"]] == ["req1", "req1"]
