"""The API function's handler, invoked in-process with the sample events in events/ (moto's server
behind real boto3, the resources of template.yaml, the built models)."""

from __future__ import annotations

import base64
import copy
import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from sif_emulator.lambda_runtime import LambdaContext
from sif_emulator.stack import LocalStack

pytestmark = [
    pytest.mark.integration,
    # health/models/usage add no metrics to the function's Metrics; the handler silences that on Lambda
    pytest.mark.filterwarnings("ignore:No application metrics to publish"),
]

MODEL = "all-minilm-l6-v2"


@pytest.fixture(scope="module")
def handler(local_stack: LocalStack) -> Iterator[ModuleType]:
    """sif_api.handler imported as Lambda would: with the function's environment (its cold start)."""
    import importlib

    from sif_core.settings import get_settings

    with pytest.MonkeyPatch.context() as env:
        for key, value in local_stack.function_env("ApiFunction").items():
            env.setenv(key, value)
        get_settings.cache_clear()
        module = importlib.import_module("sif_api.handler")
        yield module


@pytest.fixture(scope="module")
def tenant(local_stack: LocalStack) -> dict[str, Any]:
    info, _ = local_stack.create_tenant("unit-api")
    return info


Invoke = Callable[..., tuple[int, dict[str, str], Any]]


@pytest.fixture
def invoke(handler: ModuleType, load_event: Callable[[str], dict], tenant: dict[str, Any]) -> Invoke:
    """Run an events/<name>.json through the handler as `tenant` (or as `as_tenant`), fresh request id."""

    def run(
        name: str,
        *,
        body: Any = None,
        as_tenant: dict[str, Any] | None = None,
        request_id: str | None = None,
        edit: Callable[[dict[str, Any]], None] | None = None,
    ) -> tuple[int, dict[str, str], Any]:
        event = copy.deepcopy(load_event(name))
        event["requestContext"]["requestId"] = request_id or str(uuid.uuid4())
        who = as_tenant or tenant
        if "authorizer" in event["requestContext"]:
            event["requestContext"]["authorizer"].update(
                principalId=who["tenant_id"], tenant_id=who["tenant_id"], monthly_calls=str(who["monthly_calls"])
            )
        if body is not None:
            event["body"] = json.dumps(body)
        if edit is not None:
            edit(event)
        result = handler.lambda_handler(event, LambdaContext(function_name="sif-api", timeout_s=29))
        headers = {k.lower(): v for k, v in (result.get("headers") or {}).items()}
        for k, values in (result.get("multiValueHeaders") or {}).items():
            headers[k.lower()] = values[-1]
        text = result["body"]
        try:
            payload = json.loads(text)
        except ValueError:
            payload = text
        return result["statusCode"], headers, payload

    return run


def assert_error(result: tuple[int, dict[str, str], Any], status: int, kind: str | None = None) -> dict:
    code, _, body = result
    assert code == status, body
    error = body["error"]
    assert set(error) >= {"type", "message", "request_id"}
    if kind:
        assert error["type"] == kind, error
    assert "Traceback" not in json.dumps(body)
    return dict(error)


# ---------------------------------------------------------------- routes
def test_health(invoke: Invoke) -> None:
    assert invoke("api_health")[::2] == (200, {"status": "ok"})


def test_openapi_and_docs(invoke: Invoke) -> None:
    status, headers, spec = invoke("api_openapi")
    assert status == 200 and headers["content-type"] == "application/json"
    assert spec["servers"] == [{"url": "/prod"}]  # behind the stage URL on AWS
    predict = spec["paths"]["/v1/models/{name}/predict"]["post"]
    assert {"200", "400", "401", "404", "413", "422", "429", "500"} <= set(predict["responses"])
    assert predict["security"] == [{"bearerAuth": []}, {"apiKeyAuth": []}]
    assert "security" not in spec["paths"]["/health"]["get"]

    def to_docs(event: dict[str, Any]) -> None:
        event["path"] = event["resource"] = "/docs"

    status, headers, html = invoke("api_openapi", edit=to_docs)
    assert status == 200 and headers["content-type"].startswith("text/html") and "swagger" in html.lower()


