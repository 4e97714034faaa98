"""The local stack: template.yaml's resources in moto, the models published, a demo tenant, stack.json.

`LocalStack` walks the template (not a second, hand-kept list) and creates, in dependency order,
every resource moto can emulate: S3 buckets (encryption, public access block, ownership,
versioning, lifecycle, CORS, policies and the inbox -> SQS notification), SQS queues with their
attributes and redrive policies, queue policies, DynamoDB tables (keys, TTL, PITR), SNS topics,
IAM roles / instance profiles, log groups, and the AWS Batch compute environments, job queue and
job definition. The SAM functions, layers and API are not created in moto: the functions run
in-process behind the local API gateway and event pollers (see `start_api` / `start_workers`).

`run_local_stack` is `sif up`: emulator, stack, the state saved by the last run (`.local/state/`),
models, demo tenant (the last run's), API, `.local/stack.json`, then it blocks until Ctrl-C / SIGTERM
and stops everything, saving the state.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from sif_local.awsemu import (
    DUMMY_CREDENTIALS,
    HOST,
    AwsEmulator,
    PortInUseError,
    aws_client_env,
    check_port_free,
    port_from_env,
)
from sif_local.awsemu_state import EmulatorState, PeriodicSnapshot
from sif_local.background import pid_file
from sif_local.template import (
    DEFAULT_ACCOUNT_ID,
    DEFAULT_REGION,
    DEFAULT_STACK_NAME,
    REPO_ROOT,
    Template,
)

log = logging.getLogger("sif_local.stack")

DEFAULT_API_PORT = 3000
DEFAULT_MODELS_DIR = REPO_ROOT / ".cache" / "models"
DEFAULT_STATE_DIR = REPO_ROOT / ".local"
STACK_JSON = "stack.json"
STATE_SNAPSHOT_DIR = "state"  # the emulator's state between runs (sif_local.awsemu_state)
DEMO_TENANT_FILE = "demo-tenant.json"  # the demo tenant and its key, re-used while its key works
DEFAULT_SNAPSHOT_INTERVAL_S = 30.0  # SIF_LOCAL_SNAPSHOT_S; the state is also saved when the stack stops
MANIFEST_FILE = "manifest.json"
MODELS_PREFIX = "models/"

# stack.json's contract names (ARCHITECTURE.md) -> the template's logical ids.
STACK_JSON_NAMES: dict[str, dict[str, str]] = {
    "buckets": {"inbox": "InboxBucket", "results": "ResultsBucket", "models": "ModelsBucket"},
    "queues": {"jobs": "JobsQueue", "jobs_dlq": "JobsDLQ", "batch": "InboxQueue", "batch_dlq": "InboxDLQ"},
    "tables": {
        "tenants": "TenantsTable",
        "usage": "UsageTable",
        "work": "WorkTable",
        "idempotency": "IdempotencyTable",
    },
    "topics": {"job_events": "JobEventsTopic"},
    "batch": {"job_queue": "GpuJobQueue", "job_definition": "GpuJobDefinition"},
}

# Values for template parameters that have no default and no natural local value.
LOCAL_PARAMETER_VALUES: dict[str, Any] = {"GpuWorkerImage": "sif-gpu-worker:local"}

# Created elsewhere (in-process) rather than in moto.
IN_PROCESS_TYPES = {
    "AWS::Serverless::Function": "runs in-process (local API gateway / event pollers)",
    "AWS::Serverless::LayerVersion": "layers are the installed packages locally",
    "AWS::Serverless::Api": "served by the local API gateway",
}


def _client_config() -> Config:
    return Config(retries={"mode": "standard", "max_attempts": 3}, connect_timeout=5, read_timeout=60)


def aws_session(region: str = DEFAULT_REGION) -> boto3.session.Session:
    """A boto3 session with the emulator's dummy credentials (whatever the environment holds)."""
    return boto3.session.Session(
        aws_access_key_id=DUMMY_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=DUMMY_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        aws_session_token=DUMMY_CREDENTIALS["AWS_SESSION_TOKEN"],
        region_name=region,
    )


def _camel(value: Any, keep_keys_under: frozenset[str] = frozenset({"tags", "parameters"})) -> Any:
    """CloudFormation's PascalCase property names -> the Batch API's camelCase (map values kept)."""
    if isinstance(value, dict):
        out = {}
        for key, inner in value.items():
            new_key = key[:1].lower() + key[1:]
            out[new_key] = inner if new_key in keep_keys_under else _camel(inner, keep_keys_under)
        return out
    if isinstance(value, list):
        return [_camel(v, keep_keys_under) for v in value]
    return value


def _attr_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)


def _tag_list(tags: Any) -> list[dict[str, str]]:
    if isinstance(tags, dict):
        return [{"Key": str(k), "Value": str(v)} for k, v in tags.items()]
    return [{"Key": str(t["Key"]), "Value": str(t["Value"])} for t in tags or []]


# ---------------------------------------------------------------------- models
@dataclass(frozen=True)
class PublishedModel:
    name: str
    version: str
    files: tuple[str, ...]

    @property
    def prefix(self) -> str:
        return f"{MODELS_PREFIX}{self.name}/{self.version}/"


def models_dir_from_env() -> Path:
    return Path(os.environ.get("SIF_MODELS_DIR") or DEFAULT_MODELS_DIR)


