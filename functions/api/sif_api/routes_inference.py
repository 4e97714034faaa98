"""POST /v1/embeddings (OpenAI-compatible) and POST /v1/models/{name}/predict (TF-Serving style)."""

from __future__ import annotations

from typing import Annotated

from aws_lambda_powertools.event_handler.api_gateway import Router
from aws_lambda_powertools.event_handler.depends import Depends
from aws_lambda_powertools.event_handler.openapi.params import Body

from sif_api.caller import Caller, current_caller
from sif_api.errors import request_id_of
from sif_api.routes_meta import SECURITY
from sif_api.schemas import EmbeddingsRequest, EmbeddingsResponse, PredictRequest, PredictResponse, error_responses
from sif_api.service import ApiService, get_service

router = Router()
ERRORS = error_responses(400, 401, 404, 413, 415, 422, 429, 500, ok=200)


def request_id() -> str:
    """API Gateway's id for this request: the key of its usage record."""
    return request_id_of(router.current_event.raw_event)


@router.post(
    "/v1/embeddings",
    summary="Text embeddings (OpenAI-compatible)",
    description="`openai.OpenAI(base_url=<api>/v1, api_key=<key>).embeddings.create(...)` works unchanged.",
    tags=["inference"],
    security=SECURITY,
    responses=ERRORS,
)
def embeddings(
    body: Annotated[EmbeddingsRequest, Body()],
    caller: Annotated[Caller, Depends(current_caller)],
    service: Annotated[ApiService, Depends(get_service)],
) -> EmbeddingsResponse:
    return service.embeddings(caller, body, request_id())


@router.post(
    "/v1/models/<name>/predict",
    summary="Predict (TF-Serving style)",
    description=(
        "Text embedding models: string instances -> vectors, or with `parameters.labels` zero-shot "
        'classification. Image models: `{"b64": ...}` instances -> label scores.'
    ),
    tags=["inference"],
    security=SECURITY,
    responses=ERRORS,
)
def predict(
    name: str,
    body: Annotated[PredictRequest, Body()],
    caller: Annotated[Caller, Depends(current_caller)],
    service: Annotated[ApiService, Depends(get_service)],
) -> PredictResponse:
    return service.predict(caller, name, body, request_id())
