"""The streaming file scorer: rows in, predictions.jsonl + errors.jsonl + manifest.json out.

`score_file` reads a file's rows window by window (a few hundred rows), scores each window with
the inference core (which sorts it by length into micro-batches and gives results back in input
order), and appends one output line per row: a prediction for a good row, an error for a bad one.
Memory is bounded by one window plus one output part, whatever the file's size.

Outputs leave in parts (`ResultSink.upload_part`, an S3 multipart upload in Lambda) and the
state needed to carry on — where reading stopped, the parts written, the output not yet in a
part, the counts — is a `Checkpoint` saved after every part, every `checkpoint_every_s` and at
the deadline. A run that stops (deadline, crash, kill) resumes from its last checkpoint: rows
before it are never scored again and the parts after it are rewritten under the same numbers,
so the final files hold every row exactly once, in input order.

No AWS in here: the Lambda scorer and the GPU worker pass S3 adapters (sif_core.s3io); tests
and benchmarks pass the local ones below.
"""

from __future__ import annotations

import gzip
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol

from sif_core.keys import OUTPUT_FILES
from sif_core.rows import BadRow, ByteSource, Format, Item, Position, Row, open_rows
from sif_inference.errors import WrongTaskError
from sif_inference.manifest import ModelManifest
from sif_inference.registry import ModelRegistry
from sif_inference.rounding import Encoding, compact_json
from sif_inference.tasks import Field, Task, TextEmbedding

Stream = Literal["predictions", "errors"]
STREAMS: tuple[Stream, ...] = ("predictions", "errors")
CHECKPOINT_VERSION = 1
_dumps = compact_json


# ---------------------------------------------------------------------- models
@dataclass
class WindowScores:
    """One window's results: a prediction (JSON text) or an error for each row, by position.

    `inputs`: the quota units scored (None: one per prediction; a row of an OpenAI batch is a request
    of several texts). `lines`: predictions and errors are whole output lines, written as they are
    (an OpenAI batch's output and error files), not `{"id", "prediction"}` / `{"line", "id", "error"}`."""

    predictions: dict[int, str] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)
    tokens: int = 0
    pixels: int = 0
    truncated: int = 0
    inputs: int | None = None
    lines: bool = False


class FileModel(Protocol):
    """What the scorer needs from a model: which field it reads and how to score a window of rows."""

    manifest: ModelManifest
    variant: str
    field: Field
    features: dict[str, str] | None  # a tabular model's features: what a CSV file's columns are read as
    window_rows: int

    def units(self, rows: list[Row]) -> int:
        """The quota units (inputs) `rows` hold: what the gate reserves before scoring them."""
        ...

    def score(self, rows: list[Row]) -> WindowScores: ...


class TaskFileModel:
    """A task (sif_inference.tasks) as the scorer's FileModel: a bad row fails only itself.

    Decoding, limits, clipping, batch sizes and each prediction's JSON text are the task's, so a
    file row gives the same line as the same input through the API or a job."""

    def __init__(self, task: Task, *, window_rows: int | None = None, encoding: Encoding = "float") -> None:
        self.task = task
        self.dumps_all = task.dumps_all  # each prediction's JSON text
        if encoding == "base64":
            if not isinstance(task, TextEmbedding):
                name = task.manifest.name
                raise WrongTaskError(f'encoding_format "base64" is for embeddings; {name!r} does {task.name}')
            self.dumps_all = task.dumps_base64
        self.manifest = task.manifest
        self.variant = task.variant
        self.field: Field = task.field
        self.features = task.features
        self.window_rows = window_rows or task.profile.window_rows

    def units(self, rows: list[Row]) -> int:
        return len(rows)

    def score(self, rows: list[Row]) -> WindowScores:
        result = self.task.predict([row.value for row in rows])
        return WindowScores(
            predictions=self.dumps_all(result.predictions),
            errors=result.errors,
            tokens=result.tokens,
            pixels=result.pixels,
            truncated=len(result.truncated),
        )


def file_model(
    registry: ModelRegistry,
    name: str,
    variant: str | None = None,
    *,
    version: str | None = None,
    encoding: Encoding = "float",
) -> FileModel:
    """The FileModel for a registry model (one version; None: `latest`): its own task, sized for the
    session's provider (CPU or GPU); `encoding` "base64" writes an embedding model's vectors as OpenAI does."""
    return TaskFileModel(registry.task(name, variant, version=version), encoding=encoding)


