"""Completion callbacks: a POST signed with HMAC-SHA256 over "{timestamp}.{body}", retried with backoff.

Only public hosts are called (the local stack, `settings.local`, may call 127.0.0.1); a callback that
keeps failing never fails the work it reports on.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from sif_core.settings import Settings

log = logging.getLogger("sif.callbacks")

SIGNATURE_HEADER = "X-Sif-Signature"
TIMESTAMP_HEADER = "X-Sif-Timestamp"
EVENT_HEADER = "X-Sif-Event"


def check_callback_url(value: str | None) -> str | None:
    """A callback_url must be http(s) with a host (where it points is checked again at delivery)."""
    import re

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


HttpPost = Callable[[str, bytes, dict[str, str], float], int]


def urllib_post(url: str, body: bytes, headers: dict[str, str], timeout: float) -> int:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")  # noqa: S310 - http(s) checked
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:  # noqa: S310
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


@dataclass
class CallbackPolicy:
    attempts: int = 4
    base_delay_s: float = 0.5
    max_delay_s: float = 4.0
    timeout_s: float = 5.0
    # Off in AWS: a callback must not reach the function's own network (127.0.0.1, 169.254.x, the VPC).
    allow_private_hosts: bool = False


def callback_policy_for(settings: Settings) -> CallbackPolicy | None:
    """Callbacks are signed, so they go out only with a configured secret (None: no callbacks); on the
    local stack (settings.local) they may call back to 127.0.0.1."""
    if settings.secret() is None:
        return None
    return CallbackPolicy(allow_private_hosts=settings.local)


def public_host(url: str) -> bool:
    """Whether every address the URL's host resolves to is a public one."""
    host = urlsplit(url).hostname
    if not host:
        return False
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return False
    addresses = {ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos}
    return bool(addresses) and all(a.is_global for a in addresses)


def deliver_callback(
    url: str,
    payload: dict[str, Any],
    secret: str,
    *,
    post: HttpPost = urllib_post,
    policy: CallbackPolicy | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> bool:
    """POST the payload, signed; retry network errors, 408, 429 and 5xx with exponential backoff.

    Returns whether the receiver took it (2xx). Never raises: a callback cannot fail a job.
    """
    policy = policy or CallbackPolicy()
    if not policy.allow_private_hosts and not public_host(url):
        log.warning("callback to %s refused: its host is not a public address", url)
        return False
    body = json.dumps(payload, separators=(",", ":")).encode("utf-8")
    for attempt in range(1, policy.attempts + 1):
        timestamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "sif-jobs/1",
            TIMESTAMP_HEADER: timestamp,
            SIGNATURE_HEADER: sign(secret, timestamp, body),
            EVENT_HEADER: str(payload.get("type") or f"job.{payload.get('status', 'unknown')}"),
        }
        try:
            status = post(url, body, headers, policy.timeout_s)
        except Exception as exc:  # noqa: BLE001 - any transport error is a retry, never a job failure
            log.warning("callback to %s failed (attempt %d/%d): %s", url, attempt, policy.attempts, exc)
        else:
            if 200 <= status < 300:
                return True
            retryable = status in (408, 429) or status >= 500
            log.warning("callback to %s answered %d (attempt %d/%d)", url, status, attempt, policy.attempts)
            if not retryable:
                return False
        if attempt < policy.attempts:
            sleep(min(policy.max_delay_s, policy.base_delay_s * 2 ** (attempt - 1)))
    return False
