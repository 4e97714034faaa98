"""Batch scoring benchmark: end-to-end rows/s through the local stack, the PyTorch baseline, peak RSS.

    python -m sif_bench.batch [--rows 10000] [--rss-gb 1.0] [--out docs/bench_batch.md] [--json numbers.json]

1. End to end: a JSONL file of `rows` texts (shared/data/texts.txt, cycled) is put into the inbox
   with boto3; moto's notification, the SQS poller and the scorer function (its own process, the
   template's Timeout) do the rest. The clock runs from the upload's start to manifest.json's
   appearance in the results bucket.
2. The baseline: sentence-transformers (PyTorch) embedding the same texts in one process, same
   thread count, measured right before and after every end-to-end run (the machine may be
   shared: each run is compared with the baseline under the same load). The corpus repeats every
   1,000 texts, so `--baseline-rows` of them (default 1,000) have the file's length mix.
3. Float formatting: what one 384-d row costs to serialise, the plain way and the scorer's way.
4. Peak RSS: `score_file` with the S3 adapters (the scorer's own code path, no deadline) in a
   child process over a ~1 GB JSONL object, peak resident memory read from /proc (VmHWM). The file
   is mostly texts over the model's 20,000-character limit (row errors, cheap to score, but every
   byte is read, parsed and checked), with long valid texts (truncated to 256 tokens) and ordinary
   ones interleaved; predictions and errors go out as multipart uploads.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sif_core.filebatch import InboxFile
from sif_core.keys import inbox_key
from sif_tools.template import REPO_ROOT

log = logging.getLogger("sif_bench.batch")

MODEL = "all-minilm-l6-v2"
TEXTS = REPO_ROOT / "shared" / "data" / "texts.txt"


def corpus() -> list[str]:
    return [line.strip() for line in TEXTS.read_text(encoding="utf-8").splitlines() if line.strip()]


def jsonl_rows(texts: list[str]) -> bytes:
    return "".join(json.dumps({"id": i, "text": t}, ensure_ascii=False) + "\n" for i, t in enumerate(texts)).encode()


def _status_kb(pid: int | str, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


# ---------------------------------------------------------------------- 1 + 2. end to end, interleaved
class InProcess:
    """PyTorch sentence-transformers and the scorer's own model adapter, loaded once, in this process."""

    def __init__(self, threads: int, tmp: Path) -> None:
        from sif_bench.run import Baseline
        from sif_core.scoring import file_model
        from sif_emulator.stack import models_dir_from_env
        from sif_inference import LocalDirSource, ModelRegistry
        from sif_modelbuild.minilm import checkpoint_dir

        self.baseline = Baseline(checkpoint_dir(tmp), threads)
        registry = ModelRegistry(LocalDirSource(models_dir_from_env()), tmp / "cache", threads=threads)
        self.model = file_model(registry, MODEL)
        self.warm(corpus()[:64])

    def warm(self, texts: list[str]) -> None:
        self.baseline.embed(texts)
        self.scorer(texts)

    def pytorch(self, texts: list[str]) -> float:
        started = time.perf_counter()
        self.baseline.embed(texts)
        return len(texts) / (time.perf_counter() - started)

    def scorer(self, texts: list[str]) -> float:
        from sif_core.rows import Row

        started = time.perf_counter()
        for start in range(0, len(texts), self.model.window_rows):
            window = texts[start : start + self.model.window_rows]
            self.model.score([Row(start + i, start + i + 1, start + i, t) for i, t in enumerate(window)])
        return len(texts) / (time.perf_counter() - started)


