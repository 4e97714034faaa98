"""`sif usage`: the caller's own usage, through GET /v1/usage like any API user (no AWS credentials)."""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.parse
from typing import Any

from sif_cli.score import ScoreError, _api, resolve_api


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="date_from", default=None, help="first day, YYYY-MM-DD (default: month start)")
    parser.add_argument("--to", dest="date_to", default=None, help="last day, YYYY-MM-DD (default: month end)")
    parser.add_argument("--json", action="store_true", help="print the API's JSON as is")
    parser.add_argument("--api-url", default=None, help="default: $SIF_API_URL or the local stack's")
    parser.add_argument("--key", default=None, help="API key (default: $SIF_KEY or the local stack's demo key)")


COLUMNS = ("calls", "inputs", "tokens", "pixels", "compute_ms", "cost_usd")
COST_DECIMALS = 8  # a text costs fractions of a cent: fixed decimals, never 4.132e-05


def _cell(column: str, value: Any) -> str:
    if column == "cost_usd":
        return f"{float(value or 0):>14.{COST_DECIMALS}f}"
    return f"{int(value or 0):>12}"


def render(usage: dict[str, Any]) -> str:
    period = usage.get("period", {})
    lines = [f"tenant {usage.get('tenant')}  {period.get('from')} .. {period.get('to')}", ""]
    header = f"{'model':<20} {'day':<10} " + " ".join(f"{c:>14}" if c == "cost_usd" else f"{c:>12}" for c in COLUMNS)
    lines += [header, "-" * len(header)]
    for row in usage.get("by_model_day", []):
        lines.append(f"{row['model']:<20} {row['day']:<10} " + " ".join(_cell(c, row.get(c)) for c in COLUMNS))
    total = usage.get("total", {})
    lines.append(f"{'total':<31} " + " ".join(_cell(c, total.get(c)) for c in COLUMNS))
    return "\n".join(lines)


def cmd_usage(args: argparse.Namespace) -> int:
    try:
        url, key = resolve_api(args)
        query = {k: v for k, v in (("from", args.date_from), ("to", args.date_to)) if v}
        suffix = "?" + urllib.parse.urlencode(query) if query else ""
        usage = _api("GET", f"{url}/v1/usage{suffix}", key)
    except (ScoreError, urllib.error.URLError, FileNotFoundError) as exc:
        print(f"sif usage: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(usage, indent=2) if args.json else render(usage))
    return 0
