"""Our OCR server app (``create_app``) around a slow, recording stand-in engine, for the overload tests.

Each image "takes" ``--delay`` seconds (a sleep: no CPU, so timings hold on a loaded machine) and appends its tag
to ``--log``, one line per image read, so a test sees exactly which request's images were read, in which order.
The tag is the image width minus 16 (tests draw request i's images i + 16 pixels wide); the text read is
``req<tag>``.
"""

from __future__ import annotations

import argparse
import threading
import time

import uvicorn

from deepgen_rl.rewards.ocr_scoring import OcrScoringOptions, OcrToken
from deepgen_rl.rewards.servers.ocr import ServerLimits, create_app

TAG_WIDTH_OFFSET = 16


class SlowRecordingEngine:
    name = "slow-recording"

    def __init__(self, delay_s: float, log_path: str) -> None:
        self.delay_s, self.log_path = delay_s, log_path
        self._lock = threading.Lock()  # one image at a time, as the real engines (CPU-bound, one ONNX session)

    def recognize(self, image):
        tag = image.width - TAG_WIDTH_OFFSET
        with self._lock:
            time.sleep(self.delay_s)
            with open(self.log_path, "a") as log:
                log.write(f"{tag}\n")
        return [OcrToken(text=f"req{tag}", confidence=1.0)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay", type=float, default=0.05)
    parser.add_argument("--log", required=True)
    parser.add_argument("--max-body-mb", type=float, default=1.0)
    args = parser.parse_args()
    app = create_app(SlowRecordingEngine(args.delay, args.log), OcrScoringOptions(),
                     ServerLimits(max_body_bytes=int(args.max_body_mb * 2**20)))
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
