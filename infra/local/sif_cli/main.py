"""`sif`: the local stack's command-line tool.

sif up [--background]               start the local stack in the foreground (Ctrl-C stops it), or in
                                    the background (`sif down` stops it); its state is kept in .local
sif down                            stop the local stack started in the background (saving its state)
sif tenant create NAME [--monthly-calls N]   a new tenant on the running stack; prints its API key (and,
                                    once, on stderr, its callback signing secret); a name already taken
                                    is refused unless --allow-duplicate
sif tenant rotate-callback-secret TENANT_ID   a new callback signing secret (printed once); the old one stops
sif tenant list                     tenants: id, name, plan, quota, status, keys (never a key or hash)
sif tenant keys TENANT_ID           a tenant's keys: public id, status, created, revoked
sif tenant add-key TENANT_ID        one more key for the tenant; prints it
sif tenant revoke-key TENANT_ID KEY_ID_OR_HASH_PREFIX   revoke one key
sif tenant rotate-key TENANT_ID [KEY_ID]   a new key; the old one (default: every active one) revoked
sif tenant disable|enable TENANT_ID no key of the tenant may call, nothing is billed to it / again
sif env                             shell exports for the running stack: API URL, demo key and tenant id,
                                    the emulator's endpoint and dummy credentials, bucket/queue names
sif jobs redrive [--max N]          move dead-lettered job messages back to the jobs queue
sif jobs list|status|cancel ...     your jobs, newest first; one job; cancel one (through the API)
sif batches list|status|fetch|cancel ...   the same for batches; fetch waits for a batch, then downloads its results
sif score FILE --model M [--no-wait]   upload a file as a batch, show its progress (rows), download the results
sif usage [--from D] [--to D]       the caller's usage and cost
sif callbacks listen [--port P] [--secret S] [--once]   a local receiver that prints (and checks) callbacks
sif models publish|list|show|alias|retire ...   the operator's models (sif_cli.models)
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sif_cli import callbacks as callbacks_cli
from sif_cli import models as models_cli
from sif_cli import score as score_cli
from sif_cli import usage as usage_cli
from sif_cli import work as work_cli
from sif_emulator.moto_server import PortInUseError, aws_client_env

log = logging.getLogger("sif_cli.main")

EXIT_OK = 0
EXIT_ERROR = 1


def _setup_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity < 0 else logging.INFO if verbosity == 0 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if verbosity < 2:
        for noisy in ("botocore", "boto3", "urllib3", "s3transfer", "werkzeug"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    if verbosity < 1:  # `sif models publish` prints its own summary; the library's log line repeats it
        logging.getLogger("sif_modelbuild").setLevel(logging.WARNING)


def _error(message: str) -> int:
    print(f"sif: error: {message}", file=sys.stderr)
    return EXIT_ERROR


def _display_path(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _banner(running: Any) -> None:
    stack = running.stack
    _print_banner(
        stack.api_url,
        stack.aws_endpoint_url,
        stack.demo_api_key,
        [f"{m.name}@{m.version}" for m in stack.models],
        stack.stack_json_path,
    )


def _print_banner(
    api: str, aws: str, key: str | None, model_names: list[str], stack_json: Path, *, pid: int | None = None
) -> None:
    models = ", ".join(model_names) or "none published"
    lines = [
        "",
        "sif local stack is up" + (f" in the background (pid {pid})" if pid else ""),
        f"  API            {api}",
        f"  AWS emulator   {aws}   (AWS_ENDPOINT_URL=..., any credentials)",
        f"  demo API key   {key}",
        f"  models         {models}",
        f"  stack file     {_display_path(stack_json)}",
        f"  local state    {_display_path(stack_json.parent)} (kept across restarts; `make clean` drops it)",
        "",
        "Try, in another terminal in this clone (the README's examples go on from there):",
        '  source .venv/bin/activate && eval "$(sif env)"   # sif on PATH; SIF_API_URL, SIF_KEY (this demo key), ...',
        f"  curl -s {api}/health",
        f'  curl -s -H "Authorization: Bearer $SIF_KEY" {api}/v1/models',
        f'  curl -s -H "Authorization: Bearer $SIF_KEY" -H "Content-Type: application/json" \\\n'
        f'       -d \'{{"model": "all-minilm-l6-v2", "input": "hello world"}}\' {api}/v1/embeddings',
        f'  curl -s -H "x-api-key: $SIF_KEY" -H "Content-Type: application/json" \\\n'
        f'       -d \'{{"instances": ["a sentence to embed"]}}\' {api}/v1/models/all-minilm-l6-v2/predict',
        f'  curl -s -H "Authorization: Bearer $SIF_KEY" {api}/v1/usage',
        "  sif tenant create my-team --monthly-calls 10000   # a tenant of your own: prints its API key",
        "",
        "`make down` (sif down) stops it." if pid else "Ctrl-C (or SIGTERM) stops everything.",
        "",
    ]
    print("\n".join(lines), flush=True)


# ---------------------------------------------------------------------- commands
def cmd_up(args: argparse.Namespace) -> int:
    from sif_emulator.background import StackAlreadyRunning
    from sif_emulator.stack import DEFAULT_STATE_DIR, run_local_stack
    from sif_emulator.state import StateRestoreError

    if args.background:
        return _up_in_background(args)
    try:
        return run_local_stack(
            on_ready=_banner,
            api_port=args.api_port,
            aws_port=args.aws_port,
            models_dir=args.models_dir,
            state_dir=args.state_dir or DEFAULT_STATE_DIR,
            publish=not args.no_models,
        )
    except (PortInUseError, StackAlreadyRunning, StateRestoreError) as exc:
        return _error(str(exc))
    except FileNotFoundError as exc:
        return _error(f"{exc} (or pass --no-models)")
    except KeyboardInterrupt:
        return EXIT_OK


def _up_in_background(args: argparse.Namespace) -> int:
    from sif_emulator.background import BackgroundStartFailed, StackAlreadyRunning, start_background
    from sif_emulator.stack import DEFAULT_STATE_DIR, STACK_JSON

    state_dir = Path(args.state_dir or DEFAULT_STATE_DIR).resolve()
    up_args = ["--state-dir", str(state_dir)]
    for flag, value in (("--api-port", args.api_port), ("--aws-port", args.aws_port)):
        if value is not None:
            up_args += [flag, str(value)]
    if args.models_dir is not None:
        up_args += ["--models-dir", str(Path(args.models_dir).resolve())]
    if args.no_models:
        up_args.append("--no-models")
    try:
        info = start_background(up_args, state_dir, progress=sys.stderr)
    except (StackAlreadyRunning, BackgroundStartFailed) as exc:
        return _error(str(exc))
    models = [f"{m['name']}@{m['version']}" for m in info.get("models", [])]
    api, aws, key = info["api_url"], info["aws_endpoint_url"], info.get("demo_api_key")
    _print_banner(api, aws, key, models, state_dir / STACK_JSON, pid=int(info["pid"]))
    return EXIT_OK


def cmd_down(args: argparse.Namespace) -> int:
    from sif_emulator.background import stop_background
    from sif_emulator.stack import DEFAULT_STATE_DIR

    state_dir = Path(args.state_dir or DEFAULT_STATE_DIR)
    try:
        pid = stop_background(state_dir, timeout_s=args.timeout, progress=sys.stderr)
    except TimeoutError as exc:
        return _error(str(exc))
    if pid is None:
        print(f"no local stack is running from {_display_path(state_dir)}", flush=True)
    else:
        print(f"local stack (pid {pid}) stopped; its state is kept in {_display_path(state_dir)}", flush=True)
    return EXIT_OK


def _stack_clients(args: argparse.Namespace) -> tuple[dict[str, Any], Any]:
    from sif_emulator.stack import aws_session, read_stack_json

    info = read_stack_json(args.stack_json)
    endpoint = info.get("aws_endpoint_url") or os.environ.get("AWS_ENDPOINT_URL")
    session = aws_session(info.get("region", "us-east-1"))
    return info, (session, endpoint)


def cmd_tenant_create(args: argparse.Namespace) -> int:
    from botocore.exceptions import BotoCoreError, ClientError

    from sif_core.tenants import DELETED, create_tenant, list_tenants, new_callback_secret

    try:
        info, (session, endpoint) = _stack_clients(args)
    except FileNotFoundError as exc:
        return _error(str(exc))
    if args.monthly_calls is not None and args.monthly_calls < 0:
        return _error("--monthly-calls is a number of inputs per month (0 = unlimited), not negative")
    table = session.resource("dynamodb", endpoint_url=endpoint).Table(info["tables"]["tenants"])
    kwargs = {} if args.monthly_calls is None else {"monthly_calls": args.monthly_calls}
    callback_secret = new_callback_secret()
    try:
        if not args.allow_duplicate:  # a second "acme" is almost always a mistake (a re-run script)
            same = [
                line.tenant.tenant_id
                for line in list_tenants(table)
                if line.tenant.name == args.name and line.tenant.status != DELETED
            ]
            if same:
                return _error(
                    f"a tenant named {args.name!r} already exists ({', '.join(same)}); `sif tenant add-key "
                    f"{same[0]}` gives it another key, --allow-duplicate creates a second tenant of that name"
                )
        tenant, api_key = create_tenant(table, args.name, callback_secret=callback_secret, **kwargs)
    except (BotoCoreError, ClientError) as exc:
        return _error(f"the local stack at {endpoint} did not accept the tenant ({exc}); is `sif up` running?")
    quota = "unlimited" if tenant.monthly_calls == 0 else f"{tenant.monthly_calls} inputs/month"
    # stdout is the API key alone (SIF_KEY=$(sif tenant create x)); the secret is shown once, beside it
    print(
        f"created tenant {tenant.name!r} ({tenant.tenant_id}, {quota})\n"
        f"its callback signing secret (verify X-Sif-Signature with it; shown only now): {callback_secret}\n"
        "its API key:",
        file=sys.stderr,
    )
    print(api_key, flush=True)
    return EXIT_OK


def cmd_tenant_rotate_callback_secret(args: argparse.Namespace) -> int:
    from botocore.exceptions import BotoCoreError, ClientError

    from sif_core.tenants import TenantError, rotate_callback_secret

    try:
        info, (session, endpoint) = _stack_clients(args)
    except FileNotFoundError as exc:
        return _error(str(exc))
    table = session.resource("dynamodb", endpoint_url=endpoint).Table(info["tables"]["tenants"])
    try:
        secret = rotate_callback_secret(table, args.tenant_id)
    except TenantError as exc:
        return _error(str(exc))
    except (BotoCoreError, ClientError) as exc:
        return _error(f"the local stack at {endpoint} did not answer ({exc}); is `sif up` running?")
    print(
        f"new callback signing secret of tenant {args.tenant_id} (shown only now; callbacks signed from now on "
        "no longer verify with the old one):",
        file=sys.stderr,
    )
    print(secret, flush=True)
    return EXIT_OK


def _tenants_table(args: argparse.Namespace) -> tuple[Any, str]:
    """The running stack's tenants table (a boto3 Table) and the emulator's endpoint."""
    info, (session, endpoint) = _stack_clients(args)
    return session.resource("dynamodb", endpoint_url=endpoint).Table(info["tables"]["tenants"]), endpoint


def _when(epoch: int | None) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(epoch)) if epoch else "-"


def cmd_tenant_admin(args: argparse.Namespace) -> int:
    """list, keys, add-key, revoke-key, rotate-key, disable, enable: sif_core.tenants on the running stack."""
    from botocore.exceptions import BotoCoreError, ClientError

    from sif_core import tenants

    try:
        table, endpoint = _tenants_table(args)
    except FileNotFoundError as exc:
        return _error(str(exc))
    try:
        return _TENANT_ACTIONS[args.tenant_command](table, args)
    except tenants.TenantError as exc:
        return _error(str(exc))
    except (BotoCoreError, ClientError) as exc:
        return _error(f"the local stack at {endpoint} did not answer ({exc}); is `sif up` running?")


def _tenant_list(table: Any, args: argparse.Namespace) -> int:
    from sif_core.tenants import list_tenants

    rows = [("TENANT", "NAME", "PLAN", "QUOTA", "STATUS", "KEYS")]
    for line in list_tenants(table):
        t = line.tenant
        quota = "none" if t.monthly_calls is None else "unlimited" if t.monthly_calls == 0 else str(t.monthly_calls)
        keys = f"{line.keys_active} active" + (
            f", {line.keys_total - line.keys_active} revoked" if line.keys_total > line.keys_active else ""
        )
        rows.append((t.tenant_id, t.name, t.plan, quota, t.status, keys))
    _print_table(rows)
    return EXIT_OK


def _tenant_keys(table: Any, args: argparse.Namespace) -> int:
    from sif_core.tenants import get_tenant, list_keys

    if get_tenant(table, args.tenant_id) is None and not list_keys(table, args.tenant_id):
        return _error(f"no tenant {args.tenant_id}")
    rows = [("KEY ID", "STATUS", "CREATED (UTC)", "REVOKED (UTC)")]
    for key in list_keys(table, args.tenant_id):
        rows.append(
            (key.key_id or "(none: name it by sha256 prefix)", key.status, _when(key.created_at), _when(key.revoked_at))
        )
    _print_table(rows)
    return EXIT_OK


def _tenant_add_key(table: Any, args: argparse.Namespace) -> int:
    from sif_core.tenants import add_key, key_id_of

    api_key = add_key(table, args.tenant_id)
    print(f"new key {key_id_of(api_key)} for tenant {args.tenant_id}:", file=sys.stderr)
    print(api_key, flush=True)
    return EXIT_OK


def _tenant_revoke_key(table: Any, args: argparse.Namespace) -> int:
    from sif_core.tenants import revoke_key

    key = revoke_key(table, args.tenant_id, args.key)
    print(f"revoked key {key.key_id or args.key} of tenant {args.tenant_id}{_REVOCATION_NOTE}", flush=True)
    return EXIT_OK


def _tenant_rotate_key(table: Any, args: argparse.Namespace) -> int:
    from sif_core.tenants import key_id_of, rotate_key

    api_key, revoked = rotate_key(table, args.tenant_id, args.key)
    names = ", ".join(k.key_id or "(no id)" for k in revoked) or "none"
    print(
        f"new key {key_id_of(api_key)} for tenant {args.tenant_id}; revoked: {names}{_REVOCATION_NOTE}", file=sys.stderr
    )
    print(api_key, flush=True)
    return EXIT_OK


def _tenant_set_status(table: Any, args: argparse.Namespace) -> int:
    from sif_core.tenants import disable_tenant, enable_tenant

    tenant = (disable_tenant if args.tenant_command == "disable" else enable_tenant)(table, args.tenant_id)
    note = _REVOCATION_NOTE if args.tenant_command == "disable" else ""
    print(f"tenant {tenant.tenant_id} ({tenant.name!r}) is {tenant.status}{note}", flush=True)
    return EXIT_OK


def _print_table(rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


# The authorizer's per-instance cache (sif_authorizer.keys.CACHE_TTL_S); metering refuses at once.
_REVOCATION_NOTE = " (refused by metering at once, by every authorizer within 10 s)"
_TENANT_ACTIONS = {
    "list": _tenant_list,
    "keys": _tenant_keys,
    "add-key": _tenant_add_key,
    "revoke-key": _tenant_revoke_key,
    "rotate-key": _tenant_rotate_key,
    "disable": _tenant_set_status,
    "enable": _tenant_set_status,
}


def cmd_env(args: argparse.Namespace) -> int:
    try:
        info, _ = _stack_clients(args)
    except FileNotFoundError as exc:
        return _error(str(exc))
    env = aws_client_env(info["aws_endpoint_url"], info.get("region", "us-east-1"))
    env.update({k: v for k, v in info.get("env", {}).items() if k.startswith("SIF_")})
    env["SIF_API_URL"] = info["api_url"]
    if info.get("demo_api_key"):
        env["SIF_KEY"] = info["demo_api_key"]
    if (info.get("demo_tenant") or {}).get("tenant_id"):
        env["SIF_TENANT"] = info["demo_tenant"]["tenant_id"]  # the demo key's tenant: its inbox prefix
    for key, value in env.items():
        print(f"export {key}={shlex.quote(str(value))}")
    return EXIT_OK


def cmd_jobs_redrive(args: argparse.Namespace) -> int:
    from botocore.exceptions import BotoCoreError, ClientError

    from sif_core.dlq import redrive

    try:
        info, (session, endpoint) = _stack_clients(args)
    except FileNotFoundError as exc:
        return _error(str(exc))
    sqs = session.client("sqs", endpoint_url=endpoint)
    try:
        moved = redrive(sqs, info["queues"]["jobs_dlq"], info["queues"]["jobs"], limit=args.max)
    except (BotoCoreError, ClientError) as exc:
        return _error(f"redrive failed ({exc}); is `sif up` running?")
    print(f"moved {moved} message(s) from the jobs dead-letter queue back to the jobs queue", flush=True)
    return EXIT_OK


# ---------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sif", description="sif - serverless inference functions, local stack")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: AWS SDK too)")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    parser.add_argument(
        "--stack-json",
        type=Path,
        default=None,
        help="the running stack's stack.json (default: $SIF_STACK_JSON or .local/stack.json)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="start the local stack (in the foreground unless --background)")
    up.add_argument("--api-port", type=int, default=None, help="API port (default: $SIF_API_PORT or 3000)")
    up.add_argument("--aws-port", type=int, default=None, help="AWS emulator port (default: $SIF_AWS_PORT or 5000)")
    up.add_argument(
        "--models-dir", type=Path, default=None, help="built models (default: $SIF_MODELS_DIR or .cache/models)"
    )
    up.add_argument("--no-models", action="store_true", help="do not publish models")
    up.add_argument(
        "--state-dir", type=Path, default=None, help="where stack.json and the kept state go (default: .local)"
    )
    up.add_argument(
        "--background", action="store_true", help="start detached, return once it is up; `sif down` stops it"
    )
    up.set_defaults(func=cmd_up)
    down = sub.add_parser("down", help="stop the local stack started in the background (its state is kept)")
    down.add_argument("--state-dir", type=Path, default=None, help="the stack's state dir (default: .local)")
    down.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for it to stop (default: 120)")
    down.set_defaults(func=cmd_down)

    tenant = sub.add_parser("tenant", help="manage tenants of the running stack")
    tenant_sub = tenant.add_subparsers(dest="tenant_command", required=True, metavar="ACTION")
    create = tenant_sub.add_parser("create", help="create a tenant and print its new API key")
    create.add_argument("name")
    create.add_argument(
        "--monthly-calls",
        type=int,
        default=None,
        metavar="N",
        help="monthly quota in units: one input (text, image, file row) each; 0 = unlimited",
    )
    create.add_argument("--allow-duplicate", action="store_true", help="create it even if a tenant of that name exists")
    create.set_defaults(func=cmd_tenant_create)
    rotate_secret = tenant_sub.add_parser(
        "rotate-callback-secret", help="a new callback signing secret for a tenant (printed once); the old one stops"
    )
    rotate_secret.add_argument("tenant_id")
    rotate_secret.set_defaults(func=cmd_tenant_rotate_callback_secret)
    tenant_sub.add_parser("list", help="every tenant: id, name, plan, quota, status, number of keys").set_defaults(
        func=cmd_tenant_admin
    )
    for action, text in (
        ("keys", "a tenant's keys: public id, status, when created and revoked"),
        ("add-key", "one more API key for a tenant (printed once)"),
        ("disable", "disable a tenant: none of its keys may call, nothing is accepted or billed"),
        ("enable", "enable a disabled tenant again"),
    ):
        action_parser = tenant_sub.add_parser(action, help=text)
        action_parser.add_argument("tenant_id")
        action_parser.set_defaults(func=cmd_tenant_admin)
    revoke = tenant_sub.add_parser("revoke-key", help="revoke one key of a tenant")
    revoke.add_argument("tenant_id")
    revoke.add_argument(
        "key",
        metavar="KEY_ID_OR_HASH_PREFIX",
        help="the key's id (8 characters after sif_), or a prefix of its sha256 (an id from before ids began "
        "with a letter or digit may start with '-': put `--` before it)",
    )
    revoke.set_defaults(func=cmd_tenant_admin)
    rotate = tenant_sub.add_parser("rotate-key", help="a new key for a tenant, the old one revoked (printed once)")
    rotate.add_argument("tenant_id")
    rotate.add_argument(
        "key",
        nargs="?",
        default=None,
        metavar="KEY_ID_OR_HASH_PREFIX",
        help="the key to replace (default: every active key)",
    )
    rotate.set_defaults(func=cmd_tenant_admin)

    env = sub.add_parser("env", help='print shell exports for the running stack (eval "$(sif env)")')
    env.set_defaults(func=cmd_env)

    jobs = sub.add_parser("jobs", help="async jobs of the running stack")
    jobs_sub = jobs.add_subparsers(dest="jobs_command", required=True, metavar="ACTION")
    redrive = jobs_sub.add_parser("redrive", help="move messages from the jobs DLQ back to the jobs queue")
    redrive.add_argument("--max", type=int, default=None, help="move at most this many (default: all)")
    redrive.set_defaults(func=cmd_jobs_redrive)
    work_cli.add_actions(jobs_sub, "job")

    batches = sub.add_parser("batches", help="your batches: list, status, fetch results, cancel")
    work_cli.add_actions(batches.add_subparsers(dest="batches_command", required=True, metavar="ACTION"), "batch")

    score = sub.add_parser("score", help="score a file through the batch path: upload, progress, results")
    score_cli.add_arguments(score)
    score.set_defaults(func=score_cli.cmd_score)

    callbacks = sub.add_parser("callbacks", help="a local receiver for job and batch callbacks")
    callbacks_sub = callbacks.add_subparsers(dest="callbacks_command", required=True, metavar="ACTION")
    listen = callbacks_sub.add_parser("listen", help="print (and check the signature of) each callback received")
    callbacks_cli.add_arguments(listen)
    listen.set_defaults(func=callbacks_cli.cmd_listen)

    usage = sub.add_parser("usage", help="the caller's usage and cost (GET /v1/usage)")
    usage_cli.add_arguments(usage)
    usage.set_defaults(func=usage_cli.cmd_usage)
    models_cli.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.stack_json is None and os.environ.get("SIF_STACK_JSON"):
        args.stack_json = Path(os.environ["SIF_STACK_JSON"])
    _setup_logging(-1 if args.quiet else args.verbose)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
