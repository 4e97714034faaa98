"""`sif models publish`: a user's ONNX file -> an immutable, verified, probed version in the models bucket.

    manifest = publish(Path("model.onnx"), name="churn", features=["age", "plan"], store=S3Store(s3, bucket))

In order, and nothing is written until every check has passed:

1. read the graph(s) (graph.py): ONNX that parses, passes the checker and loads in this onnxruntime;
2. fit the task (taskfit.py): infer it, or check the given one fits the graph's inputs; read widths,
   labels, features, the tokenizer;
3. size: a version's files may total at most MAX_VERSION_BYTES (2 GiB: ONNX's protobuf limit; refused
   above). A default variant plus tokenizer over LAMBDA_MODEL_BYTES (400 MB: the API function's
   512 MB /tmp and 2 GB memory leave no room for more) is published with route `gpu`;
4. probe and time it (probe.py) through sif's own task layer; `cost.cpu_ms_per_item` is measured;
5. route: `gpu` when a full call (limits.max_inputs items) at the measured cost would take longer than
   API_BUDGET_MS (20 s of API Gateway's 29 s, the rest for cold start, decoding and the network);
   otherwise `cpu`, and the router still sends a file or job whose estimate exceeds
   cost.lambda_budget_ms (600 s, as the shipped models) to the GPU queue;
6. write (stores.py): claim the next version number, files first, manifest last (never over an
   existing one), then move `latest` to it (unless promote=False: `latest` is pinned where it was).
"""

from __future__ import annotations

import getpass
import json
import logging
import platform
import re
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sif_inference.manifest import (
    NAME_PATTERN,
    TASK_NAMES,
    VARIANT_PATTERN,
    Cost,
    FeatureSpec,
    ImagePreprocessing,
    ModelManifest,
    Price,
)
from sif_modelbuild import catalog
from sif_modelbuild.errors import CatalogError, ConflictError, PublishError
from sif_modelbuild.graph import Graph, load_graph, same_interface, variant_name
from sif_modelbuild.probe import probe, sample_inputs
from sif_modelbuild.stores import ModelStore
from sif_modelbuild.taskfit import TOKENIZER_FILE, Declared, TaskFit, a_task, fit_task

log = logging.getLogger("sif_modelbuild.publish")

MAX_VERSION_BYTES = 2 * 1024**3
LAMBDA_MODEL_BYTES = 400 * 1000**2
API_BUDGET_MS = 20_000.0
LAMBDA_BUDGET_MS = 600_000.0
# Until a GPU times it, the GPU figure is an estimate: a tenth of the measured CPU time.
GPU_SPEEDUP_ESTIMATE = 10.0
CLAIM_TRIES = 100
TENANT_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
# What a call costs the tenant unless the publisher says otherwise (the shipped models' figures).
PRICES: dict[str, Price] = {
    "embedding": Price(usd_per_call=1e-5, usd_per_1k_inputs=2e-5, usd_per_1m_tokens=0.02, usd_per_gpu_second=2e-4),
    "text-classification": Price(
        usd_per_call=1e-5, usd_per_1k_inputs=2e-5, usd_per_1m_tokens=0.02, usd_per_gpu_second=2e-4
    ),
    "image-classification": Price(usd_per_call=1e-5, usd_per_1k_inputs=0.2, usd_per_gpu_second=2e-4),
    "tabular": Price(usd_per_call=1e-5, usd_per_1k_inputs=1e-6, usd_per_gpu_second=2e-4),
    "tensor": Price(usd_per_call=1e-5, usd_per_1k_inputs=2e-5, usd_per_gpu_second=2e-4),
}

Features = Sequence[str | Mapping[str, Any] | FeatureSpec] | str | Path


