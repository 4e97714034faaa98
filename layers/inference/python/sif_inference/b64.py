"""The one base64 decoder for image inputs (API instances, file rows, job instances)."""

from __future__ import annotations

import base64
import binascii

from sif_inference.errors import BadInputError

_URL_SAFE = str.maketrans("-_", "+/")


def decode_b64(value: str) -> bytes:
    """Base64 text -> bytes, as clients really send it.

    Takes a `data:<mime>;base64,` URL or bare base64, the standard or the URL-safe alphabet,
    with or without padding, with line breaks or other whitespace anywhere; anything else is
    a BadInputError (a ValueError) that says why.
    """
    if not isinstance(value, str):
        raise BadInputError(f"b64 must be a string, not {type(value).__name__}")
    cleaned = "".join(value.split())
    if cleaned[:5].lower() == "data:":
        head, comma, cleaned = cleaned.partition(",")
        if not comma or not head.lower().endswith(";base64"):
            raise BadInputError("b64 is a data: URL without ;base64, (only base64 data URLs are taken)")
    if not cleaned:
        raise BadInputError("b64 is empty")
    cleaned = cleaned.rstrip("=")
    cleaned += "=" * (-len(cleaned) % 4)
    try:
        return base64.b64decode(cleaned.translate(_URL_SAFE), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadInputError(f"b64 is not valid base64: {exc}") from exc
