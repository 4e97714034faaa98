"""`sif models`: publish a model, list and show what is published, move aliases, retire versions.

sif models publish PATH --name NAME [--task T] [--labels FILE] [--tokenizer FILE] [--max-length N]
                   [--dim N] [--preprocessing JSON] [--features JSON|FILE] [--tenant ID]
                   [--description S] [--variant NAME=FILE] [--no-promote] [--json]
sif models list [--tenant ID] [--json]
sif models show NAME [--json]
sif models alias NAME ALIAS VERSION[=WEIGHT] [VERSION=WEIGHT ...]   (or --delete)
sif models retire NAME VERSION

Where: the running local stack's models bucket (its stack.json, as every `sif` command finds it), a
real bucket with `--bucket B` (the operator's AWS credentials, as boto3 finds them), or a folder laid
out like the bucket with `--models-dir DIR`. The work is sif_modelbuild.publish / .catalog.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# sif_inference.manifest.TASK_NAMES (a test keeps them equal): `sif` starts without importing numpy
TASK_NAMES = ("embedding", "text-classification", "image-classification", "tabular", "tensor")
EXIT_OK = 0
EXIT_ERROR = 1


def add_parser(sub: Any) -> None:
    """`sif models ...` on the main parser's subcommands."""
    where = argparse.ArgumentParser(add_help=False)
    target = where.add_mutually_exclusive_group()
    target.add_argument("--bucket", default=None, help="a models bucket on AWS (default: the local stack's)")
    target.add_argument("--models-dir", type=Path, default=None, help="a folder laid out like the models bucket")
    where.add_argument("--json", action="store_true", help="print JSON")

    models = sub.add_parser("models", help="publish, list, show, alias and retire models (operator)")
    actions = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")

    pub = actions.add_parser("publish", parents=[where], help="check, probe, time and publish an ONNX model")
    pub.add_argument("path", type=Path, metavar="PATH", help="the .onnx file (the default variant)")
    pub.add_argument("--name", required=True, help="model name (a new version of it if it exists)")
    pub.add_argument("--task", default=None, choices=TASK_NAMES, help="default: inferred from the graph")
    pub.add_argument("--labels", default=None, metavar="FILE", help="class names: one per line, or a JSON list")
    pub.add_argument("--tokenizer", type=Path, default=None, metavar="FILE", help="tokenizer.json (text models)")
    pub.add_argument(
        "--max-length", type=int, default=None, metavar="N", help="tokens per text (default: the tokenizer's, else 256)"
    )
    pub.add_argument("--dim", type=int, default=None, metavar="N", help="the embedding's dimensions (checked)")
    pub.add_argument("--preprocessing", default=None, metavar="JSON", help="image preprocessing (JSON or a file)")
    pub.add_argument("--features", default=None, metavar="JSON|FILE", help="tabular features: names or objects")
    pub.add_argument("--activation", choices=("softmax", "sigmoid", "none"), default=None, help="classifier scores")
    pub.add_argument("--tenant", default=None, metavar="ID", help="private to this tenant (default: public)")
    pub.add_argument("--description", default="", metavar="S")
    pub.add_argument("--variant", action="append", default=[], metavar="NAME=FILE", help="another variant (repeat)")
    pub.add_argument("--variant-name", default=None, metavar="NAME", help="the name of PATH's variant")
    pub.add_argument("--price", default=None, metavar="JSON", help="usd_per_call, usd_per_1k_inputs, ...")
    pub.add_argument("--no-promote", action="store_true", help="publish, but leave latest where it is")
    pub.set_defaults(func=cmd_publish)

    lst = actions.add_parser("list", parents=[where], help="every model: latest, versions, task, tenant, aliases")
    lst.add_argument("--tenant", default=None, metavar="ID", help="only what this tenant may call")
    lst.set_defaults(func=cmd_list)

    show = actions.add_parser("show", parents=[where], help="one model: its versions, aliases, retired versions")
    show.add_argument("name")
    show.set_defaults(func=cmd_show)

    alias = actions.add_parser("alias", parents=[where], help="point an alias at a version, or split it (canary)")
    alias.add_argument("name")
    alias.add_argument("alias")
    alias.add_argument("split", nargs="*", metavar="VERSION[=WEIGHT]", help="one version, or VERSION=WEIGHT each")
    alias.add_argument("--delete", action="store_true", help="remove the alias")
    alias.set_defaults(func=cmd_alias)

    retire = actions.add_parser("retire", parents=[where], help="stop serving a version (not while aliased)")
    retire.add_argument("name")
    retire.add_argument("version")
    retire.set_defaults(func=cmd_retire)


