"""The local API gateway's own logic: routes and auth from template.yaml, proxy events, policies,
gateway responses (the HTTP side is covered end to end in tests/e2e)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from sif_emulator.gateway import HttpRequest, LocalApiGateway, policy_allows
from sif_emulator.stack import LocalStack

pytestmark = pytest.mark.integration

ARN = "arn:aws:execute-api:us-east-1:123456789012:abc/prod/GET/v1/models"


@pytest.fixture(scope="module")
def gateway(local_stack: LocalStack) -> Iterator[LocalApiGateway]:
    gw = LocalApiGateway(local_stack, 0)  # not started: no function processes
    try:
        yield gw
    finally:
        gw.stop()


def test_routes_and_authorizers_come_from_the_template(gateway: LocalApiGateway) -> None:
    by_path = {(r.method, r.path): r for r in gateway.routes}
    assert by_path[("GET", "/health")].authorizer is None
    assert by_path[("GET", "/openapi.json")].authorizer is None
    assert by_path[("POST", "/v1/embeddings")].authorizer == "SifAuthorizer"
    assert by_path[("POST", "/v1/embeddings")].function == "ApiFunction"
    assert gateway.stage == "prod"
    assert set(gateway.pools) == {"ApiFunction", "AuthorizerFunction"}
    route, params = gateway.match("POST", "/v1/models/open-nsfw/predict") or (None, None)
    assert route is not None and route.resource == "/v1/models/{name}/predict" and params == {"name": "open-nsfw"}
    assert gateway.match("DELETE", "/v1/models") is None


def test_proxy_event_is_api_gateway_rest_v1(gateway: LocalApiGateway) -> None:
    request = HttpRequest(
        method="POST",
        raw_path="/v1/models/all-minilm-l6-v2/predict?a=1&a=2&b=",
        headers=[("Content-Type", "application/json"), ("X-Multi", "1"), ("X-Multi", "2")],
        body=b'{"instances": ["x"]}',
        source_ip="127.0.0.1",
    )
    route, params = gateway.match("POST", "/v1/models/all-minilm-l6-v2/predict") or (None, {})
    assert route is not None
    event = gateway.proxy_event(request, route, "/v1/models/all-minilm-l6-v2/predict", params, "a=1&a=2&b=", "rid-1")
    assert event["resource"] == "/v1/models/{name}/predict"
    assert event["httpMethod"] == "POST" and event["pathParameters"] == {"name": "all-minilm-l6-v2"}
    assert event["queryStringParameters"] == {"a": "2", "b": ""}
    assert event["multiValueQueryStringParameters"] == {"a": ["1", "2"], "b": [""]}
    assert event["headers"]["X-Multi"] == "1,2" and event["multiValueHeaders"]["X-Multi"] == ["1", "2"]
    assert json.loads(event["body"]) == {"instances": ["x"]} and event["isBase64Encoded"] is False
    ctx = event["requestContext"]
    assert (ctx["requestId"], ctx["stage"], ctx["resourcePath"]) == ("rid-1", "prod", "/v1/models/{name}/predict")
    assert ctx["identity"]["sourceIp"] == "127.0.0.1"

    binary = HttpRequest("POST", "/v1/embeddings", [], b"\xff\x00", "127.0.0.1")
    event = gateway.proxy_event(binary, route, "/v1/embeddings", {}, "", "rid-2")
    assert event["isBase64Encoded"] is True


def test_gateway_responses_use_the_templates_bodies(gateway: LocalApiGateway) -> None:
    for kind, status in [("UNAUTHORIZED", 401), ("MISSING_AUTHENTICATION_TOKEN", 404), ("REQUEST_TOO_LARGE", 413)]:
        response = gateway.gateway_response(kind, "rid-3")
        assert response.status == status
        error = json.loads(response.body)["error"]
        assert error["request_id"] == "rid-3" and error["type"] and error["message"]
    timeout = gateway.gateway_response("INTEGRATION_TIMEOUT", "rid-4")
    assert timeout.status == 504 and json.loads(timeout.body)["error"]["request_id"] == "rid-4"


@pytest.mark.parametrize(
    ("statements", "allowed"),
    [
        ([{"Action": "execute-api:Invoke", "Effect": "Allow", "Resource": ["arn:aws:execute-api:*/prod/*/*"]}], True),
        ([{"Action": "execute-api:Invoke", "Effect": "Allow", "Resource": [ARN]}], True),
        ([{"Action": "execute-api:Invoke", "Effect": "Allow", "Resource": [ARN.replace("GET", "POST")]}], False),
        (
            [
                {"Action": "execute-api:Invoke", "Effect": "Allow", "Resource": ["*"]},
                {"Action": "execute-api:Invoke", "Effect": "Deny", "Resource": [ARN]},
            ],
            False,
        ),
        ([{"Action": "s3:GetObject", "Effect": "Allow", "Resource": ["*"]}], False),
        ([], False),
    ],
)
def test_policy_evaluation(statements: list[dict], allowed: bool) -> None:
    assert policy_allows({"Version": "2012-10-17", "Statement": statements}, ARN) is allowed
