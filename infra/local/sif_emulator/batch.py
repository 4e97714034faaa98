"""The local AWS Batch executor: runs what is submitted to the emulated GPU queue as local processes.

moto's Batch API takes the real `submit_job` (queue, job definition, parameters), but its backend
runs nothing we can use. This executor watches the template's job queues (`list_jobs`), and for
each new job does what Batch does with a container job: take the job definition's command,
substitute `Ref::name` with the job's parameters, set the job definition's environment (plus the
stack's, so boto3 reaches the emulator, and AWS_BATCH_JOB_ID / _ATTEMPT / _JQ_NAME), and run it,
here as `python -m ...` with this interpreter instead of in the image. The attempt duration
timeout and the retry strategy (attempts, evaluateOnExit) are honoured.

Job status is driven by the worker process itself (it writes the work table); the executor only
emulates EventBridge for the end of a job: when an attempt ends FAILED, the "Batch Job State
Change" event goes to the function whose EventBridgeRule matches it in template.yaml, run as a
local process, so a worker that crashed before it could mark its job failed still ends visible.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sif_emulator.deployment import Deployment
from sif_tools.template import REPO_ROOT

log = logging.getLogger("sif_emulator.batch")

CLAIM_TAG = "sif:local-executor"  # set on a job once an executor took it: each job runs once per emulator
BATCH_EVENT_SOURCE = "aws.batch"
BATCH_EVENT_DETAIL_TYPE = "Batch Job State Change"
EVENT_RULE_TYPES = ("EventBridgeRule", "CloudWatchEvent")
INVOKE_SNIPPET = """
import importlib, json, sys
class Context:
    function_name = sys.argv[2]
    memory_limit_in_mb = 128
    invoked_function_arn = "arn:aws:lambda:local:000000000000:function:" + sys.argv[2]
    aws_request_id = "local-batch-event"
    def get_remaining_time_in_millis(self):
        return 30000
module, attr = sys.argv[1].rsplit(".", 1)
handler = getattr(importlib.import_module(module), attr)
print(json.dumps(handler(json.load(sys.stdin), Context()), default=str))
"""


@dataclass
class ExecutedJob:
    job_id: str
    job_name: str
    job_queue: str
    command: list[str]
    exit_codes: list[int] = field(default_factory=list)
    status: str = "RUNNING"  # SUCCEEDED | FAILED once done
    status_reason: str = ""
    log_path: Path | None = None
    started_at: float = field(default_factory=time.time)
    stopped_at: float | None = None

    @property
    def done(self) -> bool:
        return self.status in ("SUCCEEDED", "FAILED")


def resolve_command(command: list[str], parameters: dict[str, str]) -> list[str]:
    """Batch's parameter substitution: a `Ref::name` in a command argument becomes the value."""
    out = []
    for part in command:
        for name, value in parameters.items():
            part = part.replace(f"Ref::{name}", value)
        out.append(part)
    return out


def local_command(command: list[str], python: str = sys.executable) -> list[str]:
    """The container's `python` is this interpreter (its environment has the same packages)."""
    if command and command[0] in ("python", "python3"):
        return [python, *command[1:]]
    return command


def retry_decision(strategy: dict[str, Any], exit_code: int, reason: str, status_reason: str) -> str:
    """RETRY or EXIT per the job definition's evaluateOnExit (first match wins; no match: RETRY)."""
    for rule in strategy.get("evaluateOnExit", []) or []:
        checks = [
            ("onExitCode", str(exit_code)),
            ("onReason", reason),
            ("onStatusReason", status_reason),
        ]
        if all(fnmatch.fnmatchcase(value, rule[key]) for key, value in checks if key in rule):
            return str(rule.get("action", "EXIT")).upper()
    return "RETRY"


def pattern_matches(pattern: Any, event: Any) -> bool:
    """EventBridge's basic matching: nested objects, and lists of allowed exact values."""
    if isinstance(pattern, dict):
        return isinstance(event, dict) and all(pattern_matches(v, event.get(k)) for k, v in pattern.items())
    if isinstance(pattern, list):
        return event in pattern
    return bool(pattern == event)