# ---------------------------------------------------------------------- outputs and state
class ResultSink(Protocol):
    """Where outputs go. Parts are numbered from 1; writing a number again replaces that part."""

    min_part_bytes: int

    def upload_part(self, stream: Stream, number: int, data: bytes, state: dict[str, Any]) -> dict[str, Any]:
        """Store one part; returns a JSON-able reference. `state` (kept in the checkpoint) is the sink's own."""
        ...

    def complete(self, stream: Stream, parts: list[dict[str, Any]], tail: bytes, state: dict[str, Any]) -> str:
        """Join the parts and `tail` (may be empty) into the stream's file; safe to call again after success."""
        ...

    def write_manifest(self, manifest: dict[str, Any]) -> str: ...

    def location(self, name: str) -> str:
        """Where an output file (predictions.jsonl, ...) ends up."""
        ...


class CheckpointStore(Protocol):
    def load(self) -> Checkpoint | None: ...

    def save(self, checkpoint: Checkpoint) -> None: ...

    def clear(self) -> None: ...


@dataclass
class Checkpoint:
    """Everything needed to carry on scoring a file: saved, it is the run's only state."""

    position: Position = field(default_factory=Position)
    segment: int = 0  # which invocation owns the run now (a hand-off bumps it)
    phase: Literal["scoring", "finishing"] = "scoring"
    succeeded: int = 0
    failed: int = 0
    inputs: int = 0  # quota units scored (billed): one per good row, or the texts of an OpenAI batch's requests
    tokens: int = 0
    pixels: int = 0
    truncated: int = 0
    compute_ms: float = 0.0
    started_at: float = field(default_factory=time.time)
    parts: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: {s: [] for s in STREAMS})
    pending: dict[str, str] = field(default_factory=lambda: {s: "" for s in STREAMS})
    sink_state: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)  # what file this is (bucket, key, etag)
    stopped: str | None = None  # why scoring stopped before the end (cancelled, quota_exceeded, row_failed)

    @property
    def rows(self) -> int:
        return self.succeeded + self.failed

    def to_bytes(self) -> bytes:
        data = {
            "version": CHECKPOINT_VERSION,
            "position": self.position.to_dict(),
            "segment": self.segment,
            "phase": self.phase,
            "succeeded": self.succeeded,
            "inputs": self.inputs,
            "failed": self.failed,
            "tokens": self.tokens,
            "pixels": self.pixels,
            "truncated": self.truncated,
            "compute_ms": self.compute_ms,
            "started_at": self.started_at,
            "parts": self.parts,
            "pending": self.pending,
            "sink_state": self.sink_state,
            "source": self.source,
            "stopped": self.stopped,
        }
        return gzip.compress(json.dumps(data, ensure_ascii=False).encode("utf-8"), compresslevel=1, mtime=0)

    @classmethod
    def from_bytes(cls, blob: bytes) -> Checkpoint:
        data = json.loads(gzip.decompress(blob))
        if data.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"checkpoint version {data.get('version')!r} is not {CHECKPOINT_VERSION}")
        return cls(
            position=Position.from_dict(data["position"]),
            segment=int(data["segment"]),
            phase="finishing" if data["phase"] == "finishing" else "scoring",
            succeeded=int(data["succeeded"]),
            inputs=int(data.get("inputs", data["succeeded"])),  # older checkpoints: one unit per good row
            failed=int(data["failed"]),
            tokens=int(data["tokens"]),
            pixels=int(data.get("pixels", 0)),
            truncated=int(data["truncated"]),
            compute_ms=float(data["compute_ms"]),
            started_at=float(data["started_at"]),
            parts={s: list(data["parts"].get(s, [])) for s in STREAMS},
            pending={s: str(data["pending"].get(s, "")) for s in STREAMS},
            sink_state=dict(data.get("sink_state", {})),
            source=dict(data.get("source", {})),
            stopped=data.get("stopped"),
        )


