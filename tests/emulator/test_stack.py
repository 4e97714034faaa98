"""The local stack against moto's server: what template.yaml declares is what gets created."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest

from sif_cli import main as cli
from sif_core.tenants import hash_key
from sif_emulator.moto_server import AwsEmulator, PortInUseError, free_port
from sif_emulator.stack import STACK_JSON_NAMES, LocalStack, start_local_stack
from sif_tools.template import Template

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CONTRACT_ROUTES = {
    ("GET", "/health"): None,
    ("GET", "/openapi.json"): None,
    ("GET", "/docs"): None,
    ("GET", "/v1/models"): "SifAuthorizer",
    ("GET", "/v1/models/{name}"): "SifAuthorizer",
    ("POST", "/v1/embeddings"): "SifAuthorizer",
    ("POST", "/v1/models/{name}/predict"): "SifAuthorizer",
    ("POST", "/v1/models/{name}"): "SifAuthorizer",  # TF-Serving's {name}:predict
    ("POST", "/v1/models/{name}/versions/{version}"): "SifAuthorizer",  # .../versions/{v}:predict
    ("POST", "/v1/models/{name}/labels/{label}"): "SifAuthorizer",  # .../labels/{alias}:predict
    ("GET", "/v1/models/{name}/versions/{version}"): "SifAuthorizer",
    ("GET", "/v1/models/{name}/metadata"): "SifAuthorizer",
    ("GET", "/v2/health/live"): None,
    ("GET", "/v2/health/ready"): None,
    ("GET", "/v2"): "SifAuthorizer",
    ("GET", "/v2/models/{name}"): "SifAuthorizer",
    ("GET", "/v2/models/{name}/ready"): "SifAuthorizer",
    ("GET", "/v2/models/{name}/versions/{version}"): "SifAuthorizer",
    ("GET", "/v2/models/{name}/versions/{version}/ready"): "SifAuthorizer",
    ("POST", "/v2/models/{name}/infer"): "SifAuthorizer",
    ("POST", "/v2/models/{name}/versions/{version}/infer"): "SifAuthorizer",
    ("POST", "/v1/batches"): "SifAuthorizer",
    ("GET", "/v1/batches/{id}"): "SifAuthorizer",
    ("GET", "/v1/batches"): "SifAuthorizer",
    ("POST", "/v1/batches/{id}/cancel"): "SifAuthorizer",
    ("POST", "/v1/files"): "SifAuthorizer",
    ("GET", "/v1/files"): "SifAuthorizer",
    ("GET", "/v1/files/{id}"): "SifAuthorizer",
    ("GET", "/v1/files/{id}/content"): "SifAuthorizer",
    ("DELETE", "/v1/files/{id}"): "SifAuthorizer",
    ("POST", "/v1/jobs"): "SifAuthorizer",
    ("GET", "/v1/jobs/{id}"): "SifAuthorizer",
    ("GET", "/v1/jobs"): "SifAuthorizer",
    ("POST", "/v1/jobs/{id}/cancel"): "SifAuthorizer",
    ("GET", "/v1/usage"): "SifAuthorizer",
}


def _queue_attributes(stack: LocalStack, logical_id: str) -> dict[str, str]:
    attrs: dict[str, str] = stack.client("sqs").get_queue_attributes(
        QueueUrl=stack.ref(logical_id), AttributeNames=["All"]
    )["Attributes"]
    return attrs


def _receive_all(stack: LocalStack, queue_url: str, wait_s: float = 2.0) -> list[dict[str, Any]]:
    """Every message currently in the queue (deleted after reading), S3 test events left out."""
    sqs = stack.client("sqs")
    bodies: list[dict[str, Any]] = []
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        msgs = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=1).get("Messages", [])
        for msg in msgs:
            sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=msg["ReceiptHandle"])
            body = json.loads(msg["Body"])
            if body.get("Event") != "s3:TestEvent":
                bodies.append(body)
    return bodies


# ---------------------------------------------------------------------- template reading
def test_template_is_read_with_short_tags_and_resolved() -> None:
    template = Template(path=REPO / "template.yaml")
    assert template.physical_name("InboxBucket") == "sif-local-inbox-123456789012-us-east-1"
    assert template.physical_name("ResultsBucket") == "sif-local-resultsbucket"
    policy = template.properties("InboxQueuePolicy")["PolicyDocument"]["Statement"][0]
    assert policy["Condition"]["ArnEquals"]["aws:SourceArn"] == "arn:aws:s3:::sif-local-inbox-123456789012-us-east-1"
    # the queue policy comes before the bucket whose notification needs it (DependsOn)
    order = template.creation_order()
    assert order.index("InboxQueuePolicy") < order.index("InboxBucket")
    assert order.index("InboxDLQ") < order.index("InboxQueue")


def test_template_functions_and_routes() -> None:
    template = Template(path=REPO / "template.yaml")
    functions = template.functions()
    assert set(functions) == {
        "AuthorizerFunction",
        "ApiFunction",
        "ScorerFunction",
        "WorkerFunction",
        "GpuJobEventsFunction",
        "CallbackFunction",
    }
    assert functions["ApiFunction"].handler == "sif_api.handler.lambda_handler"
    assert functions["ApiFunction"].timeout == 29
    assert functions["ApiFunction"].runtime == "python3.12"
    assert functions["ApiFunction"].layers == (
        "BaseRuntimeLayer",
        "MlRuntimeLayer",
        "InferenceLayer",
        "CoreLayer",
        "MeteringLayer",
    )
    assert functions["ApiFunction"].environment["SIF_MODELS_BUCKET"] == "sif-local-modelsbucket"
    assert functions["ApiFunction"].environment["POWERTOOLS_SERVICE_NAME"] == "sif-api"  # function beats Globals
    for spec in functions.values():
        assert (spec.code_path / spec.module.split(".")[0]).is_dir(), spec.code_uri

    routes = {(r.method, r.path): r.authorizer for r in template.api_routes()}
    assert routes == CONTRACT_ROUTES
    by_path = {r.path: r for r in template.api_routes()}
    assert by_path["/v1/models/{name}/predict"].match("POST", "/v1/models/open-nsfw/predict") == {"name": "open-nsfw"}
    by_route = {(r.method, r.path): r for r in template.api_routes()}
    assert by_route[("GET", "/v1/models/{name}")].match("POST", "/v1/models/open-nsfw") is None
    tf_predict = by_route[("POST", "/v1/models/{name}")].match("POST", "/v1/models/open-nsfw:predict")
    assert tf_predict == {"name": "open-nsfw:predict"}  # the API function splits the verb off

    (authorizer,) = template.authorizers().values()
    assert authorizer.function == "AuthorizerFunction"
    assert authorizer.payload_type == "REQUEST"

    subs = {s.function: s for s in template.queue_subscriptions()}
    assert subs["ScorerFunction"].queue == "InboxQueue"
    assert subs["ScorerFunction"].batch_size == 1
    assert subs["WorkerFunction"].queue == "JobsQueue"
    assert subs["CallbackFunction"].queue == "CallbacksQueue"
    assert functions["CallbackFunction"].layers == ("BaseRuntimeLayer", "CoreLayer")
    assert "SIF_CALLBACK_SECRET" not in functions["WorkerFunction"].environment  # each tenant has its own
    assert all(s.report_batch_item_failures for s in subs.values())


# ---------------------------------------------------------------------- resources
def test_every_declared_resource_exists(local_stack: LocalStack) -> None:
    t = local_stack.template
    s3, sqs, ddb, sns, batch = (local_stack.client(s) for s in ("s3", "sqs", "dynamodb", "sns", "batch"))
    buckets = {b["Name"] for b in s3.list_buckets()["Buckets"]}
    for lid in t.of_type("AWS::S3::Bucket"):
        assert local_stack.name(lid) in buckets, lid
    for lid in t.of_type("AWS::SQS::Queue"):
        assert sqs.get_queue_url(QueueName=local_stack.name(lid))["QueueUrl"] == local_stack.ref(lid)
    for lid, resource in t.of_type("AWS::DynamoDB::Table").items():
        table = ddb.describe_table(TableName=local_stack.name(lid))["Table"]
        assert table["KeySchema"] == resource["Properties"]["KeySchema"], lid
        assert table["BillingModeSummary"]["BillingMode"] == "PAY_PER_REQUEST"
        ttl = resource["Properties"].get("TimeToLiveSpecification")
        if ttl:
            desc = ddb.describe_time_to_live(TableName=local_stack.name(lid))["TimeToLiveDescription"]
            assert desc["AttributeName"] == ttl["AttributeName"]
            assert desc["TimeToLiveStatus"] == "ENABLED"
    for lid in t.of_type("AWS::SNS::Topic"):
        attrs = sns.get_topic_attributes(TopicArn=local_stack.ref(lid))["Attributes"]
        assert attrs["KmsMasterKeyId"] == "alias/aws/sns"
    queues = batch.describe_job_queues(jobQueues=[local_stack.ref("GpuJobQueue")])["jobQueues"]
    assert [q["priority"] for q in queues] == [1]
    assert [o["order"] for o in queues[0]["computeEnvironmentOrder"]] == [1, 2]
    envs = batch.describe_compute_environments()["computeEnvironments"]
    types = {e["computeEnvironmentName"]: e["computeResources"]["type"] for e in envs}
    assert types[local_stack.name("GpuComputeEnvironment")] == "SPOT"
    assert types[local_stack.name("GpuOnDemandComputeEnvironment")] == "EC2"
    (jobdef,) = batch.describe_job_definitions(jobDefinitions=[local_stack.ref("GpuJobDefinition")])["jobDefinitions"]
    assert jobdef["retryStrategy"]["attempts"] == 3
    assert jobdef["timeout"]["attemptDurationSeconds"] == 3600
    assert jobdef["containerProperties"]["command"][-2:] == ["--spec", "Ref::spec"]
    assert {"type": "GPU", "value": "1"} in jobdef["containerProperties"]["resourceRequirements"]
    # nothing the emulator could take was left out
    not_created = {
        lid: why for lid, why in local_stack.skipped.items() if not t.resource_type(lid).startswith("AWS::Serverless")
    }
    assert not_created == {}


def test_buckets_are_locked_down(local_stack: LocalStack) -> None:
    s3 = local_stack.client("s3")
    for lid in local_stack.template.of_type("AWS::S3::Bucket"):
        name = local_stack.name(lid)
        rules = s3.get_bucket_encryption(Bucket=name)["ServerSideEncryptionConfiguration"]["Rules"]
        assert rules[0]["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] in {"AES256", "aws:kms"}
        block = s3.get_public_access_block(Bucket=name)["PublicAccessBlockConfiguration"]
        assert block == {
            k: True for k in ("BlockPublicAcls", "IgnorePublicAcls", "BlockPublicPolicy", "RestrictPublicBuckets")
        }
        ownership = s3.get_bucket_ownership_controls(Bucket=name)["OwnershipControls"]["Rules"]
        assert ownership == [{"ObjectOwnership": "BucketOwnerEnforced"}]
    models = local_stack.bucket("models")
    assert s3.get_bucket_versioning(Bucket=models)["Status"] == "Enabled"
    lifecycle = s3.get_bucket_lifecycle_configuration(Bucket=local_stack.bucket("inbox"))["Rules"]
    assert any(r.get("Filter", {}).get("Prefix") == "incoming/" and r["Expiration"]["Days"] > 0 for r in lifecycle)


def test_queues_have_redrive_policies(local_stack: LocalStack) -> None:
    t = local_stack.template
    with_redrive = {lid: r for lid, r in t.of_type("AWS::SQS::Queue").items() if "RedrivePolicy" in r["Properties"]}
    receives = {"InboxQueue": 5, "JobsQueue": 5, "CallbacksQueue": 10}
    assert set(with_redrive) == set(receives)
    for lid in with_redrive:
        declared = t.properties(lid)["RedrivePolicy"]
        attrs = _queue_attributes(local_stack, lid)
        redrive = json.loads(attrs["RedrivePolicy"])
        assert int(redrive["maxReceiveCount"]) == declared["maxReceiveCount"] == receives[lid]
        assert redrive["deadLetterTargetArn"] == declared["deadLetterTargetArn"]
        dlq = redrive["deadLetterTargetArn"].rsplit(":", 1)[1]
        dlq_attrs = local_stack.client("sqs").get_queue_attributes(
            QueueUrl=local_stack.client("sqs").get_queue_url(QueueName=dlq)["QueueUrl"], AttributeNames=["All"]
        )["Attributes"]
        assert dlq_attrs["MessageRetentionPeriod"] == str(14 * 24 * 3600)
        assert attrs["SqsManagedSseEnabled"] == "true"


def test_visibility_timeout_is_six_times_the_consumers_timeout(local_stack: LocalStack) -> None:
    subs = local_stack.template.queue_subscriptions()
    assert {s.queue for s in subs} == {"InboxQueue", "JobsQueue", "CallbacksQueue"}
    for sub in subs:
        timeout = local_stack.template.function_timeout(sub.function)
        visibility = int(_queue_attributes(local_stack, sub.queue)["VisibilityTimeout"])
        assert visibility == 6 * timeout, (sub.queue, sub.function)


# ---------------------------------------------------------------------- inbox notifications
@pytest.fixture(scope="module")
def own_stack(aws_server: AwsEmulator, tmp_path_factory: pytest.TempPathFactory) -> LocalStack:
    """A second stack in the same emulator, so no other test's messages are in its inbox queue."""
    return LocalStack(
        aws_server.endpoint_url, stack_name="sif-itest", state_dir=tmp_path_factory.mktemp("itest-state")
    ).create()


