"""The one place that builds onnxruntime sessions."""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cache

import onnxruntime as ort

PREFERRED_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")


def usable_cpus() -> int:
    """CPUs this process may run on (Lambda gives ~1 vCPU per 1,769 MB; the host count lies)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def choose_providers(preferred: Sequence[str] = PREFERRED_PROVIDERS) -> list[str]:
    available = set(ort.get_available_providers())
    chosen = [p for p in preferred if p in available]
    return chosen or ["CPUExecutionProvider"]


def build_session(
    model: bytes | str,
    *,
    threads: int | None = None,
    providers: Sequence[str] | None = None,
) -> ort.InferenceSession:
    """A session with every graph optimisation on and threads sized to the CPUs we may use."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.intra_op_num_threads = threads or usable_cpus()
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(model, sess_options=opts, providers=list(providers or choose_providers()))


def on_gpu(providers: Sequence[str] | None = None) -> bool:
    return (list(providers) if providers else choose_providers())[0] == "CUDAExecutionProvider"


@cache
def run_pool(workers: int | None = None) -> ThreadPoolExecutor:
    """Threads that each run one single-threaded session call at a time (one per usable CPU).

    On CPU an embedding is computed one text at a time on one thread: no padding at all, and the
    same bytes whatever the batch, the thread count or the instance (int8's dynamic activation
    scales are then per text, not per batch). Spreading texts over these threads uses every vCPU."""
    return ThreadPoolExecutor(max_workers=workers or usable_cpus(), thread_name_prefix="sif-run")