class Deadline:
    """When to stop and hand off: `remaining_ms()` (Lambda's context) minus a safety margin."""

    def __init__(self, remaining_ms: Callable[[], float] | None = None, margin_ms: float = 0.0) -> None:
        self._remaining = remaining_ms
        self.margin_ms = margin_ms

    @classmethod
    def never(cls) -> Deadline:
        return cls(None)

    @classmethod
    def after(cls, seconds: float, margin_s: float = 0.0) -> Deadline:
        end = time.monotonic() + seconds
        return cls(lambda: (end - time.monotonic()) * 1000.0, margin_s * 1000.0)

    @classmethod
    def from_context(cls, context: Any, *, margin_fraction: float = 0.15, max_margin_s: float = 20.0) -> Deadline:
        """From a Lambda context: hand off with ~15% of the time left (at most 20 s)."""
        total = float(context.get_remaining_time_in_millis())
        margin = min(max_margin_s * 1000.0, total * margin_fraction)
        return cls(lambda: float(context.get_remaining_time_in_millis()), margin)

    def remaining_ms(self) -> float:
        return float("inf") if self._remaining is None else self._remaining()

    def expired(self, next_step_ms: float = 0.0) -> bool:
        """True once what is left is within the margin, or too short for a step of `next_step_ms`."""
        return self._remaining is not None and self._remaining() <= self.margin_ms + next_step_ms


@dataclass(frozen=True)
class Progress:
    rows: int
    succeeded: int
    failed: int
    fraction: float  # of the input's bytes read, 0..1


@dataclass(frozen=True)
class ScoreConfig:
    part_bytes: int = 8 << 20  # an output part (S3 wants >= 5 MiB but for the last)
    window_bytes: int = 32 << 20  # at most this much row text per window, whatever window_rows says
    checkpoint_every_s: float = 30.0  # also checkpoint this often when parts are slow to fill
    window_rows: int | None = None  # None: the model's own choice


@dataclass
class ScoreSummary:
    done: bool  # the whole file is scored and its outputs complete
    checkpoint: Checkpoint  # the state at the end of this run (saved unless done)
    manifest: dict[str, Any] | None = None  # when done
    windows: int = 0  # windows scored in this run
    resumed_from: Position | None = None

    @property
    def rows(self) -> int:
        return self.checkpoint.rows

    @property
    def stopped(self) -> str | None:
        return self.checkpoint.stopped

    @property
    def succeeded(self) -> int:
        return self.checkpoint.succeeded

    @property
    def failed(self) -> int:
        return self.checkpoint.failed

    @property
    def tokens(self) -> int:
        return self.checkpoint.tokens

    @property
    def next_segment(self) -> int:
        return self.checkpoint.segment


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _prediction_line(row_id: str | int, prediction: str) -> str:
    return '{"id":' + _dumps(row_id) + ',"prediction":' + prediction + "}\n"


def _windows(items: Iterator[Item], max_rows: int, max_bytes: int) -> Iterator[list[Item]]:
    window: list[Item] = []
    rows = 0
    size = 0
    for item in items:
        window.append(item)
        if isinstance(item, Row):
            rows += 1
            size += item.size or len(item.value)
        if rows >= max_rows or size >= max_bytes:
            yield window
            window, rows, size = [], 0, 0
    if window:
        yield window