class LocalBatchExecutor:
    """Polls the emulator's Batch job queues and runs new jobs (at most `max_parallel` at a time)."""

    def __init__(
        self,
        stack: Deployment,
        *,
        poll_s: float = 0.5,
        max_parallel: int = 1,
        python: str = sys.executable,
        log_dir: str | Path | None = None,
    ) -> None:
        self.stack = stack
        self.poll_s = poll_s
        self.python = python
        self.batch = stack.client("batch")
        self.queues = [stack.ref(lid) for lid in stack.template.logical_ids("AWS::Batch::JobQueue")]
        self.log_dir = Path(log_dir) if log_dir is not None else Path(stack.state_dir) / "batch-logs"
        self.jobs: dict[str, ExecutedJob] = {}
        self._futures: dict[str, Future[ExecutedJob]] = {}
        self._pool = ThreadPoolExecutor(max_workers=max_parallel, thread_name_prefix="sif-batch-job")
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    # ------------------------------------------------------------ lifecycle
    def start(self) -> LocalBatchExecutor:
        self._quiet_moto_runner()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._loop, name="sif-batch-executor", daemon=True)
        self._thread.start()
        log.info("local Batch executor watching %s", ", ".join(q.rsplit("/", 1)[-1] for q in self.queues))
        return self

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop watching; jobs still running get `grace_s` to finish, then SIGTERM (as Batch would)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with self._lock:
            procs = list(self._procs.values())
        deadline = time.monotonic() + grace_s
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _quiet_moto_runner(self) -> None:
        """Tell moto not to try Docker for Batch jobs (this executor runs them)."""
        url = f"{self.stack.aws_endpoint_url}/moto-api/config"
        body = json.dumps({"batch": {"use_docker": False}}).encode()
        headers = {"Content-Type": "application/json"}
        request = urllib.request.Request(url, data=body, method="POST", headers=headers)  # noqa: S310 - local
        try:
            with urllib.request.urlopen(request, timeout=5):  # noqa: S310 - the local emulator
                pass
        except OSError as exc:
            log.debug("could not set moto's batch config: %s", exc)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll()
            except Exception as exc:  # noqa: BLE001 - keep watching; the emulator may be restarting
                log.warning("local Batch executor poll failed: %s", exc)
            self._stop.wait(self.poll_s)

    # ------------------------------------------------------------ polling
    def poll(self) -> list[str]:
        """Start every job that no executor has taken yet; returns their ids."""
        started = []
        for queue in self.queues:
            with self._lock:
                new = [s["jobId"] for s in self._list(queue) if s["jobId"] not in self._futures]
            for job_id in self._unclaimed(new):
                with self._lock:
                    self._futures[job_id] = self._pool.submit(self._run_job, job_id)
                started.append(job_id)
        return started

    def _unclaimed(self, job_ids: list[str]) -> list[str]:
        """Claim (tag) and return the jobs no executor took before, e.g. one of an earlier test module."""
        unclaimed = []
        for start in range(0, len(job_ids), 100):
            for desc in self.batch.describe_jobs(jobs=job_ids[start : start + 100])["jobs"]:
                if CLAIM_TAG in (desc.get("tags") or {}):
                    with self._lock:
                        self._futures.setdefault(desc["jobId"], _done_elsewhere(desc["jobId"]))
                    continue
                self.batch.tag_resource(resourceArn=desc["jobArn"], tags={CLAIM_TAG: str(os.getpid())})
                unclaimed.append(desc["jobId"])
        return unclaimed

    def _list(self, queue: str) -> list[dict[str, Any]]:
        jobs: list[dict[str, Any]] = []
        kwargs: dict[str, Any] = {"jobQueue": queue}
        while True:
            resp = self.batch.list_jobs(**kwargs)
            jobs += resp.get("jobSummaryList", [])
            if not resp.get("nextToken"):
                return jobs
            kwargs["nextToken"] = resp["nextToken"]

    def wait(self, job_id: str, timeout: float = 300) -> ExecutedJob:
        """Block until the job with this Batch id has run (polling for it if it is not seen yet)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                future = self._futures.get(job_id)
            if future is not None:
                return future.result(timeout=max(0.1, deadline - time.monotonic()))
            if self._thread is None:
                self.poll()
            time.sleep(0.05)
        raise TimeoutError(f"Batch job {job_id} did not run within {timeout} s")

    # ------------------------------------------------------------ running one job
    def _run_job(self, job_id: str) -> ExecutedJob:
        desc = self.batch.describe_jobs(jobs=[job_id])["jobs"][0]
        definition = self.batch.describe_job_definitions(jobDefinitions=[desc["jobDefinition"]])["jobDefinitions"][0]
        props = definition.get("containerProperties", {})
        overrides = desc.get("container", {}) or {}
        parameters = {**definition.get("parameters", {}), **desc.get("parameters", {})}
        command = local_command(resolve_command(list(props.get("command", [])), parameters), self.python)
        env = dict(os.environ)
        env.update(self.stack.function_env())
        env.update({e["name"]: e["value"] for e in props.get("environment", [])})
        # moto echoes the definition's environment as the job's; real overrides would land here too.
        env.update({e["name"]: e["value"] for e in overrides.get("environment", []) or []})
        env.update(
            {
                "AWS_BATCH_JOB_ID": job_id,
                "AWS_BATCH_JQ_NAME": desc.get("jobQueue", "").rsplit("/", 1)[-1],
                "AWS_BATCH_CE_NAME": "local",
            }
        )
        timeout_s = (desc.get("timeout") or definition.get("timeout") or {}).get("attemptDurationSeconds")
        strategy = definition.get("retryStrategy") or {"attempts": 1}
        attempts = max(1, int(strategy.get("attempts", 1)))
        job = ExecutedJob(job_id, desc.get("jobName", job_id), desc.get("jobQueue", ""), command)
        job.log_path = self.log_dir / f"{job_id}.log"
        with self._lock:
            self.jobs[job_id] = job
        log.info("Batch job %s (%s): %s", job_id, job.job_name, " ".join(command))
        for attempt in range(1, attempts + 1):
            env["AWS_BATCH_JOB_ATTEMPT"] = str(attempt)
            code, reason = self._attempt(job, env, timeout_s)
            job.exit_codes.append(code)
            if code == 0:
                job.status, job.status_reason = "SUCCEEDED", "Essential container in task exited"
                break
            job.status_reason = reason
            if attempt == attempts or retry_decision(strategy, code, reason, reason) == "EXIT":
                job.status = "FAILED"
                break
            log.info("Batch job %s attempt %d failed (%s); retrying", job_id, attempt, reason)
        job.stopped_at = time.time()
        log.info("Batch job %s %s (exit codes %s)", job_id, job.status, job.exit_codes)
        if job.status == "FAILED" and not self._stop.is_set():  # not a job the shutdown itself ended
            self._emit_state_change(desc, job, parameters)
        return job

    def _attempt(self, job: ExecutedJob, env: dict[str, str], timeout_s: int | None) -> tuple[int, str]:
        assert job.log_path is not None
        with job.log_path.open("ab") as out:
            proc = subprocess.Popen(
                job.command, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
            with self._lock:
                self._procs[job.job_id] = proc
            try:
                code = proc.wait(timeout=timeout_s)
                reason = "Essential container in task exited"
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                code = proc.wait()
                reason = "Job attempt duration exceeded timeout"
            finally:
                with self._lock:
                    self._procs.pop(job.job_id, None)
        return code, reason

    # ------------------------------------------------------------ EventBridge, emulated
    def state_change_event(self, desc: dict[str, Any], job: ExecutedJob, parameters: dict[str, str]) -> dict[str, Any]:
        account = self.stack.template.account_id
        return {
            "version": "0",
            "id": f"local-{job.job_id}",
            "detail-type": BATCH_EVENT_DETAIL_TYPE,
            "source": BATCH_EVENT_SOURCE,
            "account": account,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "region": self.stack.region,
            "resources": [desc.get("jobArn", job.job_id)],
            "detail": {
                "jobArn": desc.get("jobArn", job.job_id),
                "jobName": job.job_name,
                "jobId": job.job_id,
                "jobQueue": desc.get("jobQueue", ""),
                "status": job.status,
                "statusReason": job.status_reason,
                "attempts": [{"container": {"exitCode": c}} for c in job.exit_codes],
                "parameters": parameters,
                "jobDefinition": desc.get("jobDefinition", ""),
                "tags": desc.get("tags", {}),
                "container": {"exitCode": job.exit_codes[-1] if job.exit_codes else None},
            },
        }

    def _emit_state_change(self, desc: dict[str, Any], job: ExecutedJob, parameters: dict[str, str]) -> None:
        event = self.state_change_event(desc, job, parameters)
        for lid, spec in self.stack.template.functions().items():
            for name, ev in spec.events.items():
                if ev.get("Type") in EVENT_RULE_TYPES and pattern_matches(ev.get("Pattern", {}), event):
                    self.invoke(lid, spec.handler, event, f"{lid}.{name}")

    def invoke(self, logical_id: str, handler: str, event: dict[str, Any], what: str) -> dict[str, Any] | None:
        """Run a function's handler on one event in a fresh local process (its own env, like Lambda)."""
        env = dict(os.environ)
        env.update(self.stack.function_env(logical_id))
        try:
            proc = subprocess.run(
                [self.python, "-c", INVOKE_SNIPPET, handler, logical_id],
                input=json.dumps(event).encode(),
                cwd=REPO_ROOT,
                env=env,
                capture_output=True,
                timeout=120,
                check=False,
            )
        except subprocess.TimeoutExpired:
            log.warning("%s did not answer the Batch state change within 120 s", what)
            return None
        if proc.returncode != 0:
            log.warning("%s failed on the Batch state change: %s", what, proc.stderr.decode(errors="replace")[-2000:])
            return None
        lines = proc.stdout.decode(errors="replace").strip().splitlines()
        log.info("%s handled the Batch state change of %s", what, event["detail"]["jobId"])
        try:
            result: dict[str, Any] = json.loads(lines[-1]) if lines else {}
        except ValueError:
            return None
        return result


def _done_elsewhere(job_id: str) -> Future[ExecutedJob]:
    future: Future[ExecutedJob] = Future()
    future.set_result(ExecutedJob(job_id, "", "", [], status="UNKNOWN", status_reason="run by another executor"))
    return future


def start_batch_executor(stack: Deployment, **kwargs: Any) -> LocalBatchExecutor:
    """The local stack's hook: an executor for every AWS::Batch::JobQueue of the template."""
    return LocalBatchExecutor(stack, **kwargs).start()