def end_to_end(rows: int, runs: int, baseline_rows: int, threads: int) -> dict[str, Any]:
    """rows/s from upload to manifest through a fresh local stack, each run between two baseline runs.

    The machine may be shared: interleaving puts every end-to-end run next to baseline runs made
    under the same load, and the ratio is taken run by run.
    """
    from sif_emulator.moto_server import AwsEmulator, aws_client_env
    from sif_emulator.pollers import start_pollers
    from sif_emulator.stack import LocalStack, models_dir_from_env

    texts = corpus()
    body = jsonl_rows([texts[i % len(texts)] for i in range(rows)])
    sample = [texts[i % len(texts)] for i in range(baseline_rows)]
    emulator = AwsEmulator(port=0).start()
    saved = {k: os.environ.get(k) for k in aws_client_env(emulator.endpoint_url)}
    os.environ.update(aws_client_env(emulator.endpoint_url))
    pollers: list[Any] = []
    timings: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="sif-bench-batch-") as state:
            local = InProcess(threads, Path(state))
            stack = LocalStack(emulator.endpoint_url, state_dir=state, api_url="http://127.0.0.1:0").create()
            stack.publish_models(models_dir_from_env())
            tenant = str(stack.create_tenant("bench", monthly_calls=0)[0]["tenant_id"])  # an unlimited quota
            pollers = start_pollers(stack, functions=["ScorerFunction"])
            s3 = stack.client("s3")
            inbox, results = stack.bucket("inbox"), stack.bucket("results")
            before = local.pytorch(sample)
            for run in range(runs):
                key = inbox_key(tenant, MODEL, f"bench-{run}.jsonl")
                started = time.perf_counter()
                etag = s3.put_object(Bucket=inbox, Key=key, Body=body)["ETag"]
                manifest_key = InboxFile.parse(inbox, key, etag, len(body)).output_prefix + "manifest.json"
                deadline = started + 1800
                while time.perf_counter() < deadline:
                    try:
                        manifest = json.loads(s3.get_object(Bucket=results, Key=manifest_key)["Body"].read())
                        break
                    except s3.exceptions.NoSuchKey:
                        time.sleep(0.05)
                else:
                    raise TimeoutError(f"{key} was not scored within 30 minutes (logs in {state}/logs)")
                elapsed = time.perf_counter() - started
                if manifest["succeeded"] != rows:
                    raise RuntimeError(f"{key}: {manifest['succeeded']} of {rows} rows scored")
                after = local.pytorch(sample)
                baseline = (before + after) / 2
                timings.append(
                    {
                        "seconds": elapsed,
                        "rows_per_s": rows / elapsed,
                        "compute_s": manifest["compute_s"],
                        "segments": manifest["segments"],
                        "baseline_rows_per_s": baseline,
                        "ratio": rows / elapsed / baseline,
                    }
                )
                log.info("run %d: %.0f rows/s end to end, baseline %.0f rows/s", run, rows / elapsed, baseline)
                before = after
            scorer_alone = local.scorer(sample)
    finally:
        for poller in pollers:
            poller.stop()
        emulator.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return {
        "rows": rows,
        "baseline_rows": baseline_rows,
        "runs": timings,
        "median_rows_per_s": statistics.median(t["rows_per_s"] for t in timings),
        "median_baseline_rows_per_s": statistics.median(t["baseline_rows_per_s"] for t in timings),
        "median_ratio": statistics.median(t["ratio"] for t in timings),
        "scorer_model_rows_per_s": scorer_alone,
    }


