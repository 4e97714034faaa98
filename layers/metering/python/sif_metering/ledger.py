"""UsageLedger: exactly one usage record per request id, counters added in the same transaction.

Layout of the usage table (pk, sk):
  event#{request_id}, event                   the idempotency marker (one per metered request)
  tenant#{tenant}, day#{YYYY-MM-DD}#{model}    counters by tenant, model and day
  tenant#{tenant}, month#{YYYY-MM}             calls this month, for the quota
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

from botocore.exceptions import ClientError

COUNTERS = ("calls", "inputs", "tokens", "pixels", "compute_ms", "gpu_ms")
EVENT_TTL_S = 90 * 24 * 3600


class QuotaExceededError(Exception):
    def __init__(self, tenant: str, limit: int, retry_after_s: int) -> None:
        super().__init__(f"tenant {tenant} used its {limit} calls for this month")
        self.tenant = tenant
        self.limit = limit
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class Usage:
    tenant: str
    model: str
    request_id: str
    calls: int = 1
    inputs: int = 0
    tokens: int = 0
    pixels: int = 0
    compute_ms: int = 0
    gpu_ms: int = 0
    day: date | None = None


@dataclass(frozen=True)
class UsageRow:
    model: str
    day: str
    calls: int
    inputs: int
    tokens: int
    pixels: int
    compute_ms: int
    gpu_ms: int


def _today() -> date:
    return datetime.now(UTC).date()


def seconds_to_next_month(now: datetime | None = None) -> int:
    now = now or datetime.now(UTC)
    first_next = datetime(now.year + (now.month == 12), now.month % 12 + 1, 1, tzinfo=UTC)
    return max(1, int((first_next - now).total_seconds()))


class UsageLedger:
    def __init__(self, dynamodb_client: Any, table_name: str) -> None:
        self.ddb = dynamodb_client
        self.table = table_name

    def record(self, usage: Usage, *, monthly_limit: int | None = None) -> bool:
        """Meter one request. Returns False (and changes nothing) if this request id was already metered.

        With `monthly_limit` (> 0) the month's call counter only moves while it is below the limit, in
        the same transaction: concurrent calls can never push a tenant past its quota. A call that
        would is not metered and raises QuotaExceededError.
        """
        day = usage.day or _today()
        month_update: dict[str, Any] = {
            "TableName": self.table,
            "Key": {"pk": {"S": f"tenant#{usage.tenant}"}, "sk": {"S": f"month#{day.strftime('%Y-%m')}"}},
            "UpdateExpression": "ADD #calls :calls",
            "ExpressionAttributeNames": {"#calls": "calls"},
            "ExpressionAttributeValues": {":calls": {"N": str(usage.calls)}},
        }
        if monthly_limit is not None and monthly_limit > 0:
            month_update["ConditionExpression"] = "attribute_not_exists(#calls) OR #calls < :limit"
            month_update["ExpressionAttributeValues"][":limit"] = {"N": str(monthly_limit)}
        values = {c: getattr(usage, c) for c in COUNTERS}
        add_expr = "ADD " + ", ".join(f"#{c} :{c}" for c in COUNTERS)
        names = {f"#{c}": c for c in COUNTERS}
        attr_values = {f":{c}": {"N": str(int(v))} for c, v in values.items()}
        tenant_pk = {"S": f"tenant#{usage.tenant}"}
        try:
            self.ddb.transact_write_items(
                TransactItems=[
                    {
                        "Put": {
                            "TableName": self.table,
                            "Item": {
                                "pk": {"S": f"event#{usage.request_id}"},
                                "sk": {"S": "event"},
                                "tenant": {"S": usage.tenant},
                                "model": {"S": usage.model},
                                "day": {"S": day.isoformat()},
                                "expires_at": {"N": str(int(time.time()) + EVENT_TTL_S)},
                                **{c: {"N": str(int(v))} for c, v in values.items()},
                            },
                            "ConditionExpression": "attribute_not_exists(pk)",
                        }
                    },
                    {
                        "Update": {
                            "TableName": self.table,
                            "Key": {"pk": tenant_pk, "sk": {"S": f"day#{day.isoformat()}#{usage.model}"}},
                            "UpdateExpression": add_expr + " SET #model = :model, #day = :day",
                            "ExpressionAttributeNames": {**names, "#model": "model", "#day": "day"},
                            "ExpressionAttributeValues": {
                                **attr_values,
                                ":model": {"S": usage.model},
                                ":day": {"S": day.isoformat()},
                            },
                        }
                    },
                    {"Update": month_update},
                ]
            )
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "TransactionCanceledException":
                raise
            if _cancelled_by(exc, 0):
                return False
            if monthly_limit and _cancelled_by(exc, 2):
                raise QuotaExceededError(usage.tenant, monthly_limit, seconds_to_next_month()) from exc
            raise
        return True

    def month_calls(self, tenant: str, month: str | None = None) -> int:
        month = month or _today().strftime("%Y-%m")
        item = self.ddb.get_item(
            TableName=self.table, Key={"pk": {"S": f"tenant#{tenant}"}, "sk": {"S": f"month#{month}"}}
        ).get("Item")
        return int(item["calls"]["N"]) if item and "calls" in item else 0

    def check_quota(self, tenant: str, monthly_calls: int) -> None:
        """Raise QuotaExceededError when the tenant has no calls left this month (checked before inference)."""
        if monthly_calls > 0 and self.month_calls(tenant) >= monthly_calls:
            raise QuotaExceededError(tenant, monthly_calls, seconds_to_next_month())

    def rows(self, tenant: str, start: date, end: date) -> list[UsageRow]:
        """Counters by model and day for start <= day <= end."""
        rows: list[UsageRow] = []
        kwargs: dict[str, Any] = {
            "TableName": self.table,
            "KeyConditionExpression": "pk = :pk AND sk BETWEEN :lo AND :hi",
            "ExpressionAttributeValues": {
                ":pk": {"S": f"tenant#{tenant}"},
                ":lo": {"S": f"day#{start.isoformat()}"},
                ":hi": {"S": f"day#{end.isoformat()}#\uffff"},
            },
        }
        while True:
            page = self.ddb.query(**kwargs)
            for item in page.get("Items", []):
                rows.append(
                    UsageRow(
                        model=item["model"]["S"],
                        day=item["day"]["S"],
                        **{c: int(item[c]["N"]) if c in item else 0 for c in COUNTERS},
                    )
                )
            if "LastEvaluatedKey" not in page:
                return rows
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]


def _cancelled_by(exc: ClientError, index: int) -> bool:
    """Whether the transaction's item `index` failed its condition (0: the request marker, 2: the quota)."""
    reasons = exc.response.get("CancellationReasons") or []
    if reasons:
        return len(reasons) > index and reasons[index].get("Code") == "ConditionalCheckFailed"
    # Without structured reasons, the message lists one code per item: "[ConditionalCheckFailed, None, ...]".
    codes = str(exc).rsplit("[", 1)[-1].rstrip("]").split(", ")
    return len(codes) > index and codes[index].strip() == "ConditionalCheckFailed"
