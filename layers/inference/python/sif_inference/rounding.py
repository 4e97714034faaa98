"""Numbers out: 7 significant digits (float32's precision), float32 base64 and compact JSON, the same
for every caller."""

from __future__ import annotations

import base64
import json
from typing import Any, Literal

import numpy as np

DIGITS = 7  # float32 carries ~7.2 significant decimal digits: more would print noise
# How a vector is written: JSON floats at DIGITS significant digits, or OpenAI's `encoding_format:
# "base64"` (its float32 bytes, little-endian, base64: exact, and under half the size).
Encoding = Literal["float", "base64"]


def round_significant(values: np.ndarray, digits: int = DIGITS) -> np.ndarray:
    """Round to `digits` significant digits, as float64 values whose shortest repr is that short.

    k / 10**e with both exact is the double nearest to the decimal k x 10**-e, so `repr` (and
    json) print at most `digits` digits: ~4.8 KB per 384-d vector instead of ~8.4 KB.

    For float32 values the scaled product is exact while 10**e <= 10**12 (a 24-bit mantissa times
    5**12 fits a double), so k is the correctly rounded decimal, as `format(x, ".7g")` rounds it;
    the few values outside that range (|x| < 1e-6 or >= 1e7) are rounded by `format` itself. So
    this and `format_vectors` give the same numbers: the API and the files agree digit for digit.
    """
    a = np.asarray(values, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        magnitude = np.floor(np.log10(np.abs(a)))
    magnitude[~np.isfinite(magnitude)] = 0
    decimals = digits - 1 - magnitude
    out = np.empty_like(a)
    up = decimals >= 0
    scale = np.power(10.0, decimals[up])
    out[up] = np.round(a[up] * scale) / scale
    down = np.power(10.0, -decimals[~up])
    out[~up] = np.round(a[~up] / down) * down
    inexact = ((decimals > _EXACT_DECIMALS) | ~up) & np.isfinite(a) & (a != 0)
    if inexact.any():
        spec = f".{digits}g"
        out[inexact] = [float(format(x, spec)) for x in a[inexact].tolist()]
    return out


_EXACT_DECIMALS = 12


def format_vectors(vectors: np.ndarray, digits: int = DIGITS) -> list[str]:
    """Each row as a JSON array of floats with `digits` significant digits ("0.006385671", "-1.2e-05").

    One %-format string per call formats a whole row in one C call (the same text as
    `format(x, ".7g")` per value, at about half the time). Measured (sif_bench.batch): ~65 us per
    384-d row, ~4.4 KB; json.dumps of the raw float32-as-float64 values is ~4x slower and ~8.4 KB
    (17 digits of noise per float).
    """
    rows = np.asarray(vectors).tolist()
    if not rows:
        return []
    row_format = "[" + ",".join([f"%.{digits}g"] * len(rows[0])) + "]"
    return [row_format % tuple(row) for row in rows]


_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def compact_json(value: Any) -> str:
    """One value as JSON text without spaces (a predictions.jsonl line holds one per row)."""
    return _encode(value)


def float32_base64(vector: np.ndarray) -> str:
    """What the openai client decodes for `encoding_format: "base64"`: the vector's little-endian
    float32 bytes, base64 (the API, files and jobs all write vectors so with this one function)."""
    return base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode("ascii")
