"""`sif batches ...` and `sif jobs list|status|cancel`: the caller's batches and jobs, through the HTTP API.

Like `sif score` and `sif usage`, these talk to the API as any user would (no AWS credentials): the
URL and key come from --api-url / --key, else $SIF_API_URL / $SIF_KEY, else the running local stack's
stack.json (its demo tenant). Tables by default, the API's own JSON with --json.

sif batches list [--status S] [--limit N] [--after CURSOR]     newest first
sif batches status ID
sif batches fetch ID [--out DIR]       waits for the batch to end (with a progress bar), then saves its
                                       predictions.jsonl, errors.jsonl, manifest.json via the presigned URLs
sif batches cancel ID
sif jobs list|status|cancel ...        the same for jobs
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.parse
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from sif_cli.score import ProgressBar, ScoreError, _api, _download, resolve_api, wait_for_batch
from sif_core.work import TERMINAL

Kind = Literal["batch", "job"]
STATUSES = ("queued", "running", "succeeded", "failed", "cancelled", "expired")
PLURAL = {"batch": "batches", "job": "jobs"}
# What `fetch` downloads: the status field with the presigned URL -> the file it is saved as.
BATCH_FILES = (("result_url", "predictions.jsonl"), ("errors_url", "errors.jsonl"), ("manifest_url", "manifest.json"))


# ---------------------------------------------------------------------- parser
def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the API's JSON as is")
    parser.add_argument("--api-url", default=None, help="default: $SIF_API_URL or the local stack's")
    parser.add_argument("--key", default=None, help="API key (default: $SIF_KEY or the local stack's demo key)")


def add_actions(sub: Any, kind: Kind) -> None:
    """list, status, cancel (and fetch for batches) under `sif batches` / `sif jobs`."""
    plural = PLURAL[kind]
    listing = sub.add_parser("list", help=f"your {plural}, newest first")
    listing.add_argument("--status", choices=STATUSES, default=None, help="only this status")
    listing.add_argument("--limit", type=int, default=20, help="how many (1-100, default 20)")
    listing.add_argument("--after", default=None, help="the cursor a previous page printed")
    _common(listing)
    listing.set_defaults(func=cmd_list, kind=kind)

    status = sub.add_parser("status", help=f"one {kind}'s status")
    status.add_argument("id")
    _common(status)
    status.set_defaults(func=cmd_status, kind=kind)

    cancel = sub.add_parser("cancel", help=f"cancel a {kind} that has not ended")
    cancel.add_argument("id")
    _common(cancel)
    cancel.set_defaults(func=cmd_cancel, kind=kind)

    if kind == "batch":
        fetch = sub.add_parser("fetch", help="wait for a batch to end, then download its predictions, errors, manifest")
        fetch.add_argument("id")
        fetch.add_argument("--out", type=Path, default=None, help="where the files go (default: ./ID/)")
        fetch.add_argument("--no-wait", action="store_true", help="do not wait for a batch that has not ended")
        fetch.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the batch")
        _common(fetch)
        fetch.set_defaults(func=cmd_fetch, kind=kind)


# ---------------------------------------------------------------------- rendering
def _when(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return "-"
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _counts(item: dict[str, Any]) -> str:
    if "succeeded" in item:  # a batch
        return f"{item.get('rows', 0)} rows, {item.get('failed', 0)} failed"
    rows = item.get("rows")
    return "-" if rows is None else f"{rows} rows"


def render_list(page: dict[str, Any]) -> str:
    cols = f"{'id':<24} {'status':<10} {'model':<20} {'route':<5} {'progress':>8}  {'counts':<24} {'created (UTC)':<19}"
    lines = [cols, "-" * len(cols)]
    for item in page.get("data", []):
        lines.append(
            f"{item['id']:<24} {item['status']:<10} {item.get('model', ''):<20} {item.get('route', ''):<5} "
            f"{float(item.get('progress') or 0) * 100:>7.1f}%  {_counts(item):<24} {_when(item.get('created_at')):<19}"
        )
    if not page.get("data"):
        lines.append("(none)")
    return "\n".join(lines)


def render_one(item: dict[str, Any]) -> str:
    lines = []
    for key, value in item.items():
        if value is None:
            continue
        if key.endswith("_at") and isinstance(value, int | float):
            value = _when(value) + " UTC"
        elif key == "progress":
            value = f"{float(value) * 100:.1f}%"
        lines.append(f"{key + ':':<14} {value}")
    return "\n".join(lines)


# ---------------------------------------------------------------------- commands
def _run(args: argparse.Namespace, action: str, call: Any) -> int:
    try:
        return int(call(*resolve_api(args)))
    except (ScoreError, OSError) as exc:  # OSError: URLError, a missing stack.json, a file not written
        print(f"sif {PLURAL[args.kind]} {action}: {exc}", file=sys.stderr)
        return 1


def _url(api: str, kind: Kind, id_: str = "", action: str = "") -> str:
    path = f"{api}/v1/{PLURAL[kind]}"
    if id_:
        path += "/" + urllib.parse.quote(id_, safe="")
    return path + (f"/{action}" if action else "")


def cmd_list(args: argparse.Namespace) -> int:
    def call(api: str, key: str) -> int:
        query = {"limit": args.limit, "status": args.status, "after": args.after}
        suffix = urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        page = _api("GET", f"{_url(api, args.kind)}?{suffix}", key)
        print(json.dumps(page, indent=2) if args.json else render_list(page))
        if not args.json and page.get("has_more"):
            print(f"more: sif {PLURAL[args.kind]} list --after {page.get('next_cursor')}", file=sys.stderr)
        return 0

    return _run(args, "list", call)


def cmd_status(args: argparse.Namespace) -> int:
    def call(api: str, key: str) -> int:
        item = _api("GET", _url(api, args.kind, args.id), key)
        print(json.dumps(item, indent=2) if args.json else render_one(item))
        return 0

    return _run(args, "status", call)


def cmd_cancel(args: argparse.Namespace) -> int:
    def call(api: str, key: str) -> int:
        item = _api("POST", _url(api, args.kind, args.id, "cancel"), key)
        print(json.dumps(item, indent=2) if args.json else f"{args.kind} {item['id']}: {item['status']}")
        return 0

    return _run(args, "cancel", call)


def cmd_fetch(args: argparse.Namespace) -> int:
    def call(api: str, key: str) -> int:
        item = _api("GET", _url(api, args.kind, args.id), key)
        if item.get("status") not in TERMINAL and not args.no_wait:
            print(f"batch {item['id']} is {item.get('status')}: waiting for it to end", file=sys.stderr, flush=True)
            item = wait_for_batch(api, key, item["id"], ProgressBar(sys.stderr), args.timeout)
        present = [(field, name) for field, name in BATCH_FILES if item.get(field)]
        if not present:
            raise ScoreError(f"batch {args.id} is {item.get('status')}: it has no results yet")
        out: Path = args.out or Path(args.id)
        out.mkdir(parents=True, exist_ok=True)
        saved = []
        for field, name in present:
            _download(item[field], out / name)
            saved.append(str(out / name))
        if args.json:
            print(json.dumps({"id": item["id"], "status": item["status"], "files": saved}, indent=2))
        else:
            print(f"batch {item['id']} ({item['status']}): saved {', '.join(name for _, name in present)} in {out}")
        return 0

    return _run(args, "fetch", call)