def publish(
    path: str | Path,
    *,
    name: str,
    store: ModelStore,
    task: str | None = None,
    labels: Sequence[str] | str | Path | None = None,
    tokenizer: str | Path | bytes | None = None,
    max_length: int | None = None,
    dim: int | None = None,
    preprocessing: Mapping[str, Any] | ImagePreprocessing | str | None = None,
    features: Features | None = None,
    classification: Mapping[str, Any] | None = None,
    description: str = "",
    tenant: str | None = None,
    variants: Mapping[str, str | Path] | None = None,
    variant: str | None = None,
    price: Mapping[str, Any] | None = None,
    promote: bool = True,
) -> ModelManifest:
    """Publish `path` (the default variant; `variants` adds others by name) as the next version of `name`.

    Raises PublishError, with nothing written, when the model cannot be served as declared."""
    if not re.match(NAME_PATTERN, name):
        raise PublishError(f"{name!r} is not a model name (lower case letters, digits, '.', '_', '-'; 1-128)")
    if task is not None and task not in TASK_NAMES:
        raise PublishError(f"unknown task {task!r}; the tasks are {', '.join(TASK_NAMES)}")
    if tenant is not None and not TENANT_PATTERN.match(tenant):
        raise PublishError(f"{tenant!r} is not a tenant id")
    sources = _sources(Path(path), variants)
    tokenizer_bytes = _read_tokenizer(tokenizer)
    total = sum(p.stat().st_size for p in sources) + len(tokenizer_bytes or b"")
    if total > MAX_VERSION_BYTES:
        raise PublishError(f"the model's files total {total:,} bytes; a version may hold at most {MAX_VERSION_BYTES:,}")
    default, graphs = _load_graphs(sources[0], variants, variant)
    declared = Declared(
        task=task,
        labels=_read_labels(labels),
        tokenizer=tokenizer_bytes,
        max_length=max_length,
        dim=dim,
        preprocessing=_read_preprocessing(preprocessing),
        features=_read_features(features),
        classification=dict(classification) if classification is not None else None,
    )
    fit = fit_task(graphs[default], declared)
    files = {f"model.{v}.onnx": g.data for v, g in graphs.items()}
    if fit.tokenizer is not None and tokenizer_bytes is not None:
        files[TOKENIZER_FILE] = tokenizer_bytes
    elif tokenizer_bytes is not None:
        raise PublishError(f"{a_task(fit.task)} model takes no tokenizer")

    draft = _manifest(name, "1", fit, graphs, default, files, description, tenant, price)
    result = probe(draft, files, sample_inputs(draft, known_categories=fit.known_categories))
    serving_bytes = len(graphs[default].data) + len(files.get(TOKENIZER_FILE, b""))
    route, reason = _route(draft, result.cpu_ms_per_item, serving_bytes)
    cost = Cost(
        cpu_ms_per_item=result.cpu_ms_per_item,
        gpu_ms_per_item=round(result.cpu_ms_per_item / GPU_SPEEDUP_ESTIMATE, 3),
        lambda_budget_ms=LAMBDA_BUDGET_MS,
        measured=True,
    )
    manifest = draft.model_copy(update={"cost": cost, "route": route})
    record = {
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "by": _user(),
        "sources": {v: g.path.name for v, g in graphs.items()},
        "onnxruntime": _ort_version(),
        "measured_on": platform.processor() or platform.machine(),
        "timed_runs": result.timed_runs,
        "route_reason": reason,
    }
    version = _write(store, manifest, files, record, promote=promote)
    published = manifest.model_copy(update={"version": version})
    log.info(
        "published %s@%s (%s, %.3f ms/item measured, route %s: %s) to %s",
        name,
        version,
        fit.task,
        cost.cpu_ms_per_item,
        route,
        reason,
        store.where,
    )
    return published


# ---------------------------------------------------------------------- inputs
def _sources(path: Path, variants: Mapping[str, str | Path] | None) -> list[Path]:
    paths = [path, *(Path(p) for p in (variants or {}).values())]
    for p in paths:
        if not p.is_file():
            raise PublishError(f"{p}: no such file")
    return paths


