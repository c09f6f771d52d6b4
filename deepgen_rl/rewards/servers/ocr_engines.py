"""OCR engines behind the OCR server: RapidOCR (default, offline) and PaddleOCR (when installed).

RapidOCR ships the PP-OCR ONNX models inside its wheel, so it works with no network and no GPU.
PaddleOCR is what the DeepGen-RL reference used; it is picked by ``--engine auto`` when importable (it may
download its models on first use). Both return text boxes in reading order (top-to-bottom, left-to-right).
"""

from __future__ import annotations

import importlib.util
import threading
from typing import Any, Literal, Protocol, get_args

import numpy as np
from PIL import Image

from deepgen_rl.rewards.ocr_scoring import OcrToken

EngineName = Literal["auto", "rapidocr", "paddleocr"]
ENGINE_NAMES: tuple[str, ...] = get_args(EngineName)


class OcrEngine(Protocol):
    name: str

    def recognize(self, image: Image.Image) -> list[OcrToken]:
        """Text boxes of ``image`` in reading order."""


class RapidOcrEngine:
    name = "rapidocr"

    def __init__(self) -> None:
        from rapidocr_onnxruntime import RapidOCR

        self._ocr = RapidOCR()
        # One ONNX session per model; calls are serialised so concurrent requests do not interleave.
        self._lock = threading.Lock()

    def recognize(self, image: Image.Image) -> list[OcrToken]:
        array = np.asarray(image.convert("RGB"))[:, :, ::-1].copy()  # RapidOCR expects OpenCV's BGR order
        with self._lock:
            boxes, _elapsed = self._ocr(array)
        # boxes: [[box_points, text, confidence], ...] or None when no text was detected.
        return [OcrToken(text=str(text), confidence=float(conf)) for _box, text, conf in (boxes or [])]


class PaddleOcrEngine:
    """PaddleOCR 2.x (``.ocr``) and 3.x (``.predict``) APIs. Not exercised by our CI (not installed there)."""

    name = "paddleocr"

    def __init__(self) -> None:
        import paddleocr

        self._major = int(str(getattr(paddleocr, "__version__", "2")).split(".")[0] or 2)
        if self._major >= 3:
            self._ocr = paddleocr.PaddleOCR(lang="en", use_doc_orientation_classify=False,
                                            use_doc_unwarping=False, use_textline_orientation=False)
        else:
            self._ocr = paddleocr.PaddleOCR(use_angle_cls=False, lang="en", show_log=False)
        self._lock = threading.Lock()

    def recognize(self, image: Image.Image) -> list[OcrToken]:
        array = np.asarray(image.convert("RGB"))[:, :, ::-1].copy()
        with self._lock:
            if self._major >= 3:
                return _tokens_from_paddle3(self._ocr.predict(array))
            return _tokens_from_paddle2(self._ocr.ocr(array, cls=False))


def _tokens_from_paddle2(result: Any) -> list[OcrToken]:
    lines = result[0] if result else None  # one entry per input image
    return [OcrToken(text=str(text), confidence=float(conf)) for _box, (text, conf) in (lines or [])]


def _tokens_from_paddle3(result: Any) -> list[OcrToken]:
    tokens: list[OcrToken] = []
    for page in result or []:
        for text, conf in zip(page["rec_texts"], page["rec_scores"]):
            tokens.append(OcrToken(text=str(text), confidence=float(conf)))
    return tokens


def paddleocr_installed() -> bool:
    return importlib.util.find_spec("paddleocr") is not None


def build_engine(name: EngineName) -> OcrEngine:
    """``auto``: PaddleOCR when installed, else RapidOCR."""
    if name not in ENGINE_NAMES:
        raise ValueError(f"--engine must be one of {', '.join(ENGINE_NAMES)}; got {name!r}.")
    if name == "paddleocr" or (name == "auto" and paddleocr_installed()):
        if not paddleocr_installed():
            raise ValueError("--engine paddleocr: the paddleocr package is not installed in this environment "
                             "(install it, or use --engine rapidocr).")
        return PaddleOcrEngine()
    return RapidOcrEngine()