# ---------------------------------------------------------------------- the store
def store_for(args: argparse.Namespace) -> Any:
    from sif_modelbuild.stores import LocalStore, S3Store

    if args.models_dir is not None:
        return LocalStore(args.models_dir)
    if args.bucket is not None:
        import boto3

        return S3Store(boto3.client("s3"), args.bucket)
    from sif_emulator.stack import aws_session, read_stack_json

    info = read_stack_json(args.stack_json)
    s3 = aws_session(info.get("region", "us-east-1")).client("s3", endpoint_url=info["aws_endpoint_url"])
    return S3Store(s3, info["buckets"]["models"])


def _run(args: argparse.Namespace, action: Any) -> int:
    from botocore.exceptions import BotoCoreError, ClientError

    from sif_inference.errors import ModelNotFoundError
    from sif_modelbuild.errors import CatalogError, PublishError

    try:
        store = store_for(args)
        return int(action(store))
    except (PublishError, CatalogError, ModelNotFoundError, FileNotFoundError) as exc:
        return _error(args, str(exc))
    except (BotoCoreError, ClientError) as exc:
        return _error(args, f"the models bucket did not answer ({exc}); is `sif up` running, or --bucket right?")


def _error(args: argparse.Namespace, message: str) -> int:
    print(f"sif models {args.models_command}: error: {message}", file=sys.stderr)
    return EXIT_ERROR


# ---------------------------------------------------------------------- commands
def cmd_publish(args: argparse.Namespace) -> int:
    from sif_modelbuild.errors import PublishError
    from sif_modelbuild.publish import publish

    def act(store: Any) -> int:
        variants = {}
        for item in args.variant:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise PublishError(f"--variant {item!r}: NAME=FILE")
            variants[name] = Path(path)
        price = _json_arg(args.price, "--price") if args.price else None
        manifest = publish(
            args.path,
            name=args.name,
            store=store,
            task=args.task,
            labels=args.labels,
            tokenizer=args.tokenizer,
            max_length=args.max_length,
            dim=args.dim,
            preprocessing=args.preprocessing,
            features=args.features,
            classification={"activation": args.activation} if args.activation else None,
            description=args.description,
            tenant=args.tenant,
            variants=variants or None,
            variant=args.variant_name,
            price=price,
            promote=not args.no_promote,
        )
        if args.json:
            print(json.dumps(manifest.model_dump(mode="json"), indent=2))
            return EXIT_OK
        cost = manifest.cost
        size = sum(e.bytes for e in manifest.files.values())
        latest = "latest unchanged (--no-promote)" if args.no_promote else f"latest -> {manifest.version}"
        print(
            f"published {manifest.name} version {manifest.version} to {store.where}\n"
            f"  task {manifest.task}; variants {', '.join(manifest.variants)} (default {manifest.default_variant}); "
            f"{size:,} bytes; sha256 {manifest.sha256()}\n"
            f"  measured {cost.cpu_ms_per_item} ms per item on one CPU; route {manifest.route}; "
            f"at most {manifest.limits.max_inputs} inputs per call\n"
            f"  {'private to tenant ' + manifest.tenant if manifest.tenant else 'public'}; {latest}",
            flush=True,
        )
        return EXIT_OK

    return _run(args, act)


