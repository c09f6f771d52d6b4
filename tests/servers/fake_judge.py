"""A stand-in UniGenBench judge for tests: a real HTTP server on 127.0.0.1 speaking vLLM's OpenAI subset.

    python tests/servers/fake_judge.py [--rule image|name] [--pass-dims Style,World Knowledge] [--delay-s 0]

Prints ``listening on 127.0.0.1:<port>`` once it accepts connections (port 0 = a free port chosen by the OS).
Endpoints: ``GET /health``, ``GET /v1/models``, ``POST /v1/chat/completions`` (validated with our pydantic
request model; an unknown model name gets 404 as vLLM answers), ``GET /stats`` (request counters, each request
counted once its reply is sent).

How it answers (the rule the tests compute expected accuracies from):

* ``--rule image`` (default): the image's top-left pixel (R, G, B) encodes the verdict. Bit j of R is the score
  of test point j; G selects a behaviour:
  0 normal; 1 malformed reply on the first request of this image, then normal; 2 always malformed;
  3 always a score list one entry too long; 4 HTTP 500 on the first request, then normal; 5 always HTTP 500;
  6 sleep ``--slow-s`` then normal; 7 a body that is not JSON; 8 a reply cut short with finish_reason "length".
* ``--rule name``: test point j scores 1 iff its primary dimension (name before " - ", or "-" for Chinese
  names) is in ``--pass-dims``; images are ignored (use it with a real model's random images).

``--delay-s`` delays every reply (a slow server).
"""

from __future__ import annotations

import argparse
import ast
import base64
import io
import json
import re
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from PIL import Image

from deepgen_rl.rewards.protocol import ChatCompletionRequest

NORMAL, MALFORMED_ONCE, MALFORMED, WRONG_LENGTH, ERROR_ONCE, ERROR, SLOW, NOT_JSON, TRUNCATED = range(9)
_CHECKPOINTS = re.compile(r"<checkpoint>(.*?)</checkpoint>", re.DOTALL)


def encode_verdict(scores: list[int], behaviour: int = NORMAL, tag: int = 0) -> tuple[int, int, int]:
    """The top-left pixel colour that makes the image rule answer ``scores`` with ``behaviour``."""
    bits = sum(int(score) << j for j, score in enumerate(scores))
    assert bits < 256 and 0 <= behaviour <= TRUNCATED and 0 <= tag < 256
    return bits, behaviour, tag


class JudgeState:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.pass_dims = {d.strip() for d in args.pass_dims.split(",") if d.strip()}
        self.lock = threading.RLock()
        self.counts: Counter[str] = Counter()
        self.seen_images: Counter[str] = Counter()
        self.pending: dict[int, str] = {}  # handler thread -> the kind of request it is answering
        self.last_request: dict = {}
        self.inflight = 0
        self.max_inflight = 0  # most chat requests being answered at once: shows the client's concurrency

    def enter(self) -> None:
        with self.lock:
            self.inflight += 1
            self.max_inflight = max(self.max_inflight, self.inflight)

    def leave(self) -> None:
        with self.lock:
            self.inflight -= 1

    def count(self, key: str, image_key: str = "") -> int:
        """Record one request of kind ``key`` (counted once its reply is sent, see ``Handler._send``); return how
        many requests this image had before this one."""
        with self.lock:
            self.pending[threading.get_ident()] = key
            before = self.seen_images[image_key]
            if image_key:
                self.seen_images[image_key] += 1
            return before


def _primary(name: str) -> str:
    return name.split(" - ", 1)[0].strip() if " - " in name else name.split("-", 1)[0].strip()


def _reply(scores: list[int]) -> str:
    analysis = [f"checked point {j}" for j in range(len(scores))]
    return f"<description><analysis>{analysis}</analysis><score>{scores}</score></description>"


