"""sif HTTP API: API Gateway (REST, Lambda proxy) -> powertools' resolver -> routes_*.py.

Module scope is the cold start: settings from the environment, boto3 clients, the model registry
with every model loaded, the routes. Each route module has its own Router; batches and jobs
join the same way (`app.include_router(routes_batches.router)`).
"""

from __future__ import annotations

import warnings
from typing import Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.event_handler import APIGatewayRestResolver
from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.utilities.typing import LambdaContext

from sif_api import (
    caller,
    errors,
    routes_batches,
    routes_files,
    routes_inference,
    routes_jobs,
    routes_meta,
    routes_models,
    routes_usage,
    routes_v2,
    service,
)
from sif_core.settings import get_settings

# Usage metrics go out per call through sif_metering (tenant and model dimensions); requests that
# meter nothing (health, models, usage) leave this set empty, which is fine.
warnings.filterwarnings("ignore", message="No application metrics to publish")

logger = Logger()
tracer = Tracer()
metrics = Metrics()

app = APIGatewayRestResolver(enable_validation=True, json_body_deserializer=errors.parse_json_body)
for module in (
    routes_meta,
    routes_models,
    routes_inference,
    routes_v2,
    routes_usage,
    routes_jobs,
    routes_batches,
    routes_files,
):
    app.include_router(module.router)
# POST /v1/files reads its multipart/form-data itself: its body is documented by hand
routes_meta.add_openapi(app, request_bodies={(routes_files.UPLOAD_PATH, "post"): routes_files.UPLOAD_REQUEST_BODY})
errors.register(app, logger)

service.get_service().warm(get_settings().warm_models)  # the cold start: these models load before any request


@logger.inject_lambda_context(correlation_id_path=correlation_paths.API_GATEWAY_REST, clear_state=True)
@tracer.capture_lambda_handler
@metrics.log_metrics(capture_cold_start_metric=True)
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    too_large = errors.body_too_large(event)
    if too_large is not None:
        return too_large
    # a body of another media type than JSON: 415 (the file upload checks its multipart/form-data itself)
    not_json = None if routes_files.takes_form(event) else errors.unsupported_media_type(event)
    if not_json is not None:
        return not_json
    two_keys = caller.conflicting_keys(event)  # a Bearer key and an x-api-key that differ: 400
    if two_keys is not None:
        return two_keys
    return app.resolve(errors.with_json_content_type(event), context)
