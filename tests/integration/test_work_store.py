"""WorkStore on the work table as template.yaml declares it (moto's server): the newest-first index,
cursors, the status filter across pages, cancel and lazy expiry, all with real boto3 calls."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest

from sif_core import work
from sif_core.work import (
    InvalidCursorError,
    WorkRecord,
    WorkStore,
    created_key,
    cursor_of,
    decode_cursor,
    encode_cursor,
    upload_deadline,
)
from sif_emulator.stack import LocalStack

pytestmark = pytest.mark.integration

T0 = 1_700_000_000.0


@pytest.fixture
def store(local_stack: LocalStack) -> WorkStore:
    return WorkStore(local_stack.table("WorkTable"))


def tenant() -> str:
    return f"t_{uuid.uuid4().hex[:12]}"


def make(store: WorkStore, tenant_id: str, kind: Any, n: int, *, start: int = 0, **fields: Any) -> list[WorkRecord]:
    """n records created 1 s apart (from T0 + start), oldest first."""
    records = []
    for i in range(start, start + n):
        record = WorkRecord(id=work.new_id(kind), kind=kind, tenant=tenant_id, model="m", created_at=T0 + i, **fields)
        records.append(store.create(record))
    return records


def page_through(store: WorkStore, tenant_id: str, kind: Any, **kwargs: Any) -> list[list[str]]:
    pages, after = [], None
    while True:
        records, after = store.list(tenant_id, kind, after=after, **kwargs)
        pages.append([r.id for r in records])
        if after is None:
            return pages


def flat(pages: list[list[str]]) -> list[str]:
    return [id_ for page in pages for id_ in page]


def test_cursor_round_trip_and_rejects() -> None:
    record = WorkRecord(id="j_abc-DEF_1", kind="job", tenant="t", model="m", created_at=T0 + 0.1234)
    key = created_key("job", record.created_at, record.id)
    assert key == "job#1700000000123#j_abc-DEF_1"
    cursor = cursor_of(record)
    assert cursor == encode_cursor(key) and "=" not in cursor and "#" not in cursor
    assert decode_cursor(cursor, "job") == (key, record.id)
    for bad in ("", "!!!", "bm90LWEta2V5", "é", encode_cursor("job#12#x"), encode_cursor("batch#1700000000123#b_1")):
        with pytest.raises(InvalidCursorError):
            decode_cursor(bad, "job")


def test_list_is_newest_first_paginated_and_per_tenant_and_kind(store: WorkStore) -> None:
    mine, other = tenant(), tenant()
    batches = make(store, mine, "batch", 7)
    jobs = make(store, mine, "job", 3)
    make(store, other, "batch", 2)
    newest_first = [r.id for r in reversed(batches)]

    records, cursor = store.list(mine, "batch")
    assert [r.id for r in records] == newest_first and cursor is None
    assert records[0] == batches[-1]  # the whole record back, storage keys stripped
    assert page_through(store, mine, "batch", limit=3) == [newest_first[:3], newest_first[3:6], newest_first[6:]]
    assert page_through(store, mine, "batch", limit=7) == [newest_first]
    assert [r.id for r in store.list(mine, "job")[0]] == [r.id for r in reversed(jobs)]
    # `after` may be one of the tenant's own ids (OpenAI style) as well as a cursor
    assert [r.id for r in store.list(mine, "batch", after=newest_first[1], limit=2)[0]] == newest_first[2:4]
    with pytest.raises(InvalidCursorError):
        store.list(other, "batch", after=newest_first[1])  # another tenant's id is not a position in yours
    with pytest.raises(InvalidCursorError):
        store.list(mine, "job", after=cursor_of(batches[0]))
    assert store.list(tenant(), "batch") == ([], None)


def test_status_filter_spans_pages(store: WorkStore, monkeypatch: pytest.MonkeyPatch) -> None:
    mine = tenant()
    records = make(store, mine, "job", 30)
    cancelled = [r.id for r in records if int(r.created_at) % 4 == 0]
    for id_ in cancelled:
        assert store.cancel(mine, "job", id_) is not None
    expected = list(reversed(cancelled))
    assert [r.id for r in store.list(mine, "job", status="cancelled")[0]] == expected
    assert flat(page_through(store, mine, "job", status="cancelled", limit=2)) == expected
    # a sparse filter stops after LIST_EVALUATE_MAX records read; the cursor resumes where it stopped
    monkeypatch.setattr(work, "LIST_EVALUATE_MAX", 5)
    monkeypatch.setattr(work, "LIST_LIMIT_MAX", 5)
    pages = page_through(store, mine, "job", status="cancelled", limit=100)
    assert flat(pages) == expected and pages[0] == expected[:1] and len(pages) >= 30 // 5  # short pages


def test_cancel_only_what_has_not_ended(store: WorkStore) -> None:
    mine = tenant()
    queued, done = make(store, mine, "job", 2)
    store.update(mine, "job", done.id, status="succeeded")
    cancelled = store.cancel(mine, "job", queued.id)
    assert cancelled is not None and cancelled.status == "cancelled" and cancelled.cancelled_at is not None
    again = store.cancel(mine, "job", queued.id)
    assert again == cancelled  # unchanged
    still = store.cancel(mine, "job", done.id)
    assert still is not None and still.status == "succeeded" and still.cancelled_at is None
    assert store.cancel(mine, "job", "j_missing") is None
    assert store.cancel(tenant(), "job", queued.id) is None
    # a runner's later progress never overwrites a cancellation
    assert store.update(mine, "job", queued.id, only_if_not_terminal=True, status="running") is False


def test_batches_that_never_got_their_file_expire_lazily(store: WorkStore) -> None:
    mine = tenant()
    now = time.time()
    stale, waiting, arrived, fresh = make(store, mine, "batch", 4, details={"upload_expires_at": int(now) - 100})
    store.update(mine, "batch", fresh.id, details={"upload_expires_at": int(now) + 3600})
    store.update(mine, "batch", arrived.id, details={"upload_expires_at": int(now) - 100, "etag": "abc"})
    dropped = make(store, mine, "batch", 1, start=4)[0]  # straight into the inbox: no upload URL, never expires
    grace = 60

    assert upload_deadline(stale, grace) == int(now) - 100 + grace
    assert upload_deadline(dropped, grace) is None
    assert store.list(mine, "batch", status="expired")[0] == []  # without a grace nothing expires
    expired = store.expire_if_stale(stale, grace)
    assert expired.status == "expired" and "never uploaded" in (expired.error or "")
    assert store.expire_if_stale(expired, grace) == expired
    assert store.expire_if_stale(waiting, 600) == waiting  # still within its grace

    by_status = {s: [r.id for r in store.list(mine, "batch", status=s, upload_grace_s=grace)[0]] for s in work.STATUSES}
    assert by_status["expired"] == [waiting.id, stale.id]
    assert by_status["queued"] == [dropped.id, fresh.id, arrived.id]
    stored = store.get(mine, "batch", waiting.id)
    assert stored is not None and stored.status == "expired"  # marked in the table, not just reported
    # an expired batch is over: it cannot be cancelled
    assert store.cancel(mine, "batch", stale.id) == store.get(mine, "batch", stale.id)
