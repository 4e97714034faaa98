"""The streaming file scorer with the real models and local adapters (no network)."""

from __future__ import annotations

import base64
import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from sif_core.rows import BytesSource, FileSource
from sif_core.scoring import (
    Checkpoint,
    Deadline,
    DirSink,
    FileCheckpointStore,
    ScoreConfig,
    file_model,
    score_file,
)
from sif_inference.rounding import round_significant
from sif_modelbuild.testimages import make_test_images

REPO = Path(__file__).resolve().parents[2]
MODEL = "all-minilm-l6-v2"


def texts(n: int) -> list[str]:
    corpus = [t for t in (REPO / "shared" / "data" / "texts.txt").read_text().splitlines() if t.strip()]
    # lengths vary a lot, so length-sorted micro-batches reorder rows inside every window
    return [corpus[(i * 7) % len(corpus)][: 20 + (i * 13) % 90] for i in range(n)]


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def run_to_end(source, fmt, model, out: Path, *, config=None, deadline_factory=None, max_runs=200):
    """Call score_file until the file is done, handing the checkpoint on as the scorer function does."""
    sink, store = DirSink(out), FileCheckpointStore(out / "_checkpoint.json.gz")
    segment, runs = 0, 0
    while True:
        runs += 1
        assert runs <= max_runs
        deadline = deadline_factory() if deadline_factory else None
        summary = score_file(
            source, fmt, model, sink, store, checkpoint=store.load(), deadline=deadline, segment=segment, config=config
        )
        if summary.done:
            store.clear()
            return summary, runs
        segment = summary.next_segment


@pytest.fixture(scope="module")
def text_model(registry):
    return file_model(registry, MODEL)


# ---------------------------------------------------------------------- numbers
def test_round_significant_keeps_seven_digits_and_short_reprs():
    values = np.array([0.0123456789, -0.98765432109, 0.0, 1.5e-9, -3.0e12, 123456.789], dtype=np.float64)
    out = round_significant(values, 7)
    assert out.tolist() == [0.01234568, -0.9876543, 0.0, 1.5e-09, -3.0e12, 123456.8]
    rng = np.random.default_rng(0)
    vec = rng.standard_normal(10_000).astype(np.float32)
    rounded = round_significant(vec, 7)
    np.testing.assert_allclose(rounded, vec, rtol=5e-7)
    digits = [len(repr(abs(x)).split("e")[0].replace(".", "").lstrip("0")) for x in rounded.tolist()]
    assert max(digits) <= 7


# ---------------------------------------------------------------------- outputs
def test_mixed_file_gives_ordered_predictions_and_exact_errors(text_model, registry, tmp_path):
    lines = [
        b'{"id": "a", "text": "the first row"}',
        b'{"id": 2, "text": "a second, somewhat longer row of text to embed"}',
        b"{not json",
        b'{"id": "c"}',
        b'{"id": "d", "text": "   "}',
        b"",
        b'{"id": "e", "text": "caf\xe9 is latin-1"}',
        b'{"id": "f", "text": "' + b"x" * 20001 + b'"}',
        b'{"id": "g", "text": "the last good row"}',
        b'{"id": "", "text": "no id"}',
    ]
    summary, _ = run_to_end(BytesSource(b"\n".join(lines) + b"\n"), "jsonl", text_model, tmp_path)
    preds = read_jsonl(tmp_path / "predictions.jsonl")
    assert [p["id"] for p in preds] == ["a", 2, "g"]
    # int8 activations are quantized per batch: compare with the same window embedded directly
    good = ["the first row", "a second, somewhat longer row of text to embed", "the last good row"]
    expected = registry.embedder(MODEL).embed(good)
    assert all(len(p["prediction"]) == 384 for p in preds)
    np.testing.assert_allclose(np.array([p["prediction"] for p in preds]), expected.vectors, atol=6e-8, rtol=6e-7)
    assert read_jsonl(tmp_path / "errors.jsonl") == [
        {"line": 3, "error": "bad JSON: Expecting property name enclosed in double quotes at column 2"},
        {"line": 4, "id": "c", "error": "missing field 'text'"},
        {"line": 5, "id": "d", "error": "field 'text' is empty"},
        {"line": 7, "error": "line is not valid UTF-8 (byte 0xe9 at column 25)"},
        {"line": 8, "id": "f", "error": "text has 20001 characters; the limit is 20000"},
        {"line": 10, "error": "field 'id' is empty"},
    ]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert (manifest["rows"], manifest["succeeded"], manifest["failed"]) == (9, 3, 6)
    assert manifest["model"] == MODEL and len(manifest["sha256"]) == 64
    assert manifest["tokens"] == summary.tokens > 0
    assert {"started_at", "finished_at", "duration_s"} <= manifest.keys()


