"""docs/benchmarks.md and docs/benchmarks.png from `make bench`'s numbers: issue 10's targets in one
table, the Lambda cost per 1M texts beside them, then the detail of every measurement."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sif_bench.contenders import PEER, SIF, SIF_FP32, TORCH
from sif_tools.template import Template

# Lambda's x86 list price (us-east-1): what the cost column uses, printed with it.
GB_SECOND_USD = 0.0000166667
REQUEST_USD = 0.20 / 1e6
# Issue 10's targets.
IN_PROCESS_VS_TORCH = 5.0  # in process, texts/s >= 5x PyTorch at equal threads
IN_PROCESS_VS_PEER = 2.5  # ... and >= 2.5x the sentence-transformers ONNX int8 export
HTTP_VS_TORCH = 3.0  # HTTP, 64-text calls: texts/s >= 3x PyTorch in process
FILE_VS_TORCH = 4.0  # a 10,000-row file end to end: rows/s >= 4x PyTorch in process
HTTP_P50_VS_TORCH = 0.5  # HTTP single text p50 <= 0.5x PyTorch's in-process p50
COLD_VS_TORCH = 10.0  # cold start >= 10x faster than PyTorch's ...
COLD_MAX_S = 0.5  # ... and <= 0.5 s


@dataclass(frozen=True)
class Pricing:
    api_mb: int
    scorer_mb: int

    @classmethod
    def from_template(cls) -> Pricing:
        functions = Template().functions()
        return cls(functions["ApiFunction"].memory_size, functions["ScorerFunction"].memory_size)

    @staticmethod
    def usd_per_million(texts_per_s: float, memory_mb: int, texts_per_request: float, instances: int = 1) -> float:
        """Compute only: warm instances busy for the measured time, at this machine's speed."""
        gb_seconds = 1e6 / (texts_per_s / instances) * memory_mb / 1024
        return gb_seconds * GB_SECOND_USD + 1e6 / texts_per_request * REQUEST_USD

    def note(self, batch: int) -> str:
        return (
            f"USD per 1M texts: Lambda x86 list price, ${GB_SECOND_USD:.10f} per GB-second and "
            f"${REQUEST_USD * 1e6:.2f} per 1M requests, "
            f"compute only (warm instances busy for the measured time at this machine's speed; no cold starts, "
            f"no idle). In-process and HTTP rows at the API function's MemorySize ({self.api_mb:,} MB, from "
            f"template.yaml) and {batch} texts a request (HTTP: per instance, one per concurrent client); the file "
            f"row at the scorer's ({self.scorer_mb:,} MB), one request per file. Lambda gives about 1 vCPU per "
            "1,769 MB, so for the API function the 1-thread rows are the nearer estimate."
        )


def _x(ratio: float | None) -> str:
    return "" if ratio is None else f"{ratio:.2f}x"


def _verdict(met: bool | None) -> str:
    return "" if met is None else ("met" if met else "**not met**")


def _usd(values: list[float | None]) -> str:
    return " / ".join("-" if v is None else f"${v:.3f}" for v in values)


def _rate(row: dict[str, float] | None) -> str:
    return "-" if row is None else f"{row['texts_per_s']:.0f} (p99 {row['p99_call_ms']:.0f} ms)"


def _ms(row: dict[str, float] | None) -> str:
    return "-" if row is None else f"{row['p50_ms']:.2f} (p99 {row['p99_ms']:.2f})"


