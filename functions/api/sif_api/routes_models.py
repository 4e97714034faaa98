"""GET /v1/models (sif's list and OpenAI's: `client.models.list()`), GET /v1/models/{name}, and
TF-Serving's model status (GET /v1/models/{name}/versions/{v}) and metadata (GET /v1/models/{name}/metadata).

A caller sees the public models and its own private ones; another tenant's private model is a 404,
as an unknown one is.
"""

from __future__ import annotations

from typing import Annotated

from aws_lambda_powertools.event_handler.api_gateway import Router
from aws_lambda_powertools.event_handler.depends import Depends

from sif_api.caller import Caller, current_caller
from sif_api.routes_meta import SECURITY
from sif_api.schemas import ModelInfo, ModelList, TfModelMetadata, TfModelStatus, error_responses
from sif_api.service import ApiService, get_service

router = Router()


@router.get(
    "/v1/models",
    summary="List the models",
    description="OpenAI's list (`object`, `data`: `client.models.list()` works) and sif's `models` (the same "
    "entries), each with its versions, variants with their sha256, and aliases.",
    tags=["models"],
    security=SECURITY,
    responses=error_responses(401, ok=200),
)
def list_models(
    caller: Annotated[Caller, Depends(current_caller)], service: Annotated[ApiService, Depends(get_service)]
) -> ModelList:
    return service.catalog.models(caller)


@router.get(
    "/v1/models/<name>",
    summary="One model",
    description="`name@version` describes that version, `name@alias` the one the alias points at. The body is "
    "also OpenAI's model object (`client.models.retrieve(name)` works).",
    tags=["models"],
    security=SECURITY,
    responses=error_responses(401, 404, ok=200),
)
def get_model(
    name: str, caller: Annotated[Caller, Depends(current_caller)], service: Annotated[ApiService, Depends(get_service)]
) -> ModelInfo:
    return service.catalog.model_info(caller, name)


@router.get(
    "/v1/models/<name>/versions/<version>",
    summary="A version's status (TF-Serving)",
    description="`AVAILABLE` while the version serves, `END` once it is retired; an unknown version is a 404.",
    tags=["models"],
    security=SECURITY,
    responses=error_responses(401, 404, ok=200),
)
def version_status(
    name: str,
    version: str,
    caller: Annotated[Caller, Depends(current_caller)],
    service: Annotated[ApiService, Depends(get_service)],
) -> TfModelStatus:
    return service.catalog.version_status(caller, name, version)


@router.get(
    "/v1/models/<name>/metadata",
    summary="The model's signature (TF-Serving metadata)",
    description="The graph's inputs and outputs (from the manifest's signature, else the loaded session) "
    "under `serving_default`, for the version `name` (or `name@version`, `name@alias`) means now.",
    tags=["models"],
    security=SECURITY,
    responses=error_responses(401, 404, ok=200),
)
def metadata(
    name: str, caller: Annotated[Caller, Depends(current_caller)], service: Annotated[ApiService, Depends(get_service)]
) -> TfModelMetadata:
    return service.catalog.tf_metadata(caller, name)