def test_csv_gzip_and_jsonl_give_the_same_predictions(text_model, tmp_path):
    rows = [{"id": f"r{i}", "text": t} for i, t in enumerate(texts(40))]
    as_jsonl = jsonl(rows)
    as_csv = ("ID,Text\n" + "".join(f'{r["id"]},"{r["text"].replace(chr(34), chr(34) * 2)}"\n' for r in rows)).encode()
    outputs = {}
    for name, data, fmt in [
        ("jsonl", as_jsonl, "jsonl"),
        ("csv", as_csv, "csv"),
        ("jsonl.gz", gzip.compress(as_jsonl), "jsonl.gz"),
        ("csv.gz", gzip.compress(as_csv), "csv.gz"),
    ]:
        run_to_end(BytesSource(data), fmt, text_model, tmp_path / name)
        outputs[name] = (tmp_path / name / "predictions.jsonl").read_bytes()
    assert len(set(outputs.values())) == 1
    assert [p["id"] for p in map(json.loads, outputs["csv"].splitlines())] == [r["id"] for r in rows]


def test_empty_files_score_to_empty_outputs(text_model, tmp_path):
    for fmt, data in [("jsonl", b""), ("csv", b""), ("jsonl.gz", b""), ("csv", b"id,text\n"), ("jsonl", b"\n\n")]:
        out = tmp_path / f"{fmt}-{len(data)}"
        summary, _ = run_to_end(BytesSource(data), fmt, text_model, out)
        assert summary.done and summary.rows == 0
        assert (out / "predictions.jsonl").read_bytes() == b""
        assert (out / "errors.jsonl").read_bytes() == b""
        assert json.loads((out / "manifest.json").read_text())["rows"] == 0


def test_images_score_and_bad_images_fail_their_row(registry, tmp_path):
    model = file_model(registry, "open-nsfw")
    images = make_test_images()[:3]
    rows = [{"id": name, "b64": base64.b64encode(data).decode()} for name, data in images]
    rows.insert(1, {"id": "not-base64", "b64": "@@@"})
    rows.insert(2, {"id": "not-an-image", "b64": base64.b64encode(b"hello, world").decode()})
    run_to_end(BytesSource(jsonl(rows)), "jsonl", model, tmp_path)
    preds = read_jsonl(tmp_path / "predictions.jsonl")
    assert [p["id"] for p in preds] == [name for name, _ in images]
    direct = registry.classifier("open-nsfw").classify([data for _, data in images]).scores
    for p, ref in zip(preds, direct, strict=True):
        assert set(p["prediction"]) == {"sfw", "nsfw"}
        assert p["prediction"]["sfw"] == pytest.approx(float(ref[0]), abs=1e-6)
        assert p["prediction"]["sfw"] + p["prediction"]["nsfw"] == pytest.approx(1.0, abs=1e-5)
    errors = read_jsonl(tmp_path / "errors.jsonl")
    assert [(e["line"], e["id"]) for e in errors] == [(2, "not-base64"), (3, "not-an-image")]
    assert errors[0]["error"].startswith("b64 is not valid base64")
    assert errors[1]["error"].startswith("undecodable image: cannot decode image")


# ---------------------------------------------------------------------- resuming
@pytest.fixture(scope="module")
def big_file(tmp_path_factory):
    """500 rows with a bad row every 47th, and the outputs of one uninterrupted run."""
    rows = []
    for i, t in enumerate(texts(N_BIG)):
        rows.append({"id": i, "text": t} if i % 47 else {"id": i})
    path = tmp_path_factory.mktemp("big") / "big.jsonl"
    path.write_bytes(jsonl(rows))
    return path


