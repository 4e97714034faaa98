"""Deterministic test images (the project makes its own; no downloads)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def make_test_images(seed: int = 7) -> list[tuple[str, bytes]]:
    """A dozen images of different sizes, modes and formats, as encoded bytes."""
    rng = np.random.default_rng(seed)
    images: list[tuple[str, bytes]] = []
    y, x = np.mgrid[0:240, 0:320]
    gradient = np.stack([x * 255 // 319, y * 255 // 239, (x + y) * 255 // 558], axis=-1).astype(np.uint8)
    images.append(("gradient.png", _encode(Image.fromarray(gradient), "PNG")))
    images.append(("gradient.jpg", _encode(Image.fromarray(gradient), "JPEG")))
    noise = rng.integers(0, 256, size=(300, 200, 3), dtype=np.uint8)
    images.append(("noise_tall.png", _encode(Image.fromarray(noise), "PNG")))
    skin = np.zeros((256, 256, 3), dtype=np.uint8)
    skin[...] = (224, 172, 150)
    skin = np.clip(skin + rng.normal(0, 12, skin.shape), 0, 255).astype(np.uint8)
    images.append(("skin_tone.jpg", _encode(Image.fromarray(skin), "JPEG")))
    shapes = Image.new("RGB", (640, 480), (30, 90, 160))
    draw = ImageDraw.Draw(shapes)
    for _ in range(12):
        x0, y0 = int(rng.integers(0, 560)), int(rng.integers(0, 400))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.ellipse((x0, y0, x0 + 80, y0 + 80), fill=color)
    images.append(("shapes.png", _encode(shapes, "PNG")))
    images.append(("shapes_small.jpg", _encode(shapes.resize((64, 48)), "JPEG")))
    images.append(("grey.png", _encode(Image.fromarray(gradient).convert("L"), "PNG")))
    images.append(("palette.png", _encode(shapes.convert("P"), "PNG")))
    rgba = Image.fromarray(gradient).convert("RGBA")
    rgba.putalpha(128)
    images.append(("alpha.png", _encode(rgba, "PNG")))
    checker = ((x // 20 + y // 20) % 2 * 255).astype(np.uint8)
    images.append(("checker.gif", _encode(Image.fromarray(checker), "GIF")))
    wide = np.repeat(gradient, 3, axis=1)[:100]
    images.append(("wide.jpg", _encode(Image.fromarray(wide), "JPEG")))
    images.append(("white.bmp", _encode(Image.new("RGB", (50, 50), (255, 255, 255)), "BMP")))
    return images