def test_incoming_object_notifies_the_inbox_queue(own_stack: LocalStack) -> None:
    s3 = own_stack.client("s3")
    inbox, queue = own_stack.bucket("inbox"), own_stack.queue_url("batch")
    assert inbox.startswith("sif-itest-inbox-")
    _receive_all(own_stack, queue, wait_s=1)  # the s3:TestEvent sent when notifications were configured
    run = uuid.uuid4().hex[:8]
    s3.put_object(Bucket=inbox, Key=f"elsewhere/{run}/rows.jsonl", Body=b'{"id": 1, "text": "x"}\n')
    s3.put_object(Bucket=inbox, Key=f"incomingX/{run}.jsonl", Body=b"{}\n")
    s3.put_object(Bucket=own_stack.bucket("results"), Key=f"incoming/{run}/out.jsonl", Body=b"{}\n")
    key = f"incoming/t_test/all-minilm-l6-v2/{run} file (1).jsonl"
    s3.put_object(Bucket=inbox, Key=key, Body=b'{"id": 1, "text": "hello"}\n')

    bodies = _receive_all(own_stack, queue, wait_s=3)
    records = [rec for body in bodies for rec in body.get("Records", [])]
    assert len(records) == 1, bodies
    record = records[0]
    assert record["eventSource"] == "aws:s3"
    assert record["eventName"].startswith("ObjectCreated:")
    assert record["s3"]["bucket"]["name"] == inbox
    from urllib.parse import unquote_plus

    assert unquote_plus(record["s3"]["object"]["key"]) == key