def target_rows(results: dict[str, Any], pricing: Pricing) -> list[list[str]]:
    """| measure | sif | PyTorch | peer | sif / PyTorch | sif / peer | target | verdict | USD per 1M |"""
    core = results["core"]
    batch = core["batch"]
    rows: list[list[str]] = []
    for threads, r in core["threads"].items():
        tp, lat = r["throughput"], r["latency"]
        peer = tp.get(PEER)
        sif, torch = tp[SIF]["texts_per_s"], tp[TORCH]["texts_per_s"]
        vs_torch = sif / torch
        vs_peer = sif / peer["texts_per_s"] if peer else None
        met = vs_torch >= IN_PROCESS_VS_TORCH and (vs_peer is None or vs_peer >= IN_PROCESS_VS_PEER)
        costs = [
            pricing.usd_per_million(tp[n]["texts_per_s"], pricing.api_mb, batch) if n in tp else None
            for n in (SIF, TORCH, PEER)
        ]

        rows.append(
            [
                f"in process, {batch}-text calls, {threads} thread(s): texts/s (p99 per call)",
                _rate(tp.get(SIF)),
                _rate(tp.get(TORCH)),
                _rate(tp.get(PEER)),
                _x(vs_torch),
                _x(vs_peer),
                f">= {IN_PROCESS_VS_TORCH:g}x PyTorch, >= {IN_PROCESS_VS_PEER:g}x peer",
                _verdict(met),
                _usd(costs),
            ]
        )

        rows.append(
            [
                f"in process, single text, {threads} thread(s): p50 ms (p99)",
                _ms(lat.get(SIF)),
                _ms(lat.get(TORCH)),
                _ms(lat.get(PEER)),
                _x(lat[SIF]["p50_ms"] / lat[TORCH]["p50_ms"]),
                _x(lat[SIF]["p50_ms"] / lat[PEER]["p50_ms"] if PEER in lat else None),
                "",
                "",
                "",
            ]
        )
    api = results.get("api")
    if api:
        lat, tp, tg = api["latency"], api["throughput"], api["targets"]
        rows.append(
            [
                "HTTP, one client, single text: best-round p50 ms (vs PyTorch in process)",
                f"{lat['http']['best_round_p50_ms']:.2f}",
                f"{lat['baseline']['best_round_p50_ms']:.2f}",
                "-",
                _x(tg["latency_ratio"]),
                "",
                f"<= {HTTP_P50_VS_TORCH:g}x PyTorch",
                _verdict(tg["latency_ratio"] <= HTTP_P50_VS_TORCH),
                "",
            ]
        )
        clients = tp["http"]["clients"]
        rows.append(
            [
                f"HTTP, {batch}-text calls, {clients} clients: best-run texts/s (vs PyTorch in process)",
                f"{tp['http']['best_texts_per_s']:.0f}",
                f"{tp['baseline']['best_texts_per_s']:.0f}",
                "-",
                _x(tg["throughput_ratio"]),
                "",
                f">= {HTTP_VS_TORCH:g}x PyTorch",
                _verdict(tg["throughput_ratio"] >= HTTP_VS_TORCH),
                _usd(
                    [
                        pricing.usd_per_million(tp["http"]["best_texts_per_s"], pricing.api_mb, batch, clients),
                        pricing.usd_per_million(tp["baseline"]["best_texts_per_s"], pricing.api_mb, batch),
                        None,
                    ]
                ),
            ]
        )
    e2e = (results.get("batch") or {}).get("end_to_end")
    if e2e:
        rows.append(
            [
                f"a {e2e['rows']:,}-row file end to end: rows/s (vs PyTorch in process, run by run)",
                f"{e2e['median_rows_per_s']:.0f}",
                f"{e2e['median_baseline_rows_per_s']:.0f}",
                "-",
                _x(e2e["median_ratio"]),
                "",
                f">= {FILE_VS_TORCH:g}x PyTorch",
                _verdict(e2e["median_ratio"] >= FILE_VS_TORCH),
                _usd(
                    [
                        pricing.usd_per_million(e2e["median_rows_per_s"], pricing.scorer_mb, e2e["rows"]),
                        pricing.usd_per_million(e2e["median_baseline_rows_per_s"], pricing.scorer_mb, e2e["rows"]),
                        None,
                    ]
                ),
            ]
        )
    cold = results.get("cold_start")
    if cold:
        sif, torch = cold[SIF]["median_s"], cold[TORCH]["median_s"]
        peer_s = cold[PEER]["median_s"] if PEER in cold else None
        rows.append(
            [
                "cold start, fresh process to first embedding: median s",
                f"{sif:.3f}",
                f"{torch:.3f}",
                "-" if peer_s is None else f"{peer_s:.3f}",
                _x(sif / torch),
                _x(None if peer_s is None else sif / peer_s),
                f"<= {1 / COLD_VS_TORCH:g}x PyTorch ({COLD_VS_TORCH:g}x faster), <= {COLD_MAX_S} s",
                _verdict(torch / sif >= COLD_VS_TORCH and sif <= COLD_MAX_S),
                "",
            ]
        )
    return rows


