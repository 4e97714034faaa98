"""The GPU batch worker: `python -m sif_gpu_worker.entrypoint --spec s3://results/.../spec.json`.

AWS Batch runs this in the GPU container (the job definition's command, the spec URI as its
`spec` parameter); the local stack's Batch executor runs the same command as a local process.
It reads the `GpuJobSpec`, runs the model on CUDA when onnxruntime has it and on CPU otherwise
(the inference core's build_session chooses), streams the input through a reader thread,
compute and a writer thread, writes the outputs, keeps the work record's status and progress
current, and meters the run's GPU seconds.

Exit codes: 0 when the job finished (succeeded, or failed on purpose and marked failed); 1 when
something unexpected happened (the job is marked failed with the error first, so nothing is
left hanging in queued/running); 2 for a bad command line.
"""

from __future__ import annotations

import argparse
import functools
import io
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import IO, Any

from sif_core.jobs import (
    ChunkResult,
    InputRow,
    JobFailedError,
    JobRunner,
    OutputWriter,
    Predictor,
    callback_policy_for,
    check_input_uri,
    describe_error,
    instance_rows,
    iter_file_rows,
    open_input,
    rounded_vectors,
    services_from_settings,
)
from sif_core.routing import GpuJobSpec, read_spec
from sif_core.settings import Settings
from sif_gpu_worker.pipeline import PipelineStats, run_pipeline
from sif_inference.embedder import TextEmbedder
from sif_metering.ledger import Usage

log = logging.getLogger("sif_gpu_worker")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
PROGRESS_EVERY_S = 2.0
# Bigger micro-batches than Lambda's: a GPU wants wide tensors; the CPU keeps the core's sizes.
GPU_BATCH_ITEMS, GPU_BATCH_TOKENS = 256, 256 * 128
CHUNK_ITEMS = {"CUDAExecutionProvider": 8192, "CPUExecutionProvider": 4096}


