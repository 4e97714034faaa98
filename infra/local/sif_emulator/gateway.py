"""The local API gateway: API Gateway (REST) in front of the functions, as the template declares it.

HTTP requests on 127.0.0.1:`SIF_API_PORT` become API Gateway REST proxy events (payload 1.0:
resource, path, httpMethod, headers, multiValueHeaders, query strings, pathParameters, body,
isBase64Encoded, requestContext with a fresh requestId). Routes, which function serves each, and
which routes need the Lambda authorizer all come from template.yaml (the functions' `Api` events
and the API's `Auth`); the authorizer gets a REQUEST event as API Gateway would send it, its policy
is evaluated against the method ARN and its context lands in requestContext.authorizer. Errors the
gateway itself produces (no route, 401, 403, 413, 5xx) use the template's GatewayResponses.

Each function runs as Lambda runs it: in its own process (one per concurrent "instance", spawned,
never forked from this threaded server), with the function's environment from the stack, its
CodeUri on sys.path, the module named by its Handler imported once (the cold start) and then
invoked one event at a time. Requests are served concurrently up to the number of instances.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from sif_emulator.deployment import Deployment
from sif_emulator.lambda_runtime import FunctionPool, function_worker_spec
from sif_tools.template import ApiRoute, AuthorizerSpec

log = logging.getLogger("sif_emulator.gateway")

HOST = "127.0.0.1"
MAX_API_PAYLOAD_BYTES = 10 * 1024 * 1024  # API Gateway REST's request limit
MAX_INVOKE_PAYLOAD_BYTES = 6 * 1024 * 1024  # Lambda's synchronous invoke limit (the event as a whole)
DRAIN_LIMIT_BYTES = 64 * 1024 * 1024  # bodies over API Gateway's limit but under this are read before the 413
INTEGRATION_TIMEOUT_S = 29.0  # API Gateway's own limit, whatever the function's Timeout says

# What API Gateway answers by itself, before or instead of the integration.
GATEWAY_DEFAULTS: dict[str, tuple[int, str]] = {
    "UNAUTHORIZED": (401, "Unauthorized"),
    "ACCESS_DENIED": (403, "User is not authorized to access this resource"),
    "MISSING_AUTHENTICATION_TOKEN": (403, "Missing Authentication Token"),
    "BAD_REQUEST_BODY": (400, "Invalid request body"),
    "REQUEST_TOO_LARGE": (413, "Request Too Long"),
    "AUTHORIZER_FAILURE": (500, "Authorizer failed"),
    "AUTHORIZER_CONFIGURATION_ERROR": (500, "Authorizer returned an invalid response"),
    "INTEGRATION_FAILURE": (502, "Internal server error"),
    "INTEGRATION_TIMEOUT": (504, "Endpoint request timed out"),
}


# ---------------------------------------------------------------------- the gateway
@dataclass
class HttpRequest:
    method: str
    raw_path: str
    headers: list[tuple[str, str]]
    body: bytes
    source_ip: str


@dataclass
class HttpResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes


def _api_id(stack_name: str) -> str:
    return hashlib.sha256(stack_name.encode()).hexdigest()[:10]


def _stringify_context(context: dict[str, Any]) -> dict[str, str]:
    """API Gateway (REST) hands authorizer context values to the integration as strings."""
    out = {}
    for key, value in context.items():
        if isinstance(value, bool):
            out[key] = "true" if value else "false"
        elif value is not None:
            out[key] = str(value)
    return out


def _statements(policy: Any) -> list[dict[str, Any]]:
    statements = policy.get("Statement", []) if isinstance(policy, dict) else []
    return [statements] if isinstance(statements, dict) else [s for s in statements if isinstance(s, dict)]


def policy_allows(policy: Any, method_arn: str) -> bool:
    """IAM-style evaluation of an authorizer's policy for execute-api:Invoke on `method_arn`."""
    allowed = False
    for statement in _statements(policy):
        actions = statement.get("Action", [])
        actions = [actions] if isinstance(actions, str) else actions
        if not any(fnmatch.fnmatchcase("execute-api:Invoke", a) for a in actions):
            continue
        resources = statement.get("Resource", [])
        resources = [resources] if isinstance(resources, str) else resources
        if not any(fnmatch.fnmatchcase(method_arn, r) for r in resources):
            continue
        if str(statement.get("Effect", "")).lower() == "deny":
            return False
        if str(statement.get("Effect", "")).lower() == "allow":
            allowed = True
    return allowed