def _load_graphs(
    path: Path, variants: Mapping[str, str | Path] | None, variant: str | None
) -> tuple[str, dict[str, Graph]]:
    """(the default variant's name, every variant's graph), each checked and loadable, all alike."""
    main = load_graph(path)
    default = variant or variant_name(main)  # named by what it is (int8, fp16, fp32) unless given
    graphs = {default: main}
    for v, p in (variants or {}).items():
        if v in graphs:
            raise PublishError(f"variant {v!r} is named twice")
        graphs[v] = load_graph(Path(p))
    for v, graph in graphs.items():
        if not re.match(VARIANT_PATTERN, v):
            raise PublishError(f"{v!r} is not a variant name ({VARIANT_PATTERN})")
        why = same_interface(main, graph)
        if why:
            raise PublishError(f"variant {v} cannot stand in for {default}: its {why}")
    return default, graphs


def _read_tokenizer(tokenizer: str | Path | bytes | None) -> bytes | None:
    if tokenizer is None or isinstance(tokenizer, bytes):
        return tokenizer
    path = Path(tokenizer)
    if not path.is_file():
        raise PublishError(f"{path}: no such tokenizer file")
    return path.read_bytes()


def _read_labels(labels: Sequence[str] | str | Path | None) -> list[str] | None:
    """A list, or a file: a JSON list, or one label per line."""
    if labels is None:
        return None
    if isinstance(labels, str | Path):
        path = Path(labels)
        if not path.exists() or path.is_dir():  # a pipe (<(...)) is fine
            raise PublishError(f"{path}: no such labels file")
        text = path.read_text()
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = [line.strip() for line in text.splitlines() if line.strip()]
        if not isinstance(parsed, list):
            raise PublishError(f"{path}: a labels file is a JSON list or one label per line")
        labels = parsed
    out = [str(label) for label in labels]
    if not out or any(not label for label in out):
        raise PublishError("labels must be non-empty strings")
    return out


def _json_or_file(value: str | Path, what: str) -> Any:
    text = str(value)
    if not text.lstrip().startswith(("{", "[")):
        path = Path(text)
        if not path.exists() or path.is_dir():
            raise PublishError(f"{what}: {text!r} is neither JSON nor a file")
        text = path.read_text()
    try:
        return json.loads(text)
    except ValueError as exc:
        raise PublishError(f"{what} is not valid JSON: {exc}") from exc


def _read_preprocessing(value: Mapping[str, Any] | ImagePreprocessing | str | None) -> dict[str, Any] | None:
    if value is None:
        return None
    if isinstance(value, ImagePreprocessing):
        return value.model_dump(mode="json", exclude_unset=True)
    parsed = _json_or_file(value, "--preprocessing") if isinstance(value, str) else dict(value)
    if not isinstance(parsed, dict):
        raise PublishError("--preprocessing is a JSON object (resize, crop, layout, mean, std, ...)")
    return parsed


def _read_features(value: Features | None) -> list[dict[str, Any]] | None:
    """Names, or {name, type, categories} objects; a JSON text or a file holding either."""
    if value is None:
        return None
    items = _json_or_file(value, "--features") if isinstance(value, str | Path) else list(value)
    if not isinstance(items, list) or not items:
        raise PublishError("--features is a JSON list of names or of {name, type, categories} objects")
    out = []
    for item in items:
        if isinstance(item, FeatureSpec):
            out.append(item.model_dump(exclude_unset=True))
        elif isinstance(item, str):
            out.append({"name": item})
        elif isinstance(item, Mapping) and isinstance(item.get("name"), str):
            try:
                FeatureSpec.model_validate(item)
            except ValueError as exc:
                raise PublishError(f"feature {item['name']!r} is not valid: {exc}") from exc
            out.append(dict(item))
        else:
            raise PublishError(f"a feature is a name or a {{name, type, categories}} object, not {item!r}")
    names = [f["name"] for f in out]
    if len(set(names)) != len(names):
        raise PublishError("the features have duplicate names")
    return out


