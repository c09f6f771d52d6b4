"""A stand-in image-editing judge for tests: a real HTTP server on 127.0.0.1 speaking vLLM's OpenAI subset.

    python tests/servers/fake_edit_judge.py [--served-model-name EditJudge]

Prints ``listening on 127.0.0.1:<port>`` once it accepts connections. Endpoints: ``GET /health``, ``GET /v1/models``,
``POST /v1/chat/completions`` (validated with our pydantic request model; an unknown model gets 404 as vLLM
answers), ``GET /stats`` (requests per instruction keyword and the images of the last request).

Rule (the tests compute expected rewards from it): with m_first / m_last the mean pixel value (0-255) of the first
and the last image of the request, the reply ends with ``<score>X</score>``, X = 10 (m_last - m_first + 255) / 510.
The instruction (inside 「」) must be in the text and the text must announce as many source images as it sent
before the last one. Keywords in the instruction: GARBAGE (a reply without a score), FLAKY (GARBAGE on the first
request of that instruction, then normal), OUTOFRANGE (a score of 42).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import re
import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from PIL import Image, ImageStat

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from deepgen_rl.rewards.protocol import ChatCompletionRequest  # noqa: E402

_INSTRUCTION = re.compile(r"「(.*?)」", re.DOTALL)
_SOURCES = re.compile(r"The first (\d+) image")
KEYWORDS = ("GARBAGE", "FLAKY", "OUTOFRANGE")


def expected_score(first: Image.Image, last: Image.Image) -> float:
    """The reward (X / 10) this server's rule gives; the tests call it on their own images."""
    mean = lambda image: sum(ImageStat.Stat(image.convert("RGB")).mean) / 3  # noqa: E731
    return (mean(last) - mean(first) + 255) / 510


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    model_name = "EditJudge"
    lock = threading.Lock()
    state: dict  # {"counts": Counter, "last": dict}, set on the subclass built in main()

    def log_message(self, *args) -> None:
        pass

    def _json(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/health":
            self._json(200, {})
        elif self.path == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": self.model_name, "object": "model"}]})
        elif self.path == "/stats":
            with self.lock:
                self._json(200, {"counts": dict(self.state["counts"]), "last": self.state["last"]})
        else:
            self._json(404, {"error": f"no route {self.path}"})

    def do_POST(self) -> None:
        request = ChatCompletionRequest.model_validate_json(self.rfile.read(int(self.headers["Content-Length"])))
        if request.model != self.model_name:
            self._json(404, {"error": f"The model `{request.model}` does not exist."})
            return
        parts = request.messages[0].content
        urls = [p.image_url.url for p in parts if getattr(p, "type", "") == "image_url"]
        text = "".join(p.text for p in parts if getattr(p, "type", "") == "text")
        instruction, sources = _INSTRUCTION.search(text), _SOURCES.search(text)
        if instruction is None or sources is None or int(sources.group(1)) != len(urls) - 1 or len(urls) < 2:
            self._json(400, {"error": f"expected 「instruction」 and 'The first K image(s)' with K + 1 images; "
                                      f"got {len(urls)} images"})
            return
        keyword = next((k for k in KEYWORDS if k in instruction.group(1)), "normal")
        images = [Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) for url in urls]
        with self.lock:
            counts = self.state["counts"]
            counts[keyword] += 1
            counts[instruction.group(1)] += 1
            seen = counts[instruction.group(1)]
            self.state["last"] = {"num_images": len(urls), "temperature": request.temperature,
                         "max_tokens": request.max_tokens}
        score = 10 * expected_score(images[0], images[-1])
        if keyword == "GARBAGE" or (keyword == "FLAKY" and seen == 1):
            content = "The edit looks fine to me."
        elif keyword == "OUTOFRANGE":
            content = "Superb. <score>42</score>"
        else:
            content = f"<score>0</score> was my first thought; on reflection: <score>{score:.6f}</score>"
        self._json(200, {"id": "fake", "object": "chat.completion", "model": self.model_name,
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                      "finish_reason": "stop"}]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--served-model-name", default="EditJudge")
    args = parser.parse_args()
    handler = type("BoundHandler", (Handler,), {"model_name": args.served_model_name,
                                              "state": {"counts": Counter(), "last": {}}})
    server = ThreadingHTTPServer(("127.0.0.1", args.port), handler)
    server.daemon_threads = True
    print(f"listening on 127.0.0.1:{server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
