"""sif API key authorizer (API Gateway REST, REQUEST type).

A known key -> an Allow policy for the whole API (so a cached result serves every route) and a
context with the tenant id, name, plan and monthly quota (`monthly_calls`, in units = inputs;
0 = unlimited), which API Gateway hands to the API function as requestContext.authorizer. A missing
or unknown key -> "Unauthorized", which API Gateway answers with 401 (the template's UNAUTHORIZED
gateway response).

A tenant record without a quota (Tenant.monthly_calls None) is still allowed in, with
`monthly_calls` = NO_QUOTA (-1) in the context: context values cannot be null, and every quota
check refuses a negative limit, so its metered calls answer 429 "no quota configured" while the
unmetered routes (models, usage) keep working. It fails closed, never as 0 = unlimited.
"""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools import Logger, Tracer
from aws_lambda_powertools.utilities.data_classes import event_source
from aws_lambda_powertools.utilities.data_classes.api_gateway_authorizer_event import (
    APIGatewayAuthorizerRequestEvent,
    APIGatewayAuthorizerResponse,
)
from aws_lambda_powertools.utilities.typing import LambdaContext

from sif_authorizer.keys import TenantCache, api_key_from_headers
from sif_core.aws import table
from sif_core.settings import Settings
from sif_core.tenants import NO_QUOTA, Tenant, find_tenant

logger = Logger()
tracer = Tracer()

settings = Settings.from_env()
tenants = TenantCache(lambda key: find_tenant(table(settings.tenants_table), key))


class Unauthorized(Exception):  # API Gateway matches the message "Unauthorized" exactly
    def __init__(self) -> None:
        super().__init__("Unauthorized")


def policy(event: APIGatewayAuthorizerRequestEvent, tenant: Tenant) -> dict[str, Any]:
    arn = event.parsed_arn
    response = APIGatewayAuthorizerResponse(
        principal_id=tenant.tenant_id,
        region=arn.region,
        aws_account_id=arn.aws_account_id,
        api_id=arn.api_id,
        stage=arn.stage,
        context={
            "tenant_id": tenant.tenant_id,
            "tenant_name": tenant.name,
            "plan": tenant.plan,
            "monthly_calls": NO_QUOTA if tenant.monthly_calls is None else tenant.monthly_calls,
        },
    )
    response.allow_all_routes()
    return response.asdict()


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@event_source(data_class=APIGatewayAuthorizerRequestEvent)
def lambda_handler(event: APIGatewayAuthorizerRequestEvent, context: LambdaContext) -> dict[str, Any]:
    api_key = api_key_from_headers(event.raw_event.get("headers") or {})
    tenant = tenants.tenant(api_key) if api_key else None
    if tenant is None:
        logger.info("rejected", extra={"reason": "unknown key" if api_key else "no key", "path": event.path})
        raise Unauthorized()
    logger.append_keys(tenant_id=tenant.tenant_id)
    return policy(event, tenant)
