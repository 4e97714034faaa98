"""KServe v2 / Open Inference Protocol: health, server and model metadata, model readiness, infer.

Every model speaks it. A text model (embedding, text-classification) takes one BYTES input, its
texts, and answers FP32 rows ([n, dim] vectors, [n, labels] scores); any other model takes its
graph's named tensors (`data` row-major, reshaped by `shape`, datatypes checked against the graph)
and answers its graph's outputs. `{name}` is `name`, `name@version` or `name@alias`, or `/versions/{v}`
names the version. Infer is metered like every call: one quota unit per input (a row of the batch
axis), one usage record per request id. Errors keep the API's one error body.
"""

from __future__ import annotations

from typing import Annotated

from aws_lambda_powertools.event_handler import Response
from aws_lambda_powertools.event_handler.api_gateway import Router
from aws_lambda_powertools.event_handler.depends import Depends
from aws_lambda_powertools.event_handler.openapi.params import Body

from sif_api.caller import Caller, current_caller
from sif_api.catalog import model_ref
from sif_api.routes_inference import ERRORS, VariantQuery, request_id, respond
from sif_api.routes_meta import SECURITY, VERSION
from sif_api.schemas import (
    V2InferRequest,
    V2InferResponse,
    V2ModelMetadata,
    V2ModelReady,
    V2ServerLive,
    V2ServerMetadata,
    V2ServerReady,
    error_responses,
)
from sif_api.service import ApiService, get_service

router = Router()
SERVER_NAME = "sif"
TAGS = ["kserve-v2"]
INFER_DESCRIPTION = (
    "Text models: one BYTES input (the texts, shape [n]) -> FP32 [n, dim] (embeddings) or [n, labels] "
    "(scores). Other models: the graph's named tensors in and out. `?variant=` or `parameters.variant` "
    "picks a variant; the headers x-sif-model-version, x-sif-model-variant, x-sif-model-sha256 say what served."
)


@router.get("/v2/health/live", summary="Server live (KServe v2)", tags=TAGS)
def live() -> V2ServerLive:
    return V2ServerLive(live=True)


@router.get("/v2/health/ready", summary="Server ready (KServe v2)", tags=TAGS)
def ready() -> V2ServerReady:
    return V2ServerReady(ready=True)  # the cold start loaded the models before the first request


@router.get(
    "/v2", summary="Server metadata (KServe v2)", tags=TAGS, security=SECURITY, responses=error_responses(401, ok=200)
)
def server_metadata(caller: Annotated[Caller, Depends(current_caller)]) -> V2ServerMetadata:
    return V2ServerMetadata(name=SERVER_NAME, version=VERSION, extensions=[])


METADATA = {
    "summary": "Model metadata (KServe v2)",
    "description": "Text models show the BYTES input infer takes; other models their graph's tensors (-1: dynamic).",
    "tags": TAGS,
    "security": SECURITY,
    "responses": error_responses(401, 404, ok=200),
}
READY = {
    "summary": "Model ready (KServe v2)",
    "description": "ready: the version's session is loaded and verified.",
    "tags": TAGS,
    "security": SECURITY,
    "responses": error_responses(401, 404, ok=200),
}
INFER = {
    "summary": "Infer (KServe v2)",
    "description": INFER_DESCRIPTION,
    "tags": TAGS,
    "security": SECURITY,
    "responses": ERRORS,
}


@router.get("/v2/models/<name>", **METADATA)  # type: ignore[arg-type]
def model_metadata(
    name: str, caller: Annotated[Caller, Depends(current_caller)], service: Annotated[ApiService, Depends(get_service)]
) -> V2ModelMetadata:
    return service.catalog.v2_metadata(caller, name)


@router.get("/v2/models/<name>/versions/<version>", **METADATA)  # type: ignore[arg-type]
def version_metadata(
    name: str,
    version: str,
    caller: Annotated[Caller, Depends(current_caller)],
    service: Annotated[ApiService, Depends(get_service)],
) -> V2ModelMetadata:
    return service.catalog.v2_metadata(caller, model_ref(name, version=version))


@router.get("/v2/models/<name>/ready", **READY)  # type: ignore[arg-type]
def model_ready(
    name: str, caller: Annotated[Caller, Depends(current_caller)], service: Annotated[ApiService, Depends(get_service)]
) -> V2ModelReady:
    return service.catalog.v2_ready(caller, name)


@router.get("/v2/models/<name>/versions/<version>/ready", **READY)  # type: ignore[arg-type]
def version_ready(
    name: str,
    version: str,
    caller: Annotated[Caller, Depends(current_caller)],
    service: Annotated[ApiService, Depends(get_service)],
) -> V2ModelReady:
    return service.catalog.v2_ready(caller, model_ref(name, version=version))


@router.post("/v2/models/<name>/infer", **INFER)  # type: ignore[arg-type]
def infer(
    name: str,
    body: Annotated[V2InferRequest, Body()],
    caller: Annotated[Caller, Depends(current_caller)],
    service: Annotated[ApiService, Depends(get_service)],
    variant: VariantQuery = None,
) -> Response[V2InferResponse]:
    return respond(*service.infer(caller, name, body, request_id(), variant))


@router.post("/v2/models/<name>/versions/<version>/infer", **INFER)  # type: ignore[arg-type]
def infer_version(
    name: str,
    version: str,
    body: Annotated[V2InferRequest, Body()],
    caller: Annotated[Caller, Depends(current_caller)],
    service: Annotated[ApiService, Depends(get_service)],
    variant: VariantQuery = None,
) -> Response[V2InferResponse]:
    return respond(*service.infer(caller, model_ref(name, version=version), body, request_id(), variant))