class _Run:
    """One invocation's share of a file: the loop behind score_file."""

    def __init__(
        self,
        state: Checkpoint,
        model: FileModel,
        sink: ResultSink,
        store: CheckpointStore,
        config: ScoreConfig,
    ) -> None:
        self.state = state
        self.model = model
        self.sink = sink
        self.store = store
        self.config = config
        self.part_bytes = max(config.part_bytes, sink.min_part_bytes)
        self.buffers: dict[str, list[str]] = {s: [state.pending[s]] if state.pending[s] else [] for s in STREAMS}
        self.sizes: dict[str, int] = {s: len(state.pending[s].encode("utf-8")) for s in STREAMS}
        self.last_save = time.monotonic()

    def add(self, stream: Stream, line: str) -> None:
        self.buffers[stream].append(line)
        self.sizes[stream] += len(line)  # characters: close enough to bytes for sizing parts

    def pending_text(self, stream: Stream) -> str:
        text = "".join(self.buffers[stream])
        self.buffers[stream] = [text] if text else []
        return text

    def flush_full_parts(self) -> bool:
        flushed = False
        for stream in STREAMS:
            if self.sizes[stream] >= self.part_bytes:
                data = self.pending_text(stream).encode("utf-8")
                number = len(self.state.parts[stream]) + 1
                ref = self.sink.upload_part(stream, number, data, self.state.sink_state)
                self.state.parts[stream].append(ref)
                self.buffers[stream], self.sizes[stream] = [], 0
                flushed = True
        return flushed

    def save(self) -> None:
        for stream in STREAMS:
            self.state.pending[stream] = self.pending_text(stream)
        self.store.save(self.state)
        self.last_save = time.monotonic()

    def score_window(self, window: list[Item]) -> None:
        rows = [item for item in window if isinstance(item, Row)]
        started = time.perf_counter()
        scores = self.model.score(rows) if rows else WindowScores()
        self.state.compute_ms += (time.perf_counter() - started) * 1000.0
        k = 0
        for item in window:
            if isinstance(item, BadRow):
                self.add("errors", item.to_json() + "\n")
                self.state.failed += 1
                continue
            prediction = scores.predictions.get(k)
            if prediction is not None:
                self.add("predictions", prediction + "\n" if scores.lines else _prediction_line(item.id, prediction))
                self.state.succeeded += 1
            elif scores.lines and k in scores.errors:
                self.add("errors", scores.errors[k] + "\n")
                self.state.failed += 1
            else:
                error = scores.errors.get(k, "not scored")
                self.add("errors", BadRow(item.index, item.line, item.id, error).to_json() + "\n")
                self.state.failed += 1
            k += 1
        self.state.inputs += len(scores.predictions) if scores.inputs is None else scores.inputs
        self.state.tokens += scores.tokens
        self.state.pixels += scores.pixels
        self.state.truncated += scores.truncated


def score_file(
    source: ByteSource,
    fmt: Format,
    model: FileModel,
    sink: ResultSink,
    store: CheckpointStore,
    *,
    checkpoint: Checkpoint | None = None,
    deadline: Deadline | None = None,
    segment: int = 0,
    meta: dict[str, Any] | None = None,
    config: ScoreConfig | None = None,
    progress: Callable[[Progress], None] | None = None,
    gate: Callable[[Checkpoint, int], str | None] | None = None,
) -> ScoreSummary:
    """Score `source` (or the rest of it, from `checkpoint`) into `sink`.

    `gate(state, units)` is asked before each window is scored (`units`: the quota units its rows
    hold, `model.units`); a reason it returns (cancelled, quota_exceeded, ...) stops scoring there:
    the outputs are completed with the rows scored so far and the manifest says why it stopped
    (`checkpoint.stopped`).

    Returns when the file is done (outputs complete, manifest written) or when `deadline` is
    near, with a checkpoint saved whose `segment` is `segment + 1`: the caller hands that on.
    At least one window is scored per call, so even a tiny deadline makes progress. The caller
    clears the checkpoint once it has recorded the outcome (metering, batch status).
    """
    config = config or ScoreConfig()
    deadline = deadline or Deadline.never()
    state = checkpoint or Checkpoint(segment=segment, source=dict(meta or {}))
    state.segment = segment
    resumed_from = state.position if checkpoint is not None else None
    run = _Run(state, model, sink, store, config)
    windows = 0
    size = source.size or 0

    if state.phase == "scoring":
        reader = open_rows(source, fmt, model.field, state.position, features=model.features)
        max_rows = config.window_rows or model.window_rows
        window_ms = 0.0  # the slowest recent window: the next one may take as long
        with reader:
            for window in _windows(iter(reader), max_rows, config.window_bytes):
                if gate is not None:
                    state.stopped = gate(state, model.units([item for item in window if isinstance(item, Row)]))
                    if state.stopped:
                        break
                started = time.monotonic()
                run.score_window(window)
                windows += 1
                state.position = reader.position
                flushed = run.flush_full_parts()
                if flushed or time.monotonic() - run.last_save >= config.checkpoint_every_s:
                    run.save()
                if progress is not None:
                    fraction = min(1.0, reader.raw_offset / size) if size else 1.0
                    progress(Progress(state.rows, state.succeeded, state.failed, fraction))
                window_ms = max(window_ms * 0.8, (time.monotonic() - started) * 1000.0)
                if deadline.expired(next_step_ms=1.5 * window_ms):
                    state.segment = segment + 1
                    run.save()
                    return ScoreSummary(False, state, windows=windows, resumed_from=resumed_from)
        state.phase = "finishing"
        run.save()

    # Finishing is idempotent: parts are joined, the tail written, the manifest (re)written.
    outputs: dict[str, str] = {}
    for stream in STREAMS:
        tail = state.pending[stream].encode("utf-8")
        outputs[stream] = sink.complete(stream, state.parts[stream], tail, state.sink_state)
    finished = time.time()
    manifest = build_manifest(state, model, meta, finished)
    outputs["manifest"] = sink.write_manifest(manifest)
    if progress is not None:
        progress(Progress(state.rows, state.succeeded, state.failed, 1.0))
    return ScoreSummary(True, state, manifest=manifest, windows=windows, resumed_from=resumed_from)


