"""Image decoding with limits, the open_nsfw preprocessing, and the classifier."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

from sif_inference.batching import iter_batch
from sif_inference.errors import ImageDecodeError, InputLimitError
from sif_inference.manifest import ImagePreprocessing, ModelManifest

if TYPE_CHECKING:  # onnxruntime is imported where sessions are built, not on import
    import onnxruntime as ort

MAX_BATCH_IMAGES = 16


def decode_image(data: bytes, *, max_bytes: int | None, max_pixels: int | None) -> Image.Image:
    """Bytes -> RGB image, refusing oversize files, oversize pixel counts and decompression bombs."""
    if max_bytes is not None and len(data) > max_bytes:
        raise InputLimitError(f"image is {len(data)} bytes; the limit is {max_bytes}")
    if not data:
        raise ImageDecodeError("image is empty")
    try:
        with warnings.catch_warnings():
            # Pillow warns past MAX_IMAGE_PIXELS and raises past twice that; both are bombs to us.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if max_pixels is not None and width * height > max_pixels:
                raise InputLimitError(f"image is {width}x{height} pixels; the limit is {max_pixels} pixels")
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"image refused as a decompression bomb: {exc}") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageDecodeError(f"cannot decode image: {exc}") from exc
    return img if img.mode == "RGB" else img.convert("RGB")


def preprocess_open_nsfw(img: Image.Image, cfg: ImagePreprocessing) -> np.ndarray:
    """open_nsfw's reference pipeline: resize, centre crop, JPEG round-trip, BGR minus mean (HWC)."""
    img = img.resize((cfg.resize, cfg.resize), resample=Image.Resampling.BILINEAR)
    off = (cfg.resize - cfg.crop) // 2
    img = img.crop((off, off, off + cfg.crop, off + cfg.crop))
    if cfg.jpeg_reencode:
        buf = io.BytesIO()
        img.save(buf, format="JPEG")
        buf.seek(0)
        img = Image.open(buf)
    arr = np.asarray(img, dtype=np.float32)[:, :, ::-1] - np.asarray(cfg.mean_bgr, dtype=np.float32)
    return np.ascontiguousarray(arr, dtype=np.float32)


@dataclass(frozen=True)
class ImageScores:
    scores: np.ndarray  # (n, labels) float32, input order
    pixels: list[int]


class ImageClassifier:
    def __init__(self, session: ort.InferenceSession, manifest: ModelManifest) -> None:
        self.session = session
        self.manifest = manifest
        self.labels = manifest.labels
        self.cfg = manifest.preprocessing or ImagePreprocessing()
        self._input = session.get_inputs()[0].name
        self._output = manifest.output.name or session.get_outputs()[0].name

    def decode(self, data: bytes) -> Image.Image:
        limits = self.manifest.limits
        return decode_image(data, max_bytes=limits.max_image_bytes, max_pixels=limits.max_image_pixels)

    def preprocess(self, img: Image.Image) -> np.ndarray:
        return preprocess_open_nsfw(img, self.cfg)

    def score_arrays(self, arrays: list[np.ndarray]) -> np.ndarray:
        if not arrays:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        parts = []
        for chunk in iter_batch(arrays, MAX_BATCH_IMAGES):
            (out,) = self.session.run([self._output], {self._input: np.stack(chunk)})
            parts.append(np.asarray(out, dtype=np.float32))
        return np.concatenate(parts)

    def classify(self, images: list[bytes]) -> ImageScores:
        """Decode, preprocess and score; the first undecodable image raises (callers wanting per-row errors
        call decode/preprocess per row and score_arrays on the good ones)."""
        decoded = [self.decode(b) for b in images]
        arrays = [self.preprocess(img) for img in decoded]
        return ImageScores(scores=self.score_arrays(arrays), pixels=[i.width * i.height for i in decoded])
