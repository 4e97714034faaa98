"""`sif callbacks listen`: a local receiver for job and batch callbacks, to see (and check) what sif sends.

It binds 127.0.0.1 (the local stack may call back 127.0.0.1; on AWS a callback_url must be public),
prints each POSTed event on one line and, given the tenant's callback secret (--secret), checks its
X-Sif-Signature as a receiver should (`sif_core.callbacks.verify_signature`): 204 when it verifies,
401 when not. `--once` exits after the first callback and `--timeout S` after S seconds (status 1 if
none came, or one did not verify), so a script can wait for its callback: `... --once --timeout 120 &`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

from sif_core.callbacks import EVENT_HEADER, verify_signature

HOST = "127.0.0.1"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, default=8765, help="port on 127.0.0.1 (default: 8765)")
    parser.add_argument("--secret", default=None, help="the tenant's callback secret: check X-Sif-Signature")
    parser.add_argument("--once", action="store_true", help="exit after the first callback")
    parser.add_argument("--timeout", type=float, default=None, help="stop after S seconds (status 1 if none came)")


class _Receiver(HTTPServer):
    secret: str | None = None
    received: list[bool]  # per callback: whether it verified (True when no secret was given)


class _Handler(BaseHTTPRequestHandler):
    server: _Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        secret = self.server.secret
        verified = secret is None or verify_signature(secret, dict(self.headers.items()), body)
        try:
            event: Any = json.loads(body)
        except json.JSONDecodeError:
            event = body[:200].decode("utf-8", "replace")
        check = "signature not checked (no --secret)" if secret is None else f"signature {'ok' if verified else 'BAD'}"
        print(f"callback {self.path} {self.headers.get(EVENT_HEADER, '-')} ({check}): {json.dumps(event)}", flush=True)
        self.send_response(204 if verified else 401)
        self.end_headers()
        self.server.received.append(verified)

    def do_GET(self) -> None:
        self.send_response(405)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per callback is printed above


def cmd_listen(args: argparse.Namespace) -> int:
    try:
        server = _Receiver((HOST, args.port), _Handler)
    except OSError as exc:
        print(f"sif callbacks listen: cannot listen on {HOST}:{args.port} ({exc.strerror})", file=sys.stderr)
        return 1
    server.secret, server.received = args.secret, []
    print(f"listening for callbacks on http://{HOST}:{server.server_port}/ (Ctrl-C stops)", file=sys.stderr, flush=True)
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    try:
        with server:
            while not (args.once and server.received):
                if deadline is not None and time.monotonic() >= deadline:
                    if not server.received:
                        print(f"sif callbacks listen: no callback within {args.timeout:.0f} s", file=sys.stderr)
                        return 1
                    break
                server.timeout = 0.5
                server.handle_request()
    except KeyboardInterrupt:
        pass
    return 0 if all(server.received) else 1
