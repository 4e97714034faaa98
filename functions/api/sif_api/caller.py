"""Who is calling: the tenant that the authorizer put into the request context, and with which key."""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools.event_handler.api_gateway import BaseRouter
from pydantic import BaseModel, ValidationError

from sif_api.errors import ApiError, BadRequestError, ForbiddenError, UnauthorizedError, error_body, request_id_of
from sif_core.tenants import keys_disagree
from sif_metering.ledger import NO_QUOTA, TenantInactiveError


class Caller(BaseModel):
    """API Gateway passes authorizer context values as strings; pydantic turns them back into types.

    `monthly_calls` is the tenant's quota in units (inputs) per month: 0 = unlimited; NO_QUOTA (-1,
    what the authorizer sends for a tenant record without a quota) is refused by every quota check.
    A context without the field fails closed the same way, never as unlimited.

    `key_hash` is the sha256 of the key the authorizer checked: the usage transaction checks that
    key item again, so a key revoked while an authorizer's cache still lets it in bills nothing
    ("" when unknown: then only the tenant's profile is checked).
    """

    tenant_id: str
    tenant_name: str = ""
    plan: str = "standard"
    monthly_calls: int = NO_QUOTA
    key_id: str = ""
    key_hash: str = ""


def caller_from_event(event: dict[str, Any]) -> Caller:
    context = (event.get("requestContext") or {}).get("authorizer") or {}
    try:
        return Caller.model_validate(context)
    except ValidationError as exc:
        # Only a route deployed without the authorizer gets here.
        raise UnauthorizedError("missing or unknown API key") from exc


def current_caller() -> Caller:
    """A Depends() provider: the caller of the request being resolved."""
    return caller_from_event(BaseRouter.current_event.raw_event)


def refused(exc: TenantInactiveError) -> ApiError:
    """The metering refusal as the caller sees it: a revoked key is 401 (as the authorizer answers
    once its cache expires), a disabled or deleted tenant 403."""
    if exc.key_revoked:
        return UnauthorizedError("the API key was revoked")
    return ForbiddenError("the tenant is disabled or no longer exists")


def conflicting_keys(event: dict[str, Any]) -> dict[str, Any] | None:
    """The 400 proxy response for a Bearer key and an x-api-key that differ (never a silent choice)."""
    if not keys_disagree(event.get("headers") or {}):
        return None
    message = "the Authorization (Bearer) and x-api-key headers carry different keys; send one"
    return {
        "statusCode": BadRequestError.status,
        "headers": {"Content-Type": "application/json"},
        "body": error_body(BadRequestError.type, message, request_id_of(event)),
        "isBase64Encoded": False,
    }
