"""Completion callbacks on the wire: the signature, and one delivery attempt that cannot be turned on us.

A callback is a POST signed with HMAC-SHA256 over "{timestamp}.{body}" under the tenant's own callback
secret (`sif_core.tenants`). This module makes one attempt; the retries are the callbacks queue's
(`sif_core.announce.CallbackSender`), so a slow or hanging receiver costs the callback function one
timeout, never a worker's time.

What a callback_url cannot make us do (outside the local stack, `settings.local`, which may call 127.0.0.1):
- reach a private address: the host is resolved once, and every address it resolves to must be public;
- be rebound between the check and the connection: we connect to the address that was checked (the
  hostname still goes in the Host header and, for https, in SNI and the certificate check);
- be redirected: redirects are never followed, a 3xx is a failed delivery and is not retried.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import http.client
import ipaddress
import logging
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from sif_core.settings import Settings

log = logging.getLogger("sif.callbacks")

SIGNATURE_HEADER = "X-Sif-Signature"
TIMESTAMP_HEADER = "X-Sif-Timestamp"
EVENT_HEADER = "X-Sif-Event"
USER_AGENT = "sif-callbacks/2"
DEFAULT_PORTS = {"http": 80, "https": 443}
TOTAL_TIMEOUTS = 3  # one attempt lasts at most this many per-operation timeouts


def check_callback_url(value: str | None) -> str | None:
    """A callback_url must be http(s) with a host (where it points is checked again at delivery)."""
    if value is not None and not re.match(r"^https?://[^\s/?#]+", value):
        raise ValueError("callback_url must be an http(s) URL")
    return value


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The callback signature: hex HMAC-SHA256 of "{timestamp}.{body}" under the callback secret."""
    digest = hmac.new(secret.encode("utf-8"), timestamp.encode("ascii") + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def verify_signature(secret: str, headers: dict[str, str], body: bytes, *, max_age_s: float = 300) -> bool:
    """What a receiver does: recompute the signature and reject stale timestamps (replays)."""
    lower = {k.lower(): v for k, v in headers.items()}
    timestamp, signature = lower.get(TIMESTAMP_HEADER.lower(), ""), lower.get(SIGNATURE_HEADER.lower(), "")
    if not timestamp.isdigit() or abs(time.time() - int(timestamp)) > max_age_s:
        return False
    return hmac.compare_digest(sign(secret, timestamp, body), signature)


def signed_headers(secret: str, body: bytes, event_type: str, *, now: float | None = None) -> dict[str, str]:
    timestamp = str(int(time.time() if now is None else now))
    return {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        TIMESTAMP_HEADER: timestamp,
        SIGNATURE_HEADER: sign(secret, timestamp, body),
        EVENT_HEADER: event_type,
    }


# ---------------------------------------------------------------------- policy
@dataclass(frozen=True)
class CallbackPolicy:
    timeout_s: float = 5.0  # per socket operation: connect, send, each read of the answer's head
    # Off in AWS: a callback must not reach the function's own network (127.0.0.1, 169.254.x, the VPC).
    allow_private_hosts: bool = False
    # Backoff between receives of a callback message: base, 2 x base, 4 x base, ... at most max.
    base_delay_s: float = 5.0
    max_delay_s: float = 900.0

    def retry_delay(self, attempt: int) -> float:
        """How long to wait after failed attempt number `attempt` (1-based)."""
        return float(min(self.max_delay_s, self.base_delay_s * 2 ** max(0, attempt - 1)))


def callback_policy_for(settings: Settings) -> CallbackPolicy:
    """On the local stack (settings.local) callbacks may reach 127.0.0.1; anywhere else only public hosts."""
    return CallbackPolicy(
        timeout_s=settings.callback_timeout_s,
        allow_private_hosts=settings.local,
        base_delay_s=settings.callback_retry_base_s,
        max_delay_s=settings.callback_retry_max_s,
    )


# ---------------------------------------------------------------------- one attempt
Resolver = Callable[[str, int], list[str]]  # (host, port) -> its addresses, in the resolver's order
Connector = Callable[[str, int, float], socket.socket]  # (address, port, timeout) -> a connected socket


def system_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    addresses: list[str] = []
    for info in infos:
        address = str(info[4][0])
        if address not in addresses:
            addresses.append(address)
    return addresses


def tcp_connect(address: str, port: int, timeout: float) -> socket.socket:
    return socket.create_connection((address, port), timeout=timeout)


class CallbackRefusedError(Exception):
    """The callback_url may not be called (not http(s), no host, a private address): final, never retried."""


@dataclass(frozen=True)
class Target:
    """Where one attempt goes: `address` is the one address that was checked, `host` the URL's hostname."""

    scheme: Literal["http", "https"]
    host: str
    port: int
    path: str
    address: str


def target_for(url: str, policy: CallbackPolicy, resolve: Resolver = system_resolver) -> Target:
    """Resolve the URL's host once and check what it resolved to; CallbackRefusedError if it may not be called."""
    parts = urlsplit(url)
    scheme, host = parts.scheme.lower(), parts.hostname
    if scheme not in DEFAULT_PORTS or not host:
        raise CallbackRefusedError("not an http(s) URL with a host")
    try:
        port = parts.port or DEFAULT_PORTS[scheme]
    except ValueError as exc:
        raise CallbackRefusedError(f"bad port: {exc}") from exc
    try:
        addresses = [ipaddress.ip_address(a.split("%", 1)[0]) for a in resolve(host, port)]
    except (OSError, ValueError) as exc:
        raise CallbackRefusedError(f"{host} does not resolve: {exc}") from exc
    if not addresses:
        raise CallbackRefusedError(f"{host} does not resolve")
    if not policy.allow_private_hosts and not all(a.is_global for a in addresses):
        raise CallbackRefusedError(f"{host} is not a public address")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Target(
        scheme="https" if scheme == "https" else "http", host=host, port=port, path=path, address=str(addresses[0])
    )


class _PinnedConnection(http.client.HTTPConnection):
    """An HTTP(S) connection to a given address, speaking for the target's hostname (Host, SNI, certificate)."""

    def __init__(self, target: Target, timeout: float, connect: Connector) -> None:
        super().__init__(target.host, target.port, timeout=timeout)
        self.default_port = DEFAULT_PORTS[target.scheme]  # Host: carries the port only when it is not the default
        self._target = target
        self._timeout_s = timeout
        self._connect = connect

    def connect(self) -> None:
        sock = self._connect(self._target.address, self._target.port, self._timeout_s)
        if self._target.scheme == "https":
            context = ssl.create_default_context()  # certificate and hostname checked against target.host
            sock = context.wrap_socket(sock, server_hostname=self._target.host)
        self.sock = sock


def post_once(target: Target, body: bytes, headers: dict[str, str], timeout: float, connect: Connector) -> int:
    """One POST to the pinned target; the answer's status (its body is not read, redirects not followed).

    `timeout` bounds each socket operation, and the whole attempt is cut off after TOTAL_TIMEOUTS of them,
    so a receiver dripping its answer a byte at a time cannot hold the callback function either."""
    conn = _PinnedConnection(target, timeout, connect)
    watchdog = threading.Timer(timeout * TOTAL_TIMEOUTS, _cut_off, args=(conn,))
    watchdog.daemon = True
    watchdog.start()
    try:
        conn.request("POST", target.path, body=body, headers=headers)
        return int(conn.getresponse().status)
    finally:
        watchdog.cancel()
        conn.close()


def _cut_off(conn: http.client.HTTPConnection) -> None:
    sock = conn.sock
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


Outcome = Literal["delivered", "retry", "final"]


@dataclass(frozen=True)
class DeliveryResult:
    outcome: Outcome  # delivered (2xx); retry (network error, timeout, 408, 429, 5xx); final (anything else)
    status: int | None = None
    detail: str = ""


def classify(status: int) -> Outcome:
    if 200 <= status < 300:
        return "delivered"
    if status in (408, 429) or status >= 500:
        return "retry"
    return "final"  # 3xx (never followed), 4xx: the receiver said no


def deliver(
    url: str,
    body: bytes,
    headers: dict[str, str],
    policy: CallbackPolicy,
    *,
    resolve: Resolver = system_resolver,
    connect: Connector = tcp_connect,
) -> DeliveryResult:
    """One attempt to POST `body` to `url`. Never raises: a callback cannot fail the work it reports on."""
    try:
        target = target_for(url, policy, resolve)
    except CallbackRefusedError as exc:
        log.warning("callback to %s refused: %s", url, exc)
        return DeliveryResult("final", detail=f"refused: {exc}")
    try:
        status = post_once(target, body, headers, policy.timeout_s, connect)
    except (OSError, http.client.HTTPException) as exc:  # timeouts and TLS errors are OSErrors
        log.warning("callback to %s failed: %r", url, exc)
        return DeliveryResult("retry", detail=f"{type(exc).__name__}: {exc}"[:300])
    outcome = classify(status)
    if outcome != "delivered":
        log.warning("callback to %s answered %d (%s)", url, status, outcome)
    detail = "redirects are not followed" if 300 <= status < 400 else ""
    return DeliveryResult(outcome, status, detail)
