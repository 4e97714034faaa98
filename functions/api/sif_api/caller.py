"""Who is calling: the tenant that the authorizer put into the request context."""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools.event_handler.api_gateway import BaseRouter
from pydantic import BaseModel, ValidationError

from sif_api.errors import UnauthorizedError
from sif_metering.ledger import NO_QUOTA


class Caller(BaseModel):
    """API Gateway passes authorizer context values as strings; pydantic turns them back into types.

    `monthly_calls` is the tenant's quota in units (inputs) per month: 0 = unlimited; NO_QUOTA (-1,
    what the authorizer sends for a tenant record without a quota) is refused by every quota check.
    A context without the field fails closed the same way, never as unlimited.
    """

    tenant_id: str
    tenant_name: str = ""
    plan: str = "standard"
    monthly_calls: int = NO_QUOTA


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