def build_manifest(state: Checkpoint, model: FileModel, meta: dict[str, Any] | None, finished: float) -> dict[str, Any]:
    """The one manifest schema of every results folder (batches and jobs, CPU and GPU)."""
    manifest = model.manifest
    entry = manifest.files.get(manifest.variant_file(model.variant))
    source = dict(meta or state.source)
    status = "succeeded" if not state.stopped else "cancelled" if state.stopped == "cancelled" else "failed"
    return {
        "kind": source.pop("kind", None),
        "id": source.pop("id", None),
        "tenant": source.pop("tenant", None),
        "status": status,
        "reason": state.stopped,
        "route": source.pop("route", None),
        "provider": source.pop("provider", None),
        "model": manifest.name,
        "version": manifest.version,
        "variant": model.variant,
        "task": manifest.task,
        "sha256": entry.sha256 if entry else None,
        "input": source,
        "rows": state.rows,
        "succeeded": state.succeeded,
        "inputs": state.inputs,
        "failed": state.failed,
        "tokens": state.tokens,
        "pixels": state.pixels,
        "truncated": state.truncated,
        "parts": {s: len(state.parts[s]) + (1 if state.pending[s] else 0) for s in STREAMS},
        "segments": state.segment + 1,
        "started_at": _iso(state.started_at),
        "finished_at": _iso(finished),
        "duration_s": round(finished - state.started_at, 3),
        "compute_s": round(state.compute_ms / 1000.0, 3),
        "outputs": dict(OUTPUT_FILES),
    }


# ---------------------------------------------------------------------- local adapters
class DirSink:
    """A folder as the sink: parts as files, joined into the outputs by `complete` (tests, benchmarks)."""

    min_part_bytes = 0

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.parts_dir = self.root / "_parts"

    def upload_part(self, stream: Stream, number: int, data: bytes, state: dict[str, Any]) -> dict[str, Any]:
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        path = self.parts_dir / f"{stream}-{number:05d}"
        _atomic_write(path, data)
        return {"number": number, "bytes": len(data)}

    def complete(self, stream: Stream, parts: list[dict[str, Any]], tail: bytes, state: dict[str, Any]) -> str:
        target = self.root / OUTPUT_FILES[stream]
        tmp = target.with_name(target.name + ".tmp")
        with open(tmp, "wb") as out:
            for ref in sorted(parts, key=lambda r: int(r["number"])):
                with open(self.parts_dir / f"{stream}-{int(ref['number']):05d}", "rb") as part:
                    while chunk := part.read(1 << 20):
                        out.write(chunk)
            out.write(tail)
        tmp.replace(target)
        return str(target)

    def write_manifest(self, manifest: dict[str, Any]) -> str:
        target = self.root / OUTPUT_FILES["manifest"]
        _atomic_write(target, (json.dumps(manifest, indent=2) + "\n").encode())
        return str(target)

    def location(self, name: str) -> str:
        return str(self.root / name)


class FileCheckpointStore:
    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def load(self) -> Checkpoint | None:
        try:
            return Checkpoint.from_bytes(self.path.read_bytes())
        except FileNotFoundError:
            return None

    def save(self, checkpoint: Checkpoint) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.path, checkpoint.to_bytes())

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
