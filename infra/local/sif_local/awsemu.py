"""The AWS emulator of the local stack: moto's server on 127.0.0.1.

Clients reach it with `AWS_ENDPOINT_URL=<endpoint_url>` and any dummy credentials. A busy port is
a clear `PortInUseError` at once, never a hang (moto's own ThreadedMotoServer waits forever when
its thread fails to bind, and werkzeug exits the process on a bind error).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from types import TracebackType
from typing import IO, Any

log = logging.getLogger("sif_local.awsemu")

HOST = "127.0.0.1"
DEFAULT_AWS_PORT = 5000
DUMMY_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
}


class PortInUseError(RuntimeError):
    """The port the local stack wants is taken by another program."""

    def __init__(self, port: int, what: str, env_var: str | None = None) -> None:
        hint = f"; free it or set {env_var} to another port" if env_var else ""
        super().__init__(f"port {port} on {HOST} ({what}) is already in use{hint}")
        self.port = port


def port_from_env(env_var: str, default: int) -> int:
    raw = os.environ.get(env_var, "")
    if not raw:
        return default
    try:
        port = int(raw)
    except ValueError:
        raise ValueError(f"{env_var}={raw!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"{env_var}={raw!r} is not a port number")
    return port


def check_port_free(port: int, what: str, env_var: str | None = None, host: str = HOST) -> None:
    """Raise PortInUseError if `host:port` cannot be bound right now (port 0 always can)."""
    if port == 0:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Same option the servers use, so a port merely in TIME_WAIT does not count as busy.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                raise PortInUseError(port, what, env_var) from exc
            raise


def free_port(host: str = HOST) -> int:
    """A port that is free right now (for tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def aws_client_env(endpoint_url: str, region: str = "us-east-1") -> dict[str, str]:
    """Environment for boto3 clients (and child processes) that talk to the emulator."""
    return {
        "AWS_ENDPOINT_URL": endpoint_url,
        "AWS_DEFAULT_REGION": region,
        "AWS_REGION": region,
        **DUMMY_CREDENTIALS,
    }


_transaction_keys = threading.local()


def speed_up_dynamodb_transactions() -> None:
    """Make moto's TransactWriteItems cost O(items touched), not O(table size).

    moto snapshots every table a transaction names with copy.deepcopy before applying it (to roll
    back on a cancelled transaction), so each transaction gets slower as the table grows; a usage
    table with one marker per metered request crosses 50 ms within minutes. Here the snapshot is a
    shallow copy of the table that deep-copies only the items the transaction touches, which is
    all a rollback needs. Real DynamoDB has no such cost. Applies to the in-process emulator.
    """
    import copy

    from moto.dynamodb import models
    from moto.dynamodb.models.dynamo_type import DynamoType
    from moto.dynamodb.models.table import Table

    backend = models.DynamoDBBackend
    if getattr(backend.transact_write_items, "_sif_fast", False):
        return
    original = backend.transact_write_items

    def touched(self: Any, transact_items: list[dict[str, Any]]) -> dict[str, set[tuple[Any, Any]]] | None:
        keys: dict[str, set[tuple[Any, Any]]] = {}
        for item in transact_items:
            op_type, op = next(iter(item.items()))
            table = self.tables.get(op.get("TableName"))
            if table is None:
                return None
            attrs = op["Item"] if op_type == "Put" else op["Key"]
            hash_value = DynamoType(attrs[table.hash_key_attr])
            range_value = DynamoType(attrs[table.range_key_attr]) if table.range_key_attr else None
            keys.setdefault(table.name, set()).add((hash_value, range_value))
        return keys

    def snapshot(table: Any, keys: set[tuple[Any, Any]]) -> Any:
        snap = copy.copy(table)
        items = copy.copy(table.items)
        copied: set[Any] = set()
        for hash_value, range_value in keys:
            if hash_value not in table.items:
                continue
            if range_value is None:
                items[hash_value] = copy.deepcopy(table.items[hash_value])
                continue
            if hash_value not in copied:  # one copy of the inner dict per hash key
                items[hash_value] = dict(table.items[hash_value])
                copied.add(hash_value)
            if range_value in items[hash_value]:
                items[hash_value][range_value] = copy.deepcopy(items[hash_value][range_value])
        snap.items = items
        return snap

    class SnapshotCopy:
        """`copy` as moto.dynamodb.models sees it: a cheap snapshot of a table inside a transaction."""

        def __getattr__(self, name: str) -> Any:
            return getattr(copy, name)

        def deepcopy(self, obj: Any, memo: Any = None) -> Any:
            keys = getattr(_transaction_keys, "keys", None)
            if keys is not None and isinstance(obj, Table) and obj.name in keys:
                return snapshot(obj, keys[obj.name])
            return copy.deepcopy(obj, memo)

    def transact_write_items(self: Any, transact_items: list[dict[str, Any]]) -> None:
        try:
            _transaction_keys.keys = touched(self, transact_items)
        except (KeyError, TypeError, StopIteration, AttributeError):
            _transaction_keys.keys = None  # malformed: moto's own path raises the right error
        try:
            original(self, transact_items)
        finally:
            _transaction_keys.keys = None

    transact_write_items._sif_fast = True  # type: ignore[attr-defined]
    models.copy = SnapshotCopy()  # type: ignore[assignment]
    backend.transact_write_items = transact_write_items  # type: ignore[method-assign]


_dynamodb_writes = threading.RLock()


def serialize_dynamodb_writes() -> None:
    """One DynamoDB write at a time in the in-process emulator, as DynamoDB's item-level atomicity
    and transaction isolation promise. moto's server is threaded and its writes read, modify and
    write items without a lock, so concurrent `ADD` updates of one counter could lose increments."""
    from moto.dynamodb import models

    backend = models.DynamoDBBackend
    for name in ("put_item", "update_item", "delete_item", "transact_write_items", "batch_write_item"):
        method = getattr(backend, name, None)
        if method is None or getattr(method, "_sif_serialized", False):
            continue

        def serialized(self: Any, *args: Any, __method: Any = method, **kwargs: Any) -> Any:
            with _dynamodb_writes:
                return __method(self, *args, **kwargs)

        serialized._sif_serialized = True  # type: ignore[attr-defined]
        setattr(backend, name, serialized)


class AwsEmulator:
    """moto's server bound to 127.0.0.1:`port` (SIF_AWS_PORT, default 5000; 0 picks a free one).

    In-process by default (a werkzeug server thread); `in_process=False` runs `python -m moto.server`
    as a child process instead, which keeps moto off this process's GIL.
    """

    def __init__(self, port: int | None = None, *, host: str = HOST, in_process: bool = True) -> None:
        self.host = host
        self.port = port_from_env("SIF_AWS_PORT", DEFAULT_AWS_PORT) if port is None else port
        self.in_process = in_process
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is None
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> AwsEmulator:
        if self.running:
            return self
        check_port_free(self.port, "AWS emulator", "SIF_AWS_PORT", self.host)
        if self.in_process:
            self._start_thread()
        else:
            self._start_process()
        log.info("AWS emulator (moto) listening on %s", self.endpoint_url)
        return self

    def _start_thread(self) -> None:
        from moto.moto_server.werkzeug_app import (
            DomainDispatcherApplication,
            MotoRequestHandler,
            create_backend_app,
        )
        from werkzeug.serving import make_server

        # One line per request from werkzeug is noise here.
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        speed_up_dynamodb_transactions()
        serialize_dynamodb_writes()
        app = DomainDispatcherApplication(create_backend_app)
        try:
            server = make_server(self.host, self.port, app, threaded=True, request_handler=MotoRequestHandler)
        except SystemExit as exc:  # werkzeug exits on bind errors (a race with another program)
            raise PortInUseError(self.port, "AWS emulator", "SIF_AWS_PORT") from exc
        self._server = server
        self.port = int(server.server_address[1])
        self._thread = threading.Thread(target=server.serve_forever, name="moto-server", daemon=True)
        self._thread.start()

    def _start_process(self) -> None:
        if self.port == 0:
            self.port = free_port(self.host)
        cmd = [sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(self.port)]
        # moto logs every request: a pipe nobody reads fills up and hangs the server, so use a file.
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()
        log_file = self._log
        self._proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log_file)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                log_file.seek(0)
                err = log_file.read().decode(errors="replace")
                if "in use" in err.lower():
                    raise PortInUseError(self.port, "AWS emulator", "SIF_AWS_PORT")
                raise RuntimeError(f"moto server exited with {self._proc.returncode}: {err.strip()}")
            if self.ready():
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"moto server did not answer on {self.endpoint_url} within 30 s")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.endpoint_url}/moto-api/", timeout=1) as resp:  # noqa: S310 - local
                return int(resp.status) < 500
        except OSError:
            return False

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self._log is not None:
            with contextlib.suppress(OSError):
                self._log.close()
            self._log = None

    def __enter__(self) -> AwsEmulator:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