def _table(header: list[str], align: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"] + [
        "| " + " | ".join(row) + " |" for row in rows
    ]


def render(results: dict[str, Any], sections: list[str]) -> str:
    pricing = Pricing.from_template()
    core = results["core"]
    peer = results.get("peer")
    lines = ["# Benchmarks", ""]
    if results.get("quick"):
        lines += ["**A `--quick` smoke run: too few samples to be results.**", ""]
    lines += [
        f"Generated by `make bench` on {results['date']} ({results['cpus']} usable CPUs, {core['texts']} "
        "natural-language texts from shared/data/texts.txt, all-minilm-l6-v2). In process, every contender gets "
        f"the same texts in the same {core['batch']}-text calls at the same thread count, timed by the same "
        "lines, interleaved round by round: the machine is shared and noisy, and the ratios are the figures "
        f"to read. PyTorch and the peer are sentence-transformers' `encode()` (batch_size {core['st_batch']}, "
        "its default, normalised).",
        "",
        "## Issue 10's targets",
        "",
    ]
    lines += _table(
        [
            "measure",
            "sif",
            "PyTorch",
            "ST ONNX int8 peer",
            "sif / PyTorch",
            "sif / peer",
            "target",
            "verdict",
            "USD per 1M texts (sif / PyTorch / peer)",
        ],
        ["---", "---:", "---:", "---:", "---:", "---:", "---", "---", "---:"],
        target_rows(results, pricing),
    )
    lines += ["", pricing.note(core["batch"]), ""]
    if peer:
        v = peer["versions"]
        export = peer["export"]
        lines += [
            'The peer: sentence-transformers\' own ONNX backend, `SentenceTransformer(checkpoint, backend="onnx")`, '
            f'its int8 export `export_dynamic_quantized_onnx_model(model, "{export["config"]}", dir)` loaded with '
            f'`model_kwargs={{"file_name": "{peer["file_name"]}"}}` and an ORT session of the row\'s intra-op '
            "threads (torch's threads too, for pooling), from the same checkpoint as `make models`. It runs in its "
            f"own venv (.cache/peer-venv: sentence-transformers {v.get('sentence-transformers')}, transformers "
            f"{v.get('transformers')}, optimum {v.get('optimum')}, optimum-onnx {v.get('optimum-onnx')}, "
            f"onnxruntime {v.get('onnxruntime')}, torch {v.get('torch')}; pip took {peer.get('setup_s', 0):.0f} s "
            "once) since optimum-onnx pins transformers<4.58, "
            "and in its own process, asked call by call; its sessions' intra-op threads, read back: "
            f"{peer.get('session_threads', {})}. CPU: {results.get('cpu', 'unknown')}.",
            "",
        ]
    for threads, r in core["threads"].items():
        tp, lat = r["throughput"], r["latency"]
        base_tp, base_lat = tp[TORCH]["texts_per_s"], lat[TORCH]["p50_ms"]
        peer_tp = tp[PEER]["texts_per_s"] if PEER in tp else None
        lines += [f"## In process, {threads} thread(s)", ""]
        rows = [
            [
                name,
                f"{row['texts_per_s']:.0f}",
                f"{row['best_texts_per_s']:.0f}",
                f"{row['p50_call_ms']:.1f}",
                f"{row['p99_call_ms']:.1f}",
                _x(row["texts_per_s"] / base_tp),
                _x(None if peer_tp is None else row["texts_per_s"] / peer_tp),
            ]
            for name, row in tp.items()
        ]
        lines += _table(
            [
                f"{core['batch']}-text calls",
                "texts/s (median)",
                "best run",
                "p50 ms/call",
                "p99 ms/call",
                "vs PyTorch",
                "vs peer",
            ],
            ["---", "---:", "---:", "---:", "---:", "---:", "---:"],
            rows,
        )
        lines.append("")
        rows = [
            [
                name,
                f"{row['p50_ms']:.2f}",
                f"{row['p99_ms']:.2f}",
                f"{row['best_round_p50_ms']:.2f}",
                f"{base_lat / row['p50_ms']:.1f}x",
            ]
            for name, row in lat.items()
        ]
        lines += _table(
            ["single text", "p50 ms", "p99 ms", "best-round p50 ms", "p50 speed-up vs PyTorch"],
            ["---", "---:", "---:", "---:", "---:"],
            rows,
        )
        lines.append("")
    lines += [
        "Agreement with PyTorch (cosine between each text's vector and PyTorch's, all texts):",
        "",
        *_table(
            ["contender", "mean", "p1", "min"],
            ["---", "---:", "---:", "---:"],
            [[n, f"{a['mean']:.4f}", f"{a['p1']:.4f}", f"{a['min']:.4f}"] for n, a in core["agreement"].items()],
        ),
        "",
    ]
    cold = results.get("cold_start")
    if cold:
        base_cold = cold[TORCH]["median_s"]
        lines += [
            "## Cold start (fresh process until its first embedding)",
            "",
            "sif includes fetching the int8 model and tokenizer from the models bucket (moto's server), checking "
            "their sha256 and building the session; PyTorch loads the checkpoint from local disk, the peer its int8 "
            "export from local disk (in the peer venv).",
            "",
            *_table(
                ["contender", "median s", "max s", "runs", "PyTorch / this"],
                ["---", "---:", "---:", "---:", "---:"],
                [
                    [
                        n,
                        f"{r['median_s']:.3f}",
                        f"{r['max_s']:.3f}",
                        str(r["runs"]),
                        f"{base_cold / r['median_s']:.1f}x",
                    ]
                    for n, r in cold.items()
                ],
            ),
            "",
        ]
    for extra in sections:
        lines += [extra.rstrip(), ""]
    lines += ["![benchmarks](benchmarks.png)", ""]
    return "\n".join(lines)


