"""Image decoding with limits, the manifest's preprocessing, and the classifier.

Memory is bounded per image, not per call: an image is decoded no larger than the model needs
(JPEG at a DCT scale, JPEG 2000 at a resolution level, other formats reduced by an integer factor
right after decoding), one image at a time in a process, and freed once it is a model input; a
call or a file window keeps only the small model inputs. Images at most REDUCING_GAP x the model's
resize on a side (every test image, most photos) decode exactly as before.
"""

from __future__ import annotations

import io
import re
import struct
import threading
import warnings
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

from sif_inference.batching import iter_batch
from sif_inference.errors import ImageDecodeError, InferenceError, InputLimitError
from sif_inference.manifest import ImagePreprocessing, ModelManifest
from sif_inference.scores import activate, classification

if TYPE_CHECKING:  # onnxruntime is imported where sessions are built, not on import
    import onnxruntime as ort

MAX_BATCH_IMAGES = 16
# The formats clients send; Pillow's other decoders (EPS through Ghostscript, PSD, ICNS, FITS, ...)
# never see our inputs. Each of these was measured at the pixel limit (tests/unit/test_hardening.py).
FORMATS = ("JPEG", "MPO", "PNG", "GIF", "WEBP", "BMP", "TIFF", "JPEG2000", "AVIF")
# An image is decoded or reduced to no less than this many times the model's resize per side,
# as Pillow's `reducing_gap`: the bilinear resize that follows gives practically the same pixels.
REDUCING_GAP = 3
# One full-size decode per process at a time, whatever threads score images.
_DECODING = threading.Lock()
_OBJECT_REPR = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")
# What Pillow's decoders raise on malformed or truncated bytes (RuntimeError: the AVIF decoder).
MALFORMED = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    RuntimeError,
    struct.error,
    IndexError,
    KeyError,
    ZeroDivisionError,
)


@cache
def supported_formats() -> tuple[str, ...]:
    """FORMATS that this Pillow build decodes (AVIF needs Pillow 11.2+)."""
    Image.init()
    return tuple(f for f in FORMATS if f in Image.OPEN)


def _clean(exc: BaseException) -> str:
    """Pillow's message without object reprs (`<_io.BytesIO object at 0x...>`) or a trailing period."""
    return _OBJECT_REPR.sub("the data", str(exc)).strip().rstrip(".") or type(exc).__name__


