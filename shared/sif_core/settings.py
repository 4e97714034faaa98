"""The one Settings: read from the environment (prefix SIF_) once, at a handler's import.

Logic receives values from here, never reads os.environ itself. No secret comes from here: each
tenant's callback signing secret lives in its profile item in the tenants table, readable only by
the callback function (`sif_core.tenants`). `local` says the code runs on the local stack (callbacks
may reach 127.0.0.1 there); it is an explicit field, not a variable read deep in the logic.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SIF_", extra="ignore", frozen=True)

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
    # How long a warm process trusts what it read of a model's versions and aliases (an alias moved in
    # the models bucket serves within this time, without a redeploy).
    model_index_ttl_s: float = 30.0
    # Models the API function loads at its cold start (comma-separated; "*": every published model).
    # Any other model (a published one of yours) loads on its first call; warming hundreds of models
    # would make every cold start pay for all of them.
    warm_models: str = "all-minilm-l6-v2,open-nsfw"
    presign_ttl_s: int = 3600
    # Callbacks: queued by the lifecycle on the callbacks queue, delivered by the callback function.
    callbacks_queue_url: str = ""
    callback_timeout_s: float = 5.0  # per socket operation of one delivery attempt
    callback_retry_base_s: float = 5.0  # backoff between attempts: base, 2 x base, ... at most max
    callback_retry_max_s: float = 900.0
    local: bool = False
    # A batch created with POST /v1/batches whose file never arrives expires this long after its upload URL.
    upload_grace_s: int = 600

    @classmethod
    def from_env(cls) -> Settings:
        return cls()


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
