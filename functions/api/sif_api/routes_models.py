"""GET /v1/models and GET /v1/models/{name}."""

from __future__ import annotations

from typing import Annotated

from aws_lambda_powertools.event_handler.api_gateway import Router
from aws_lambda_powertools.event_handler.depends import Depends

from sif_api.caller import Caller, current_caller
from sif_api.routes_meta import SECURITY
from sif_api.schemas import ModelInfo, ModelList, error_responses
from sif_api.service import ApiService, get_service

router = Router()


@router.get(
    "/v1/models", summary="List the models", tags=["models"], security=SECURITY, responses=error_responses(401, ok=200)
)
def list_models(
    caller: Annotated[Caller, Depends(current_caller)], service: Annotated[ApiService, Depends(get_service)]
) -> ModelList:
    return service.models()


@router.get(
    "/v1/models/<name>",
    summary="One model",
    tags=["models"],
    security=SECURITY,
    responses=error_responses(401, 404, ok=200),
)
def get_model(
    name: str, caller: Annotated[Caller, Depends(current_caller)], service: Annotated[ApiService, Depends(get_service)]
) -> ModelInfo:
    return service.model_info(name)
