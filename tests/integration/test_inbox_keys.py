"""Inbox keys that would land elsewhere once normalised are never scored (issue: `..` in inbox keys).

`incoming/<B>/<model>/../../<A>/<model>/victim.jsonl` is a literal S3 key in tenant B's prefix that a
client normalising paths reads as A's. It is refused as a whole: no batch record for either tenant,
nothing written under either tenant's results, nothing billed; so are empty and `.` segments.
"""

from __future__ import annotations

import copy
import json
import uuid
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any
from urllib.parse import quote_plus

import pytest

from sif_core.work import WorkStore
from sif_emulator.stack import LocalStack
from tests.integration.test_scorer_handler import MODEL, Context, import_scorer

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore:No application metrics to publish")]


@pytest.fixture(scope="module")
def scorer_fixture(local_stack: LocalStack) -> Iterator[ModuleType]:
    yield from import_scorer(local_stack)


def event_for(load_event: Callable[[str], dict[str, Any]], bucket: str, key: str, etag: str, size: int) -> dict:
    event = copy.deepcopy(load_event("sqs_inbox_multipart"))
    body = json.loads(event["Records"][0]["body"])
    body["Records"][0]["s3"]["bucket"]["name"] = bucket
    body["Records"][0]["s3"]["object"].update(key=quote_plus(key, safe="/"), size=size, eTag=etag)
    event["Records"][0]["body"] = json.dumps(body)
    event["Records"][0]["messageId"] = str(uuid.uuid4())
    return event


@pytest.mark.parametrize("shape", ["{b}/{m}/../../{a}/{m}/victim.jsonl", "{b}/{m}/./victim.jsonl", "{b}//{m}/x.jsonl"])
def test_keys_with_dot_or_empty_segments_are_never_scored(
    scorer_fixture: ModuleType, load_event: Callable[..., Any], local_stack: LocalStack, shape: str
) -> None:
    victim = str(local_stack.create_tenant(f"victim-{uuid.uuid4().hex[:6]}", monthly_calls=0)[0]["tenant_id"])
    attacker = str(local_stack.create_tenant(f"attacker-{uuid.uuid4().hex[:6]}", monthly_calls=0)[0]["tenant_id"])
    key = "incoming/" + shape.format(a=victim, b=attacker, m=MODEL)
    s3, inbox, results = local_stack.client("s3"), local_stack.bucket("inbox"), local_stack.bucket("results")
    body = b'{"id": 1, "text": "planted"}\n'
    etag = s3.put_object(Bucket=inbox, Key=key, Body=body)["ETag"]

    answer = scorer_fixture.lambda_handler(event_for(load_event, inbox, key, etag, len(body)), Context())
    assert answer == {"batchItemFailures": []}  # consumed, not retried: the key is what is wrong
    store = WorkStore(local_stack.table("WorkTable"))
    for tenant in (victim, attacker):
        records, _ = store.list(tenant, "batch")
        assert records == [], tenant
        listing = s3.list_objects_v2(Bucket=results, Prefix=f"results/{tenant}/")
        assert listing.get("KeyCount", 0) == 0, tenant