# ---------------------------------------------------------------------- stack.json, models, tenants
def test_stack_json_has_every_contract_key(local_stack: LocalStack) -> None:
    info = json.loads(local_stack.stack_json_path.read_text())
    for key in ("api_url", "aws_endpoint_url", "region", "buckets", "queues", "tables", "demo_api_key"):
        assert info.get(key), key
    assert set(info["buckets"]) >= {"inbox", "results", "models"}
    assert set(info["queues"]) >= {"jobs", "jobs_dlq", "batch", "batch_dlq"}
    assert set(info["tables"]) >= {"tenants", "usage", "work", "idempotency"}
    assert info["aws_endpoint_url"] == local_stack.aws_endpoint_url
    assert info["region"] == "us-east-1"
    for section in ("buckets", "queues", "tables"):
        for key, lid in STACK_JSON_NAMES[section].items():
            assert info[section][key] == local_stack.ref(lid)
    assert info["queues"]["batch"] == local_stack.ref("InboxQueue")
    assert info["env"]["SIF_WORK_TABLE"] == info["tables"]["work"]
    assert info["env"]["SIF_JOBS_QUEUE_URL"] == info["queues"]["jobs"]
    assert info["batch"]["job_queue"].startswith("arn:aws:batch:")
    # every name really exists in the emulator
    sqs = local_stack.client("sqs")
    for url in info["queues"].values():
        sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])