def publish_models(s3_client: Any, bucket: str, models_dir: str | Path) -> list[PublishedModel]:
    """Upload every `{name}/{version}/` dir that has a manifest.json to `models/{name}/{version}/{file}`.

    The manifest goes last, so whoever sees a manifest finds every file it lists already there.
    """
    root = Path(models_dir)
    published: list[PublishedModel] = []
    if not root.is_dir():
        raise FileNotFoundError(f"models dir {root} does not exist: run `make models` first")
    for manifest in sorted(root.glob(f"*/*/{MANIFEST_FILE}")):
        version_dir = manifest.parent
        name, version = version_dir.parent.name, version_dir.name
        files = sorted(p for p in version_dir.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)
        keys: list[str] = []
        for path in [*files, manifest]:
            rel = path.relative_to(version_dir).as_posix()
            key = f"{MODELS_PREFIX}{name}/{version}/{rel}"
            extra = {"ContentType": "application/json"} if path.suffix == ".json" else {}
            s3_client.upload_file(str(path), bucket, key, ExtraArgs=extra or None)
            keys.append(rel)
        published.append(PublishedModel(name=name, version=version, files=tuple(keys)))
        log.info("published model %s version %s (%d files) to s3://%s", name, version, len(keys), bucket)
    if not published:
        log.warning("no model (%s/{name}/{version}/%s) found to publish", root, MANIFEST_FILE)
    return published


