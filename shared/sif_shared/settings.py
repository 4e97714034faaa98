"""Environment, read once at the boundary (handler import), never deep inside logic."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel


class Settings(BaseModel):
    models_bucket: str = ""
    inbox_bucket: str = ""
    results_bucket: str = ""
    jobs_queue_url: str = ""
    inbox_queue_url: str = ""
    batch_job_queue: str = ""
    batch_job_definition: str = ""
    tenants_table: str = ""
    usage_table: str = ""
    work_table: str = ""
    idempotency_table: str = ""
    job_topic_arn: str = ""
    model_cache_dir: Path = Path("/tmp/sif-models")  # noqa: S108 - Lambda's only writable place
    presign_ttl_s: int = 3600
    callback_secret: str = "sif-local-callback-secret"  # noqa: S105 - overridden per deployment

    @classmethod
    def from_env(cls) -> Settings:
        values = {
            name: os.environ[f"SIF_{name.upper()}"] for name in cls.model_fields if f"SIF_{name.upper()}" in os.environ
        }
        return cls.model_validate(values)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings.from_env()