def test_function_env_names_local_resources(local_stack: LocalStack) -> None:
    env = local_stack.function_env("WorkerFunction")
    for name in (
        "SIF_MODELS_BUCKET",
        "SIF_INBOX_BUCKET",
        "SIF_RESULTS_BUCKET",
        "SIF_JOBS_QUEUE_URL",
        "SIF_BATCH_JOB_QUEUE",
        "SIF_BATCH_JOB_DEFINITION",
        "SIF_TENANTS_TABLE",
        "SIF_USAGE_TABLE",
        "SIF_WORK_TABLE",
        "SIF_IDEMPOTENCY_TABLE",
        "SIF_JOB_TOPIC_ARN",
        "POWERTOOLS_SERVICE_NAME",
        "POWERTOOLS_METRICS_NAMESPACE",
    ):
        assert env.get(name), name
    assert env["AWS_ENDPOINT_URL"] == local_stack.aws_endpoint_url
    assert env["SIF_BATCH_JOB_DEFINITION"] == local_stack.ref("GpuJobDefinition")
    assert env["POWERTOOLS_SERVICE_NAME"] == "sif-worker"


def test_models_are_published_with_their_manifests(local_stack: LocalStack) -> None:
    if not local_stack.models:
        pytest.skip("no built models (run `make models`)")
    s3 = local_stack.client("s3")
    bucket = local_stack.bucket("models")
    import hashlib

    for model in local_stack.models:
        manifest = json.loads(s3.get_object(Bucket=bucket, Key=model.prefix + "manifest.json")["Body"].read())
        listed = {
            o["Key"][len(model.prefix) :] for o in s3.list_objects_v2(Bucket=bucket, Prefix=model.prefix)["Contents"]
        }
        assert listed == set(model.files)
        blob = json.dumps(manifest)
        for name in listed - {"manifest.json"}:
            digest = hashlib.sha256(s3.get_object(Bucket=bucket, Key=model.prefix + name)["Body"].read()).hexdigest()
            assert digest in blob, f"{model.name}/{name}: sha256 not in the manifest"


