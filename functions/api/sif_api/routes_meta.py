"""GET /health and GET /openapi.json: no API key needed (the template marks them Authorizer: NONE)."""

from __future__ import annotations

import json
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
        if not request_bodies:
            return text
        spec = json.loads(text)
        for (path, method), body in request_bodies.items():
            spec["paths"][path][method]["requestBody"] = body
        return json.dumps(spec)

    @app.get("/openapi.json", include_in_schema=False)
    def openapi_json() -> Any:  # a Response: no response model, no validation
        return Response(status_code=200, content_type="application/json", body=document(base_path(app)))

    app.enable_swagger(
        path="/docs", title=TITLE, version=VERSION, description=DESCRIPTION, security_schemes=SECURITY_SCHEMES
    )
