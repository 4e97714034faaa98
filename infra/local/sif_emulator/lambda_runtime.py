"""Lambda's runtime on this machine: each function instance is its own `python` process.

A pool per function keeps up to its concurrency of instances; an instance imports the function's
Handler module once (the cold start), then runs one event at a time with a context whose remaining
time follows the function's Timeout, its environment from the stack, its CodeUri on sys.path, and as
many of the host's CPUs as its memory buys on Lambda. The API gateway, the event pollers and the
Batch executor all invoke functions through here.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import subprocess
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from multiprocessing.connection import Connection, Pipe
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the worker processes import this module: keep their imports light
    from sif_tools.template import FunctionSpec

log = logging.getLogger("sif_emulator.lambda_runtime")

INIT_TIMEOUT_S = 120.0  # Lambda caps init at 10 s; a cold local machine loading models may need more
MB_PER_VCPU = 1769  # Lambda's vCPUs follow memory
WORKER_IMPORT = "from sif_emulator.lambda_runtime import worker_main"


# ---------------------------------------------------------------------- Lambda side (worker processes)
@dataclass
class LambdaContext:
    """The context object a handler receives (the attributes powertools reads)."""

    function_name: str
    memory_limit_in_mb: int = 128
    timeout_s: float = 3.0
    aws_request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    function_version: str = "$LATEST"
    region: str = "us-east-1"
    account_id: str = "123456789012"
    _deadline: float = field(default=0.0, repr=False)

    def __post_init__(self) -> None:
        self._deadline = time.monotonic() + self.timeout_s
        self.invoked_function_arn = f"arn:aws:lambda:{self.region}:{self.account_id}:function:{self.function_name}"
        self.log_group_name = f"/aws/lambda/{self.function_name}"
        self.log_stream_name = f"{datetime.now(UTC):%Y/%m/%d}/[$LATEST]{uuid.uuid4().hex}"

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))


@dataclass(frozen=True)
class WorkerSpec:
    """What a function instance needs to start (sent to the worker process, so picklable)."""

    logical_id: str
    function_name: str
    handler: str
    code_path: str
    env: dict[str, str]
    memory_mb: int
    timeout_s: float
    log_path: str | None
    vcpus: int | None = None  # pin each instance to this many of the host's CPUs (None: all of them)


def function_worker_spec(
    fn: FunctionSpec, env: dict[str, str], log_dir: Path, *, timeout_s: float | None = None, pin: bool = False
) -> WorkerSpec:
    """A template function's instances as Lambda runs them: its environment plus Lambda's own variables, its
    Timeout (or `timeout_s`), and with `pin` the vCPUs its MemorySize buys."""
    timeout = float(timeout_s or fn.timeout)
    env = {
        **env,
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(fn.memory_size),
        "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
        "AWS_LAMBDA_FUNCTION_TIMEOUT": str(int(timeout)),
        "AWS_EXECUTION_ENV": "AWS_Lambda_python_local",
        "_HANDLER": fn.handler,
    }
    return WorkerSpec(
        logical_id=fn.logical_id,
        function_name=fn.name,
        handler=fn.handler,
        code_path=str(fn.code_path),
        env=env,
        memory_mb=fn.memory_size,
        timeout_s=timeout,
        log_path=str(log_dir / f"{fn.logical_id}.log"),
        vcpus=lambda_vcpus(fn.memory_size) if pin and hasattr(os, "sched_setaffinity") else None,
    )


def worker_main(fd: int) -> None:
    """One function instance (a fresh interpreter): init (import the handler), then invoke events
    from the gateway one at a time until the pipe closes. The first message is the WorkerSpec."""
    conn = Connection(fd)
    spec, cpus = conn.recv()
    if cpus:  # this instance's vCPUs: what os.sched_getaffinity, and so the session threads, will see
        os.sched_setaffinity(0, cpus)
    sys.path.insert(0, spec.code_path)
    module_name, _, attribute = spec.handler.rpartition(".")
    try:
        handler = getattr(importlib.import_module(module_name), attribute)
    except BaseException as exc:  # noqa: BLE001 - an init failure is reported, as Lambda does
        traceback.print_exc()
        conn.send(("init_error", {"errorMessage": str(exc), "errorType": type(exc).__name__}))
        return
    conn.send(("ready", None))
    region = os.environ.get("AWS_REGION", "us-east-1")
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        event, request_id = message
        context = LambdaContext(
            function_name=spec.function_name,
            memory_limit_in_mb=spec.memory_mb,
            timeout_s=spec.timeout_s,
            aws_request_id=request_id,
            region=region,
        )
        try:
            reply: tuple[str, Any] = ("ok", handler(event, context))
        except Exception as exc:  # noqa: BLE001 - a function error is a result, as in Lambda
            traceback.print_exc()
            reply = ("error", {"errorMessage": str(exc), "errorType": type(exc).__name__})
        try:
            conn.send(reply)
        except Exception as exc:  # noqa: BLE001 - e.g. a result that does not pickle
            conn.send(("error", {"errorMessage": f"unusable result: {exc}", "errorType": type(exc).__name__}))


# ---------------------------------------------------------------------- instances and pools (gateway side)
class FunctionFailedToStart(RuntimeError):
    pass


class Instance:
    """One worker process (a fresh `python`, like a Lambda execution environment) and the pipe to it.

    Not multiprocessing's spawn: that would re-import the caller's __main__ in every instance.
    stdout/stderr (the function's logs, EMF lines included) go to the function's log file.
    """

    def __init__(self, spec: WorkerSpec, cpus: tuple[int, ...] | None = None) -> None:
        self.spec = spec
        self.conn, child = Pipe()
        env = {**os.environ, **spec.env, "PYTHONUNBUFFERED": "1"}
        log_file: Any = subprocess.DEVNULL
        if spec.log_path:
            Path(spec.log_path).parent.mkdir(parents=True, exist_ok=True)
            log_file = open(spec.log_path, "ab")  # noqa: SIM115 - handed to the child, closed below
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-c", f"{WORKER_IMPORT}; worker_main({child.fileno()})"],
                pass_fds=(child.fileno(),),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        finally:
            child.close()
            if log_file is not subprocess.DEVNULL:
                log_file.close()
        self.conn.send((spec, cpus))

    def wait_ready(self, timeout_s: float) -> None:
        if not self.conn.poll(timeout_s):
            self.kill()
            raise self._failed(f"did not finish its init within {timeout_s:.0f} s")
        try:
            kind, detail = self.conn.recv()
        except (EOFError, OSError) as exc:
            self.kill()
            raise self._failed("exited during init") from exc
        if kind != "ready":
            self.kill()
            raise self._failed(f"init failed: {detail}")

    def _failed(self, what: str) -> FunctionFailedToStart:
        tail = ""
        if self.spec.log_path and Path(self.spec.log_path).is_file():
            lines = Path(self.spec.log_path).read_text(errors="replace").splitlines()[-15:]
            tail = "\n" + "\n".join(f"  | {line}" for line in lines)
        return FunctionFailedToStart(f"{self.spec.logical_id} {what} (log: {self.spec.log_path}){tail}")

    def invoke(self, event: dict[str, Any], request_id: str, timeout_s: float) -> tuple[str, Any]:
        """('ok', result) | ('error', {errorMessage, errorType}) | ('timeout', None) | ('crashed', None)."""
        try:
            self.conn.send((event, request_id))
            if not self.conn.poll(timeout_s):
                self.kill()
                return "timeout", None
            kind, payload = self.conn.recv()
            return str(kind), payload
        except (EOFError, OSError):
            self.kill()
            return "crashed", None

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(None)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)
        self.kill()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=5)
        with contextlib.suppress(OSError):
            self.conn.close()


class FunctionPool:
    """A function's instances: warm ones are reused (last used first), more start on demand up to
    `max_instances`, beyond that requests wait for one to be free (Lambda's reserved concurrency)."""

    def __init__(self, spec: WorkerSpec, *, min_instances: int = 1, max_instances: int = 2) -> None:
        self.spec = spec
        self.min_instances = max(0, min(min_instances, max_instances))
        self.max_instances = max(1, max_instances)
        self._idle: list[Instance] = []
        self._count = 0
        self._cond = threading.Condition()
        self._closed = False
        self.busy = 0
        self.max_busy = 0
        self.invocations = 0
        self.cold_starts = 0

    def start(self) -> None:
        """Start `min_instances` in parallel and wait for their init."""
        instances = [self._spawn() for _ in range(self.min_instances)]
        try:
            for instance in instances:
                instance.wait_ready(INIT_TIMEOUT_S)
        except BaseException:
            for instance in instances:
                instance.kill()
            raise
        with self._cond:
            self._idle.extend(instances)
            self._count += len(instances)

    def _spawn(self) -> Instance:
        self.cold_starts += 1
        cpus = None
        if self.spec.vcpus:
            host = sorted(os.sched_getaffinity(0))
            if self.spec.vcpus < len(host):
                start = (self.cold_starts - 1) * self.spec.vcpus
                cpus = tuple(host[(start + i) % len(host)] for i in range(self.spec.vcpus))
        return Instance(self.spec, cpus)

    def _acquire(self) -> Instance:
        with self._cond:
            while True:
                if self._closed:
                    raise FunctionFailedToStart(f"{self.spec.logical_id} is stopped")
                if self._idle:
                    return self._idle.pop()
                if self._count < self.max_instances:
                    self._count += 1
                    break
                self._cond.wait()
        try:  # a cold start, outside the lock
            instance = self._spawn()
            instance.wait_ready(INIT_TIMEOUT_S)
            return instance
        except BaseException:
            with self._cond:
                self._count -= 1
                self._cond.notify()
            raise

    def _release(self, instance: Instance) -> None:
        with self._cond:
            if instance.alive and not self._closed:
                self._idle.append(instance)
            else:
                self._count -= 1
                instance.kill()
            self._cond.notify()

    def invoke(self, event: dict[str, Any], request_id: str, timeout_s: float | None = None) -> tuple[str, Any]:
        instance = self._acquire()
        with self._cond:
            self.busy += 1
            self.invocations += 1
            self.max_busy = max(self.max_busy, self.busy)
        try:
            return instance.invoke(event, request_id, timeout_s or self.spec.timeout_s)
        finally:
            with self._cond:
                self.busy -= 1
            self._release(instance)

    def stop(self) -> None:
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._cond.notify_all()
        for instance in idle:
            instance.stop()


def lambda_vcpus(memory_mb: int) -> int:
    """Lambda gives about one vCPU per 1,769 MB; an instance gets that many of the host's CPUs here,
    so concurrent instances do not all run their session threads on every core."""
    return max(1, round(memory_mb / MB_PER_VCPU))
