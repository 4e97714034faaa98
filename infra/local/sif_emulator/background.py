"""`sif up --background` and `sif down`: a local stack as a background process, found by its pid file.

Every `sif up` writes `<state dir>/sif.pid` while it runs (and refuses to start when a live stack
already holds that state dir: two stacks saving to one `.local/state/` would overwrite each other).
`--background` starts `sif up` detached, its output in `<state dir>/logs/sif-up.log`, and returns once
the stack's `stack.json` names it (ready) or it has exited (failed: the log's end is shown); meanwhile
(under a minute) the log's steps are echoed, one line each.
`sif down` sends that process SIGTERM, which stops the stack as Ctrl-C does (saving its state), and
waits for it to exit.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

PID_FILE = "sif.pid"
UP_LOG = "logs/sif-up.log"
# A log record of `sif up` (cli._setup_logging's format): its message is a step worth echoing.
_LOG_RECORD = re.compile(r"^\S+ \S+ (?:INFO|WARNING|ERROR) [\w.]+: (.*)$")


class StackAlreadyRunning(RuntimeError):
    """Another live `sif up` holds this state dir."""


class BackgroundStartFailed(RuntimeError):
    """The background `sif up` exited, or did not get ready in time."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive, but not ours
        return True
    return True


def _looks_like_sif(pid: int) -> bool:
    """Whether `pid` runs `sif up` (a pid file can outlive its process, and the pid be reused)."""
    cmdline = Path(f"/proc/{pid}/cmdline")
    if not cmdline.exists():
        return _alive(pid)  # no /proc (macOS): trust the pid file
    try:
        args = cmdline.read_bytes().split(b"\0")
    except OSError:
        return False
    return any(b"sif" in a for a in args) and b"up" in args


def running_pid(state_dir: str | Path) -> int | None:
    """The pid of the live `sif up` that holds `state_dir`, or None."""
    path = Path(state_dir) / PID_FILE
    try:
        pid = int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    if pid == os.getpid() or (_alive(pid) and _looks_like_sif(pid)):
        return pid
    return None


@contextlib.contextmanager
def pid_file(state_dir: str | Path) -> Iterator[Path]:
    """Hold `state_dir` for this process while inside the block (StackAlreadyRunning if taken)."""
    state = Path(state_dir)
    other = running_pid(state)
    if other is not None and other != os.getpid():
        raise StackAlreadyRunning(
            f"a local stack (pid {other}) is already running from {state}; stop it first (`make down` / `sif down`)"
        )
    state.mkdir(parents=True, exist_ok=True)
    path = state / PID_FILE
    path.write_text(f"{os.getpid()}\n")
    try:
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError, ValueError):
            if int(path.read_text().strip()) == os.getpid():
                path.unlink()


class _LogEcho:
    """Echo the steps a growing log file records (its log records' messages), from where it is now."""

    def __init__(self, path: Path, stream: IO[str] | None) -> None:
        self.path, self.stream = path, stream
        self.offset = path.stat().st_size if path.exists() else 0
        self.partial = b""

    def poll(self) -> None:
        if self.stream is None:
            return
        data = b""
        with contextlib.suppress(FileNotFoundError), self.path.open("rb") as fh:
            fh.seek(self.offset)
            data = fh.read()
        self.offset += len(data)
        *lines, self.partial = (self.partial + data).split(b"\n")
        for line in lines:
            match = _LOG_RECORD.match(line.decode(errors="replace"))
            if match:
                self.stream.write(f"  {match.group(1)}\n")
                self.stream.flush()


def start_background(
    up_args: Sequence[str],
    state_dir: str | Path,
    *,
    timeout_s: float = 900.0,
    env: dict[str, str] | None = None,
    progress: IO[str] | None = None,
) -> dict[str, Any]:
    """Run `sif up <up_args>` detached; return its stack.json once ready. `up_args` must name
    `state_dir` (--state-dir) when it is not the default. Its steps are echoed to `progress`."""
    state = Path(state_dir)
    other = running_pid(state)
    if other is not None:
        raise StackAlreadyRunning(
            f"a local stack (pid {other}) is already running from {state}; stop it first (`make down` / `sif down`)"
        )
    log_path = state / UP_LOG
    log_path.parent.mkdir(parents=True, exist_ok=True)
    stack_json = state / "stack.json"
    if progress is not None:
        progress.write(f"starting the local stack in the background (under a minute; its log: {log_path})\n")
        progress.flush()
    with log_path.open("ab") as log_file:
        log_file.write(f"\n--- sif up --background at {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        log_file.flush()
        echo = _LogEcho(log_path, progress)
        proc = subprocess.Popen(
            [sys.executable, "-m", "sif_cli.main", "up", *up_args],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # not stopped by the terminal's Ctrl-C; `sif down` stops it
            env=env,
        )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        echo.poll()
        code = proc.poll()
        if code is not None:
            raise BackgroundStartFailed(f"sif up exited with {code}:\n{_tail(log_path)}")
        with contextlib.suppress(FileNotFoundError, ValueError):
            info: dict[str, Any] = json.loads(stack_json.read_text())
            if info.get("pid") == proc.pid:
                echo.poll()
                return info
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    raise BackgroundStartFailed(f"sif up did not get ready within {timeout_s:.0f} s:\n{_tail(log_path)}")


def stop_background(state_dir: str | Path, *, timeout_s: float = 120.0, progress: IO[str] | None = None) -> int | None:
    """SIGTERM the `sif up` holding `state_dir` and wait for it to exit; its pid, or None if none ran."""
    pid = running_pid(state_dir)
    if pid is None:
        with contextlib.suppress(FileNotFoundError):
            (Path(state_dir) / PID_FILE).unlink()  # a stale one
        return None
    if progress is not None:
        progress.write(f"stopping the local stack (pid {pid}) and saving its state (10-20 s) ...\n")
        progress.flush()
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while _alive(pid) and _looks_like_sif(pid) and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # our own child (tests): reap it, or it stays a zombie
        time.sleep(0.2)
    if _alive(pid) and _looks_like_sif(pid):
        raise TimeoutError(f"the local stack (pid {pid}) did not stop within {timeout_s:.0f} s")
    return pid


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except FileNotFoundError:
        return "  (no log)"
    return "\n".join(f"  | {line}" for line in text)