def test_openapi_says_what_the_api_sends(invoke: Invoke) -> None:
    _, _, spec = invoke("api_openapi")
    paths = spec["paths"]
    # every 422 is the API's own error body, and only where a parameter or a body can fail validation
    for path, operations in paths.items():
        for method, operation in operations.items():
            bad = operation["responses"].get("422")
            if bad is not None:
                assert bad["content"]["application/json"]["schema"]["$ref"] == "#/components/schemas/ErrorResponse"
                assert operation.get("parameters") or "requestBody" in operation, (method, path)
    assert "422" not in paths["/health"]["get"]["responses"] and "422" not in paths["/v1/models"]["get"]["responses"]
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    # a job's accepted and status bodies are documented, and a create links to its reads
    created = paths["/v1/jobs"]["post"]["responses"]["202"]
    assert "CreateJobResponse" in json.dumps(created["content"])
    assert "JobStatusResponse" in json.dumps(paths["/v1/jobs/{job_id}"]["get"]["responses"]["200"]["content"])
    link = created["links"]["GetJob"]
    assert link["parameters"] == {"job_id": "$response.body#/id"}
    assert link["operationRef"] == "#/paths/~1v1~1jobs~1{job_id}/get"
    assert set(paths["/v1/files"]["post"]["responses"]["200"]["links"]) == {"GetFile", "GetFileContent", "DeleteFile"}
    # a redirect has a Location and no body (schemathesis' content-type check reads an empty 307 as a violation)
    redirect = paths["/v1/files/{file_id}/content"]["get"]["responses"]["307"]
    assert "content" not in redirect and redirect["headers"]["Location"]["schema"]["format"] == "uri"
    # a 404 says what was not found: a model on the model routes, an id on the id routes
    assert "unknown id" in paths["/v1/files/{file_id}/content"]["get"]["responses"]["404"]["description"]
    assert "unknown model" in paths["/v1/models/{name}/predict"]["post"]["responses"]["404"]["description"]


def test_models(invoke: Invoke) -> None:
    status, _, body = invoke("api_list_models")
    assert status == 200
    names = [m["name"] for m in body["models"]]
    assert names == sorted(names) and {MODEL, "open-nsfw"} <= set(names)
    status, _, one = invoke("api_get_model")
    assert status == 200 and one["name"] == MODEL and one["version"] == "1" and one["route"] == "cpu"
    assert set(one) >= {"name", "version", "task", "sha256", "route", "limits"}

    def unknown(event: dict[str, Any]) -> None:
        event["path"], event["pathParameters"] = "/v1/models/nope", {"name": "nope"}

    error = assert_error(invoke("api_get_model", edit=unknown), 404, "model_not_found")
    assert error["message"] == "unknown model 'nope'"


def test_embeddings(invoke: Invoke, minilm_reference: dict) -> None:
    status, _, body = invoke("api_embeddings")
    assert status == 200 and body["object"] == "list" and body["model"] == MODEL
    vectors = np.array([d["embedding"] for d in body["data"]], dtype=np.float32)
    ref = np.array(minilm_reference["embeddings"][:2], dtype=np.float32)  # the event's two texts
    assert (vectors * ref).sum(1).min() >= 0.97
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] == 11  # 8 + 3 ("hello")


def test_embeddings_base64(invoke: Invoke) -> None:
    status, _, body = invoke("api_embeddings_base64")
    assert status == 200
    vector = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), dtype="<f4")
    assert vector.shape == (384,) and abs(float(np.linalg.norm(vector)) - 1) < 1e-3


def test_token_id_inputs_embed_as_the_text_they_stand_for(invoke: Invoke) -> None:
    texts = {"model": MODEL, "input": ["hello world", "hello"]}
    status, _, by_text = invoke("api_embeddings", body=texts)
    assert status == 200
    # bert-base-uncased ids: [CLS] hello world [SEP] and hello alone (special tokens or not)
    for ids in ([[101, 7592, 2088, 102], [7592]], [[7592, 2088], [101, 7592, 102]]):
        status, _, by_ids = invoke("api_embeddings", body={"model": MODEL, "input": ids})
        assert status == 200, by_ids
        assert [d["embedding"] for d in by_ids["data"]] == [d["embedding"] for d in by_text["data"]]
        assert by_ids["usage"]["total_tokens"] == by_text["usage"]["total_tokens"]
    status, _, one = invoke("api_embeddings", body={"model": MODEL, "input": [7592]})  # one input as a list of ids
    assert status == 200 and one["data"][0]["embedding"] == by_text["data"][1]["embedding"]
    assert_error(invoke("api_embeddings", body={"model": MODEL, "input": [[7592, 30522]]}), 400, "bad_request")
    assert_error(invoke("api_embeddings", body={"model": MODEL, "input": [[101, 102]]}), 400, "bad_request")  # empty
    assert_error(invoke("api_embeddings", body={"model": MODEL, "input": [[-1]]}), 422, "validation_error")


