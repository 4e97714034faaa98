"""OpenAI Batch requests on the file engine: the staged request rows, the file model that runs them,
and the lines of OpenAI's output and error files.

An OpenAI batch (POST /v1/batches with an `input_file_id`) is a sif batch like any other: one work
record (kind `batch`, `details.origin == "openai"`), one inbox object, one lifecycle, one bill, the
same scorer, GPU route, checkpoints, cancel and events. What differs is what a row is and what its
line says:

- the API reads the input file when the batch is created, checks it line by line and puts one
  *staged row* per line into the inbox (`incoming/{tenant}/{model}/{batch id}.jsonl`, which starts the
  scoring): `{"id": <line number>, "text": <a RequestSpec's JSON>}`, the spec holding the request's
  custom_id and texts, or why the line cannot be run (not JSON, no custom_id, a duplicate, another
  url, a bad body);
- `EmbeddingRequests` scores a window of staged rows: each request runs as its own POST
  /v1/embeddings would (`task.predict(texts, strict=True)`: the same limits, errors, vectors and
  tokens), and its whole line is written: `{"id", "custom_id", "response": {"status_code": 200,
  "request_id", "body"}, "error": null}` in predictions.jsonl (the output file), or the error line
  (`response` null or the 4xx the endpoint would answer, `error: {"code", "message"}`) in errors.jsonl
  (the error file);
- the quota unit is the text, as everywhere: a request of five texts is five inputs (`units`,
  `WindowScores.inputs`), reserved when the file arrives and settled to what was scored.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field

from sif_core.rows import Row
from sif_core.scoring import WindowScores
from sif_inference.errors import BadInputError, ImageDecodeError, InferenceError, InputLimitError, WrongTaskError
from sif_inference.rounding import Encoding, compact_json, float32_base64
from sif_inference.tasks import Field as RowField
from sif_metering.pricing import cost_usd

if TYPE_CHECKING:
    from sif_inference.manifest import ModelManifest
    from sif_inference.registry import ModelRegistry
    from sif_inference.tasks import TextEmbedding

ORIGIN = "openai"  # details.origin of an OpenAI batch's record
ENDPOINT = "/v1/embeddings"  # the one endpoint a batch may call
COMPLETION_WINDOW = "24h"
Stream = Literal["output", "errors"]
_OUTPUT_FILE = "file-{batch_id}-{stream}"


# ---------------------------------------------------------------------- ids
def request_ids(batch_id: str, line: int) -> tuple[str, str]:
    """(the output line's `id`, its response's `request_id`): derived from the batch and the line, so a
    resumed run writes the same bytes."""
    digest = hashlib.sha256(f"{batch_id}#{line}".encode()).hexdigest()
    return f"batch_req_{digest[:24]}", f"req_{digest[24:48]}"


def output_file_id(batch_id: str, stream: Stream) -> str:
    """The file id of a batch's output or error file (its predictions.jsonl or errors.jsonl)."""
    return _OUTPUT_FILE.format(batch_id=batch_id, stream=stream)


def parse_output_file_id(file_id: str) -> tuple[str, Stream] | None:
    """(batch id, stream) of an id `output_file_id` made, else None."""
    head, _, stream = file_id.rpartition("-")
    batch_id = head.removeprefix("file-")
    if not head.startswith("file-") or stream not in ("output", "errors"):
        return None
    from sif_core.keys import OPENAI_BATCH_ID

    if not OPENAI_BATCH_ID.match(batch_id):
        return None
    return batch_id, "output" if stream == "output" else "errors"


# ---------------------------------------------------------------------- staged rows
class LineError(BaseModel):
    """Why a line fails: `code` and `message` for the error file; `status`/`type` when the endpoint itself
    would have answered (the line then carries that response, with the API's error body)."""

    code: str
    message: str
    status: int | None = None
    type: str | None = None


class RequestSpec(BaseModel):
    """One input line as the API staged it: a request to run, or the error it already is."""

    custom_id: str | None = None
    model: str = ""  # as the request named it (the response body repeats it)
    input: list[str] = Field(default_factory=list)
    encoding_format: Encoding = "float"
    error: LineError | None = None


def staged_row(line: int, spec: RequestSpec) -> str:
    """The staged file's row for input line `line`: UTF-8 JSON, or ASCII escapes where a text holds a lone
    surrogate (which UTF-8 cannot carry; the task refuses it when the request runs, as the API does)."""
    value = spec.model_dump(exclude_defaults=True)
    for ascii_only in (False, True):
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=ascii_only)
        row = json.dumps({"id": line, "text": text}, separators=(",", ":"), ensure_ascii=ascii_only) + "\n"
        try:
            row.encode("utf-8")
        except UnicodeEncodeError:
            continue
        return row
    raise AssertionError("unreachable")  # pragma: no cover - ASCII JSON always encodes


def parse_spec(row: Row) -> RequestSpec:
    """The spec in a staged row's text (python-mode validation: lone surrogates reach the task's check)."""
    if not isinstance(row.value, str):  # pragma: no cover - staged rows are JSONL rows with a text
        raise BadInputError("a staged request row has no text")
    return RequestSpec.model_validate(json.loads(row.value))


# ---------------------------------------------------------------------- output lines
# What the API answers for the inference core's errors (sif_api.errors maps them the same way).
_STATUS: list[tuple[type[InferenceError], int, str]] = [
    (InputLimitError, 413, "input_too_large"),
    (WrongTaskError, 400, "wrong_task"),
    (ImageDecodeError, 400, "invalid_image"),
    (BadInputError, 400, "bad_request"),
    (InferenceError, 400, "bad_request"),
]


