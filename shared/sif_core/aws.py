"""boto3 clients, built once per process (cold start) and reused across warm invocations.

boto3 honours AWS_ENDPOINT_URL itself, which is how the local stack points everything at moto.
Clients are thread-safe once built; resources are not, so tables are cached per thread.
"""

from __future__ import annotations

import threading
from functools import cache
from typing import Any

import boto3
from botocore.config import Config

_CONFIG = Config(retries={"mode": "standard", "max_attempts": 5}, tcp_keepalive=True)
# S3 presigned URLs must be SigV4: S3 refuses SigV2 for new buckets.
_S3_CONFIG = _CONFIG.merge(Config(signature_version="s3v4"))
_local = threading.local()
_lock = threading.Lock()


@cache
def client(service: str) -> Any:
    with _lock:  # building clients concurrently is not thread-safe
        return boto3.session.Session().client(service, config=_S3_CONFIG if service == "s3" else _CONFIG)


def table(name: str) -> Any:
    tables: dict[str, Any] = _local.__dict__.setdefault("tables", {})
    if name not in tables:
        with _lock:
            tables[name] = boto3.session.Session().resource("dynamodb", config=_CONFIG).Table(name)
    return tables[name]


def presign_get(s3: Any, bucket: str, key: str, ttl_s: int) -> str:
    """An expiring GET for one object (the S3 client signs SigV4)."""
    url: str = s3.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=ttl_s)
    return url