# ---------------------------------------------------------------------- the manifest
def _manifest(
    name: str,
    version: str,
    fit: TaskFit,
    graphs: dict[str, Graph],
    default: str,
    files: dict[str, bytes],
    description: str,
    tenant: str | None,
    price: Mapping[str, Any] | None,
) -> ModelManifest:
    import hashlib

    data: dict[str, Any] = {
        "name": name,
        "version": version,
        "task": fit.task,
        "description": description,
        "variants": {v: f"model.{v}.onnx" for v in graphs},
        "default_variant": default,
        "files": {f: {"sha256": hashlib.sha256(b).hexdigest(), "bytes": len(b)} for f, b in files.items()},
        "signature": graphs[default].signature,
        "route": "cpu",
        "archive_route": "gpu" if fit.task == "image-classification" else None,
        "cost": Cost(cpu_ms_per_item=0.0, gpu_ms_per_item=0.0, lambda_budget_ms=LAMBDA_BUDGET_MS),
        "price": Price.model_validate(price) if price is not None else PRICES[fit.task],
        "tenant": tenant,
        **fit.fields,
    }
    try:
        return ModelManifest.model_validate(data)
    except ValueError as exc:
        raise PublishError(f"the manifest would not be valid: {exc}") from exc


def _route(manifest: ModelManifest, cpu_ms_per_item: float, serving_bytes: int) -> tuple[str, str]:
    if serving_bytes > LAMBDA_MODEL_BYTES:
        return "gpu", f"{serving_bytes:,} bytes to load is over Lambda's {LAMBDA_MODEL_BYTES:,}"
    call_ms = cpu_ms_per_item * manifest.limits.max_inputs
    if call_ms > API_BUDGET_MS:
        return "gpu", (
            f"a full call ({manifest.limits.max_inputs} inputs x {cpu_ms_per_item:.1f} ms) takes "
            f"~{call_ms / 1000:.1f} s, over the API's {API_BUDGET_MS / 1000:.0f} s budget"
        )
    return "cpu", f"a full call ({manifest.limits.max_inputs} inputs) takes ~{call_ms / 1000:.2f} s on one CPU"


# ---------------------------------------------------------------------- writing
def _write(
    store: ModelStore, manifest: ModelManifest, files: dict[str, bytes], record: dict[str, Any], *, promote: bool
) -> str:
    """Claim the next version, write the files then the manifest, then move `latest`; returns the version."""
    name = manifest.name
    version = ""
    for _ in range(CLAIM_TRIES):
        candidate = str(max(store.version_numbers(name), default=0) + 1)
        if store.claim(name, candidate, {"at": record["at"], "by": record["by"]}):
            version = candidate
            break
        time.sleep(0.01)
    if not version:
        raise ConflictError(f"could not claim a version of {name} in {CLAIM_TRIES} tries")
    published = False
    try:
        for filename, data in files.items():
            store.put_file(name, version, filename, data)
        if not promote:
            catalog.pin_latest(name, store=store)
        body = manifest.model_copy(update={"version": version}).model_dump(mode="json")
        body["published"] = record
        if not store.put_manifest(name, version, (json.dumps(body, indent=2) + "\n").encode()):
            raise PublishError(f"{name} version {version} already has a manifest (written without a claim)")
        published = True
    finally:
        store.release(name, version, published=published)
    if promote:
        try:
            catalog.alias(name, "latest", {version: 1}, store=store)
        except CatalogError as exc:
            raise CatalogError(
                f"{name} version {version} is published, but latest did not move ({exc}); "
                f"move it with: sif models alias {name} latest {version}"
            ) from exc
    return version


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        return "unknown"


def _ort_version() -> str:
    import onnxruntime as ort

    return str(ort.__version__)
