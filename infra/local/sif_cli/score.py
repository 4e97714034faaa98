"""`sif score FILE --model M`: a file through the batch path, as any API user would send it.

POST /v1/batches, PUT the file to the presigned upload URL, poll GET /v1/batches/{id} with a
progress bar, then download predictions.jsonl, errors.jsonl and manifest.json next to the file
(`FILE.results/{batch id}/` unless --out says otherwise). Only the HTTP API and presigned URLs are used: no
AWS credentials needed. The API URL and key come from --api-url / --key, else $SIF_API_URL /
$SIF_KEY, else the running local stack's stack.json (its demo tenant).
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import IO, Any

from sif_core.rows import detect_format
from sif_core.work import TERMINAL

POLL_S = 0.5
BAR_WIDTH = 30


class ScoreError(Exception):
    """Something the user should read: the API's error message, a missing file, a timeout."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, help="a .jsonl or .csv file (optionally .gz)")
    parser.add_argument("--model", required=True, help="model name, e.g. all-minilm-l6-v2")
    parser.add_argument("--accelerator", choices=("auto", "cpu", "gpu"), default="auto")
    parser.add_argument("--out", type=Path, default=None, help="where results go (default: FILE.results/{batch id}/)")
    parser.add_argument("--api-url", default=None, help="default: $SIF_API_URL or the local stack's")
    parser.add_argument("--key", default=None, help="API key (default: $SIF_KEY or the local stack's demo key)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the batch")
    parser.add_argument("--no-wait", action="store_true", help="upload and print the batch id, do not wait")


# ---------------------------------------------------------------------- HTTP
def _request(
    method: str, url: str, *, key: str | None = None, body: Any = None, data: IO[bytes] | None = None, size: int = 0
) -> tuple[int, bytes]:
    headers = {"Accept": "application/json"}
    payload: Any = None
    if key:
        headers["Authorization"] = f"Bearer {key}"
    if body is not None:
        payload = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    elif data is not None:
        payload = data
        headers["Content-Length"] = str(size)
        # urllib would say x-www-form-urlencoded, which servers may parse as a form
        headers["Content-Type"] = "application/octet-stream"
    req = urllib.request.Request(url, data=payload, method=method, headers=headers)  # noqa: S310 - http(s) only
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:  # noqa: S310
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


def _api(method: str, url: str, key: str, body: Any = None) -> dict[str, Any]:
    status, raw = _request(method, url, key=key, body=body)
    try:
        data: dict[str, Any] = json.loads(raw or b"{}")
    except json.JSONDecodeError:
        data = {}
    if status >= 300:
        error = data.get("error", {}) if isinstance(data, dict) else {}
        raise ScoreError(f"{method} {url} -> {status}: {error.get('message') or raw[:200]!r}")
    return data


def _download(url: str, target: Path) -> None:
    tmp = target.with_name(target.name + ".part")
    with urllib.request.urlopen(url, timeout=300) as resp, open(tmp, "wb") as out:  # noqa: S310
        shutil.copyfileobj(resp, out, 1 << 20)
    tmp.replace(target)


# ---------------------------------------------------------------------- rows
def count_rows(path: Path, fmt: str) -> int | None:
    """The rows the scorer will read from `path` (blank lines are not rows; a CSV's header is not),
    counted locally so the progress bar can move by rows; None when the file cannot be read so."""
    try:
        with gzip.open(path, "rb") if fmt.endswith(".gz") else open(path, "rb") as raw:
            if fmt.startswith("jsonl"):
                return sum(1 for line in raw if line.strip())
            text = io.TextIOWrapper(raw, encoding="utf-8", errors="replace", newline="")
            records = (r for r in csv.reader(text) if r and any(c.strip() for c in r))
            return max(sum(1 for _ in records) - 1, 0)  # the first record is the header
    except (OSError, EOFError, zlib.error, csv.Error):
        return None  # the scorer will say what is wrong with it; the bar falls back to the API's progress


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


