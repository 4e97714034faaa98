"""GET /health and GET /openapi.json: no API key needed (the template marks them Authorizer: NONE)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from functools import cache
from typing import Any

from aws_lambda_powertools.event_handler import APIGatewayRestResolver, Response
from aws_lambda_powertools.event_handler.api_gateway import Router
from aws_lambda_powertools.event_handler.openapi.models import APIKey, APIKeyIn, HTTPBearer, SecurityScheme, Server

from sif_api.schemas import Health

router = Router()

TITLE = "sif - serverless inference functions"
VERSION = "1.0.0"
DESCRIPTION = (
    "Pay-per-call inference. Authenticate with `Authorization: Bearer <key>` or `x-api-key: <key>`. "
    'Every error is `{"error": {"type", "message", "request_id"}}`.'
)
SECURITY_SCHEMES: dict[str, SecurityScheme] = {
    "bearerAuth": HTTPBearer(description="Authorization: Bearer <key>"),
    "apiKeyAuth": APIKey(name="x-api-key", in_=APIKeyIn.header, description="x-api-key: <key>"),
}
# Either scheme will do.
SECURITY: list[dict[str, list[str]]] = [{"bearerAuth": []}, {"apiKeyAuth": []}]


@router.get("/health", summary="Liveness", tags=["meta"])
def health() -> Health:
    return Health()


def base_path(app: APIGatewayRestResolver) -> str:
    """'/prod' behind API Gateway's stage URL, '' behind a custom domain or the local gateway."""
    context = app.current_event.request_context
    stage = context.stage
    if stage and stage != "$default" and (context.path or "").startswith(f"/{stage}/"):
        return f"/{stage}"
    return ""


# What a create returns names what to read, cancel or delete next (OpenAPI links: readers and
# schemathesis' stateful phase follow them): (path, method, status) -> {link: (path, method, parameter)}.
LINKS: dict[tuple[str, str, str], dict[str, tuple[str, str, str]]] = {
    ("/v1/jobs", "post", "202"): {
        "GetJob": ("/v1/jobs/{job_id}", "get", "job_id"),
        "CancelJob": ("/v1/jobs/{job_id}/cancel", "post", "job_id"),
    },
    ("/v1/batches", "post", "201"): {
        "GetBatch": ("/v1/batches/{batch_id}", "get", "batch_id"),
        "CancelBatch": ("/v1/batches/{batch_id}/cancel", "post", "batch_id"),
    },
    ("/v1/files", "post", "200"): {
        "GetFile": ("/v1/files/{file_id}", "get", "file_id"),
        "GetFileContent": ("/v1/files/{file_id}/content", "get", "file_id"),
        "DeleteFile": ("/v1/files/{file_id}", "delete", "file_id"),
    },
}


# Each path parameter's example, so that Swagger's "Try it out" starts from a call that works: a model
# that is always there, its first version, its `latest` alias. Ids come from a create (the links say
# which); their examples have the right shape and, made up, answer the documented 404.
PARAMETER_EXAMPLES: dict[str, str] = {
    "name": "all-minilm-l6-v2",
    "version": "1",
    "label": "latest",
    "job_id": "j_0123456789abcdef0123",
    "batch_id": "b_0123456789abcdef0123",
    "file_id": "file-0123456789abcdef01234567",
}


def finish_document(spec: dict[str, Any]) -> None:
    """What the generated document cannot know: a 422 is the API's one error body (powertools lists its
    own `{"detail": [...]}` shape, which this API never sends), and only where something can fail
    validation (a parameter or a body); a redirect's Location and no body; path parameters' examples;
    the links between a create and its reads."""
    error_body = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    for path, operations in spec.get("paths", {}).items():
        for operation in operations.values():
            for parameter in operation.get("parameters", []):
                if parameter.get("in") == "path" and parameter["name"] in PARAMETER_EXAMPLES:
                    parameter.setdefault("example", PARAMETER_EXAMPLES[parameter["name"]])
            responses = operation.get("responses", {})
            if "404" in responses and re.search(r"\{(job|batch|file)_id\}", path):
                responses["404"]["description"] = "unknown id: another tenant's job, batch or file is 404 too"
            for status, response in responses.items():
                if status.startswith("3"):  # a redirect has no body, only where to go
                    response.pop("content", None)
                    response.setdefault("headers", {})["Location"] = {
                        "description": "where the content is (a presigned, expiring URL)",
                        "schema": {"type": "string", "format": "uri"},
                    }
            if operation.get("security") and "400" not in responses:  # keys that disagree (see sif_api.caller)
                responses["400"] = {
                    "description": "bad request (e.g. a Bearer key and an x-api-key that disagree)",
                    "content": error_body,
                }
            if "422" not in responses:
                continue
            if not operation.get("parameters") and "requestBody" not in operation:
                del responses["422"]
            else:
                responses["422"] = {"description": "the body or the query does not validate", "content": error_body}
    schemas = spec.get("components", {}).get("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        if unused in schemas and f"#/components/schemas/{unused}" not in json.dumps(spec.get("paths", {})):
            del schemas[unused]
    for (path, method, status), links in LINKS.items():
        response = spec.get("paths", {}).get(path, {}).get(method, {}).get("responses", {}).get(status)
        if response is None:
            continue
        response["links"] = {
            name: {
                "operationRef": "#/paths/" + target.replace("~", "~0").replace("/", "~1") + "/" + verb,
                "parameters": {parameter: "$response.body#/id"},
            }
            for name, (target, verb, parameter) in links.items()
        }


def add_openapi(
    app: APIGatewayRestResolver, *, request_bodies: Mapping[tuple[str, str], dict[str, Any]] | None = None
) -> None:
    """GET /openapi.json (generated once per base path) and the Swagger UI at GET /docs.

    `request_bodies`: {(path, method): requestBody} for routes that read their body themselves (a
    multipart form), which the generated document cannot know."""

    @cache
    def document(base: str) -> str:
        text = app.get_openapi_json_schema(
            title=TITLE,
            version=VERSION,
            description=DESCRIPTION,
            servers=[Server(url=base or "/")],
            security_schemes=SECURITY_SCHEMES,
        )
        spec = json.loads(text)
        for (path, method), body in (request_bodies or {}).items():
            spec["paths"][path][method]["requestBody"] = body
        finish_document(spec)
        return json.dumps(spec)

    @app.get("/openapi.json", include_in_schema=False)
    def openapi_json() -> Any:  # a Response: no response model, no validation
        return Response(status_code=200, content_type="application/json", body=document(base_path(app)))

    app.enable_swagger(
        path="/docs", title=TITLE, version=VERSION, description=DESCRIPTION, security_schemes=SECURITY_SCHEMES
    )
