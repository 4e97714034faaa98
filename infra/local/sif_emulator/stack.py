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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import boto3
from botocore.config import Config

from sif_emulator import gateway, pollers
from sif_emulator.background import pid_file
from sif_emulator.batch import start_batch_executor
from sif_emulator.moto_server import (
    DUMMY_CREDENTIALS,
    HOST,
    AwsEmulator,
    aws_client_env,
    check_port_free,
    port_from_env,
)
from sif_emulator.resources import REQUIRED, TRANSLATORS, Creation, local_network
from sif_emulator.state import EmulatorState, PeriodicSnapshot
from sif_tools.template import (
    DEFAULT_ACCOUNT_ID,
    DEFAULT_REGION,
    DEFAULT_STACK_NAME,
    REPO_ROOT,
    Template,
)

log = logging.getLogger("sif_emulator.stack")

DEFAULT_API_PORT = 3000
DEFAULT_MODELS_DIR = REPO_ROOT / ".cache" / "models"
DEFAULT_STATE_DIR = REPO_ROOT / ".local"
STACK_JSON = "stack.json"
STATE_SNAPSHOT_DIR = "state"  # the emulator's state between runs (sif_emulator.state)
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
        self._creation = Creation(self.client, self.template, self.region, notes=self.notes)

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
        for lid in self.template.creation_order():
            rtype = self.template.resource_type(lid)
            if not self.template.resource_enabled(lid):
                self.skipped[lid] = "its Condition is false"
                continue
            handler = TRANSLATORS.get(rtype)
            if handler is None:
                self.skipped[lid] = IN_PROCESS_TYPES.get(rtype, f"{rtype} is not emulated locally")
                log.debug("skipping %s (%s): %s", lid, rtype, self.skipped[lid])
                continue
            missing = [
                d
                for d in self.template.dependencies(lid)
                if d in self.skipped and self.template.resource_type(d) not in IN_PROCESS_TYPES
            ]
            if missing and rtype not in REQUIRED:
                self.skipped[lid] = f"depends on {', '.join(sorted(missing))}, which could not be created"
                log.warning("skipping %s: %s", lid, self.skipped[lid])
                continue
            try:
                handler(self._creation, lid, self.template.properties(lid))
            except Exception as exc:
                if rtype in REQUIRED:
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
                value = local_network(self._creation)["subnet"]
            elif "AWS::EC2::SecurityGroup::Id" in ptype:
                value = local_network(self._creation)["security_group"]
            elif "AWS::EC2::VPC::Id" in ptype:
                value = local_network(self._creation)["vpc"]
            elif ptype == "Number":
                value = 0
            else:
                value = f"{self.template.stack_name}-{name.lower()}"
            if ptype.startswith("List<") or ptype == "CommaDelimitedList":
                value = [value]
            self.template.set_parameter(name, value)

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


def start_api(stack: LocalStack, port: int) -> RunningService:
    """Serve the HTTP API on 127.0.0.1:`port` (the local API gateway); `.url` and `.stop()`."""
    return gateway.start_api(stack, port)


def start_workers(stack: LocalStack) -> list[RunningService]:
    """The event pollers and, when the template has a Batch job queue, the local Batch executor."""
    services: list[RunningService] = list(pollers.start_pollers(stack))
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
