"""`sif up --background` and `sif down`: a local stack as a background process, found by its pid file.

Every `sif up` writes `<state dir>/sif.pid` while it runs (and refuses to start when a live stack
already holds that state dir: two stacks saving to one `.local/state/` would overwrite each other).
`--background` starts `sif up` detached, its output in `<state dir>/logs/sif-up.log`, and returns once
the stack's `stack.json` names it (ready) or it has exited (failed: the log's end is shown).
`sif down` sends that process SIGTERM, which stops the stack as Ctrl-C does (saving its state), and
waits for it to exit.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

PID_FILE = "sif.pid"
UP_LOG = "logs/sif-up.log"


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


def start_background(
    up_args: Sequence[str], state_dir: str | Path, *, timeout_s: float = 900.0, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run `sif up <up_args>` detached; return its stack.json once ready. `up_args` must name
    `state_dir` (--state-dir) when it is not the default."""
    state = Path(state_dir)
    other = running_pid(state)
    if other is not None:
        raise StackAlreadyRunning(
            f"a local stack (pid {other}) is already running from {state}; stop it first (`make down` / `sif down`)"
        )
    log_path = state / UP_LOG
    log_path.parent.mkdir(parents=True, exist_ok=True)
    stack_json = state / "stack.json"
    with log_path.open("ab") as log_file:
        log_file.write(f"\n--- sif up --background at {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        log_file.flush()
        proc = subprocess.Popen(
            [sys.executable, "-m", "sif_local.cli", "up", *up_args],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # not stopped by the terminal's Ctrl-C; `sif down` stops it
            env=env,
        )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        code = proc.poll()
        if code is not None:
            raise BackgroundStartFailed(f"sif up exited with {code}:\n{_tail(log_path)}")
        with contextlib.suppress(FileNotFoundError, ValueError):
            info: dict[str, Any] = json.loads(stack_json.read_text())
            if info.get("pid") == proc.pid:
                return info
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    raise BackgroundStartFailed(f"sif up did not get ready within {timeout_s:.0f} s:\n{_tail(log_path)}")


def stop_background(state_dir: str | Path, *, timeout_s: float = 120.0) -> int | None:
    """SIGTERM the `sif up` holding `state_dir` and wait for it to exit; its pid, or None if none ran."""
    pid = running_pid(state_dir)
    if pid is None:
        with contextlib.suppress(FileNotFoundError):
            (Path(state_dir) / PID_FILE).unlink()  # a stale one
        return None
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