def _open(data: bytes, max_pixels: int | None, fit: int | None) -> tuple[Image.Image, int]:
    """(the image loaded, its pixels as sent); with `fit`, decoded at a reduced size where the format can."""
    img = Image.open(io.BytesIO(data), formats=supported_formats())
    width, height = img.size
    if max_pixels is not None and width * height > max_pixels:
        raise InputLimitError(f"image is {width}x{height} pixels; the limit is {max_pixels} pixels")
    target = (fit or 0) * REDUCING_GAP
    if target and img.format in ("JPEG", "MPO"):
        img.draft("RGB", (target, target))  # DCT scaling by 1/2, 1/4 or 1/8, never below target
    elif target and img.format == "JPEG2000" and min(width, height) >= 2 * target:
        img.reduce = (min(width, height) // target).bit_length() - 1  # type: ignore[assignment, method-assign]
        try:  # each resolution level halves both sides
            img.load()
        except OSError:  # a file with fewer levels than that: decoded at full size
            img = Image.open(io.BytesIO(data), formats=supported_formats())
    img.load()
    return img, width * height


def _reduced(img: Image.Image, fit: int) -> Image.Image:
    """`img` as RGB, box-reduced by whole factors to no less than REDUCING_GAP x `fit` per side."""
    target = fit * REDUCING_GAP
    factors = (max(1, img.width // target), max(1, img.height // target))
    # Image.reduce by name: a JPEG 2000 file's `reduce` attribute is its decode-time setting.
    if img.mode in ("RGB", "L"):  # reduce first: the same pixels, and the full-size RGB copy is never made
        img = Image.Image.reduce(img, factors) if factors != (1, 1) else img
        return img if img.mode == "RGB" else img.convert("RGB")
    img = img.convert("RGB")  # alpha dropped, palette and 16-bit values mapped, as at any size
    return Image.Image.reduce(img, factors) if factors != (1, 1) else img


def load_image(
    data: bytes, *, max_bytes: int | None, max_pixels: int | None, fit: int | None = None
) -> tuple[Image.Image, int]:
    """Bytes -> (RGB image, pixels as sent), refusing oversize files and pixel counts, decompression
    bombs and formats outside FORMATS. With `fit` (the side the caller resizes to) a large image comes
    back reduced to no less than REDUCING_GAP x `fit` per side; the pixel count is the original's."""
    if max_bytes is not None and len(data) > max_bytes:
        raise InputLimitError(f"image is {len(data)} bytes; the limit is {max_bytes}")
    if not data:
        raise ImageDecodeError("image is empty")
    try:
        with _DECODING, warnings.catch_warnings():
            # Pillow warns past MAX_IMAGE_PIXELS and raises past twice that; both are bombs to us.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img, pixels = _open(data, max_pixels, fit)
            img = _reduced(img, fit) if fit else img if img.mode == "RGB" else img.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"image refused as a decompression bomb: {_clean(exc)}") from exc
    except UnidentifiedImageError as exc:
        names = ", ".join(supported_formats())
        raise ImageDecodeError(f"cannot decode image: not an image in a supported format ({names})") from exc
    except MALFORMED as exc:
        raise ImageDecodeError(f"cannot decode image: {_clean(exc)}") from exc
    return img, pixels


def decode_image(data: bytes, *, max_bytes: int | None, max_pixels: int | None) -> Image.Image:
    """Bytes -> the whole RGB image at full size (see `load_image` for the checks)."""
    return load_image(data, max_bytes=max_bytes, max_pixels=max_pixels)[0]


def preprocess(img: Image.Image, cfg: ImagePreprocessing) -> np.ndarray:
    """The manifest's pipeline: resize (square, or the shorter side keeping the aspect), centre crop,
    optional JPEG round trip, (pixel * scale - mean) / std per channel in `channel_order`, `layout`.

    open-nsfw's reference pipeline is one configuration: square 256, crop 224, JPEG round trip, BGR
    minus (104, 117, 123), NHWC (scale and std 1: the same float32 values as its own code)."""
    if cfg.resize_mode == "shorter_side":
        w, h = img.size
        ratio = cfg.resize / min(w, h)
        size = (max(cfg.resize, round(w * ratio)), max(cfg.resize, round(h * ratio)))
    else:
        size = (cfg.resize, cfg.resize)
    img = img.resize(size, resample=Image.Resampling.BILINEAR)
    left, top = (size[0] - cfg.crop) // 2, (size[1] - cfg.crop) // 2
    img = img.crop((left, top, left + cfg.crop, top + cfg.crop))
    if cfg.jpeg_reencode:
        buf = io.BytesIO()
        img.save(buf, format="JPEG")
        buf.seek(0)
        img = Image.open(buf)
    arr = np.asarray(img, dtype=np.float32)
    if cfg.scale != 1.0:
        arr = arr * np.float32(cfg.scale)
    if cfg.channel_order == "BGR":
        arr = arr[:, :, ::-1]
    arr = arr - np.asarray(cfg.mean, dtype=np.float32)
    if any(s != 1.0 for s in cfg.std):
        arr = np.asarray(arr / np.asarray(cfg.std, dtype=np.float32), dtype=np.float32)
    if cfg.layout == "NCHW":
        arr = arr.transpose(2, 0, 1)
    return np.ascontiguousarray(arr, dtype=np.float32)


@dataclass(frozen=True)
class ImageScores:
    scores: np.ndarray  # (n, labels) float32, input order
    pixels: list[int]


class ImageClassifier:
    """Images -> one score per label: the manifest's preprocessing (layout included), the graph's
    one input, and its output through `classification.activation` (sif_inference.scores)."""

    def __init__(self, session: ort.InferenceSession, manifest: ModelManifest) -> None:
        self.session = session
        self.manifest = manifest
        self.labels = manifest.labels
        self.cfg = manifest.preprocessing or ImagePreprocessing()
        self.activation = classification(manifest).activation
        graph_input = session.get_inputs()[0]
        self._input = graph_input.name
        self._output = manifest.output.name or session.get_outputs()[0].name
        self._check_layout(graph_input.shape)

    def _check_layout(self, shape: list[object]) -> None:
        """A graph whose fixed input dims disagree with the preprocessing is refused at load, not
        run on transposed pixels."""
        if not shape:  # a graph that does not declare its input's shape: nothing to check
            return
        crop = self.cfg.crop
        item = [3, crop, crop] if self.cfg.layout == "NCHW" else [crop, crop, 3]
        dims = list(shape)[1:] if len(shape) == 4 else None
        if dims is None or any(isinstance(d, int) and d != want for d, want in zip(dims, item, strict=True)):
            wanted = ["batch", *item]
            raise InferenceError(
                f"{self.manifest.name}: the graph's input {self._input!r} is {list(shape)}; "
                f"the manifest's preprocessing ({self.cfg.layout}, crop {crop}) makes {wanted}"
            )

    def decode(self, data: bytes) -> Image.Image:
        """The whole image at full size (what a caller sent; scoring goes through `prepare`)."""
        limits = self.manifest.limits
        return decode_image(data, max_bytes=limits.max_image_bytes, max_pixels=limits.max_image_pixels)

    def preprocess(self, img: Image.Image) -> np.ndarray:
        return preprocess(img, self.cfg)

    def prepare(self, data: bytes) -> tuple[np.ndarray, int]:
        """(the model input, the pixels sent) for one image: decoded no larger than the preprocessing
        needs, and dropped as soon as its input is made."""
        limits = self.manifest.limits
        img, pixels = load_image(
            data, max_bytes=limits.max_image_bytes, max_pixels=limits.max_image_pixels, fit=self.cfg.resize
        )
        return self.preprocess(img), pixels

    def score_arrays(self, arrays: list[np.ndarray]) -> np.ndarray:
        if not arrays:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        parts = []
        for chunk in iter_batch(arrays, MAX_BATCH_IMAGES):
            (out,) = self.session.run([self._output], {self._input: np.stack(chunk)})
            parts.append(activate(out, self.activation))
        return np.concatenate(parts)

    def classify(self, images: list[bytes]) -> ImageScores:
        """Prepare (one image at a time) and score; the first undecodable image raises (callers wanting
        per-row errors call `prepare` per row and score_arrays on the good ones)."""
        prepared = [self.prepare(b) for b in images]
        return ImageScores(scores=self.score_arrays([a for a, _ in prepared]), pixels=[n for _, n in prepared])
