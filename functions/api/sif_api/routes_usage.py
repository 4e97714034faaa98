"""GET /v1/usage: the caller's own usage and its cost."""

from __future__ import annotations

from datetime import date
from typing import Annotated

from aws_lambda_powertools.event_handler.api_gateway import Router
from aws_lambda_powertools.event_handler.depends import Depends
from aws_lambda_powertools.event_handler.openapi.params import Query

from sif_api.caller import Caller, current_caller
from sif_api.routes_meta import SECURITY
from sif_api.schemas import UsageResponse, error_responses
from sif_api.service import ApiService, get_service

router = Router()


@router.get(
    "/v1/usage",
    summary="Your usage and its cost",
    description="By model and day; `from` and `to` (YYYY-MM-DD, inclusive) narrow it, default: this month.",
    tags=["usage"],
    security=SECURITY,
    responses=error_responses(400, 401, 422, ok=200),
)
def usage(
    caller: Annotated[Caller, Depends(current_caller)],
    service: Annotated[ApiService, Depends(get_service)],
    from_: Annotated[date | None, Query(alias="from")] = None,
    to: Annotated[date | None, Query()] = None,
) -> UsageResponse:
    return service.usage(caller, from_, to)