def test_predict(invoke: Invoke) -> None:
    status, _, text = invoke("api_predict_text")
    assert status == 200 and np.array(text["predictions"]).shape == (2, 384)
    assert text["model_version"] == "1" and text["usage"]["inputs"] == 2

    status, _, zero_shot = invoke("api_predict_zero_shot")
    assert status == 200
    assert [p["label"] for p in zero_shot["predictions"]] == ["sports", "finance"]

    status, _, image = invoke("api_predict_image")
    assert status == 200 and image["predictions"][0]["label"] == "sfw"
    assert image["usage"]["pixels"] == 64 * 48 and image["usage"]["cost_usd"] > 0


# ---------------------------------------------------------------- metering
def test_one_usage_record_per_request_id(invoke: Invoke, local_stack: LocalStack) -> None:
    info, _ = local_stack.create_tenant("unit-idempotent")
    request_id = str(uuid.uuid4())
    for _ in range(3):  # a retried invocation carries the same API Gateway request id
        assert invoke("api_embeddings", as_tenant=info, request_id=request_id)[0] == 200
    invoke("api_embeddings_base64", as_tenant=info)
    status, _, usage = invoke("api_usage", as_tenant=info)
    assert status == 200 and usage["tenant"] == info["tenant_id"]
    assert (usage["total"]["calls"], usage["total"]["inputs"]) == (2, 3)
    (row,) = usage["by_model_day"]
    assert row["model"] == MODEL and row["calls"] == 2


def test_usage_metrics_have_tenant_and_model_dimensions(
    invoke: Invoke, tenant: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    invoke("api_predict_text")
    blobs = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith('{"_aws"')]
    usage = [b for b in blobs if "Calls" in b]
    assert len(usage) == 1
    (directive,) = usage[0]["_aws"]["CloudWatchMetrics"]
    assert {"tenant", "model"} <= set(directive["Dimensions"][0])
    assert usage[0]["tenant"] == tenant["tenant_id"] and usage[0]["model"] == MODEL
    assert usage[0]["Inputs"] == [2.0] and usage[0]["Tokens"][0] > 0


# ---------------------------------------------------------------- errors
def test_body_over_6mb_is_413(invoke: Invoke) -> None:
    big = {"model": MODEL, "input": "x" * (6 * 1024 * 1024)}
    assert_error(invoke("api_embeddings", body=big), 413, "payload_too_large")


def test_quota_is_checked_before_inference_and_answers_429(invoke: Invoke, local_stack: LocalStack) -> None:
    info, _ = local_stack.create_tenant("unit-quota", monthly_calls=2)  # the sample call embeds 2 texts: 2 units
    assert invoke("api_embeddings", as_tenant=info)[0] == 200
    result = invoke("api_embeddings", as_tenant=info)
    assert_error(result, 429, "quota_exceeded")
    assert int(result[1]["retry-after"]) > 0


def test_no_authorizer_context_is_401(invoke: Invoke) -> None:
    def anonymous(event: dict[str, Any]) -> None:
        del event["requestContext"]["authorizer"]

    assert_error(invoke("api_list_models", edit=anonymous), 401, "unauthorized")


def test_validation_errors_are_422_with_details(invoke: Invoke) -> None:
    error = assert_error(invoke("api_embeddings", body={"model": MODEL}), 422, "validation_error")
    assert error["details"][0]["loc"] == ["body", "input"]

    def not_utf8(event: dict[str, Any]) -> None:
        event["body"], event["isBase64Encoded"] = base64.b64encode(b"\xff\xfe{").decode(), True

    assert_error(invoke("api_embeddings", edit=not_utf8), 422, "validation_error")