COLOURS = {SIF: "#2a7", SIF_FP32: "#5b9", TORCH: "#c55", PEER: "#57c"}


def plot(results: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    core = results["core"]
    pricing = Pricing.from_template()
    threads = list(core["threads"])
    names = [n for n in (SIF, TORCH, PEER) if n in core["threads"][threads[0]]["throughput"]]
    fig, axes = plt.subplots(1, 4, figsize=(17, 4.2))
    width = 0.8 / len(names)

    def grouped(ax: Any, value: Any, title: str) -> None:
        for i, name in enumerate(names):
            xs = [t + (i - (len(names) - 1) / 2) * width for t in range(len(threads))]
            ax.bar(xs, [value(core["threads"][t], name) for t in threads], width, label=name, color=COLOURS[name])
        ax.set_xticks(range(len(threads)), [f"{t} thread(s)" for t in threads])
        ax.set_title(title, fontsize=10)

    grouped(
        axes[0],
        lambda r, n: r["throughput"][n]["texts_per_s"],
        f"{core['batch']}-text calls (texts/s, higher is better)",
    )
    grouped(axes[1], lambda r, n: r["latency"][n]["p50_ms"], "single-text p50 (ms, lower is better)")
    grouped(
        axes[2],
        lambda r, n: pricing.usd_per_million(r["throughput"][n]["texts_per_s"], pricing.api_mb, core["batch"]),
        f"USD per 1M texts at {pricing.api_mb} MB (lower is better)",
    )
    axes[0].legend(fontsize=8)
    cold = results.get("cold_start")
    if cold:
        axes[3].bar(list(cold), [v["median_s"] for v in cold.values()], color=[COLOURS[n] for n in cold])
        axes[3].axhline(COLD_MAX_S, color="#888", linestyle="--", linewidth=1)
        axes[3].set_title("cold start to first embedding (s; target dashed)", fontsize=10)
        axes[3].tick_params(axis="x", labelsize=7)
    else:
        axes[3].axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