# ---------------------------------------------------------------------- 3. float formatting
def serialisation(rows: int = 2000) -> dict[str, Any]:
    import numpy as np

    from sif_inference.rounding import format_vectors, round_significant

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((rows, 384)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    out: dict[str, Any] = {}
    cases = {
        "json.dumps(float32 -> float64, 17 digits)": lambda: [json.dumps(v) for v in vectors.tolist()],
        "round_significant(7) + compact json.dumps": lambda: [
            json.dumps(v, separators=(",", ":")) for v in round_significant(vectors, 7).tolist()
        ],
        "format_vectors: one '%.7g' row format (the scorer)": lambda: format_vectors(vectors, 7),
        "fixed-point integers, 'e-8,'.join (unusual output)": lambda: [
            "[" + "e-8,".join(map(str, row)) + "e-8]"
            for row in np.rint(vectors.astype(np.float64) * 1e8).astype(np.int64).tolist()
        ],
    }
    for name, fn in cases.items():
        times = []
        for _ in range(5):  # median of five: the machine may be shared
            started = time.perf_counter()
            lines = fn()
            times.append(time.perf_counter() - started)
        seconds = statistics.median(times)
        out[name] = {"us_per_row": seconds / rows * 1e6, "bytes_per_row": sum(map(len, lines)) / rows}
    return out


# ---------------------------------------------------------------------- 4. peak RSS on a big file
def write_big_file(path: Path, target_bytes: int) -> dict[str, int]:
    """~target_bytes of JSONL: over-limit texts (row errors), long valid texts and ordinary ones."""
    words = " ".join(corpus()).split()
    over = " ".join(words[i % len(words)] for i in range(4000))[:21_000]  # > 20,000 characters
    long_ok = " ".join(words[(i * 7) % len(words)] for i in range(4000))[:19_000]
    texts = corpus()
    counts = {"over_limit": 0, "long": 0, "ordinary": 0}
    written = 0
    row = 0
    with open(path, "w", encoding="utf-8") as out:
        block = 0
        while written < target_bytes:
            lines = []
            for _ in range(5):
                lines.append(json.dumps({"id": row, "text": over}))
                row += 1
                counts["over_limit"] += 1
            if block % 25 == 0:
                lines.append(json.dumps({"id": row, "text": long_ok}))
                row += 1
                counts["long"] += 1
            lines.append(json.dumps({"id": row, "text": texts[row % len(texts)]}))
            row += 1
            counts["ordinary"] += 1
            chunk = "\n".join(lines) + "\n"
            out.write(chunk)
            written += len(chunk.encode("utf-8"))
            block += 1
    counts["bytes"] = written
    return counts


RSS_CHILD = """
import json, sys, time
from pathlib import Path
import boto3
from sif_inference import LocalDirSource, ModelRegistry
from sif_core.s3io import S3CheckpointStore, S3Object, S3ResultSink
from sif_core.scoring import file_model, score_file

def kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

bucket, key, results, models, cache, threads = sys.argv[1:7]
s3 = boto3.client("s3")
registry = ModelRegistry(LocalDirSource(Path(models)), Path(cache), threads=int(threads))
model = file_model(registry, "all-minilm-l6-v2")
model.score([])
loaded = kb("VmRSS")
source = S3Object(s3, bucket, key)
started = time.perf_counter()
summary = score_file(source, "jsonl", model, S3ResultSink(s3, results, "results/bench/rss/"),
                     S3CheckpointStore(s3, results, "results/bench/rss/_state/checkpoint.json.gz"))
print(json.dumps({"rows": summary.rows, "succeeded": summary.succeeded, "failed": summary.failed,
                  "seconds": time.perf_counter() - started, "rss_after_model_kb": loaded,
                  "peak_rss_kb": kb("VmHWM")}))
"""


def peak_rss(target_bytes: int, threads: int) -> dict[str, Any]:
    import boto3
    from boto3.s3.transfer import TransferConfig

    from sif_emulator.moto_server import AwsEmulator, aws_client_env
    from sif_emulator.stack import models_dir_from_env

    emulator = AwsEmulator(port=0).start()
    env = {**os.environ, **aws_client_env(emulator.endpoint_url)}
    try:
        with tempfile.TemporaryDirectory(prefix="sif-bench-rss-") as tmp:
            path = Path(tmp) / "big.jsonl"
            counts = write_big_file(path, target_bytes)
            s3 = boto3.client(
                "s3",
                endpoint_url=emulator.endpoint_url,
                region_name="us-east-1",
                aws_access_key_id="testing",
                aws_secret_access_key="testing",  # noqa: S106 - the emulator's dummy credentials
            )
            s3.create_bucket(Bucket="bench-inbox")
            s3.create_bucket(Bucket="bench-results")
            s3.upload_file(
                str(path), "bench-inbox", "incoming/big.jsonl", Config=TransferConfig(multipart_chunksize=64 << 20)
            )
            path.unlink()
            args = [
                "bench-inbox",
                "incoming/big.jsonl",
                "bench-results",
                str(models_dir_from_env()),
                f"{tmp}/cache",
                str(threads),
            ]
            child = subprocess.Popen(
                [sys.executable, "-c", RSS_CHILD, *args], env=env, stdout=subprocess.PIPE, text=True
            )
            sampled = 0
            while child.poll() is None:
                with contextlib.suppress(OSError):
                    sampled = max(sampled, _status_kb(child.pid, "VmHWM"))
                time.sleep(0.2)
            out = child.stdout.read() if child.stdout else ""
            if child.returncode != 0:
                raise RuntimeError(f"the scorer child failed with {child.returncode}")
            report = json.loads(out.strip().splitlines()[-1])
    finally:
        emulator.stop()
    report["peak_rss_kb"] = max(report["peak_rss_kb"], sampled)
    return {**report, "file": counts}


# ---------------------------------------------------------------------- the report
def run_batch_bench(
    *,
    rows: int = 10_000,
    runs: int = 3,
    baseline_rows: int = 1000,
    rss_bytes: int = 1 << 30,
    threads: int | None = None,
) -> dict[str, Any]:
    """Run the batch benchmarks; `render(...)` makes the markdown section of the numbers."""
    from sif_inference.sessions import usable_cpus

    threads = threads or usable_cpus()
    results: dict[str, Any] = {"threads": threads}
    results["end_to_end"] = end_to_end(rows, runs, baseline_rows, threads)
    results["serialisation"] = serialisation()
    if rss_bytes > 0:
        results["rss"] = peak_rss(rss_bytes, threads)
    return results


def run_note(run: dict[str, Any]) -> str:
    return (
        f"{run['seconds']:.1f} s, {run['rows_per_s']:.0f} rows/s ({run['segments']} segment(s), "
        f"{run['compute_s']:.1f} s scoring) vs baseline {run['baseline_rows_per_s']:.0f} rows/s = {run['ratio']:.2f}x"
    )


def render(results: dict[str, Any]) -> str:
    e2e = results["end_to_end"]
    base = e2e["median_baseline_rows_per_s"]
    lines = [
        "## Batch scoring (drop a file in the inbox)",
        "",
        f"{e2e['rows']:,} texts from shared/data/texts.txt in one JSONL file, timed from the start of the upload "
        "to manifest.json in the results bucket: moto's S3 notification, the SQS poller, the scorer function in "
        f"its own process ({results['threads']} threads), outputs as multipart uploads. Baseline: "
        f"sentence-transformers (PyTorch) embedding {e2e['baseline_rows']:,} of the same texts (the corpus repeats "
        "every 1,000, so the length mix is the file's) in one process, same threads, measured before and after "
        "every end-to-end run; the ratio is taken run by run and its median reported.",
        "",
        "| path | rows/s | vs baseline |",
        "| --- | ---: | ---: |",
        f"| end to end through the local stack (median of {len(e2e['runs'])}) | {e2e['median_rows_per_s']:.0f} | "
        f"**{e2e['median_ratio']:.2f}x** |",
        f"| the scorer's model adapter alone, in process | {e2e['scorer_model_rows_per_s']:.0f} | "
        f"{e2e['scorer_model_rows_per_s'] / base:.2f}x |",
        f"| PyTorch baseline, in process (median) | {base:.0f} | 1.00x |",
        "",
        "Runs: " + "; ".join(run_note(r) for r in e2e["runs"]) + ".",
        "",
        "Writing one 384-d prediction row:",
        "",
        "| formatting | µs/row | bytes/row |",
        "| --- | ---: | ---: |",
    ]
    for name, r in results["serialisation"].items():
        lines.append(f"| {name} | {r['us_per_row']:.0f} | {r['bytes_per_row']:.0f} |")
    rss = results.get("rss")
    if rss:
        f = rss["file"]
        lines += [
            "",
            f"Peak RSS of the scorer over a {f['bytes'] / 2**30:.2f} GiB JSONL object (score_file with the S3 "
            f"adapters, child process, VmHWM): **{rss['peak_rss_kb'] / 1024:.0f} MB** "
            f"({rss['rss_after_model_kb'] / 1024:.0f} MB with the model loaded, before the file). The file: "
            f"{f['over_limit']:,} texts of 21,000 characters (over the 20,000 limit: row errors), {f['long']:,} of "
            f"19,000 characters (scored, truncated to 256 tokens), {f['ordinary']:,} ordinary texts; "
            f"{rss['rows']:,} rows in {rss['seconds']:.0f} s, {rss['succeeded']:,} scored, {rss['failed']:,} errors.",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sif_bench.batch", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--baseline-rows", type=int, default=1000)
    parser.add_argument("--rss-gb", type=float, default=1.0, help="size of the peak-RSS file (0: skip)")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw numbers here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer", "werkzeug"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    results = run_batch_bench(
        rows=args.rows, runs=args.runs, baseline_rows=args.baseline_rows, rss_bytes=int(args.rss_gb * (1 << 30))
    )
    text = render(results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
