"""Every error the API returns, in one place: `{"error": {"type", "message", "request_id"}}`.

Routes and the service raise small named exceptions (or the inference core's and the ledger's own);
`register` turns each kind into its status here. Stack traces go to the logs, never to the caller.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from aws_lambda_powertools import Logger
from aws_lambda_powertools.event_handler import APIGatewayRestResolver, Response
from aws_lambda_powertools.event_handler.api_gateway import BaseRouter
from aws_lambda_powertools.event_handler.exceptions import NotFoundError as RouteNotFoundError
from aws_lambda_powertools.event_handler.openapi.exceptions import (
    RequestUnsupportedContentType,
    RequestValidationError,
)

from sif_inference.errors import (
    ImageDecodeError,
    InputLimitError,
    IntegrityError,
    ModelNotFoundError,
    UnknownVariantError,
    WrongTaskError,
)
from sif_metering.ledger import QuotaExceededError

# Lambda's synchronous invoke payload limit; API Gateway would pass up to 10 MB.
MAX_BODY_BYTES = 6 * 1024 * 1024
JSON = "application/json"
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# Every body the API takes is a few levels deep; far deeper JSON is refused before validation walks it
# (recursively, in Python), whatever the interpreter's own recursion limits.
MAX_JSON_DEPTH = 64


class ApiError(Exception):
    status = 500
    type = "internal_error"

    def __init__(self, message: str, *, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = dict(headers or {})


class BadRequestError(ApiError):
    status, type = 400, "bad_request"


class UnauthorizedError(ApiError):
    status, type = 401, "unauthorized"


class ForbiddenError(ApiError):
    status, type = 403, "forbidden"


class NotFoundError(ApiError):
    status, type = 404, "not_found"


class ConflictError(ApiError):
    status, type = 409, "conflict"


class PayloadTooLargeError(ApiError):
    status, type = 413, "payload_too_large"


class UnsupportedMediaTypeError(ApiError):
    status, type = 415, "unsupported_media_type"


def error_body(error_type: str, message: str, request_id: str, details: list[dict[str, Any]] | None = None) -> str:
    error: dict[str, Any] = {"type": error_type, "message": message, "request_id": request_id}
    if details:
        error["details"] = details
    return json.dumps({"error": error})


def request_id_of(event: Mapping[str, Any] | None) -> str:
    context = (event or {}).get("requestContext") or {}
    return str(context.get("requestId") or "")


def current_request_id() -> str:
    event = getattr(BaseRouter, "current_event", None)
    return request_id_of(getattr(event, "raw_event", None))


def error_response(
    status: int,
    error_type: str,
    message: str,
    *,
    headers: Mapping[str, str] | None = None,
    details: list[dict[str, Any]] | None = None,
) -> Response:
    return Response(
        status_code=status,
        content_type=JSON,
        body=error_body(error_type, message, current_request_id(), details),
        headers=dict(headers or {}),
    )


def body_too_large(event: Mapping[str, Any]) -> dict[str, Any] | None:
    """The 413 proxy response for a body over Lambda's 6 MB, checked before anything parses it."""
    body = event.get("body") or ""
    if len(body) <= MAX_BODY_BYTES:
        return None
    return {
        "statusCode": 413,
        "headers": {"Content-Type": JSON},
        "body": error_body(
            PayloadTooLargeError.type,
            f"request body is {len(body)} bytes; the limit is {MAX_BODY_BYTES} (6 MB)",
            request_id_of(event),
        ),
        "isBase64Encoded": False,
    }