class LocalApiGateway:
    def __init__(
        self,
        stack: Deployment,
        port: int,
        *,
        host: str = HOST,
        api_instances: int | None = None,
        log_dir: Path | None = None,
    ) -> None:
        from sif_emulator.moto_server import PortInUseError, check_port_free

        template = stack.template
        self.region = stack.region
        self.account_id = template.account_id
        self.routes: list[ApiRoute] = template.api_routes()
        self.authorizers: dict[str, AuthorizerSpec] = template.authorizers()
        api = self.routes[0].api if self.routes else ""
        props = template.properties(api) if api in template.resources else {}
        self.stage = str(props.get("StageName", "prod"))
        self.api_id = _api_id(template.stack_name)
        self.gateway_responses: dict[str, Any] = props.get("GatewayResponses", {}) or {}
        self.log_dir = Path(log_dir) if log_dir is not None else stack.state_dir / "logs"

        functions = template.functions()
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        api_max = api_instances or int(os.environ.get("SIF_LOCAL_API_INSTANCES", 0)) or max(2, min(4, cpus))
        authorizer_ids = {a.function for a in self.authorizers.values()}
        self.pools: dict[str, FunctionPool] = {}
        for lid in sorted({r.function for r in self.routes} | authorizer_ids):
            fn = functions[lid]
            size = 2 if lid in authorizer_ids else api_max
            spec = function_worker_spec(fn, stack.function_env(lid), self.log_dir, pin=lid not in authorizer_ids)
            self.pools[lid] = FunctionPool(spec, min_instances=size, max_instances=size)
        self._auth_cache: dict[tuple[str, tuple[str, ...]], tuple[float, dict[str, Any]]] = {}
        self._auth_lock = threading.Lock()

        check_port_free(port, "API", "SIF_API_PORT", host)
        gateway = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            server_version = "sif-local-gateway"

            def setup(self) -> None:
                super().setup()
                # Headers and body are separate writes: without this, Nagle + delayed ACKs add 40 ms.
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def _serve(self) -> None:
                gateway._serve_http(self)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _serve

            def __getattr__(self, name: str) -> Any:
                # Any other method (TRACE, CONNECT, PROPFIND, ...) is routed like the others: no route
                # has it, so API Gateway's own answer, not the stdlib's HTML 501.
                if name.startswith("do_"):
                    return self._serve
                raise AttributeError(name)

            def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
                # What the stdlib refuses before routing (a malformed request line, too many or too
                # long headers) gets API Gateway's JSON error body too, never an HTML page; and a
                # status line with headers even when the request line was too broken to say HTTP/1.x.
                if self.request_version == "HTTP/0.9":
                    self.request_version = "HTTP/1.1"
                gateway._write(self, gateway.client_error(code, message or "bad request"), close=True)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("api: " + format, *args)

        try:
            self.server = _Server((host, port), Handler)
        except OSError as exc:
            raise PortInUseError(port, "API", "SIF_API_PORT") from exc
        self.url = f"http://{host}:{self.server.server_address[1]}"
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ lifecycle
    def start(self) -> LocalApiGateway:
        """Start every function's instances (their cold starts happen here), then serve."""
        errors: list[BaseException] = []

        def start_pool(pool: FunctionPool) -> None:
            try:
                pool.start()
            except BaseException as exc:  # noqa: BLE001 - collected and raised below
                errors.append(exc)

        threads = [threading.Thread(target=start_pool, args=(p,)) for p in self.pools.values()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            self.stop()
            raise errors[0]
        self._thread = threading.Thread(target=self.server.serve_forever, name="sif-gateway", daemon=True)
        self._thread.start()
        log.info("local API gateway on %s (%d routes; logs in %s)", self.url, len(self.routes), self.log_dir)
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self.server.shutdown()
            self._thread.join(timeout=10)
            self._thread = None
        self.server.server_close()
        for pool in self.pools.values():
            pool.stop()

    def stats(self) -> dict[str, dict[str, int]]:
        return {
            lid: {"invocations": p.invocations, "max_concurrent": p.max_busy, "cold_starts": p.cold_starts}
            for lid, p in self.pools.items()
        }

    # ------------------------------------------------------------ HTTP
    def _serve_http(self, h: BaseHTTPRequestHandler) -> None:
        request_id = str(uuid.uuid4())
        try:
            length = int(h.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        chunked = "chunked" in (h.headers.get("Transfer-Encoding") or "").lower()
        if length < 0 or length > MAX_API_PAYLOAD_BYTES:
            # Read (and drop) a body of sane size first: a client still sending when the socket
            # closes gets a reset instead of the 413.
            if 0 < length <= DRAIN_LIMIT_BYTES:
                _drain(h, length)
            self._write(h, self.gateway_response("REQUEST_TOO_LARGE", request_id), close=length > DRAIN_LIMIT_BYTES)
            return
        try:
            body = _read_chunked(h) if chunked else (h.rfile.read(length) if length else b"")
        except ValueError:  # a malformed or oversized chunked body
            self._write(h, self.gateway_response("REQUEST_TOO_LARGE", request_id), close=True)
            return
        request = HttpRequest(
            method=h.command,
            raw_path=h.path,
            headers=[(k, v) for k, v in h.headers.items() if k.lower() not in ("content-length", "transfer-encoding")],
            body=body,
            source_ip=h.client_address[0],
        )
        try:
            response = self.handle(request, request_id)
        except Exception:  # the gateway must answer, whatever broke
            log.exception("gateway error")
            response = self.gateway_response("INTEGRATION_FAILURE", request_id)
        self._write(h, response, head=h.command == "HEAD")

    @staticmethod
    def _write(h: BaseHTTPRequestHandler, response: HttpResponse, *, close: bool = False, head: bool = False) -> None:
        h.send_response(response.status)
        for name, value in response.headers:
            if name.lower() not in ("content-length", "connection", "transfer-encoding"):
                h.send_header(name, value)
        h.send_header("Content-Length", str(len(response.body)))
        if close:
            h.send_header("Connection", "close")
            h.close_connection = True
        h.end_headers()
        if not head:
            h.wfile.write(response.body)

    # ------------------------------------------------------------ API Gateway's behaviour
    def gateway_response(self, kind: str, request_id: str, message: str | None = None) -> HttpResponse:
        """An error API Gateway produces itself, rendered from the template's GatewayResponses."""
        status, default_message = GATEWAY_DEFAULTS.get(kind, (500, "Internal server error"))
        family = "DEFAULT_4XX" if status < 500 else "DEFAULT_5XX"
        spec = self.gateway_responses.get(kind) or self.gateway_responses.get(family) or {}
        if spec.get("StatusCode") and kind in self.gateway_responses:
            status = int(spec["StatusCode"])
        body_template = (spec.get("ResponseTemplates") or {}).get("application/json")
        text = message or default_message
        if body_template:
            body = body_template.replace("$context.requestId", request_id).replace(
                "$context.error.messageString", json.dumps(text)
            )
        else:
            body = json.dumps({"message": text})
        headers = [("Content-Type", "application/json"), ("x-amzn-RequestId", request_id)]
        if kind == "UNAUTHORIZED":
            headers.append(("x-amzn-ErrorType", "UnauthorizedException"))
        return HttpResponse(status, headers, body.encode())

    def client_error(self, status: int, message: str) -> HttpResponse:
        """A request API Gateway refuses before routing it: a 4xx (never a 5xx: the client's fault)
        rendered with the template's DEFAULT_4XX response."""
        request_id = str(uuid.uuid4())
        response = self.gateway_response("BAD_REQUEST_BODY", request_id, message)
        response.status = status if 400 <= status < 500 else 400
        return response

    def match(self, method: str, path: str) -> tuple[ApiRoute, dict[str, str]] | None:
        for route in self.routes:
            params = route.match(method, path)
            if params is not None:
                return route, params
        return None

    def handle(self, request: HttpRequest, request_id: str) -> HttpResponse:
        split = urlsplit(request.raw_path)
        path = unquote(split.path) or "/"
        if path.startswith(f"/{self.stage}/"):  # the stage URL, as on AWS: /prod/v1/...
            path = path[len(self.stage) + 1 :]
        found = self.match(request.method, path)
        if found is None:
            return self.gateway_response("MISSING_AUTHENTICATION_TOKEN", request_id)
        route, params = found
        event = self.proxy_event(request, route, path, params, split.query, request_id)
        if route.authorizer is not None:
            denied = self.authorize(route, event, request_id)
            if denied is not None:
                return denied
        if len(request.body) > MAX_INVOKE_PAYLOAD_BYTES:
            return self.gateway_response("REQUEST_TOO_LARGE", request_id)
        kind, result = self.pools[route.function].invoke(event, request_id, INTEGRATION_TIMEOUT_S)
        if kind == "timeout":
            return self.gateway_response("INTEGRATION_TIMEOUT", request_id)
        if kind != "ok" or not isinstance(result, dict) or not isinstance(result.get("statusCode"), int):
            log.warning("%s: %s (%s)", route.function, kind, result)
            return self.gateway_response("INTEGRATION_FAILURE", request_id)
        return self.proxy_response(result, request_id)

    def proxy_event(
        self, request: HttpRequest, route: ApiRoute, path: str, params: dict[str, str], query: str, request_id: str
    ) -> dict[str, Any]:
        headers: dict[str, str] = {}
        multi_headers: dict[str, list[str]] = {}
        for name, value in request.headers:
            multi_headers.setdefault(name, []).append(value)
            headers[name] = value if name not in headers else f"{headers[name]},{value}"
        multi_query = {k: v for k, v in parse_qs(query, keep_blank_values=True).items()} if query else {}
        now = datetime.now(UTC)
        try:
            body: str | None = request.body.decode("utf-8") if request.body else None
            encoded = False
        except UnicodeDecodeError:
            body, encoded = base64.b64encode(request.body).decode("ascii"), True
        return {
            "resource": route.resource,
            "path": path,
            "httpMethod": request.method,
            "headers": headers or None,
            "multiValueHeaders": multi_headers or None,
            "queryStringParameters": {k: v[-1] for k, v in multi_query.items()} or None,
            "multiValueQueryStringParameters": multi_query or None,
            "pathParameters": params or None,
            "stageVariables": None,
            "requestContext": {
                "accountId": self.account_id,
                "apiId": self.api_id,
                "resourceId": hashlib.sha256(route.resource.encode()).hexdigest()[:6],
                "resourcePath": route.resource,
                "httpMethod": request.method,
                # Served at the root locally (as `sam local start-api` does): no stage in the path.
                "path": path,
                "protocol": "HTTP/1.1",
                "stage": self.stage,
                "requestId": request_id,
                "extendedRequestId": base64.b64encode(uuid.uuid4().bytes[:12]).decode(),
                "requestTime": now.strftime("%d/%b/%Y:%H:%M:%S +0000"),
                "requestTimeEpoch": int(now.timestamp() * 1000),
                "domainName": urlsplit(self.url).netloc,
                "identity": {
                    "sourceIp": request.source_ip,
                    "userAgent": headers.get("User-Agent") or headers.get("user-agent"),
                    "apiKey": None,
                    "accessKey": None,
                    "accountId": None,
                    "caller": None,
                    "user": None,
                    "userArn": None,
                    "cognitoIdentityId": None,
                    "cognitoIdentityPoolId": None,
                    "cognitoAuthenticationType": None,
                    "cognitoAuthenticationProvider": None,
                },
            },
            "body": body,
            "isBase64Encoded": encoded,
        }

    def method_arn(self, method: str, path: str) -> str:
        return f"arn:aws:execute-api:{self.region}:{self.account_id}:{self.api_id}/{self.stage}/{method}{path}"

    def authorize(self, route: ApiRoute, event: dict[str, Any], request_id: str) -> HttpResponse | None:
        """Run the route's Lambda authorizer; None when allowed (its context is then in the event)."""
        spec = self.authorizers[route.authorizer or ""]
        method_arn = self.method_arn(event["httpMethod"], event["path"])
        headers = {k.lower(): v for k, v in (event["headers"] or {}).items()}
        identity = tuple(headers.get(h.lower(), "") for h in spec.identity_headers)
        if spec.identity_headers and not all(identity):
            return self.gateway_response("UNAUTHORIZED", request_id)  # an identity source is missing
        cache_key = (spec.name, identity)
        cacheable = spec.ttl_s > 0 and bool(spec.identity_headers)
        result: dict[str, Any] | None = None
        if cacheable:
            with self._auth_lock:
                hit = self._auth_cache.get(cache_key)
            if hit is not None and hit[0] > time.monotonic():
                result = hit[1]
        started = time.perf_counter()
        if result is None:
            auth_event = {
                "type": "REQUEST",
                "methodArn": method_arn,
                **{k: event[k] for k in ("resource", "path", "httpMethod", "headers", "multiValueHeaders")},
                "queryStringParameters": event["queryStringParameters"] or {},
                "multiValueQueryStringParameters": event["multiValueQueryStringParameters"] or {},
                "pathParameters": event["pathParameters"] or {},
                "stageVariables": {},
                "requestContext": dict(event["requestContext"]),
            }
            kind, payload = self.pools[spec.function].invoke(auth_event, str(uuid.uuid4()))
            if kind == "error" and isinstance(payload, dict) and payload.get("errorMessage") == "Unauthorized":
                return self.gateway_response("UNAUTHORIZED", request_id)
            if kind != "ok" or not isinstance(payload, dict) or "policyDocument" not in payload:
                log.warning("authorizer %s: %s (%s)", spec.name, kind, payload)
                return self.gateway_response("AUTHORIZER_CONFIGURATION_ERROR", request_id)
            result = payload
            if cacheable:
                with self._auth_lock:
                    self._auth_cache[cache_key] = (time.monotonic() + spec.ttl_s, result)
        if not policy_allows(result.get("policyDocument"), method_arn):
            return self.gateway_response("ACCESS_DENIED", request_id)
        context = _stringify_context(dict(result.get("context") or {}))
        event["requestContext"]["authorizer"] = {
            "principalId": str(result.get("principalId", "")),
            **context,
            "integrationLatency": int((time.perf_counter() - started) * 1000),
        }
        return None

    @staticmethod
    def proxy_response(result: dict[str, Any], request_id: str) -> HttpResponse:
        headers: list[tuple[str, str]] = []
        seen: set[str] = set()
        for name, values in (result.get("multiValueHeaders") or {}).items():
            for value in values if isinstance(values, list) else [values]:
                headers.append((str(name), str(value)))
            seen.add(str(name).lower())
        for name, value in (result.get("headers") or {}).items():
            if str(name).lower() not in seen:
                headers.append((str(name), str(value)))
        headers.append(("x-amzn-RequestId", request_id))
        body = result.get("body") or ""
        data = base64.b64decode(body) if result.get("isBase64Encoded") else str(body).encode("utf-8")
        return HttpResponse(int(result["statusCode"]), headers, data)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):  # a client went away: not our error
            log.debug("client %s went away", client_address)
            return
        super().handle_error(request, client_address)


def _drain(h: BaseHTTPRequestHandler, length: int) -> None:
    while length > 0:
        chunk = h.rfile.read(min(length, 1 << 20))
        if not chunk:
            return
        length -= len(chunk)


def _read_chunked(h: BaseHTTPRequestHandler) -> bytes:
    parts: list[bytes] = []
    total = 0
    while True:
        size = int(h.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            h.rfile.readline()
            return b"".join(parts)
        total += size
        if total > MAX_API_PAYLOAD_BYTES:
            raise ValueError("chunked body too large")
        parts.append(h.rfile.read(size))
        h.rfile.readline()


def start_api(stack: Deployment, port: int) -> LocalApiGateway:
    """The local stack's hook (sif_emulator.stack.start_api): serve the API on 127.0.0.1:`port`."""
    return LocalApiGateway(stack, port).start()