class CountingReader(io.RawIOBase):
    """Wraps a byte stream and counts what was read, for progress on inputs of known size."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.raw.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        self.count += n
        return n


def embed_wide(embedder: TextEmbedder, texts: list[str]) -> ChunkResult:
    """Embeddings in GPU-sized micro-batches (same tokenizer, same graph, wider tensors)."""
    result = embedder.embed(texts, max_items=GPU_BATCH_ITEMS, max_tokens=GPU_BATCH_TOKENS)
    return ChunkResult(rounded_vectors(result.vectors), tokens=result.total_tokens)


class GpuJob:
    """One spec of kind "job": the same outputs, status and events as the worker function's CPU path."""

    def __init__(self, runner: JobRunner, spec: GpuJobSpec) -> None:
        self.runner = runner
        self.spec = spec
        self.size: int | None = None
        self.counter: CountingReader | None = None
        self._last_progress = 0.0

    def _rows(self, predictor: Predictor) -> Iterator[InputRow]:
        spec, manifest = self.spec, predictor.manifest
        if spec.instances is not None:
            self.size = len(spec.instances)
            yield from instance_rows(manifest, spec.instances)
            return
        assert spec.input_uri is not None
        bucket, key = check_input_uri(spec.input_uri, spec.tenant, self.runner.s.settings)
        body, size = open_input(self.runner.s.s3, bucket, key)
        with body:
            self.counter = CountingReader(body)
            self.size = size or None
            yield from iter_file_rows(manifest, io.BufferedReader(self.counter, buffer_size=1 << 20), key, size)

    def _progress(self, rows: int) -> None:
        now = time.monotonic()
        if now - self._last_progress < PROGRESS_EVERY_S:
            return
        self._last_progress = now
        if self.spec.instances is not None and self.size:
            fraction = rows / self.size
        elif self.counter is not None and self.size:
            fraction = self.counter.count / self.size
        else:
            return
        self.runner.progress(self.spec.tenant, self.spec.id, fraction)

    def run(self) -> PipelineStats | None:
        spec, runner = self.spec, self.runner
        record = runner.s.store.get(spec.tenant, "job", spec.id)
        if record is not None and record.status == "succeeded":
            log.info("job %s already succeeded (a retried Batch attempt); nothing to do", spec.id)
            return None
        started = time.monotonic()
        attempt = os.environ.get("AWS_BATCH_JOB_ATTEMPT", "1")
        runs = int(record.details.get("runs", 0)) + 1 if record is not None else 1
        runner.mark_running(spec.tenant, spec.id, route="gpu", batch_attempt=attempt, runs=runs)
        try:
            predictor = Predictor(runner.s.registry, spec.model, spec.variant)
            log.info("job %s: model %s on %s", spec.id, spec.model, predictor.provider)
            predict: Callable[[list[Any]], ChunkResult] = predictor.predict
            embedder = predictor.loaded.embedder
            if embedder is not None and predictor.provider == "CUDAExecutionProvider":
                predict = functools.partial(embed_wide, embedder)
            writer = OutputWriter()
            try:
                stats = run_pipeline(
                    self._rows(predictor),
                    predict,
                    writer.write,
                    chunk_items=CHUNK_ITEMS.get(predictor.provider, 1024),
                    on_progress=self._progress,
                )
                manifest = runner.output_manifest(
                    spec.id, predictor, writer.rows, int(stats.compute_s * 1000), route="gpu"
                )
                manifest["pipeline"] = {
                    "wall_s": round(stats.wall_s, 3),
                    "compute_s": round(stats.compute_s, 3),
                    "rows_per_s": round(stats.rows_per_s, 1),
                    **{k: round(v, 3) for k, v in stats.waits.items()},
                }
                writer.upload(runner.s.s3, runner.s.settings.results_bucket, spec.output_prefix, manifest)
            finally:
                writer.close()
        except JobFailedError as exc:
            runner.fail(spec.tenant, spec.id, describe_error(exc))
            return None
        elapsed_ms = int((time.monotonic() - started) * 1000)
        usage = Usage(
            tenant=spec.tenant,
            model=spec.model,
            request_id=spec.metering_id,
            inputs=stats.rows,
            tokens=stats.tokens,
            pixels=stats.pixels,
            compute_ms=int(stats.compute_s * 1000),
            gpu_ms=elapsed_ms,  # the GPU instance is held for the whole run, so all of it is billed
        )
        runner.succeed(
            spec.tenant,
            spec.id,
            spec.output_prefix,
            stats.rows,
            usage,
            callback_url=spec.callback_url,
            model=spec.model,
        )
        log.info("job %s: %d rows in %.2f s (%.0f rows/s)", spec.id, stats.rows, stats.wall_s, stats.rows_per_s)
        return stats


def run_batch_spec(spec: GpuJobSpec, settings: Settings) -> None:
    """A drop-file batch routed to the GPU queue: scored by the batch scorer's streaming scorer."""
    from sif_core.filebatch import score_gpu_batch

    outcome = score_gpu_batch(spec, settings)
    log.info("batch %s: %s", spec.id, outcome.as_dict())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sif_gpu_worker", description=__doc__.splitlines()[0])
    parser.add_argument("--spec", required=True, help="s3:// URI of the job spec (GpuJobSpec JSON)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    settings = Settings.from_env()
    services = services_from_settings(settings, batch=None, callback_policy=callback_policy_for(settings))
    runner = JobRunner(services)
    try:
        spec = read_spec(services.s3, args.spec)
    except Exception as exc:
        log.exception("cannot read the job spec %s", args.spec)
        print(f"sif_gpu_worker: cannot read the job spec {args.spec}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    try:
        if spec.kind == "job":
            GpuJob(runner, spec).run()
        else:
            run_batch_spec(spec, settings)
    except Exception as exc:
        log.exception("%s %s failed", spec.kind, spec.id)
        if spec.kind == "job":
            runner.fail(spec.tenant, spec.id, f"GPU worker error: {describe_error(exc)}")
        return EXIT_FAILED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