class Handler(BaseHTTPRequestHandler):
    state: JudgeState  # set on the subclass built in main()
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        # The reply and its count are one step under the lock /stats takes: a client holding the reply sees it
        # counted, so no test sleeps for a count.
        with self.state.lock:
            key = self.state.pending.pop(threading.get_ident(), None)
            self.wfile.write(body)  # a client gone before the reply: not counted
            if key is not None:
                self.state.counts[key] += 1

    def _json(self, status: int, payload: dict) -> None:
        self._send(status, json.dumps(payload).encode())

    def do_GET(self) -> None:
        if self.path == "/health":
            self._send(200, b"")
        elif self.path == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": self.state.args.served_model_name, "object": "model"}]})
        elif self.path == "/stats":
            with self.state.lock:
                self._json(200, {"counts": dict(self.state.counts), "last_request": self.state.last_request,
                                 "max_inflight": self.state.max_inflight})
        else:
            self._json(404, {"error": f"no route {self.path}"})

    def do_POST(self) -> None:
        self.state.enter()
        try:
            self._chat()
        finally:
            self.state.leave()

    def _chat(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path != "/v1/chat/completions":
            self._json(404, {"error": f"no route {self.path}"})
            return
        try:
            request = ChatCompletionRequest.model_validate_json(body)
        except Exception as err:
            self.state.count("bad_request")
            self._json(400, {"error": f"invalid request: {err}"})
            return
        if request.model != self.state.args.served_model_name:
            self.state.count("unknown_model")
            self._json(404, {"error": f"The model `{request.model}` does not exist."})
            return
        parts = request.messages[0].content
        images = [p.image_url.url for p in parts if getattr(p, "type", "") == "image_url"]
        text = "".join(p.text for p in parts if getattr(p, "type", "") == "text")
        with self.state.lock:
            self.state.last_request = {"model": request.model, "temperature": request.temperature,
                                       "max_tokens": request.max_tokens, "num_images": len(images),
                                       "image_prefix": images[0][:22] if images else "", "text": text}
        match = _CHECKPOINTS.search(text)
        if len(images) != 1 or match is None:
            self.state.count("bad_request")
            self._json(400, {"error": "expected one image and a <checkpoint>[...]</checkpoint> list"})
            return
        points = ast.literal_eval(match.group(1))
        if self.state.args.delay_s:
            time.sleep(self.state.args.delay_s)
        if self.state.args.rule == "name":
            self.state.count("chat")
            self._answer([int(_primary(p) in self.state.pass_dims) for p in points])
            return
        pixel = Image.open(io.BytesIO(base64.b64decode(images[0].split(",", 1)[1]))).convert("RGB").getpixel((0, 0))
        bits, behaviour = pixel[0], pixel[1]
        before = self.state.count("chat", images[0])
        scores = [(bits >> j) & 1 for j in range(len(points))]
        if behaviour == MALFORMED or (behaviour == MALFORMED_ONCE and before == 0):
            self._answer_text("I looked at the picture and I like it.")
        elif behaviour == WRONG_LENGTH:
            self._answer(scores + [1])
        elif behaviour == ERROR or (behaviour == ERROR_ONCE and before == 0):
            self._json(500, {"error": "internal server error (fake)"})
        elif behaviour == TRUNCATED:  # vLLM stopped at max_tokens inside the analysis
            self._answer_text(_reply(scores)[:12], finish_reason="length")
        elif behaviour == NOT_JSON:
            self._send(200, b"<html>not json</html>", "text/html")
        else:
            if behaviour == SLOW:
                time.sleep(self.state.args.slow_s)
            self._answer(scores)

    def _answer(self, scores: list[int]) -> None:
        self._answer_text(_reply(scores))

    def _answer_text(self, content: str, finish_reason: str = "stop") -> None:
        self._json(200, {"id": "fake", "object": "chat.completion", "model": self.state.args.served_model_name,
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                      "finish_reason": finish_reason}]})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--served-model-name", default="UniGenBench-EvalModel-qwen3vl-32b-v1")
    parser.add_argument("--rule", choices=("image", "name"), default="image")
    parser.add_argument("--pass-dims", default="", help="comma-separated primary dimensions scored 1 (rule name)")
    parser.add_argument("--delay-s", type=float, default=0.0, help="delay of every reply")
    parser.add_argument("--slow-s", type=float, default=5.0, help="delay of behaviour-6 replies")
    args = parser.parse_args(argv)
    handler = type("BoundHandler", (Handler,), {"state": JudgeState(args)})
    server = ThreadingHTTPServer(("127.0.0.1", args.port), handler)
    server.daemon_threads = True
    print(f"listening on 127.0.0.1:{server.server_address[1]}", flush=True)
    server.serve_forever()


# ---- launching it from a test ----

class FakeJudge:
    """Run the server in a child process: ``with FakeJudge(rule="name") as judge: judge.url ...``."""

    def __init__(self, *, rule: str = "image", pass_dims: str = "", delay_s: float = 0.0, slow_s: float = 5.0,
                 served_model_name: str = "UniGenBench-EvalModel-qwen3vl-32b-v1", start_timeout_s: float = 60.0):
        self.argv = [sys.executable, str(Path(__file__).resolve()), "--rule", rule, "--pass-dims", pass_dims,
                     "--delay-s", str(delay_s), "--slow-s", str(slow_s), "--served-model-name", served_model_name]
        self.start_timeout_s = start_timeout_s
        self.process = None
        self.url = ""

    def __enter__(self) -> "FakeJudge":
        import subprocess
        import tempfile

        # stderr goes to a file: a pipe nobody reads would block the server once tracebacks fill it.
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=self._stderr, text=True)
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.append(self.process.stdout.readline()), daemon=True)
        reader.start()
        reader.join(self.start_timeout_s)
        if not lines or not lines[0].startswith("listening on "):
            self._terminate()
            self._stderr.seek(0)
            stderr = self._stderr.read()[-2000:]
            self.stop()
            raise RuntimeError(f"fake judge did not start: {lines} {stderr}")
        self.url = "http://" + lines[0].split("listening on ", 1)[1].strip()
        return self

    def stats(self) -> dict:
        import httpx

        return httpx.get(self.url + "/stats", timeout=10).json()

    def _terminate(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except Exception:
                self.process.kill()
                self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is None:
            return
        self._terminate()
        self.process.stdout.close()
        self._stderr.close()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":
    main()