def _json_arg(text: str, what: str) -> Any:
    from sif_modelbuild.errors import PublishError

    try:
        return json.loads(Path(text).read_text() if Path(text).is_file() else text)
    except ValueError as exc:
        raise PublishError(f"{what} is not valid JSON: {exc}") from exc


def cmd_list(args: argparse.Namespace) -> int:
    from sif_modelbuild.catalog import list_models

    def act(store: Any) -> int:
        models = list_models(store=store, tenant=args.tenant, all_tenants=args.tenant is None)
        if args.json:
            print(json.dumps([m.model_dump(mode="json") for m in models], indent=2))
            return EXIT_OK
        rows = [("NAME", "LATEST", "VERSIONS", "TASK", "TENANT", "ALIASES")]
        for m in models:
            live = [v.version for v in m.versions if not v.retired]
            aliases = " ".join(f"{a}={_split(s)}" for a, s in m.aliases.items()) or "-"
            rows.append((m.name, m.latest or "-", ",".join(live) or "-", m.task or "-", m.tenant or "public", aliases))
        _print_table(rows)
        return EXIT_OK

    return _run(args, act)


def cmd_show(args: argparse.Namespace) -> int:
    from sif_modelbuild.catalog import show

    def act(store: Any) -> int:
        info = show(args.name, store=store)
        if args.json:
            print(json.dumps(info.model_dump(mode="json"), indent=2))
            return EXIT_OK
        aliases = ", ".join(f"{a} -> {_split(s)}" for a, s in info.aliases.items()) or "none (latest = highest)"
        print(f"{info.name}: latest {info.latest or '-'}; aliases {aliases}; retired {', '.join(info.retired) or '-'}")
        rows = [("VERSION", "TASK", "VARIANTS", "BYTES", "SHA256", "CPU MS/ITEM", "ROUTE", "TENANT", "STATE")]
        for v in info.versions:
            state = "retired" if v.retired else ", ".join(v.aliases) or "live"
            if v.error:
                rows.append((v.version, "-", "-", "-", "-", "-", "-", "-", v.error))
                continue
            cost = f"{v.cpu_ms_per_item}" + ("" if v.measured else " (estimate)")
            variants = ",".join(k + ("*" if k == v.default_variant else "") for k in v.variants)
            rows.append(
                (v.version, v.task, variants, f"{v.bytes:,}", v.sha256[:16], cost, v.route, v.tenant or "public", state)
            )
        _print_table(rows)
        return EXIT_OK

    return _run(args, act)


def cmd_alias(args: argparse.Namespace) -> int:
    from sif_modelbuild.catalog import alias, parse_split, remove_alias
    from sif_modelbuild.errors import CatalogError

    def act(store: Any) -> int:
        if args.delete:
            if args.split:
                raise CatalogError("--delete takes no versions")
            remove_alias(args.name, args.alias, store=store)
            print(f"{args.name}: alias {args.alias} removed", flush=True)
            return EXIT_OK
        index = alias(args.name, args.alias, parse_split(args.split), store=store)
        print(f"{args.name}: {args.alias} -> {_split(index.aliases[args.alias])} (serving within 30 s)", flush=True)
        return EXIT_OK

    return _run(args, act)


def cmd_retire(args: argparse.Namespace) -> int:
    from sif_modelbuild.catalog import retire

    def act(store: Any) -> int:
        retire(args.name, args.version, store=store)
        print(f"{args.name}: version {args.version} retired (no longer served within 30 s)", flush=True)
        return EXIT_OK

    return _run(args, act)


def _split(split: dict[str, int]) -> str:
    if len(split) == 1:
        return next(iter(split))
    total = sum(split.values()) or 1
    return "+".join(f"{v}:{100 * w / total:.0f}%" for v, w in split.items())


def _print_table(rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