@pytest.fixture(scope="module")
def reference_run(big_file, text_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    run_to_end(FileSource(str(big_file)), "jsonl", text_model, out, config=SMALL)
    return out


N_BIG = 500
SMALL = ScoreConfig(part_bytes=48 << 10, window_rows=32)


def assert_same_outputs(out: Path, reference: Path) -> None:
    for name in ("predictions.jsonl", "errors.jsonl"):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    ours, ref = (json.loads((d / "manifest.json").read_text()) for d in (out, reference))
    for key in ("rows", "succeeded", "failed", "tokens", "sha256"):
        assert ours[key] == ref[key], key


def test_reference_run_is_complete_and_ordered(reference_run):
    preds = read_jsonl(reference_run / "predictions.jsonl")
    errors = read_jsonl(reference_run / "errors.jsonl")
    assert [p["id"] for p in preds] == [i for i in range(N_BIG) if i % 47]
    assert [e["id"] for e in errors] == [i for i in range(N_BIG) if i % 47 == 0]
    assert [e["line"] for e in errors] == [i + 1 for i in range(N_BIG) if i % 47 == 0]
    assert not (reference_run / "_checkpoint.json.gz").exists()


def test_tiny_deadline_hands_off_window_by_window_and_loses_nothing(big_file, text_model, reference_run, tmp_path):
    expired = lambda: Deadline(lambda: 0.0)  # noqa: E731 - expired before it starts: one window per run
    _, runs = run_to_end(
        FileSource(str(big_file)), "jsonl", text_model, tmp_path, config=SMALL, deadline_factory=expired
    )
    assert runs == -(-N_BIG // 32) + 1  # one run per window (the last finishes at EOF), plus the finishing one
    assert json.loads((tmp_path / "manifest.json").read_text())["segments"] == runs
    assert_same_outputs(tmp_path, reference_run)


class CrashingSink(DirSink):
    """Raises once, on its n-th part: a crash between two checkpoints."""

    def __init__(self, root, crash_on: int) -> None:
        super().__init__(root)
        self.calls = 0
        self.crash_on = crash_on

    def upload_part(self, stream, number, data, state):
        self.calls += 1
        if self.calls == self.crash_on:
            raise RuntimeError("injected crash")
        return super().upload_part(stream, number, data, state)


def test_a_crash_mid_file_resumes_from_the_checkpoint_exactly(big_file, text_model, reference_run, tmp_path):
    store = FileCheckpointStore(tmp_path / "_checkpoint.json.gz")
    source = FileSource(str(big_file))
    with pytest.raises(RuntimeError, match="injected crash"):
        score_file(source, "jsonl", text_model, CrashingSink(tmp_path, crash_on=4), store, config=SMALL)
    checkpoint = store.load()
    assert checkpoint is not None and 0 < checkpoint.position.row < N_BIG
    assert len(checkpoint.parts["predictions"]) == 3
    crashed_at = checkpoint.position
    summary = score_file(
        source, "jsonl", text_model, DirSink(tmp_path), store, checkpoint=checkpoint, config=SMALL, segment=0
    )
    assert summary.done and summary.resumed_from == crashed_at
    assert_same_outputs(tmp_path, reference_run)


KILL_CHILD = """
import sys
from pathlib import Path
from sif_inference import LocalDirSource, ModelRegistry
from sif_core.rows import FileSource
from sif_core.scoring import DirSink, FileCheckpointStore, ScoreConfig, file_model, score_file
src, out, models, cache = sys.argv[1:5]
registry = ModelRegistry(LocalDirSource(Path(models)), Path(cache))
model = file_model(registry, "all-minilm-l6-v2")
score_file(FileSource(src), "jsonl", model, DirSink(out), FileCheckpointStore(Path(out) / "_checkpoint.json.gz"),
           config=ScoreConfig(part_bytes=48 << 10, window_rows=32, checkpoint_every_s=0.0))
"""


def test_a_killed_scorer_resumes_exactly(big_file, text_model, reference_run, models_dir, tmp_path):
    store = FileCheckpointStore(tmp_path / "_checkpoint.json.gz")
    child = subprocess.Popen(
        [sys.executable, "-c", KILL_CHILD, str(big_file), str(tmp_path), str(models_dir), str(tmp_path / "cache")],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        deadline = time.monotonic() + 120
        killed_at = None
        while time.monotonic() < deadline and child.poll() is None:
            checkpoint = store.load() if store.path.exists() else None
            if checkpoint is not None and checkpoint.position.row >= 100:
                child.send_signal(signal.SIGKILL)
                killed_at = checkpoint.position.row
                break
            time.sleep(0.05)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert killed_at is not None, "the child finished before it could be killed"
    assert not (tmp_path / "manifest.json").exists()
    checkpoint = store.load()
    assert checkpoint is not None and checkpoint.position.row < N_BIG
    summary = score_file(
        FileSource(str(big_file)), "jsonl", text_model, DirSink(tmp_path), store, checkpoint=checkpoint, config=SMALL
    )
    assert summary.done
    assert_same_outputs(tmp_path, reference_run)


def test_finishing_again_changes_nothing(text_model, tmp_path):
    """A crash after the outputs were joined but before the caller cleared the checkpoint."""
    store = FileCheckpointStore(tmp_path / "_checkpoint.json.gz")
    source = BytesSource(jsonl([{"id": i, "text": t} for i, t in enumerate(texts(40))] + [{"id": "bad"}]))
    first = score_file(source, "jsonl", text_model, DirSink(tmp_path / "a"), store, config=SMALL)
    outputs = {n: (tmp_path / "a" / n).read_bytes() for n in ("predictions.jsonl", "errors.jsonl")}
    checkpoint = store.load()
    assert first.done and checkpoint is not None and checkpoint.phase == "finishing"
    again = score_file(source, "jsonl", text_model, DirSink(tmp_path / "a"), store, checkpoint=checkpoint)
    assert again.done and again.windows == 0
    assert {n: (tmp_path / "a" / n).read_bytes() for n in outputs} == outputs


def test_checkpoint_round_trips():
    cp = Checkpoint(segment=3, succeeded=5, failed=1, tokens=99, source={"key": "k"})
    cp.pending["predictions"] = '{"id":1,"prediction":[0.5]}\n'
    cp.parts["errors"].append({"number": 1, "etag": "x"})
    back = Checkpoint.from_bytes(cp.to_bytes())
    assert back == cp


def test_long_texts_are_clipped_without_changing_their_embedding(text_model, registry):
    task = text_model.task  # the text task clips, for the API as for files
    words = " ".join(texts(400)).split()
    long_text = " ".join(words[i % len(words)] for i in range(3000))
    clipped = task.clip(long_text)
    assert len(clipped) <= task.cut_chars < len(long_text) and long_text.startswith(clipped)
    embedder = registry.embedder(MODEL)
    full, head = embedder.embed([long_text]), embedder.embed([clipped])
    assert full.tokens == head.tokens == [256] and full.truncated == head.truncated == [True]
    np.testing.assert_array_equal(full.vectors, head.vectors)
    # nothing to gain, or not provably safe: left whole
    assert task.clip("short text") == "short text"
    cjk = "日本語の文章" * 2000  # no whitespace to cut at
    assert task.clip(cjk) == cjk
    giant_words = " ".join(["x" * 500] * 40)  # few words: the head may hold fewer tokens than the model keeps
    assert task.clip(giant_words) == giant_words


def test_a_window_is_embedded_in_bounded_calls(registry, monkeypatch):
    from dataclasses import replace

    from sif_core.rows import Row
    from sif_core.scoring import TaskFileModel
    from sif_inference.tasks import TEXT_CPU, TextEmbedding

    loaded = registry.get(MODEL)
    embedder = loaded.embedder
    calls = []
    real_embed = embedder.embed

    def spy(batch, **kwargs):
        calls.append((sum(map(len, batch)), kwargs))
        return real_embed(batch, **kwargs)

    monkeypatch.setattr(embedder, "embed", spy)
    model = TaskFileModel(TextEmbedding(loaded, profile=replace(TEXT_CPU, call_chars=2000)))
    rows = [Row(i, i + 1, i, t) for i, t in enumerate(texts(60))]
    scores = model.score(rows)
    assert len(scores.predictions) == 60 and len(calls) > 1 and all(chars <= 2000 for chars, _ in calls)
    assert all(kw == {"max_items": TEXT_CPU.max_items, "max_tokens": TEXT_CPU.max_tokens} for _, kw in calls)
    assert model.window_rows == TEXT_CPU.window_rows and model.field == "text"