# ---------------------------------------------------------------------- the stack
class LocalStack:
    """template.yaml's resources created in the AWS emulator at `aws_endpoint_url`."""

    def __init__(
        self,
        aws_endpoint_url: str,
        *,
        template: Template | None = None,
        template_path: str | Path | None = None,
        stack_name: str = DEFAULT_STACK_NAME,
        region: str = DEFAULT_REGION,
        account_id: str = DEFAULT_ACCOUNT_ID,
        api_url: str | None = None,
        state_dir: str | Path = DEFAULT_STATE_DIR,
        parameters: dict[str, Any] | None = None,
    ) -> None:
        self.aws_endpoint_url = aws_endpoint_url.rstrip("/")
        self.region = region
        if template is None:
            kwargs: dict[str, Any] = {} if template_path is None else {"path": template_path}
            template = Template(
                stack_name=stack_name,
                account_id=account_id,
                region=region,
                parameters=parameters,
                aws_endpoint_url=self.aws_endpoint_url,
                **kwargs,
            )
        self.template = template
        self.api_url = api_url or f"http://{HOST}:{port_from_env('SIF_API_PORT', DEFAULT_API_PORT)}"
        self.state_dir = Path(state_dir)
        self.session = aws_session(region)
        self._clients: dict[str, Any] = {}
        self._lock = threading.Lock()
        self.created: dict[str, str] = {}  # logical id -> resource type
        self.skipped: dict[str, str] = {}  # logical id -> why it is not in the emulator
        self.notes: dict[str, str] = {}  # logical id -> what differs locally
        self.models: list[PublishedModel] = []
        self.demo_api_key: str | None = None
        self.demo_tenant: dict[str, Any] | None = None
        self._network: dict[str, str] = {}

    # ------------------------------------------------------------ clients
    def client(self, service: str) -> Any:
        """A boto3 client for the emulator (dummy credentials, the stack's region)."""
        with self._lock:
            if service not in self._clients:
                self._clients[service] = self.session.client(
                    service, endpoint_url=self.aws_endpoint_url, config=_client_config()
                )
            return self._clients[service]

    def table(self, logical_id: str) -> Any:
        """A boto3 DynamoDB Table resource for a table of the template."""
        resource = self.session.resource("dynamodb", endpoint_url=self.aws_endpoint_url, config=_client_config())
        return resource.Table(self.ref(logical_id))

    # ------------------------------------------------------------ names
    def ref(self, logical_id: str) -> str:
        """The resource's Ref value here: bucket/table name, queue URL, topic/Batch ARN."""
        return str(self.template.ref(logical_id))

    def arn(self, logical_id: str) -> str:
        return str(self.template.get_att(logical_id, "Arn"))

    def name(self, logical_id: str) -> str:
        return self.template.physical_name(logical_id)

    def bucket(self, key: str) -> str:
        return self.ref(STACK_JSON_NAMES["buckets"][key])

    def queue_url(self, key: str) -> str:
        return self.ref(STACK_JSON_NAMES["queues"][key])

    def table_name(self, key: str) -> str:
        return self.ref(STACK_JSON_NAMES["tables"][key])

    def function_env(self, logical_id: str | None = None) -> dict[str, str]:
        """Environment for running a function locally: the template's variables with local names,
        plus what boto3 needs to reach the emulator. `logical_id=None`: the Globals only."""
        if logical_id is None:
            variables = self.template.resolve(self.template.globals.get("Function", {}).get("Environment", {}))
            env = {k: str(v) for k, v in variables.get("Variables", {}).items()}
        else:
            env = dict(self.template.functions()[logical_id].environment)
            env["AWS_LAMBDA_FUNCTION_NAME"] = self.template.physical_name(logical_id)
        env.update(aws_client_env(self.aws_endpoint_url, self.region))
        env.setdefault("SIF_MODEL_CACHE_DIR", str(self.state_dir / "model-cache"))
        env["POWERTOOLS_TRACE_DISABLED"] = "true"  # no X-Ray daemon locally
        env["SIF_LOCAL"] = "1"  # callbacks may reach 127.0.0.1 (each is signed with its tenant's own secret)
        return env

    # ------------------------------------------------------------ create
    def create(self) -> LocalStack:
        """Create every emulated resource of the template, in dependency order."""
        self._fill_parameters()
        handlers: dict[str, Callable[[str, dict[str, Any]], None]] = {
            "AWS::S3::Bucket": self._create_bucket,
            "AWS::S3::BucketPolicy": self._create_bucket_policy,
            "AWS::SQS::Queue": self._create_queue,
            "AWS::SQS::QueuePolicy": self._create_queue_policy,
            "AWS::DynamoDB::Table": self._create_table,
            "AWS::SNS::Topic": self._create_topic,
            "AWS::IAM::Role": self._create_role,
            "AWS::IAM::InstanceProfile": self._create_instance_profile,
            "AWS::Logs::LogGroup": self._create_log_group,
            "AWS::Batch::ComputeEnvironment": self._create_compute_environment,
            "AWS::Batch::JobQueue": self._create_job_queue,
            "AWS::Batch::JobDefinition": self._create_job_definition,
        }
        # Failing to create one of these breaks a product path: that is an error, not a warning.
        required = {"AWS::S3::Bucket", "AWS::SQS::Queue", "AWS::SQS::QueuePolicy", "AWS::DynamoDB::Table"}
        for lid in self.template.creation_order():
            rtype = self.template.resource_type(lid)
            if not self.template.resource_enabled(lid):
                self.skipped[lid] = "its Condition is false"
                continue
            handler = handlers.get(rtype)
            if handler is None:
                self.skipped[lid] = IN_PROCESS_TYPES.get(rtype, f"{rtype} is not emulated locally")
                log.debug("skipping %s (%s): %s", lid, rtype, self.skipped[lid])
                continue
            missing = [
                d
                for d in self.template.dependencies(lid)
                if d in self.skipped and self.template.resource_type(d) not in IN_PROCESS_TYPES
            ]
            if missing and rtype not in required:
                self.skipped[lid] = f"depends on {', '.join(sorted(missing))}, which could not be created"
                log.warning("skipping %s: %s", lid, self.skipped[lid])
                continue
            try:
                handler(lid, self.template.properties(lid))
            except Exception as exc:
                if rtype in required:
                    raise RuntimeError(f"could not create {lid} ({rtype}) in the emulator: {exc}") from exc
                self.skipped[lid] = f"the emulator refused it: {exc}"
                log.warning("could not create %s (%s) locally, going on without it: %s", lid, rtype, exc)
                continue
            self.created[lid] = rtype
            log.debug("created %s (%s) as %s", lid, rtype, self.ref(lid))
        log.info("created %d resources from %s", len(self.created), self.template.path.name)
        return self

    def _fill_parameters(self) -> None:
        """Local values for parameters without a default (VPC bits are created in the emulator)."""
        for name in self.template.missing_parameters():
            ptype = self.template.parameter_type(name)
            value: Any
            if name in LOCAL_PARAMETER_VALUES:
                value = LOCAL_PARAMETER_VALUES[name]
            elif "AWS::EC2::Subnet::Id" in ptype:
                value = self._local_network()["subnet"]
            elif "AWS::EC2::SecurityGroup::Id" in ptype:
                value = self._local_network()["security_group"]
            elif "AWS::EC2::VPC::Id" in ptype:
                value = self._local_network()["vpc"]
            elif ptype == "Number":
                value = 0
            else:
                value = f"{self.template.stack_name}-{name.lower()}"
            if ptype.startswith("List<") or ptype == "CommaDelimitedList":
                value = [value]
            self.template.set_parameter(name, value)

    def _local_network(self) -> dict[str, str]:
        if not self._network:
            ec2 = self.client("ec2")
            vpc = ec2.create_vpc(CidrBlock="10.42.0.0/16")["Vpc"]["VpcId"]
            subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.42.1.0/24", AvailabilityZone=f"{self.region}a")
            group = ec2.create_security_group(
                GroupName=f"{self.template.stack_name}-gpu", Description="sif local GPU workers", VpcId=vpc
            )
            self._network = {"vpc": vpc, "subnet": subnet["Subnet"]["SubnetId"], "security_group": group["GroupId"]}
        return self._network

    # -- S3
    def _create_bucket(self, lid: str, props: dict[str, Any]) -> None:
        s3 = self.client("s3")
        name = self.name(lid)
        kwargs: dict[str, Any] = {"Bucket": name}
        if self.region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        s3.create_bucket(**kwargs)
        self.template.bind(lid, ref=name)
        if "BucketEncryption" in props:
            rules = []
            for rule in props["BucketEncryption"].get("ServerSideEncryptionConfiguration", []):
                api_rule: dict[str, Any] = {}
                if "ServerSideEncryptionByDefault" in rule:
                    api_rule["ApplyServerSideEncryptionByDefault"] = rule["ServerSideEncryptionByDefault"]
                if "BucketKeyEnabled" in rule:
                    api_rule["BucketKeyEnabled"] = bool(rule["BucketKeyEnabled"])
                rules.append(api_rule)
            s3.put_bucket_encryption(Bucket=name, ServerSideEncryptionConfiguration={"Rules": rules})
        if "PublicAccessBlockConfiguration" in props:
            s3.put_public_access_block(
                Bucket=name, PublicAccessBlockConfiguration=props["PublicAccessBlockConfiguration"]
            )
        if "OwnershipControls" in props:
            s3.put_bucket_ownership_controls(Bucket=name, OwnershipControls=props["OwnershipControls"])
        if "VersioningConfiguration" in props:
            s3.put_bucket_versioning(Bucket=name, VersioningConfiguration=props["VersioningConfiguration"])
        if "LifecycleConfiguration" in props:
            rules = [self._lifecycle_rule(r) for r in props["LifecycleConfiguration"].get("Rules", [])]
            s3.put_bucket_lifecycle_configuration(Bucket=name, LifecycleConfiguration={"Rules": rules})
        if "CorsConfiguration" in props:
            renames = {"MaxAge": "MaxAgeSeconds", "ExposedHeaders": "ExposeHeaders", "Id": "ID"}
            cors = [{renames.get(k, k): v for k, v in r.items()} for r in props["CorsConfiguration"]["CorsRules"]]
            s3.put_bucket_cors(Bucket=name, CORSConfiguration={"CORSRules": cors})
        if "Tags" in props:
            s3.put_bucket_tagging(Bucket=name, Tagging={"TagSet": _tag_list(props["Tags"])})
        if "NotificationConfiguration" in props:
            s3.put_bucket_notification_configuration(
                Bucket=name, NotificationConfiguration=self._notification(lid, props["NotificationConfiguration"])
            )

    @staticmethod
    def _lifecycle_rule(rule: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"Status": rule.get("Status", "Enabled")}
        if "Id" in rule:
            out["ID"] = rule["Id"]
        out["Filter"] = {"Prefix": rule.get("Prefix", "")}
        expiration: dict[str, Any] = {}
        if "ExpirationInDays" in rule:
            expiration["Days"] = int(rule["ExpirationInDays"])
        if "ExpirationDate" in rule:
            expiration["Date"] = rule["ExpirationDate"]
        if "ExpiredObjectDeleteMarker" in rule:
            expiration["ExpiredObjectDeleteMarker"] = bool(rule["ExpiredObjectDeleteMarker"])
        if expiration:
            out["Expiration"] = expiration
        if "AbortIncompleteMultipartUpload" in rule:
            days = int(rule["AbortIncompleteMultipartUpload"]["DaysAfterInitiation"])
            out["AbortIncompleteMultipartUpload"] = {"DaysAfterInitiation": days}
        if "NoncurrentVersionExpiration" in rule:
            nve = rule["NoncurrentVersionExpiration"]
            out["NoncurrentVersionExpiration"] = {k: int(v) for k, v in nve.items()}
        elif "NoncurrentVersionExpirationInDays" in rule:
            out["NoncurrentVersionExpiration"] = {"NoncurrentDays": int(rule["NoncurrentVersionExpirationInDays"])}
        if "Transitions" in rule:
            out["Transitions"] = [
                {"StorageClass": t["StorageClass"], "Days": int(t["TransitionInDays"])} for t in rule["Transitions"]
            ]
        return out

    def _notification(self, lid: str, config: dict[str, Any]) -> dict[str, Any]:
        def s3_filter(entry: dict[str, Any]) -> dict[str, Any]:
            rules = entry.get("Filter", {}).get("S3Key", {}).get("Rules", [])
            return {"Filter": {"Key": {"FilterRules": rules}}} if rules else {}

        out: dict[str, Any] = {}
        queues = [
            {"QueueArn": q["Queue"], "Events": [q["Event"]], **s3_filter(q)}
            for q in config.get("QueueConfigurations", [])
        ]
        topics = [
            {"TopicArn": t["Topic"], "Events": [t["Event"]], **s3_filter(t)}
            for t in config.get("TopicConfigurations", [])
        ]
        if queues:
            out["QueueConfigurations"] = queues
        if topics:
            out["TopicConfigurations"] = topics
        if config.get("LambdaConfigurations"):
            log.warning("%s: Lambda notifications are not emulated (functions run in-process)", lid)
        if config.get("EventBridgeConfiguration", {}).get("EventBridgeEnabled"):
            out["EventBridgeConfiguration"] = {}
        return out

    def _create_bucket_policy(self, lid: str, props: dict[str, Any]) -> None:
        policy = props["PolicyDocument"]
        policy = json.loads(policy) if isinstance(policy, str) else policy
        # The emulator speaks plain HTTP on 127.0.0.1, and moto evaluates bucket policies: a
        # deny-unless-TLS statement would deny every local call, so it is left out here.
        statements = policy.get("Statement", [])
        statements = [statements] if isinstance(statements, dict) else statements
        kept = [st for st in statements if "aws:SecureTransport" not in json.dumps(st.get("Condition", {}))]
        if len(kept) < len(statements):
            self.notes[lid] = "deny-insecure-transport statement not applied (the emulator is plain HTTP)"
            log.debug("%s: %s", lid, self.notes[lid])
        if kept:
            self.client("s3").put_bucket_policy(
                Bucket=props["Bucket"], Policy=json.dumps({**policy, "Statement": kept})
            )
        self.template.bind(lid, ref=props["Bucket"])

    # -- SQS
    def _create_queue(self, lid: str, props: dict[str, Any]) -> None:
        sqs = self.client("sqs")
        name = self.name(lid)
        attributes = {k: _attr_value(v) for k, v in props.items() if k not in {"QueueName", "Tags"}}
        kwargs: dict[str, Any] = {"QueueName": name, "Attributes": attributes}
        if "Tags" in props:
            kwargs["tags"] = {t["Key"]: t["Value"] for t in _tag_list(props["Tags"])}
        url = sqs.create_queue(**kwargs)["QueueUrl"]
        arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        self.template.bind(lid, ref=url, Arn=arn, QueueUrl=url, QueueName=name)

    def _create_queue_policy(self, lid: str, props: dict[str, Any]) -> None:
        policy = json.dumps(props["PolicyDocument"])
        for url in props["Queues"]:
            self.client("sqs").set_queue_attributes(QueueUrl=url, Attributes={"Policy": policy})
        self.template.bind(lid, ref=self.name(lid))

    # -- DynamoDB
    def _create_table(self, lid: str, props: dict[str, Any]) -> None:
        ddb = self.client("dynamodb")
        name = self.name(lid)
        kwargs: dict[str, Any] = {
            "TableName": name,
            "KeySchema": props["KeySchema"],
            "AttributeDefinitions": props["AttributeDefinitions"],
            "BillingMode": props.get("BillingMode", "PROVISIONED"),
        }
        if "ProvisionedThroughput" in props:
            kwargs["ProvisionedThroughput"] = {k: int(v) for k, v in props["ProvisionedThroughput"].items()}
        for index_kind in ("GlobalSecondaryIndexes", "LocalSecondaryIndexes"):
            if index_kind in props:
                keep = {"IndexName", "KeySchema", "Projection", "ProvisionedThroughput"}
                kwargs[index_kind] = [{k: v for k, v in ix.items() if k in keep} for ix in props[index_kind]]
        if "SSESpecification" in props:
            kwargs["SSESpecification"] = {
                "Enabled" if k == "SSEEnabled" else k: v for k, v in props["SSESpecification"].items()
            }
        if "StreamSpecification" in props:
            kwargs["StreamSpecification"] = {"StreamEnabled": True, **props["StreamSpecification"]}
        if "Tags" in props:
            kwargs["Tags"] = _tag_list(props["Tags"])
        table = ddb.create_table(**kwargs)["TableDescription"]
        if "TimeToLiveSpecification" in props:
            ttl = props["TimeToLiveSpecification"]
            ddb.update_time_to_live(
                TableName=name,
                TimeToLiveSpecification={"AttributeName": ttl["AttributeName"], "Enabled": bool(ttl["Enabled"])},
            )
        pitr = props.get("PointInTimeRecoverySpecification", {})
        if pitr.get("PointInTimeRecoveryEnabled"):
            with contextlib.suppress(Exception):  # cosmetic locally
                ddb.update_continuous_backups(
                    TableName=name, PointInTimeRecoverySpecification={"PointInTimeRecoveryEnabled": True}
                )
        self.template.bind(lid, ref=name, Arn=table["TableArn"])

    # -- SNS
    def _create_topic(self, lid: str, props: dict[str, Any]) -> None:
        sns = self.client("sns")
        attrs = {
            k: _attr_value(v)
            for k, v in props.items()
            if k in {"KmsMasterKeyId", "DisplayName", "FifoTopic", "ContentBasedDeduplication", "SignatureVersion"}
        }
        kwargs: dict[str, Any] = {"Name": self.name(lid), "Attributes": attrs}
        if "Tags" in props:
            kwargs["Tags"] = _tag_list(props["Tags"])
        arn = sns.create_topic(**kwargs)["TopicArn"]
        for sub in props.get("Subscription", []):
            sns.subscribe(TopicArn=arn, Protocol=sub["Protocol"], Endpoint=sub["Endpoint"])
        self.template.bind(lid, ref=arn, TopicArn=arn, TopicName=self.name(lid))

    # -- IAM
    def _create_role(self, lid: str, props: dict[str, Any]) -> None:
        iam = self.client("iam")
        name = self.name(lid)
        kwargs: dict[str, Any] = {
            "RoleName": name,
            "AssumeRolePolicyDocument": json.dumps(props["AssumeRolePolicyDocument"]),
            "Path": props.get("Path", "/"),
        }
        if "Description" in props:
            kwargs["Description"] = props["Description"]
        role = iam.create_role(**kwargs)["Role"]
        for policy in props.get("Policies", []):
            iam.put_role_policy(
                RoleName=name, PolicyName=policy["PolicyName"], PolicyDocument=json.dumps(policy["PolicyDocument"])
            )
        for arn in props.get("ManagedPolicyArns", []):
            try:
                iam.attach_role_policy(RoleName=name, PolicyArn=arn)
            except ClientError as exc:  # moto only knows AWS managed policies when told to load them
                log.debug("%s: managed policy %s not attached locally: %s", lid, arn, exc)
        self.template.bind(lid, ref=name, Arn=role["Arn"], RoleId=role["RoleId"])

    def _create_instance_profile(self, lid: str, props: dict[str, Any]) -> None:
        iam = self.client("iam")
        name = self.name(lid)
        profile = iam.create_instance_profile(InstanceProfileName=name, Path=props.get("Path", "/"))
        for role in props.get("Roles", []):
            iam.add_role_to_instance_profile(InstanceProfileName=name, RoleName=role)
        self.template.bind(lid, ref=name, Arn=profile["InstanceProfile"]["Arn"])

    # -- Logs
    def _create_log_group(self, lid: str, props: dict[str, Any]) -> None:
        logs = self.client("logs")
        name = self.name(lid)
        logs.create_log_group(logGroupName=name)
        if "RetentionInDays" in props:
            logs.put_retention_policy(logGroupName=name, retentionInDays=int(props["RetentionInDays"]))
        self.template.bind(lid, ref=name)

    # -- Batch
    def _batch_service_role(self) -> str:
        """Batch's service-linked role (the template uses it implicitly; moto wants it to exist)."""
        if "batch_service_role" not in self._network:
            iam = self.client("iam")
            prefix = "/aws-service-role/batch.amazonaws.com/"
            roles = iam.list_roles(PathPrefix=prefix)["Roles"]
            if roles:
                arn = roles[0]["Arn"]
            else:
                arn = iam.create_service_linked_role(AWSServiceName="batch.amazonaws.com")["Role"]["Arn"]
            self._network["batch_service_role"] = str(arn)
        return self._network["batch_service_role"]

    def _create_compute_environment(self, lid: str, props: dict[str, Any]) -> None:
        batch = self.client("batch")
        kwargs: dict[str, Any] = {
            "computeEnvironmentName": self.name(lid),
            "type": props["Type"],
            "state": props.get("State", "ENABLED"),
            # The template relies on Batch's service-linked role; moto wants a role to exist.
            "serviceRole": props.get("ServiceRole") or self._batch_service_role(),
        }
        if "ComputeResources" in props:
            resources = _camel(props["ComputeResources"])
            for key in ("minvCpus", "maxvCpus", "desiredvCpus", "bidPercentage"):
                if key in resources:
                    resources[key] = int(resources[key])
            kwargs["computeResources"] = resources
        if "Tags" in props:
            kwargs["tags"] = props["Tags"]
        resp = batch.create_compute_environment(**kwargs)
        self.template.bind(lid, ref=resp["computeEnvironmentArn"], Arn=resp["computeEnvironmentArn"])

    def _create_job_queue(self, lid: str, props: dict[str, Any]) -> None:
        batch = self.client("batch")
        order = [
            {"order": int(o["Order"]), "computeEnvironment": o["ComputeEnvironment"]}
            for o in props["ComputeEnvironmentOrder"]
        ]
        kwargs: dict[str, Any] = {
            "jobQueueName": self.name(lid),
            "state": props.get("State", "ENABLED"),
            "priority": int(props["Priority"]),
            "computeEnvironmentOrder": order,
        }
        if "Tags" in props:
            kwargs["tags"] = props["Tags"]
        resp = batch.create_job_queue(**kwargs)
        self.template.bind(lid, ref=resp["jobQueueArn"], Arn=resp["jobQueueArn"])

    def _create_job_definition(self, lid: str, props: dict[str, Any]) -> None:
        batch = self.client("batch")
        kwargs: dict[str, Any] = {"jobDefinitionName": self.name(lid), "type": props["Type"]}
        for key in (
            "Parameters",
            "ContainerProperties",
            "RetryStrategy",
            "Timeout",
            "PlatformCapabilities",
            "PropagateTags",
            "Tags",
        ):
            if key in props:
                kwargs[key[:1].lower() + key[1:]] = (
                    _camel(props[key]) if key not in {"Parameters", "Tags"} else props[key]
                )
        if "retryStrategy" in kwargs:
            kwargs["retryStrategy"]["attempts"] = int(kwargs["retryStrategy"].get("attempts", 1))
        if "timeout" in kwargs:
            kwargs["timeout"] = {k: int(v) for k, v in kwargs["timeout"].items()}
        resp = batch.register_job_definition(**kwargs)
        self.template.bind(lid, ref=resp["jobDefinitionArn"], Arn=resp["jobDefinitionArn"])

    # ------------------------------------------------------------ models, tenants
    def publish_models(self, models_dir: str | Path | None = None) -> list[PublishedModel]:
        """Publish the built models (SIF_MODELS_DIR, default .cache/models) into the models bucket."""
        path = Path(models_dir) if models_dir is not None else models_dir_from_env()
        self.models = publish_models(self.client("s3"), self.bucket("models"), path)
        return self.models

    def create_tenant(self, name: str, *, monthly_calls: int | None = None) -> tuple[dict[str, Any], str]:
        """A new tenant in the tenants table; returns (tenant, api_key). Only the key's hash is stored."""
        from sif_core.tenants import create_tenant

        kwargs: dict[str, Any] = {} if monthly_calls is None else {"monthly_calls": monthly_calls}
        tenant, api_key = create_tenant(self.table(STACK_JSON_NAMES["tables"]["tenants"]), name, **kwargs)
        return tenant.model_dump(), api_key

    def create_demo_tenant(self) -> str:
        tenant, key = self.create_tenant("demo")
        self.demo_tenant, self.demo_api_key = tenant, key
        return key

    @property
    def demo_tenant_path(self) -> Path:
        return self.state_dir / DEMO_TENANT_FILE

    def keep_demo_tenant(self) -> str:
        """The demo tenant of the last run from this state dir while its key works (its tenant came
        back with the state), else a new one; the demo key stays the same from run to run."""
        from sif_core.tenants import check_key

        with contextlib.suppress(FileNotFoundError, ValueError, KeyError, TypeError):
            saved = json.loads(self.demo_tenant_path.read_text())
            if check_key(self.table(STACK_JSON_NAMES["tables"]["tenants"]), str(saved["api_key"])).allowed:
                self.demo_tenant, self.demo_api_key = dict(saved["tenant"]), str(saved["api_key"])
                return self.demo_api_key
        key = self.create_demo_tenant()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.demo_tenant_path.with_suffix(".json.tmp")
        tmp.touch(mode=0o600)
        tmp.write_text(json.dumps({"tenant": self.demo_tenant, "api_key": key}, indent=2) + "\n")
        tmp.replace(self.demo_tenant_path)
        return key

    # ------------------------------------------------------------ stack.json
    def stack_info(self) -> dict[str, Any]:
        """What `.local/stack.json` holds (ARCHITECTURE.md's keys first, then extras)."""
        info: dict[str, Any] = {
            "api_url": self.api_url,
            "aws_endpoint_url": self.aws_endpoint_url,
            "region": self.region,
        }
        for section, names in STACK_JSON_NAMES.items():
            info[section] = {key: self.ref(lid) for key, lid in names.items() if lid in self.template.resources}
        info["demo_api_key"] = self.demo_api_key
        info["demo_tenant"] = self.demo_tenant
        info["stack_name"] = self.template.stack_name
        info["account_id"] = self.template.account_id
        info["models"] = [{"name": m.name, "version": m.version, "files": list(m.files)} for m in self.models]
        info["env"] = self.function_env()
        info["functions"] = {
            lid: {
                "name": spec.name,
                "handler": spec.handler,
                "code_uri": spec.code_uri,
                "timeout": spec.timeout,
                "memory_size": spec.memory_size,
            }
            for lid, spec in self.template.functions().items()
        }
        info["resources"] = {
            lid: {
                "type": self.template.resource_type(lid),
                "physical_id": self.ref(lid) if lid in self.created else None,
                **({"skipped": self.skipped[lid]} if lid in self.skipped else {}),
                **({"note": self.notes[lid]} if lid in self.notes else {}),
            }
            for lid in self.template.resources
        }
        info["pid"] = os.getpid()
        info["started_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        return info

    @property
    def stack_json_path(self) -> Path:
        return self.state_dir / STACK_JSON

    def write_stack_json(self) -> Path:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        path = self.stack_json_path
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.stack_info(), indent=2) + "\n")
        tmp.replace(path)  # readers never see half a file
        return path

    def remove_stack_json(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.stack_json_path.unlink()


# ---------------------------------------------------------------------- services (API, pollers)
class RunningService(Protocol):
    """Something the local stack started and stops on shutdown."""

    def stop(self) -> None: ...


class HealthApi:
    """Placeholder API until the local API gateway exists: GET /health, JSON errors for the rest."""

    def __init__(self, stack: LocalStack, port: int, host: str = HOST) -> None:
        routes = stack.template.api_routes()
        check_port_free(port, "API", "SIF_API_PORT", host)

        class Handler(BaseHTTPRequestHandler):
            server_version = "sif-local"

            def _send(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self) -> None:
                path = self.path.split("?", 1)[0]
                if self.command == "GET" and path == "/health":
                    self._send(200, {"status": "ok"})
                    return
                known = [r for r in routes if r.matches_path(path)]
                if any(r.match(self.command, path) is not None for r in known):
                    status, kind, message = 501, "not_implemented", "not served by the local stack yet"
                elif known:
                    status, kind, message = 405, "method_not_allowed", f"{self.command} is not allowed on {path}"
                else:
                    status, kind, message = 404, "not_found", f"no route for {self.command} {path}"
                self._send(status, {"error": {"type": kind, "message": message, "request_id": str(uuid.uuid4())}})

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _handle

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("api: " + format, *args)

        try:
            self.server = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise PortInUseError(port, "API", "SIF_API_PORT") from exc
        self.server.daemon_threads = True
        self.url = f"http://{host}:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, name="sif-api", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=10)


def start_api(stack: LocalStack, port: int) -> RunningService:
    """Serve the HTTP API on 127.0.0.1:`port`; returns a service with `.url` and `.stop()`.

    The hook for the local API gateway: when a module `sif_local.gateway` with
    `start_api(stack, port)` exists, it serves the API; until then a /health-only server does.
    """
    try:
        from sif_local import gateway  # type: ignore[attr-defined, unused-ignore]
    except ImportError:
        return HealthApi(stack, port)
    service: RunningService = gateway.start_api(stack, port)
    return service


def start_workers(stack: LocalStack) -> list[RunningService]:
    """The event pollers (`sif_local.pollers.start_pollers(stack)`) and the local Batch executor."""
    from sif_local.batch_executor import start_batch_executor

    services: list[RunningService] = []
    try:
        from sif_local import pollers  # type: ignore[attr-defined, unused-ignore]
    except ImportError:
        pass
    else:
        services += list(pollers.start_pollers(stack))
    if stack.template.logical_ids("AWS::Batch::JobQueue"):
        services.append(start_batch_executor(stack))
    return services


# ---------------------------------------------------------------------- sif up
@dataclass
class RunningStack:
    emulator: AwsEmulator
    stack: LocalStack
    services: list[RunningService]
    snapshots: PeriodicSnapshot | None = None  # keeps the emulator's state in <state dir>/state

    @property
    def api_url(self) -> str:
        return self.stack.api_url

    def stop(self) -> None:
        """Stop the services, then the emulator; remove stack.json. Safe to call twice."""
        self.stack.remove_stack_json()
        for service in reversed(self.services):
            try:
                service.stop()
            except Exception as exc:  # noqa: BLE001 - one failing service must not keep the rest running
                log.warning("stopping %s: %s", type(service).__name__, exc)
        self.services = []
        if self.snapshots is not None:  # after the services: nothing changes the state any more
            try:
                self.snapshots.stop()
            except Exception as exc:  # noqa: BLE001 - the emulator must stop all the same
                log.warning("could not save the local state to %s: %s", self.snapshots.state.root, exc)
            self.snapshots = None
        self.emulator.stop()
        log.info("local stack stopped")


def start_local_stack(
    *,
    api_port: int | None = None,
    aws_port: int | None = None,
    models_dir: str | Path | None = None,
    state_dir: str | Path = DEFAULT_STATE_DIR,
    template_path: str | Path | None = None,
    publish: bool = True,
    api: Callable[[LocalStack, int], RunningService] = start_api,
    workers: Callable[[LocalStack], list[RunningService]] = start_workers,
    persist: bool = True,
    snapshot_interval_s: float | None = None,
) -> RunningStack:
    """Bring the whole local stack up and write stack.json; the caller stops it (RunningStack.stop).

    `persist`: restore the emulator's state from `<state_dir>/state` (S3 objects, DynamoDB items, SQS
    messages), keep the demo tenant of the last run, and save the state every `snapshot_interval_s`
    (default: SIF_LOCAL_SNAPSHOT_S or 30; 0: only on stop) and when the stack stops."""
    api_port = port_from_env("SIF_API_PORT", DEFAULT_API_PORT) if api_port is None else api_port
    aws_port = port_from_env("SIF_AWS_PORT", 5000) if aws_port is None else aws_port
    # Both ports first: fail before anything starts.
    check_port_free(aws_port, "AWS emulator", "SIF_AWS_PORT")
    check_port_free(api_port, "API", "SIF_API_PORT")
    emulator = AwsEmulator(aws_port).start()
    services: list[RunningService] = []
    try:
        stack = LocalStack(
            emulator.endpoint_url,
            template_path=template_path,
            api_url=f"http://{HOST}:{api_port}",
            state_dir=state_dir,
        ).create()
        state: EmulatorState | None = None
        if persist:
            state = EmulatorState(
                stack.state_dir / STATE_SNAPSHOT_DIR,
                stack.session,
                emulator.endpoint_url,
                region=stack.region,
                # the published models are rebuilt from SIF_MODELS_DIR on every start
                skip_buckets={stack.bucket("models")} if publish else (),
                in_process=emulator.in_process,
            )
            state.restore()
        if publish:
            stack.publish_models(models_dir)
        if persist:
            stack.keep_demo_tenant()
        else:
            stack.create_demo_tenant()
        api_service = api(stack, api_port)
        services.append(api_service)
        stack.api_url = str(getattr(api_service, "url", stack.api_url))
        services.extend(workers(stack))
        snapshots = None
        if state is not None:
            if snapshot_interval_s is None:
                snapshot_interval_s = float(os.environ.get("SIF_LOCAL_SNAPSHOT_S") or DEFAULT_SNAPSHOT_INTERVAL_S)
            snapshots = PeriodicSnapshot(state, snapshot_interval_s)
        running = RunningStack(emulator, stack, services, snapshots)
        stack.write_stack_json()
        if snapshots is not None:
            snapshots.start()
        return running
    except BaseException:
        for service in reversed(services):
            with contextlib.suppress(Exception):
                service.stop()
        emulator.stop()
        raise


@contextlib.contextmanager
def stop_signals() -> Iterator[threading.Event]:
    """An event set by SIGINT or SIGTERM while inside the block (previous handlers restored after)."""
    stop = threading.Event()
    previous: dict[signal.Signals, Any] = {}

    def handler(signum: int, frame: Any) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def run_local_stack(on_ready: Callable[[RunningStack], None] | None = None, **kwargs: Any) -> int:
    """`sif up`: start everything, call `on_ready`, block until Ctrl-C / SIGTERM, stop. Exit code.

    While it runs, `<state dir>/sif.pid` names this process (`sif down` stops it)."""
    with pid_file(kwargs.get("state_dir") or DEFAULT_STATE_DIR), stop_signals() as stop:
        running = start_local_stack(**kwargs)
        try:
            if on_ready is not None:
                on_ready(running)
            while not stop.wait(0.5):
                pass
        finally:
            running.stop()
    return 0


def read_stack_json(path: str | Path | None = None) -> dict[str, Any]:
    """The running stack's stack.json (SIF_STACK_JSON, default .local/stack.json)."""
    target = Path(path or os.environ.get("SIF_STACK_JSON") or DEFAULT_STATE_DIR / STACK_JSON)
    if not target.is_file():
        raise FileNotFoundError(f"{target} not found: is the local stack running? (`make up` / `sif up`)")
    data: dict[str, Any] = json.loads(target.read_text())
    return data