def _content_type(event: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """(the header's name as sent, its value), or (None, None) without one."""
    for name, value in (event.get("headers") or {}).items():
        if name.lower() == "content-type":
            return name, str(value)
    for name, values in (event.get("multiValueHeaders") or {}).items():
        if name.lower() == "content-type" and values:
            return name, str(values[-1])
    return None, None


def media_type(value: str) -> str:
    """`Application/JSON; charset=UTF-8` -> `application/json` (media types are case-insensitive)."""
    return value.split(";", 1)[0].strip().lower()


def unsupported_media_type(event: Mapping[str, Any]) -> dict[str, Any] | None:
    """The 415 proxy response for a body that is not declared as JSON, checked before anything parses it.

    `application/json` in any case, with any parameters, is JSON; so is a body without a
    Content-Type (as most JSON APIs take it). Anything else (text/plain, XML, forms) is refused here,
    never handed to the resolver's form parsers.
    """
    if event.get("httpMethod") not in BODY_METHODS or not event.get("body"):
        return None
    _, declared = _content_type(event)
    if declared is None or media_type(declared) == JSON:
        return None
    message = f"Content-Type {declared.strip()!r} is not supported; send the body as {JSON}"
    return {
        "statusCode": UnsupportedMediaTypeError.status,
        "headers": {"Content-Type": JSON},
        "body": error_body(UnsupportedMediaTypeError.type, message, request_id_of(event)),
        "isBase64Encoded": False,
    }


def with_json_content_type(event: dict[str, Any]) -> dict[str, Any]:
    """`event` with a JSON Content-Type spelled `application/json...` in lower case, as the resolver's
    validation recognises it (it compares case-sensitively); other events are returned as they are."""
    name, declared = _content_type(event)
    if name is None or declared is None or media_type(declared) != JSON or declared.startswith(JSON):
        return event
    canonical = JSON + declared.strip()[len(JSON) :]
    fixed = dict(event)
    for field, value in (("headers", canonical), ("multiValueHeaders", [canonical])):
        if event.get(field):
            kept = {k: v for k, v in event[field].items() if k.lower() != "content-type"}
            fixed[field] = {**kept, name: value}
    return fixed


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether JSON `value` (a dict or list: level 1) has containers below level `limit`; iterative."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item
        if depth == limit and any(isinstance(child, dict | list) for child in children):
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def parse_json_body(text: str | bytes) -> Any:
    """The resolver's JSON body parser: a body nested more than MAX_JSON_DEPTH levels is the caller's 400."""
    too_deep = BadRequestError(f"the JSON body is nested more than {MAX_JSON_DEPTH} levels deep")
    try:
        value = json.loads(text)
    except RecursionError:  # deeper than the parser goes
        raise too_deep from None
    # A text with no more brackets than the limit cannot nest deeper: most bodies skip the walk.
    brackets = text.count("[") + text.count("{") if isinstance(text, str) else MAX_JSON_DEPTH + 1
    if brackets > MAX_JSON_DEPTH and isinstance(value, dict | list) and _deeper_than(value, MAX_JSON_DEPTH):
        raise too_deep
    return value


def _validation_details(exc: RequestValidationError) -> list[dict[str, Any]]:
    # loc, msg and type only: never the input values, pydantic's URLs or file names.
    details = []
    for err in exc.errors():
        loc = [str(part) for part in err.get("loc", ())]
        details.append({"loc": loc, "msg": str(err.get("msg", "")), "type": str(err.get("type", ""))})
    return details


def register(app: APIGatewayRestResolver, logger: Logger) -> None:
    """Map every exception the routes may raise to its status and the one error body."""

    @app.exception_handler(ApiError)
    def api_error(exc: ApiError) -> Response:
        return error_response(exc.status, exc.type, exc.message, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    def validation_error(exc: RequestValidationError) -> Response:
        details = _validation_details(exc)
        first = details[0] if details else {"loc": [], "msg": "invalid request"}
        where = ".".join(first["loc"]) or "request"
        message = f"{where}: {first['msg']}" + (f" (and {len(details) - 1} more)" if len(details) > 1 else "")
        return error_response(422, "validation_error", message, details=details)

    @app.exception_handler(RequestUnsupportedContentType)
    def not_json(exc: RequestUnsupportedContentType) -> Response:
        # The handler refuses these first (unsupported_media_type); this is the resolver's own check.
        return error_response(415, UnsupportedMediaTypeError.type, f"the body must be {JSON}")

    @app.exception_handler(UnicodeDecodeError)
    def not_text(exc: UnicodeDecodeError) -> Response:
        details = [{"loc": ["body"], "msg": "the body is not UTF-8 text", "type": "json_invalid"}]
        return error_response(422, "validation_error", "body: the body is not UTF-8 JSON", details=details)

    @app.exception_handler(RouteNotFoundError)
    def no_route(exc: RouteNotFoundError) -> Response:
        event = app.current_event
        return error_response(404, "not_found", f"no route for {event.http_method} {event.path}")

    @app.exception_handler(ModelNotFoundError)
    def unknown_model(exc: ModelNotFoundError) -> Response:
        return error_response(404, "model_not_found", str(exc))

    @app.exception_handler(UnknownVariantError)
    def unknown_variant(exc: UnknownVariantError) -> Response:
        return error_response(400, "unknown_variant", str(exc))

    @app.exception_handler(WrongTaskError)
    def wrong_task(exc: WrongTaskError) -> Response:
        return error_response(400, "wrong_task", str(exc))

    @app.exception_handler(ImageDecodeError)
    def bad_image(exc: ImageDecodeError) -> Response:
        return error_response(400, "invalid_image", str(exc))

    @app.exception_handler(InputLimitError)
    def over_limit(exc: InputLimitError) -> Response:
        return error_response(413, "input_too_large", str(exc))

    @app.exception_handler(QuotaExceededError)
    def over_quota(exc: QuotaExceededError) -> Response:
        if exc.limit < 0:  # a tenant record without a quota: refused, never unlimited
            message = f"{exc}; ask the operator to set one"
        else:
            message = f"the monthly quota of {exc.limit} units (inputs) is used up; it resets in {exc.retry_after_s} s"
        return error_response(429, "quota_exceeded", message, headers={"Retry-After": str(exc.retry_after_s)})

    @app.exception_handler(IntegrityError)
    def unverified_model(exc: IntegrityError) -> Response:
        logger.error("model failed its sha256 check", extra={"error": str(exc)})
        return error_response(500, "internal_error", f"model unavailable (request id {current_request_id()})")

    @app.exception_handler(Exception)
    def unexpected(exc: Exception) -> Response:
        logger.exception("unhandled error")
        return error_response(500, "internal_error", f"internal error (request id {current_request_id()})")
