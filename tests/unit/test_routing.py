"""The router: explicit accelerator, manifest route, archive route, cost vs the Lambda budget; the GPU spec."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from sif_core.routing import (
    GpuJobSpec,
    RoutingError,
    batch_job_name,
    choose_route,
    parse_s3_uri,
    read_spec,
    spec_key,
    submit_gpu_job,
)
from sif_core.settings import Settings
from sif_inference.manifest import ModelManifest

MODELS = Path(__file__).resolve().parents[2] / "shared" / "models"


def manifest(name: str, **changes: Any) -> ModelManifest:
    data = json.loads((MODELS / f"{name}.json").read_text())
    for key, value in changes.items():
        if isinstance(value, dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return ModelManifest.model_validate(data)


def test_small_cpu_work_stays_on_cpu() -> None:
    assert choose_route(manifest("all-minilm-l6-v2"), 10) == "cpu"


def test_cost_beyond_one_lambda_run_goes_to_gpu() -> None:
    m = manifest("all-minilm-l6-v2", cost={"cpu_ms_per_item": 4.0, "lambda_budget_ms": 600_000})
    assert choose_route(m, 150_000) == "cpu"  # exactly the budget still fits
    assert choose_route(m, 150_001) == "gpu"


def test_explicit_accelerator_wins() -> None:
    m = manifest("all-minilm-l6-v2")
    assert choose_route(m, 1, "gpu") == "gpu"
    assert choose_route(manifest("all-minilm-l6-v2", route="gpu"), 1, "cpu") == "cpu"
    assert choose_route(m, 10**9, "cpu") == "cpu"


def test_gpu_route_models_and_archives() -> None:
    assert choose_route(manifest("all-minilm-l6-v2", route="gpu"), 1) == "gpu"
    nsfw = manifest("open-nsfw")
    assert choose_route(nsfw, 1) == "cpu"
    assert choose_route(nsfw, 1, archive=True) == "gpu"
    assert choose_route(nsfw, 10_000) == "gpu"  # 120 ms x 10k > 600 s


def test_unknown_accelerator_is_refused() -> None:
    with pytest.raises(RoutingError, match="accelerator"):
        choose_route(manifest("all-minilm-l6-v2"), 1, "tpu")


def test_s3_uri_parsing() -> None:
    assert parse_s3_uri("s3://b/a/b.jsonl") == ("b", "a/b.jsonl")
    for bad in ("http://b/k", "s3://b", "s3:///k", "b/k"):
        with pytest.raises(ValueError):
            parse_s3_uri(bad)


class FakeS3:
    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], bytes] = {}

    def put_object(self, *, Bucket: str, Key: str, Body: bytes, **_: Any) -> dict[str, Any]:
        self.objects[(Bucket, Key)] = Body
        return {}

    def get_object(self, *, Bucket: str, Key: str) -> dict[str, Any]:
        return {"Body": io.BytesIO(self.objects[(Bucket, Key)])}


class FakeBatch:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def submit_job(self, **kwargs: Any) -> dict[str, Any]:
        self.calls.append(kwargs)
        return {"jobId": "batch-123", "jobName": kwargs["jobName"]}


def test_submit_gpu_job_writes_a_tenant_scoped_spec_and_passes_its_uri() -> None:
    s3, batch = FakeS3(), FakeBatch()
    settings = Settings(results_bucket="results-b", batch_job_queue="arn:q", batch_job_definition="arn:jd")
    spec = GpuJobSpec(
        kind="job", id="j_1", tenant="t_a", model="all-minilm-l6-v2", instances=["x"], output_prefix="results/t_a/m/"
    )
    assert submit_gpu_job(batch, s3, settings, spec) == "batch-123"
    (call,) = batch.calls
    assert call["jobQueue"] == "arn:q" and call["jobDefinition"] == "arn:jd"
    uri = call["parameters"]["spec"]
    assert uri == f"s3://results-b/{spec_key(spec)}" and spec_key(spec).startswith("results/t_a/")
    assert read_spec(s3, uri) == spec


def test_submit_without_a_queue_is_a_clear_error() -> None:
    spec = GpuJobSpec(kind="batch", id="b_1", tenant="t", model="m", input_uri="s3://i/k", output_prefix="results/t/")
    with pytest.raises(RoutingError, match="SIF_BATCH_JOB_QUEUE"):
        submit_gpu_job(FakeBatch(), FakeS3(), Settings(results_bucket="r"), spec)


def test_batch_job_names_are_valid() -> None:
    spec = GpuJobSpec(kind="batch", id="b.x/y" * 25, tenant="t", model="m", output_prefix="results/t/")
    name = batch_job_name(spec)
    assert len(name) <= 128 and all(c.isalnum() or c in "-_" for c in name)