def error_of(exc: InferenceError) -> LineError:
    for cls, status, kind in _STATUS:
        if isinstance(exc, cls):
            return LineError(code=kind, message=str(exc), status=status, type=kind)
    raise AssertionError("unreachable")  # pragma: no cover - InferenceError closes the list


def error_line(batch_id: str, line: int, custom_id: str | None, error: LineError) -> str:
    """An error file line: the endpoint's 4xx as `response` when it would have answered, else null."""
    line_id, request_id = request_ids(batch_id, line)
    response = None
    if error.status is not None:
        body = {"error": {"type": error.type or error.code, "message": error.message, "request_id": request_id}}
        response = {"status_code": error.status, "request_id": request_id, "body": body}
    value = {
        "id": line_id,
        "custom_id": custom_id,
        "response": response,
        "error": {"code": error.code, "message": error.message},
    }
    return json.dumps(value, separators=(",", ":"))  # ASCII: whatever a message quotes, the line encodes


@dataclass
class RequestResult:
    """One request's run: its vectors (JSON values or base64), tokens, truncated inputs and time."""

    embeddings: list[Any]
    tokens: int
    truncated: list[int]
    compute_ms: int


def response_body(spec: RequestSpec, result: RequestResult, manifest: ModelManifest) -> dict[str, Any]:
    """Exactly what POST /v1/embeddings answers for this request (sif_api.schemas.EmbeddingsResponse);
    `cost_usd` is the request's share of the batch's bill: its inputs and tokens (the batch is one call)."""
    inputs = len(result.embeddings)
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(result.embeddings)],
        "model": spec.model,
        "usage": {
            "prompt_tokens": result.tokens,
            "total_tokens": result.tokens,
            "truncated_inputs": result.truncated,
            "compute_ms": result.compute_ms,
            "cost_usd": cost_usd(manifest.price, calls=0, inputs=inputs, tokens=result.tokens),
        },
    }


def output_line(batch_id: str, line: int, spec: RequestSpec, body: dict[str, Any]) -> str:
    line_id, request_id = request_ids(batch_id, line)
    response = {"status_code": 200, "request_id": request_id, "body": body}
    return compact_json({"id": line_id, "custom_id": spec.custom_id, "response": response, "error": None})


# ---------------------------------------------------------------------- the file model
_POOL: Executor | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> Executor:
    """Requests of a window run side by side (each text still runs on the embedder's own pool): one
    thread per CPU this process may use, built once per process."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            _POOL = ThreadPoolExecutor(max_workers=max(1, cpus), thread_name_prefix="sif-openai-batch")
        return _POOL


class EmbeddingRequests:
    """The scorer's FileModel for an OpenAI embeddings batch: a staged row is one request, run as
    POST /v1/embeddings runs it, and its output or error line is written whole (`WindowScores.lines`)."""

    field: RowField = "text"
    features: dict[str, str] | None = None

    def __init__(self, task: TextEmbedding, batch_id: str, *, window_rows: int | None = None) -> None:
        self.task = task
        self.manifest = task.manifest
        self.variant = task.variant
        self.batch_id = batch_id
        # A request holds up to max_inputs texts: windows of fewer rows keep a window's vectors bounded.
        self.window_rows = window_rows or max(16, task.profile.window_rows // 16)

    def units(self, rows: list[Row]) -> int:
        """Texts in the window's runnable requests: the quota's unit."""
        specs = [parse_spec(row) for row in rows]
        return sum(len(spec.input) for spec in specs if spec.error is None)

    def run(self, spec: RequestSpec) -> RequestResult | LineError:
        """One request, exactly as the API runs it (strict: the first bad text fails the request)."""
        started = time.perf_counter()
        try:
            result = self.task.predict(spec.input, strict=True)
        except InferenceError as exc:
            return error_of(exc)
        vectors = [result.predictions[i] for i in range(len(spec.input))]
        if spec.encoding_format == "base64":
            embeddings: list[Any] = [float32_base64(v) for v in vectors]
        else:
            embeddings = [self.task.to_json(v) for v in vectors]
        compute_ms = max(1, math.ceil((time.perf_counter() - started) * 1000))
        return RequestResult(embeddings, result.tokens, result.truncated, compute_ms)

    def score(self, rows: list[Row]) -> WindowScores:
        specs = [parse_spec(row) for row in rows]
        runnable = [(k, spec) for k, spec in enumerate(specs) if spec.error is None]
        results = dict(zip((k for k, _ in runnable), _pool().map(self.run, (s for _, s in runnable)), strict=True))
        scores = WindowScores(inputs=0, lines=True)
        for k, (row, spec) in enumerate(zip(rows, specs, strict=True)):
            line = int(row.id)
            outcome: RequestResult | LineError | None = spec.error or results.get(k)
            if isinstance(outcome, RequestResult):
                body = response_body(spec, outcome, self.manifest)
                scores.predictions[k] = output_line(self.batch_id, line, spec, body)
                scores.inputs = (scores.inputs or 0) + len(spec.input)
                scores.tokens += outcome.tokens
                scores.truncated += len(outcome.truncated)
            else:
                assert outcome is not None
                scores.errors[k] = error_line(self.batch_id, line, spec.custom_id, outcome)
        return scores


def file_model(
    registry: ModelRegistry, batch_id: str, name: str, variant: str | None = None, *, version: str | None = None
) -> EmbeddingRequests:
    """The FileModel of OpenAI batch `batch_id` on model `name` (an embedding model: WrongTaskError else)."""
    from sif_inference.tasks import TextEmbedding

    task = registry.task(name, variant, version=version, kind="embedding")
    if not isinstance(task, TextEmbedding):  # pragma: no cover - kind="embedding" gives one or raises
        raise WrongTaskError(f"model {name!r} does not make embeddings")
    return EmbeddingRequests(task, batch_id)
