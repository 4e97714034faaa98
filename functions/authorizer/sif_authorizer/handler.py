"""sif API key authorizer (API Gateway REST, REQUEST type).

An active key of an active tenant -> an Allow policy for the whole API (so a cached result serves
every route) and a context with the tenant id, name, plan and monthly quota (`monthly_calls`, in
units = inputs; 0 = unlimited), the key's public id and its sha256 (`key_hash`, which the usage
transaction checks again, so a key revoked while this instance's cache still allows it bills
nothing), which API Gateway hands to the API function as requestContext.authorizer. A missing,
unknown or revoked key -> "Unauthorized", which API Gateway answers with 401 (the template's
UNAUTHORIZED gateway response); a known key of a disabled or deleted tenant -> a Deny policy, 403
(ACCESS_DENIED). Keys and tenants are read again every CACHE_TTL_S (sif_authorizer.keys).

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
from sif_core.tenants import NO_QUOTA, TENANT_DELETED, TENANT_DISABLED, KeyCheck, Tenant, check_key

logger = Logger()
tracer = Tracer()

settings = Settings.from_env()
tenants = TenantCache(lambda key: check_key(table(settings.tenants_table), key))


class Unauthorized(Exception):  # API Gateway matches the message "Unauthorized" exactly
    def __init__(self) -> None:
        super().__init__("Unauthorized")


def policy(event: APIGatewayAuthorizerRequestEvent, tenant: Tenant, check: KeyCheck | None = None) -> dict[str, Any]:
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
            "key_id": check.key_id if check else "",
            "key_hash": check.key_hash if check else "",
        },
    )
    response.allow_all_routes()
    return response.asdict()


def deny(event: APIGatewayAuthorizerRequestEvent, principal: str) -> dict[str, Any]:
    """A Deny policy for the whole API: API Gateway answers 403 (ACCESS_DENIED)."""
    arn = event.parsed_arn
    response = APIGatewayAuthorizerResponse(
        principal_id=principal,
        region=arn.region,
        aws_account_id=arn.aws_account_id,
        api_id=arn.api_id,
        stage=arn.stage,
    )
    response.deny_all_routes()
    return response.asdict()


# clear_state: the keys appended for one caller (tenant_id, key_id) must not label the next request's logs.
@logger.inject_lambda_context(clear_state=True)
@tracer.capture_lambda_handler
@event_source(data_class=APIGatewayAuthorizerRequestEvent)
def lambda_handler(event: APIGatewayAuthorizerRequestEvent, context: LambdaContext) -> dict[str, Any]:
    api_key = api_key_from_headers(event.raw_event.get("headers") or {})
    if not api_key:
        logger.info("rejected", extra={"reason": "no key", "path": event.path})
        raise Unauthorized()
    check = tenants.check(api_key)
    if check.allowed and check.tenant is not None:
        logger.append_keys(tenant_id=check.tenant.tenant_id, key_id=check.key_id)
        return policy(event, check.tenant, check)
    extra = {"reason": check.refused, "tenant_id": check.tenant_id, "key_id": check.key_id, "path": event.path}
    logger.info("rejected", extra=extra)
    if check.refused in (TENANT_DISABLED, TENANT_DELETED):
        return deny(event, check.tenant_id)
    raise Unauthorized()
