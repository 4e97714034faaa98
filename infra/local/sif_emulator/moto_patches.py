"""Every third-party internal the AWS emulator relies on (moto 5.2, botocore 1.44, werkzeug 3.1), each
with why: the rest of the emulator (moto_server, presigned, state) uses public APIs only.

When moto, botocore or werkzeug change, this is the one module to check. The functions here:

- `speed_up_dynamodb_transactions`, `serialize_dynamodb_writes`: moto's DynamoDB backend is slow and
  unsynchronised where DynamoDB is neither (see each docstring).
- `server_app`: moto's WSGI dispatcher with two fixes so a request body is stored as sent. moto's
  dispatcher reads a form-typed body to guess the service and loses it when it is not UTF-8; werkzeug
  parses any `application/x-www-form-urlencoded` body as a form, which leaves moto's S3 an empty
  body (urllib sends that content type by default). S3 never takes a URL-encoded form.
- `is_s3_request`: the service moto would route an unsigned request to (S3 unless it is one of the
  few unsigned APIs), so the presigned-URL check can refuse anonymous S3 calls as S3 does.
- `presigned_signature`: botocore's own SigV4 query signer, run at the URL's `X-Amz-Date` instead of
  now (botocore's `add_auth` always signs at the current time, so its steps are called one by one).
- `queued_messages` / `requeue`: moto's SQS messages, read without receiving them (SQS has no
  peek: a receive would bump receive counts and hide in-flight messages), for state snapshots.
- `set_object_etag`: an object restored by one PutObject keeps the ETag it had, multipart or not.
"""

from __future__ import annotations

import copy
import io
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

# ---------------------------------------------------------------------- DynamoDB
_transaction_keys = threading.local()


def speed_up_dynamodb_transactions() -> None:
    """Make moto's TransactWriteItems cost O(items touched), not O(table size).

    moto snapshots every table a transaction names with copy.deepcopy before applying it (to roll
    back on a cancelled transaction), so each transaction gets slower as the table grows; a usage
    table with one marker per metered request crosses 50 ms within minutes. Here the snapshot is a
    shallow copy of the table that deep-copies only the items the transaction touches, which is
    all a rollback needs. Real DynamoDB has no such cost. Applies to the in-process emulator.
    """
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


# ---------------------------------------------------------------------- the WSGI app and server
FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"


def _s3_request_class() -> type:
    from moto.moto_server.werkzeug_app import BackendRequest

    class S3Request(BackendRequest):
        """S3's request: a body is a form only for POST Object (multipart/form-data); any other body,
        whatever its Content-Type, is the object's bytes (werkzeug would parse a URL-encoded one)."""

        @property
        def want_form_data_parsed(self) -> bool:
            return self.mimetype == "multipart/form-data"

    return S3Request