def test_tenant_create_stores_only_the_hash(
    local_stack: LocalStack, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SIF_STACK_JSON", str(local_stack.stack_json_path))
    assert cli.main(["tenant", "create", "acme", "--monthly-calls", "1234"]) == 0
    api_key = capsys.readouterr().out.strip().splitlines()[-1]
    assert api_key.startswith("sif_") and len(api_key) > 30

    items = local_stack.table("TenantsTable").scan()["Items"]
    dump = json.dumps(items, default=str)
    assert api_key not in dump
    assert local_stack.demo_api_key is not None and local_stack.demo_api_key not in dump
    (acme,) = [i for i in items if i["name"] == "acme" and not i["key_hash"].startswith("tenant#")]
    assert acme["key_hash"] == hash_key(api_key)
    assert int(acme["monthly_calls"]) == 1234
    # the tenant's profile (found by id, for jobs and dropped files) holds the same quota and no key
    (profile,) = [i for i in items if i["key_hash"] == f"tenant#{acme['tenant_id']}"]
    assert int(profile["monthly_calls"]) == 1234


def test_tenant_create_without_a_running_stack_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["--stack-json", str(tmp_path / "missing.json"), "tenant", "create", "x"]) == 1
    assert "is the local stack running" in capsys.readouterr().err


# ---------------------------------------------------------------------- ports, lifecycle
@pytest.fixture
def busy_port() -> Any:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    yield sock.getsockname()[1]
    sock.close()


def test_busy_aws_port_is_a_clear_error(busy_port: int) -> None:
    start = time.monotonic()
    with pytest.raises(PortInUseError, match=rf"port {busy_port} .* already in use.*SIF_AWS_PORT"):
        AwsEmulator(busy_port).start()
    assert time.monotonic() - start < 2


def test_busy_api_port_fails_before_anything_starts(busy_port: int, tmp_path: Path) -> None:
    aws_port = free_port()
    with pytest.raises(PortInUseError, match="SIF_API_PORT"):
        start_local_stack(api_port=busy_port, aws_port=aws_port, state_dir=tmp_path, publish=False)
    assert not (tmp_path / "stack.json").exists()
    # the AWS port was never taken
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", aws_port))


def _sif_up(tmp_path: Path, api_port: int, aws_port: int) -> subprocess.Popen[str]:
    env = {**os.environ, "SIF_API_PORT": str(api_port), "SIF_AWS_PORT": str(aws_port)}
    env.pop("AWS_ENDPOINT_URL", None)
    return subprocess.Popen(
        [sys.executable, "-m", "sif_cli.main", "up", "--no-models", "--state-dir", str(tmp_path)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_sif_up_on_a_busy_port_exits_non_zero(busy_port: int, tmp_path: Path) -> None:
    proc = _sif_up(tmp_path, api_port=busy_port, aws_port=free_port())
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode not in (0, None)
    assert f"port {busy_port}" in err and "already in use" in err
    assert "Traceback" not in err


def test_sif_up_serves_health_and_stops_on_sigterm(tmp_path: Path) -> None:
    api_port, aws_port = free_port(), free_port()
    proc = _sif_up(tmp_path, api_port, aws_port)
    stack_json = tmp_path / "stack.json"
    try:
        deadline = time.monotonic() + 60
        while not stack_json.exists():
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "sif up did not get ready in 60 s"
            time.sleep(0.2)
        info = json.loads(stack_json.read_text())
        assert info["api_url"] == f"http://127.0.0.1:{api_port}"
        assert info["aws_endpoint_url"] == f"http://127.0.0.1:{aws_port}"
        with urllib.request.urlopen(f"{info['api_url']}/health", timeout=5) as resp:
            assert json.loads(resp.read()) == {"status": "ok"}
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"{info['api_url']}/nope", timeout=5)
        assert json.loads(missing.value.read())["error"]["type"] == "not_found"
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert info["demo_api_key"] in out  # the banner shows the key
    assert not stack_json.exists()
    for port in (api_port, aws_port):  # both released
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(("127.0.0.1", port))
