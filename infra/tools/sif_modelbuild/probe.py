"""The probe: a model about to be published, run through sif's own task layer, and its CPU cost timed.

The version is staged in a temporary folder laid out like the bucket and loaded by a ModelRegistry
(sha256-verified, sessions built as Lambda builds them), then `registry.task(...).predict(samples,
strict=True)` runs on sample inputs: the project's texts, its generated test images, rows over the
declared features, tensors of the signature's shapes. Every variant must pass. What fails here
would fail for the first caller, so it is refused before anything is written.

The cost is the median of single-input calls on one thread after a warm-up: what one item costs a
Lambda (about one vCPU at the API's 2 GB), pre- and post-processing included.
"""

from __future__ import annotations

import base64
import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sif_inference.manifest import ModelManifest
from sif_modelbuild.errors import PublishError
from sif_modelbuild.taskfit import sample_rows, tensor_instance

SAMPLES = 8
WARMUP_RUNS = 2
TIMED_RUNS = 9
TIMING_BUDGET_S = 20.0  # a very slow model is timed on fewer runs (at least 3)
MIN_TIMED_RUNS = 3


@dataclass(frozen=True)
class ProbeResult:
    cpu_ms_per_item: float
    timed_runs: int
    samples: int


def sample_inputs(
    manifest: ModelManifest, count: int = SAMPLES, known_categories: dict[str, list[str]] | None = None
) -> list[Any]:
    """Inputs as a caller sends them (API instances), for the manifest's task."""
    if manifest.task in ("embedding", "text-classification"):
        from sif_modelbuild.common import load_texts

        return load_texts()[:count]
    if manifest.task == "image-classification":
        from sif_modelbuild.testimages import make_test_images

        return [{"b64": base64.b64encode(data).decode()} for _, data in make_test_images()[:count]]
    if manifest.task == "tabular":
        return sample_rows(manifest.features, count, known_categories)
    inputs = manifest.signature.inputs if manifest.signature else []
    return [{spec.name: tensor_instance(spec, i) for spec in inputs} for i in range(min(count, 4))]


def edge_inputs(manifest: ModelManifest) -> list[Any]:
    """Inputs at the manifest's limits, probed but not timed: a text that fills max_length tokens (a
    graph whose position table is shorter than --max-length fails here, not on a caller's long text)."""
    if manifest.tokenizer is not None:
        return [" ".join(["probe"] * (2 * manifest.tokenizer.max_length))]
    return []


def probe(manifest: ModelManifest, files: dict[str, bytes], samples: list[Any]) -> ProbeResult:
    """Run every variant on `samples` (sample_inputs) through the task layer; time the default one."""
    from sif_inference.registry import ModelRegistry
    from sif_inference.sources import MANIFEST_FILE, LocalDirSource

    with tempfile.TemporaryDirectory(prefix="sif-publish-") as work:
        stage = Path(work) / "stage" / manifest.name / manifest.version
        stage.mkdir(parents=True)
        for filename, data in files.items():
            (stage / filename).write_bytes(data)
        (stage / MANIFEST_FILE).write_text(json.dumps(manifest.model_dump(mode="json")))
        registry = ModelRegistry(LocalDirSource(Path(work) / "stage"), Path(work) / "cache", threads=1)
        probes = [*samples, *edge_inputs(manifest)]
        for variant in [manifest.default_variant, *(v for v in manifest.variants if v != manifest.default_variant)]:
            task = _run(lambda v=variant: registry.task(manifest.name, v, version=manifest.version), variant)
            result = _run(lambda t=task: t.predict(probes, strict=True), variant)
            if result.errors or len(result.predictions) != len(probes):
                raise PublishError(f"the probe of variant {variant} failed on sample inputs: {result.errors}")
        task = registry.task(manifest.name, version=manifest.version)
        timings = _time(lambda i: task.predict([samples[i % len(samples)]], strict=True))
    median = round(statistics.median(timings), 3)
    return ProbeResult(cpu_ms_per_item=median, timed_runs=len(timings), samples=len(samples))


def _run(call: Any, variant: str) -> Any:
    try:
        return call()
    except PublishError:
        raise
    except Exception as exc:  # whatever the task layer raises, the model is not servable
        from sif_modelbuild.graph import ort_message

        raise PublishError(
            f"the probe of variant {variant} through sif's task layer failed on sample inputs: "
            f"{type(exc).__name__}: {ort_message(exc)}"
        ) from exc


def _time(call: Any) -> list[float]:
    for i in range(WARMUP_RUNS):
        call(i)
    timings: list[float] = []
    deadline = time.monotonic() + TIMING_BUDGET_S
    for i in range(TIMED_RUNS):
        start = time.perf_counter()
        call(i)
        timings.append((time.perf_counter() - start) * 1000.0)
        if len(timings) >= MIN_TIMED_RUNS and time.monotonic() > deadline:
            break
    return timings