def server_app() -> Any:
    """moto's server WSGI app (DomainDispatcherApplication) that keeps request bodies as sent."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

    s3_request = _s3_request_class()

    def create_app(service: Any) -> Any:
        app = create_backend_app(service)
        if service == "s3":
            app.request_class = s3_request
        return app

    class Dispatcher(DomainDispatcherApplication):
        def _get_body(self, environ: dict[str, Any]) -> str | None:
            """moto reads a URL-encoded body to find the service of an unsigned call and, when that
            body is not UTF-8 (a gzip file PUT with urllib's default type), drops it: keep it."""
            if not str(environ.get("CONTENT_TYPE", "")).startswith(FORM_CONTENT_TYPE):
                return None
            try:
                size = int(environ.get("CONTENT_LENGTH") or 0)
            except ValueError:
                return None
            if size <= 0:
                return None
            raw = environ["wsgi.input"].read(size)
            environ["wsgi.input"] = io.BytesIO(raw)
            try:
                return str(raw.decode("utf-8"))
            except UnicodeDecodeError:
                return None

    return Dispatcher(create_app)


def make_server(host: str, port: int, app: Any) -> Any:
    """werkzeug's threaded server with moto's request handler (it keeps underscores in S3 metadata
    header names, which werkzeug drops). Raises SystemExit when the port cannot be bound."""
    from moto.moto_server.werkzeug_app import MotoRequestHandler
    from werkzeug.serving import make_server as werkzeug_server

    return werkzeug_server(host, port, app, threaded=True, request_handler=MotoRequestHandler)


def is_s3_request(app: Any, environ: dict[str, Any]) -> bool:
    """Whether moto routes this (unsigned) request to S3, its default for anything it cannot place."""
    path = str(environ.get("PATH_INFO", ""))
    try:
        host = app.infer_service_region_host(environ, path)
    except (KeyError, ValueError, AttributeError, IndexError):
        return True
    return host is None or str(host).startswith(("s3.", "s3-"))


# ---------------------------------------------------------------------- SigV4 query signing
@dataclass(frozen=True)
class SignedRequest:
    signature: str
    canonical_request: str
    string_to_sign: str


def presigned_signature(
    *,
    access_key: str,
    secret_key: str,
    token: str | None,
    service: str,
    region: str,
    method: str,
    url: str,
    headers: Mapping[str, str],
    timestamp: str,
    expires: int,
) -> SignedRequest:
    """The SigV4 query signature botocore would put on this request if it presigned it at `timestamp`
    (`X-Amz-Date`) for `expires` seconds. `url` holds every query parameter but X-Amz-Signature;
    the auth parameters in it are replaced by the signer's own, as when botocore presigns."""
    from botocore.auth import S3SigV4QueryAuth, SigV4QueryAuth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    signer_class = S3SigV4QueryAuth if service == "s3" else SigV4QueryAuth
    signer = signer_class(Credentials(access_key, secret_key, token), service, region, expires=expires)
    request = AWSRequest(method=method, url=url, headers=dict(headers), data=b"")
    # SigV4Auth.add_auth's steps, at the URL's time rather than now.
    request.context["timestamp"] = timestamp
    signer._modify_request_before_signing(request)
    canonical = signer.canonical_request(request)
    string_to_sign = signer.string_to_sign(request, canonical)
    return SignedRequest(signer.signature(string_to_sign, request), canonical, string_to_sign)


# ---------------------------------------------------------------------- state snapshots
def _account_id() -> str:
    """The account moto files requests under: its default, for any access key IAM does not know."""
    from moto.core import DEFAULT_ACCOUNT_ID

    return str(DEFAULT_ACCOUNT_ID)


def queued_messages(region: str) -> dict[str, list[dict[str, Any]]]:
    """Every message of every queue of the in-process emulator (visible, in flight or delayed), as
    JSON-ready dicts, by queue name; receive counts are not kept (a restart redelivers, as SQS would)."""
    from moto.sqs.models import sqs_backends

    backend = sqs_backends[_account_id()][region]
    out: dict[str, list[dict[str, Any]]] = {}
    for name, queue in list(backend.queues.items()):
        with queue._messages_lock:
            messages = list(queue._messages)
        out[name] = [
            {
                "body": message.body,
                "message_attributes": message.message_attributes or {},
                "group_id": message.group_id,
                "deduplication_id": message.deduplication_id,
            }
            for message in messages
        ]
    return out


def requeue(region: str, queue_name: str, messages: Iterable[Mapping[str, Any]]) -> int:
    """Send saved messages (from `queued_messages`) to a queue of the in-process emulator again;
    0 when the queue does not exist."""
    from moto.sqs.models import sqs_backends

    backend = sqs_backends[_account_id()][region]
    if queue_name not in backend.queues:
        return 0
    sent = 0
    for message in messages:
        backend.send_message(
            queue_name,
            message["body"],
            message_attributes=dict(message.get("message_attributes") or {}) or None,
            delay_seconds=0,
            deduplication_id=message.get("deduplication_id"),
            group_id=message.get("group_id"),
        )
        sent += 1
    return sent


def set_object_etag(bucket: str, key: str, etag: str) -> None:
    """Give a restored object of the in-process emulator the ETag it had (a multipart upload's ETag
    is not the MD5 that one PutObject of the same bytes gets)."""
    from moto.s3.models import s3_backends

    obj = s3_backends[_account_id()]["aws"].get_object(bucket, key)
    if obj is not None:
        obj._etag = etag.strip('"')