# ---------------------------------------------------------------------- progress
class ProgressBar:
    """One line: rows done / total, rate and ETA. It moves by rows (the total counted locally, when
    known; else the API's byte fraction) and reads 100 % only once the batch has ended."""

    def __init__(self, stream: IO[str], total: int | None = None) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.total = total
        self.last = ""
        self.last_print = 0.0
        self.started: tuple[float, int] | None = None  # (when, rows) at the first poll of a running batch
        self.moved: tuple[float, int] | None = None  # (when, rows) at the last poll where rows moved

    def _rate(self, rows: int, now: float) -> float | None:
        """Rows per second between the start and the last time the count moved: the scorer reports
        rows a window at a time, so time since then is not yet counted against the rate."""
        if self.started is None:
            return None
        if self.moved is None or rows != self.moved[1]:
            self.moved = (now, rows)
        (since, rows0), (when, moved_rows) = self.started, self.moved
        return (moved_rows - rows0) / (when - since) if when - since >= 1 and moved_rows > rows0 else None

    def render(self, status: dict[str, Any], now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        state = str(status.get("status"))
        rows = int(status.get("rows") or 0)
        if self.started is None and (state == "running" or rows):
            self.started = (now, rows)
        total = self.total
        if state == "succeeded":
            total = max(total or 0, rows)  # the scorer's count is the truth once it is done
            fraction = 1.0
        elif total:
            fraction = min(rows / total, 0.999)
        else:
            fraction = min(float(status.get("progress") or 0.0), 0.999)
        filled = round(fraction * BAR_WIDTH)
        counts = f"{rows:,}/{total:,} rows" if total else f"{rows:,} rows"
        parts = [f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {fraction * 100:5.1f}%", counts]
        rate = self._rate(rows, now)
        if rate:
            parts.append(f"{rate:,.0f} rows/s")
            if total and state not in TERMINAL and self.moved is not None:
                left = max(total - rows, 0) / rate - (now - self.moved[0])
                parts.append(f"ETA {_duration(max(left, 1))}")
        if self.started is not None and state in TERMINAL:
            parts.append(f"in {_duration(now - self.started[0])}")
        if status.get("failed"):
            parts.append(f"{status['failed']:,} failed")
        parts.append(state + (" (gpu)" if status.get("route") == "gpu" else ""))
        return "  ".join(parts)

    def show(self, status: dict[str, Any]) -> None:
        line = self.render(status)
        now = time.monotonic()
        if self.tty:
            self.stream.write("\r" + line.ljust(len(self.last)))
            self.stream.flush()
        elif line != self.last and (now - self.last_print >= 5 or status.get("status") in TERMINAL):
            self.stream.write(line + "\n")
            self.stream.flush()
            self.last_print = now
        self.last = line

    def done(self) -> None:
        if self.tty and self.last:
            self.stream.write("\n")
            self.stream.flush()


def wait_for_batch(
    url: str, key: str, batch_id: str, bar: ProgressBar, timeout_s: float, poll_s: float = POLL_S
) -> dict[str, Any]:
    """Poll GET /v1/batches/{id} until the batch has ended, showing `bar`; the last status."""
    deadline = time.monotonic() + timeout_s
    state: dict[str, Any] = {}
    try:
        while time.monotonic() < deadline:
            state = _api("GET", f"{url}/v1/batches/{batch_id}", key)
            bar.show(state)
            if state.get("status") in TERMINAL:
                return state
            time.sleep(poll_s)
    finally:
        bar.done()
    raise ScoreError(f"batch {batch_id} did not finish within {timeout_s:.0f} s (last: {state.get('status')})")


# ---------------------------------------------------------------------- the command
def resolve_api(args: argparse.Namespace) -> tuple[str, str]:
    url = args.api_url or os.environ.get("SIF_API_URL")
    key = args.key or os.environ.get("SIF_KEY")
    if not url or not key:
        from sif_emulator.stack import read_stack_json

        info = read_stack_json(getattr(args, "stack_json", None))
        url = url or info["api_url"]
        key = key or info.get("demo_api_key")
    if not key:
        raise ScoreError("no API key: pass --key or set SIF_KEY")
    return str(url).rstrip("/"), str(key)


def score(args: argparse.Namespace, *, err: IO[str] | None = None) -> dict[str, Any]:
    err = err or sys.stderr
    path: Path = args.file
    if not path.is_file():
        raise ScoreError(f"{path}: no such file")
    fmt = detect_format(path.name)
    if fmt is None:
        raise ScoreError(f"{path.name}: expected a .jsonl or .csv file, optionally .gz")
    url, key = resolve_api(args)
    size = path.stat().st_size
    if size > 64 << 20:
        print(f"counting the rows of {path.name} ({size / 1e6:,.0f} MB) ...", file=err, flush=True)
    total = count_rows(path, fmt)
    batch = _api(
        "POST", f"{url}/v1/batches", key, {"model": args.model, "format": fmt, "accelerator": args.accelerator}
    )
    rows = "" if total is None else f"{total:,} rows, "
    print(f"batch {batch['id']}: uploading {path.name} ({rows}{size:,} bytes)", file=err, flush=True)
    with open(path, "rb") as fh:
        status, raw = _request("PUT", batch["upload_url"], data=fh, size=size)
    if status >= 300:
        raise ScoreError(f"upload failed with {status}: {raw[:300]!r}")
    if args.no_wait:
        return {"id": batch["id"], "status": "queued"}
    state = wait_for_batch(url, key, batch["id"], ProgressBar(err, total), args.timeout)
    # Each run gets its own folder: FILE.results/{batch id}/ (the file's full name, so reviews.csv and
    # reviews.jsonl never share one, and a second run never overwrites the first).
    out: Path = args.out or path.with_name(path.name + ".results") / str(batch["id"])
    out.mkdir(parents=True, exist_ok=True)
    for field, name in (
        ("result_url", "predictions.jsonl"),
        ("errors_url", "errors.jsonl"),
        ("manifest_url", "manifest.json"),
    ):
        if state.get(field):
            _download(state[field], out / name)
    state["out"] = str(out)
    return state


def cmd_score(args: argparse.Namespace) -> int:
    try:
        state = score(args)
    except (ScoreError, FileNotFoundError, urllib.error.URLError) as exc:
        print(f"sif score: {exc}", file=sys.stderr)
        return 1
    if args.no_wait:
        print(state["id"])
        return 0
    if state["status"] != "succeeded":
        print(f"sif score: batch {state['id']} failed: {state.get('error')}", file=sys.stderr)
        return 1
    print(
        f"batch {state['id']}: {state['rows']:,} rows, {state['succeeded']:,} scored, {state['failed']:,} failed "
        f"(route {state['route']}); results in {state['out']}",
        file=sys.stderr,
    )
    print(Path(state["out"]) / "predictions.jsonl")
    return 0
