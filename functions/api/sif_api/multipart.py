"""A small, bounded multipart/form-data reader (RFC 7578) for the one route that takes a form: POST /v1/files.

API Gateway hands the body over base64-encoded (multipart/form-data is one of the API's binary media
types in template.yaml); the local gateway sends UTF-8 bodies as text. Either way the body is at
most Lambda's 6 MB, read once: parts are cut at the boundary delimiters, their headers parsed by the
standard library's `email` header parser (quoted and RFC 2231 `filename*` parameters included), and
their bytes kept exactly as sent. Anything malformed is a `MultipartError` (the route's 400), never
a guess.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from email import policy
from email.message import Message
from email.parser import BytesHeaderParser
from typing import Any

MULTIPART = "multipart/form-data"
MAX_PARTS = 16
MAX_HEADER_BYTES = 8 * 1024  # one part's headers
_HEADERS = BytesHeaderParser(policy=policy.HTTP)


class MultipartError(ValueError):
    """The body is not the multipart/form-data it says it is."""


@dataclass(frozen=True)
class Part:
    name: str
    data: bytes
    filename: str | None = None
    content_type: str | None = None


def boundary_of(content_type: str) -> str:
    header = Message()
    header["content-type"] = content_type
    if header.get_content_type() != MULTIPART:
        raise MultipartError(f"not {MULTIPART}")
    boundary = header.get_param("boundary")
    if not isinstance(boundary, str) or not 1 <= len(boundary) <= 70:
        raise MultipartError("the Content-Type has no boundary (1 to 70 characters)")
    return boundary


def event_body(event: Mapping[str, Any]) -> bytes:
    """The raw body bytes of an API Gateway proxy event."""
    body = event.get("body") or ""
    if event.get("isBase64Encoded"):
        try:
            return base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise MultipartError(f"the body is not valid base64: {exc}") from exc
    return str(body).encode("utf-8", "surrogateescape")


def parse(body: bytes, content_type: str) -> dict[str, Part]:
    """The form's parts by name. A name given twice, more than MAX_PARTS parts, a part without a name
    or headers, or a body that does not end with the closing delimiter: MultipartError."""
    delimiter = b"--" + boundary_of(content_type).encode("ascii", "strict")
    start = body.find(delimiter)
    if start < 0 or (start > 0 and body[start - 2 : start] != b"\r\n"):
        raise MultipartError("the body does not start with the boundary")
    pos = start + len(delimiter)
    parts: dict[str, Part] = {}
    while True:
        if body.startswith(b"--", pos):
            return parts  # the close delimiter (an epilogue after it is ignored)
        eol = body.find(b"\r\n", pos)
        if eol < 0 or body[pos:eol].strip(b" \t"):
            raise MultipartError("a boundary line is malformed")
        pos = eol + 2
        end = body.find(b"\r\n" + delimiter, pos)
        if end < 0:
            raise MultipartError("the body ends before its closing boundary")
        parts_seen = len(parts) + 1
        if parts_seen > MAX_PARTS:
            raise MultipartError(f"more than {MAX_PARTS} parts")
        part = _part(body[pos:end])
        if part.name in parts:
            raise MultipartError(f"the field {part.name!r} is given more than once")
        parts[part.name] = part
        pos = end + 2 + len(delimiter)


def _part(chunk: bytes) -> Part:
    head, sep, data = chunk.partition(b"\r\n\r\n")
    if not sep:
        if chunk.startswith(b"\r\n"):  # a part without headers
            raise MultipartError("a part has no Content-Disposition header")
        raise MultipartError("a part's headers do not end")
    if len(head) > MAX_HEADER_BYTES:
        raise MultipartError(f"a part's headers are longer than {MAX_HEADER_BYTES} bytes")
    headers = _HEADERS.parsebytes(head + b"\r\n\r\n")
    disposition = headers.get("content-disposition")
    name = headers.get_param("name", header="content-disposition") if disposition else None
    if not disposition or str(disposition).split(";", 1)[0].strip().lower() != "form-data" or not name:
        raise MultipartError('a part is not `Content-Disposition: form-data; name="..."`')
    if not isinstance(name, str):
        raise MultipartError("a part's name is not text")
    filename = headers.get_filename()
    content_type = headers.get("content-type")
    return Part(name=name, data=data, filename=filename, content_type=str(content_type) if content_type else None)
