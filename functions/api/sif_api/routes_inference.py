"""POST /v1/embeddings (OpenAI-compatible) and predict (TF-Serving style), in every URL form TF-Serving has.

`{name}` (and `model` in bodies) is `name`, `name@version` or `name@alias`; TF-Serving's own forms name a
version (`/versions/{v}:predict`) or an alias (`/labels/{alias}:predict`) in the path instead. API
Gateway (REST) cannot have a literal after a path parameter, so template.yaml routes `POST
/v1/models/{name}` and `POST /v1/models/{name}/{versions|labels}/{v}`; the `:predict` verb arrives
inside the last parameter and the resolver's routes below (whose parameters match ':' and '@') take it
apart. Every response says what served: x-sif-model-version, x-sif-model-variant, x-sif-model-sha256.
"""

from __future__ import annotations

from typing import Annotated, TypeVar

from aws_lambda_powertools.event_handler import Response
from aws_lambda_powertools.event_handler.api_gateway import Router
from aws_lambda_powertools.event_handler.depends import Depends
from aws_lambda_powertools.event_handler.openapi.params import Body, Query

from sif_api.caller import Caller, current_caller
from sif_api.catalog import Served, model_ref
from sif_api.errors import JSON, request_id_of
from sif_api.routes_meta import SECURITY
from sif_api.schemas import (
    EmbeddingsRequest,
    EmbeddingsResponse,
    PredictRequest,
    PredictResponse,
    error_responses,
)
from sif_api.service import ApiService, get_service
from sif_inference.manifest import VARIANT_PATTERN

router = Router()
ERRORS = error_responses(400, 401, 404, 413, 415, 422, 429, 500, ok=200)
PREDICT_DESCRIPTION = (
    "Text embedding models: string instances -> vectors, or with `parameters.labels` zero-shot "
    'classification. Image models: `{"b64": ...}` instances -> label scores. The response headers '
    "`x-sif-model-version`, `x-sif-model-variant` and `x-sif-model-sha256` say what served."
)
VariantQuery = Annotated[
    str | None,
    Query(pattern=VARIANT_PATTERN, max_length=32, description="a variant of the model (unknown: 400)"),
]
B = TypeVar("B")


def request_id() -> str:
    """API Gateway's id for this request: the key of its usage record (and of a canary's pick)."""
    return request_id_of(router.current_event.raw_event)


def respond(body: B, served: Served) -> Response[B]:
    """A 200 carrying what served the call in its headers."""
    return Response(status_code=200, content_type=JSON, body=body, headers=served.headers())


@router.post(
    "/v1/embeddings",
    summary="Text embeddings (OpenAI-compatible)",
    description="`openai.OpenAI(base_url=<api>/v1, api_key=<key>).embeddings.create(...)` works unchanged. "
    "`model` may be `name@version` or `name@alias`; `variant` (body or query) picks a variant.",
    tags=["inference"],
    security=SECURITY,
    responses=ERRORS,
)
def embeddings(
    body: Annotated[EmbeddingsRequest, Body()],
    caller: Annotated[Caller, Depends(current_caller)],
    service: Annotated[ApiService, Depends(get_service)],
    variant: VariantQuery = None,
) -> Response[EmbeddingsResponse]:
    return respond(*service.embeddings(caller, body, request_id(), variant))


def _predict(
    service: ApiService, caller: Caller, ref: str, body: PredictRequest, variant: str | None
) -> Response[PredictResponse]:
    return respond(*service.predict(caller, ref, body, request_id(), variant))


@router.post(
    "/v1/models/<name>/predict",
    summary="Predict (TF-Serving style)",
    description=PREDICT_DESCRIPTION,
    tags=["inference"],
    security=SECURITY,
    responses=ERRORS,
)
def predict(
    name: str,
    body: Annotated[PredictRequest, Body()],
    caller: Annotated[Caller, Depends(current_caller)],
    service: Annotated[ApiService, Depends(get_service)],
    variant: VariantQuery = None,
) -> Response[PredictResponse]:
    return _predict(service, caller, name, body, variant)


@router.post(
    "/v1/models/<name>:predict",
    summary="Predict (TF-Serving's URL)",
    description=PREDICT_DESCRIPTION,
    tags=["inference"],
    security=SECURITY,
    responses=ERRORS,
)
def predict_tf(
    name: str,
    body: Annotated[PredictRequest, Body()],
    caller: Annotated[Caller, Depends(current_caller)],
    service: Annotated[ApiService, Depends(get_service)],
    variant: VariantQuery = None,
) -> Response[PredictResponse]:
    return _predict(service, caller, name, body, variant)


@router.post(
    "/v1/models/<name>/versions/<version>:predict",
    summary="Predict with one version (TF-Serving's URL)",
    description=PREDICT_DESCRIPTION,
    tags=["inference"],
    security=SECURITY,
    responses=ERRORS,
)
def predict_version(
    name: str,
    version: str,
    body: Annotated[PredictRequest, Body()],
    caller: Annotated[Caller, Depends(current_caller)],
    service: Annotated[ApiService, Depends(get_service)],
    variant: VariantQuery = None,
) -> Response[PredictResponse]:
    return _predict(service, caller, model_ref(name, version=version), body, variant)


@router.post(
    "/v1/models/<name>/labels/<label>:predict",
    summary="Predict with the version an alias names (TF-Serving's version labels)",
    description=PREDICT_DESCRIPTION,
    tags=["inference"],
    security=SECURITY,
    responses=ERRORS,
)
def predict_label(
    name: str,
    label: str,
    body: Annotated[PredictRequest, Body()],
    caller: Annotated[Caller, Depends(current_caller)],
    service: Annotated[ApiService, Depends(get_service)],
    variant: VariantQuery = None,
) -> Response[PredictResponse]:
    return _predict(service, caller, model_ref(name, alias=label), body, variant)
