"""Batch and job records in the work table, always addressed through their tenant.

Keys: pk = tenant#{tenant}, sk = {kind}#{id}. A lookup needs the caller's tenant, so another
tenant's id is simply not found (404), never "forbidden".
"""

from __future__ import annotations

import secrets
import time
from decimal import Decimal
from typing import Any, Literal

from boto3.dynamodb.conditions import Attr
from botocore.exceptions import ClientError
from pydantic import BaseModel, Field

Kind = Literal["batch", "job"]
Status = Literal["queued", "running", "succeeded", "failed"]
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed"})
RECORD_TTL_S = 30 * 24 * 3600


def new_id(kind: Kind) -> str:
    return ("b_" if kind == "batch" else "j_") + secrets.token_hex(10)


class WorkRecord(BaseModel):
    id: str
    kind: Kind
    tenant: str
    model: str
    status: Status = "queued"
    route: Literal["cpu", "gpu"] = "cpu"
    rows: int = 0
    succeeded: int = 0
    failed: int = 0
    progress: float = 0.0
    input_key: str | None = None
    output_prefix: str | None = None
    error: str | None = None
    callback_url: str | None = None
    details: dict[str, Any] = Field(default_factory=dict)
    created_at: float = Field(default_factory=time.time)
    updated_at: float = Field(default_factory=time.time)


def _to_ddb(value: Any) -> Any:
    if isinstance(value, float):
        return Decimal(str(value))
    if isinstance(value, dict):
        return {k: _to_ddb(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_to_ddb(v) for v in value]
    return value


def _from_ddb(value: Any) -> Any:
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, dict):
        return {k: _from_ddb(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_ddb(v) for v in value]
    return value


class WorkStore:
    def __init__(self, table: Any) -> None:
        self.table = table  # a boto3 dynamodb Table

    @staticmethod
    def key(tenant: str, kind: Kind, id_: str) -> dict[str, str]:
        return {"pk": f"tenant#{tenant}", "sk": f"{kind}#{id_}"}

    def create(self, record: WorkRecord) -> WorkRecord:
        item = {
            **self.key(record.tenant, record.kind, record.id),
            **_to_ddb(record.model_dump()),
            "expires_at": int(time.time()) + RECORD_TTL_S,
        }
        self.table.put_item(Item=item, ConditionExpression=Attr("pk").not_exists())
        return record

    def get(self, tenant: str, kind: Kind, id_: str) -> WorkRecord | None:
        item = self.table.get_item(Key=self.key(tenant, kind, id_), ConsistentRead=True).get("Item")
        if item is None:
            return None
        data = _from_ddb({k: v for k, v in item.items() if k not in ("pk", "sk", "expires_at")})
        return WorkRecord.model_validate(data)

    def update(self, tenant: str, kind: Kind, id_: str, *, only_if_not_terminal: bool = False, **fields: Any) -> bool:
        """Set fields; with only_if_not_terminal, a finished record is left alone (returns False)."""
        fields["updated_at"] = time.time()
        names = {f"#{k}": k for k in fields}
        values = {f":{k}": _to_ddb(v) for k, v in fields.items()}
        kwargs: dict[str, Any] = {
            "Key": self.key(tenant, kind, id_),
            "UpdateExpression": "SET " + ", ".join(f"#{k} = :{k}" for k in fields),
            "ExpressionAttributeNames": names,
            "ExpressionAttributeValues": values,
        }
        condition = Attr("pk").exists()
        if only_if_not_terminal:
            condition = condition & ~Attr("status").is_in(sorted(TERMINAL))
        kwargs["ConditionExpression"] = condition
        try:
            self.table.update_item(**kwargs)
        except ClientError as exc:
            if exc.response["Error"]["Code"] == "ConditionalCheckFailedException":
                return False
            raise
        return True
