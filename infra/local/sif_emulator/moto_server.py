"""The AWS emulator of the local stack: moto's server on 127.0.0.1, behaving like AWS where users can tell.

Clients reach it with `AWS_ENDPOINT_URL=<endpoint_url>` and any dummy credentials. On top of moto:
presigned (query-string SigV4) URLs are verified as S3 verifies them, against the credentials the
stack signs with (`awsemu_presigned`); request bodies are stored as sent whatever their
Content-Type; DynamoDB writes are serialised and transactions cheap (`awsemu_internals`, the one
module that touches moto's and botocore's internals). A busy port is a clear `PortInUseError` at
once, never a hang (moto's own ThreadedMotoServer waits forever when its thread fails to bind, and
werkzeug exits the process on a bind error).

`python -m sif_emulator.moto_server -p PORT` serves the same app in a process of its own.
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

from sif_emulator.moto_patches import (
    make_server,
    serialize_dynamodb_writes,
    server_app,
    speed_up_dynamodb_transactions,
)
from sif_emulator.presigned import PresignedUrlCheck, SigningCredentials

log = logging.getLogger("sif_emulator.moto_server")

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


def signing_credentials() -> list[SigningCredentials]:
    """The identities presigned URLs are verified against: the credentials the stack gives its
    functions (`aws_client_env`), so the URLs they presign work and an edited one does not."""
    return [
        SigningCredentials(
            access_key=DUMMY_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            secret_key=DUMMY_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            token=DUMMY_CREDENTIALS["AWS_SESSION_TOKEN"],
        )
    ]


def emulator_app() -> Any:
    """The WSGI app the emulator serves: moto's server behind S3's presigned-URL checks."""
    speed_up_dynamodb_transactions()
    serialize_dynamodb_writes()
    return PresignedUrlCheck(server_app(), signing_credentials())


def aws_client_env(endpoint_url: str, region: str = "us-east-1") -> dict[str, str]:
    """Environment for boto3 clients (and child processes) that talk to the emulator."""
    return {
        "AWS_ENDPOINT_URL": endpoint_url,
        "AWS_DEFAULT_REGION": region,
        "AWS_REGION": region,
        **DUMMY_CREDENTIALS,
    }


class AwsEmulator:
    """moto's server bound to 127.0.0.1:`port` (SIF_AWS_PORT, default 5000; 0 picks a free one).

    In-process by default (a werkzeug server thread); `in_process=False` runs the same app as a child
    process (`python -m sif_emulator.moto_server`) instead, which keeps moto off this process's GIL.
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
        # One line per request from werkzeug is noise here.
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        try:
            server = make_server(self.host, self.port, emulator_app())
        except SystemExit as exc:  # werkzeug exits on bind errors (a race with another program)
            raise PortInUseError(self.port, "AWS emulator", "SIF_AWS_PORT") from exc
        self._server = server
        self.port = int(server.server_address[1])
        self._thread = threading.Thread(target=server.serve_forever, name="moto-server", daemon=True)
        self._thread.start()

    def _start_process(self) -> None:
        if self.port == 0:
            self.port = free_port(self.host)
        cmd = [sys.executable, "-m", "sif_emulator.moto_server", "-H", self.host, "-p", str(self.port)]
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


def main(argv: list[str] | None = None) -> int:
    """`python -m sif_emulator.moto_server`: the emulator in a process of its own, until SIGTERM / Ctrl-C."""
    import argparse
    import signal

    parser = argparse.ArgumentParser(prog="python -m sif_emulator.moto_server", description=__doc__.splitlines()[0])
    parser.add_argument("-H", "--host", default=HOST)
    parser.add_argument("-p", "--port", type=int, default=DEFAULT_AWS_PORT)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    emulator = AwsEmulator(args.port, host=args.host)
    try:
        emulator.start()
    except PortInUseError as exc:
        print(f"sif_emulator.moto_server: {exc}", file=sys.stderr)
        return 1
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass
    emulator.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