def test_wrong_task_is_400(invoke: Invoke) -> None:
    assert_error(invoke("api_embeddings", body={"model": "open-nsfw", "input": "x"}), 400, "wrong_task")


def test_a_failing_dependency_is_500(invoke: Invoke, handler: ModuleType) -> None:
    from sif_api import service
    from sif_core.aws import client
    from sif_metering import UsageLedger

    working = service.get_service()
    broken = service.ApiService(working.registry, UsageLedger(client("dynamodb"), "no-such-table"))
    handler.app.dependency_overrides[service.get_service] = lambda: broken
    try:
        result = invoke("api_embeddings", request_id="req-500")
    finally:
        handler.app.dependency_overrides.clear()
    error = assert_error(result, 500, "internal_error")
    assert error["request_id"] == "req-500" and "req-500" in error["message"]
    assert "no-such-table" not in json.dumps(result[2])


# ---------------------------------------------------------------- the task layer behind the routes
def test_predict_takes_what_files_take_and_answers_the_same_numbers(
    invoke: Invoke, handler: ModuleType, load_event: Callable[[str], dict]
) -> None:
    from sif_api import service

    event_body = json.loads(load_event("api_predict_image")["body"])
    b64 = event_body["instances"][0]["b64"]
    url_safe = base64.urlsafe_b64encode(base64.b64decode(b64)).decode().rstrip("=")
    bodies = [{"instances": [{"b64": "data:image/png;base64," + b64}]}, {"instances": [{"b64": url_safe}]}]
    answers = []
    for body in bodies:
        status, _, answer = invoke("api_predict_image", body=body)
        assert status == 200, answer
        answers.append(answer["predictions"][0])
    assert answers[0] == answers[1]
    task = service.get_service().registry.task("open-nsfw")
    file_line = task.dumps_all(task.predict([b64]).predictions)[0]  # what a file row gets
    assert json.loads(file_line) == answers[0]["scores"]

    status, _, text = invoke("api_embeddings", body={"model": MODEL, "input": "hello", "encoding_format": "float"})
    assert status == 200
    embedding = text["data"][0]["embedding"]
    text_task = service.get_service().registry.task(MODEL)
    assert embedding == json.loads(text_task.dumps_all(text_task.predict(["hello"]).predictions)[0])
    assert max(len(repr(abs(x)).split("e")[0].replace(".", "").strip("0")) for x in embedding) <= 7


def test_bad_inputs_are_4xx_not_500(invoke: Invoke) -> None:
    error = assert_error(invoke("api_embeddings", body={"model": MODEL, "input": ["ok", "a\ud800b"]}), 400)
    assert error["type"] == "bad_request" and error["message"].startswith("input 1: text is not valid Unicode")
    predict = {"instances": ["ok", "\udfff"]}
    assert_error(invoke("api_predict_text", body=predict), 400, "bad_request")
    not_b64 = {"instances": [{"b64": "this is not base64!"}]}
    assert_error(invoke("api_predict_image", body=not_b64), 400, "bad_request")
    assert_error(invoke("api_predict_image", body={"instances": ["a text"]}), 400, "wrong_task")
    duplicates = {"instances": ["x"], "parameters": {"labels": ["a", "a"]}}
    assert_error(invoke("api_predict_text", body=duplicates), 400, "bad_request")
    too_long = {"model": MODEL, "input": ["ok", "y" * 20_001]}
    assert assert_error(invoke("api_embeddings", body=too_long), 413, "input_too_large")["message"].startswith(
        "input 1: text has 20001 characters"
    )


def test_the_cold_start_warms_only_the_configured_models(handler: ModuleType, models_dir: Path, tmp_path: Path) -> None:
    from sif_api import service
    from sif_core.aws import client
    from sif_inference import LocalDirSource, ModelRegistry
    from sif_metering import UsageLedger

    registry = ModelRegistry(LocalDirSource(models_dir), tmp_path / "cache")
    api = service.ApiService(registry, UsageLedger(client("dynamodb"), "unused"))
    assert api.warm("all-minilm-l6-v2, iris-species") == ["all-minilm-l6-v2", "iris-species"]
    assert {key[0] for key in registry._loaded} == {"all-minilm-l6-v2", "iris-species"}
    assert sorted(api.warm("*")) == sorted(registry.names())
