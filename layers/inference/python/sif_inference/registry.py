"""ModelRegistry: manifests, sha256-verified files, one session per model variant per process."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from sif_inference.embedder import TextEmbedder
from sif_inference.errors import IntegrityError, ModelNotFoundError, WrongTaskError
from sif_inference.integrity import manifest_entry, require_sha256
from sif_inference.manifest import ModelManifest, Signature
from sif_inference.sources import ModelSource
from sif_inference.tasks import Task, task_class, task_for
from sif_inference.tensors import graph_signature
from sif_inference.text import TextRunner
from sif_inference.tokenization import TextTokenizer
from sif_inference.versions import ModelIndex, ModelRef, choose_version

if TYPE_CHECKING:
    import onnxruntime as ort

    from sif_inference.images import ImageClassifier


logger = logging.getLogger(__name__)
T = TypeVar("T")
# How long a warm process trusts what it read of a model's versions and aliases.
INDEX_TTL_S = 30.0
# A version or alias named explicitly and not (yet) known re-reads the model's index once it is this
# old: one just published answers at once, and unknown names cost at most one listing per interval.
MISS_REFRESH_S = 2.0
# Tasks whose models take texts: a tokenizer, and on CPU one text per single-threaded run.
TEXT_TASKS = ("embedding", "text-classification")


def _in_background(name: str, work: Callable[[], T]) -> Future[T]:
    """`work()` in a daemon thread of its own; its result, or its exception, in the Future."""
    future: Future[T] = Future()

    def run() -> None:
        try:
            future.set_result(work())
        except Exception as exc:  # noqa: BLE001 - re-raised to whoever reads the Future
            future.set_exception(exc)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


@dataclass(frozen=True)
class LoadedModel:
    """One model variant, ready: its session and what its task needs around it."""

    manifest: ModelManifest
    variant: str
    session: ort.InferenceSession
    embedder: TextEmbedder | None = None  # embedding models
    classifier: ImageClassifier | None = None  # image classifiers
    text: TextRunner | None = None  # text models (embedding, text-classification): tokenizer + session
    signature: Signature | None = None  # the graph's inputs and outputs, as the session reads them


class ModelRegistry:
    """Loads models from a ModelSource into `cache_dir`, verifying every file before use.

    Files are read into memory once, hashed, and the session is built from those same
    bytes, so what is served is exactly what was verified.
    """

    def __init__(
        self, source: ModelSource, cache_dir: Path, *, threads: int | None = None, index_ttl_s: float = INDEX_TTL_S
    ) -> None:
        self.source = source
        self.cache_dir = Path(cache_dir)
        self.threads = threads
        self.index_ttl_s = index_ttl_s
        self._manifests: dict[tuple[str, str], ModelManifest] = {}  # versions are immutable: kept
        self._indexes: dict[str, tuple[float, list[str], ModelIndex | None]] = {}  # re-read after index_ttl_s
        self._loaded: dict[tuple[str, str, str], LoadedModel] = {}
        self._lock = threading.Lock()
        self._prefetched: dict[tuple[str, str, str], Future[dict[str, bytes]]] = {}

    def names(self) -> list[str]:
        return self.source.list_models()

    # ------------------------------------------------------------ versions and aliases
    def versions(self, name: str, *, max_age_s: float | None = None) -> tuple[list[str], ModelIndex | None]:
        """(published versions, the model's index), as of at most `index_ttl_s` (or `max_age_s`) ago: a
        warm process sees an alias move or a new version within that time, without a redeploy."""
        now = time.monotonic()
        cached = self._indexes.get(name)
        ttl = self.index_ttl_s if max_age_s is None else min(self.index_ttl_s, max_age_s)
        if cached is None or now - cached[0] >= ttl:
            # Two round trips, overlapped (a cold start waits on both): the index in a thread of its own.
            index_read = _in_background(f"index-{name}", lambda: self._read_index(name))
            versions = self.source.list_versions(name)
            cached = (now, versions, index_read.result())
            self._indexes[name] = cached
        return cached[1], cached[2]

    def _read_index(self, name: str) -> ModelIndex | None:
        try:
            return self.source.read_index(name)
        except ValueError:  # an unreadable index: versions still serve, `latest` is the highest
            logger.exception("unreadable model index %s; ignoring its aliases", name)
            return None

    def resolve(self, ref: str, *, routing_key: str | None = None, tenant: str | None = None) -> ModelManifest:
        """The manifest `ref` (`name`, `name@version`, `name@alias`) means for this request.

        A canary alias picks a version by `routing_key` (stable per request id); a model private to
        another tenant is unknown (ModelNotFoundError), as if it did not exist."""
        parsed = ModelRef.parse(ref)
        versions, index = self.versions(parsed.name)
        try:
            version = choose_version(parsed, versions, index, routing_key)
        except ModelNotFoundError:
            if parsed.version is None and parsed.alias is None:
                raise
            versions, index = self.versions(parsed.name, max_age_s=MISS_REFRESH_S)  # published since?
            version = choose_version(parsed, versions, index, routing_key)
        manifest = self.manifest(parsed.name, version)
        if not manifest.visible_to(tenant):
            raise ModelNotFoundError(f"unknown model {parsed.name!r}")
        return manifest

    def manifest(self, name: str, version: str | None = None) -> ModelManifest:
        """One version's manifest (None: what `latest` points at)."""
        if version is None:
            return self.resolve(name)
        key = (name, version)
        cached = self._manifests.get(key)
        if cached is None:
            try:
                cached = self.source.read_manifest(name, version)
            except ValueError as exc:  # not JSON, or not a manifest: this version is not servable
                raise ModelNotFoundError(f"model {name!r} version {version!r} has an unreadable manifest") from exc
            if cached.name != name or cached.version != version:
                raise ModelNotFoundError(f"{name}/{version}: its manifest says {cached.name}/{cached.version}")
            self._manifests[key] = cached
        return cached

    def manifests(self, tenant: str | None = None) -> list[ModelManifest]:
        """What `latest` points at for every model `tenant` may see. A model whose folder has no
        readable manifest (half-published, half-deleted, hand-edited) is logged and left out: it must
        not take the listing down for the others."""
        found = []
        for name in self.names():
            try:
                versions, index = self.versions(name)
                manifest = self.manifest(name, choose_version(ModelRef(name), versions, index))
            except ModelNotFoundError:
                logger.warning("model %s has no servable version; not listed", name, exc_info=True)
                continue
            if manifest.visible_to(tenant):
                found.append(manifest)
        return found

    def get(self, name: str, variant: str | None = None, *, version: str | None = None) -> LoadedModel:
        manifest = self.manifest(name, version)
        chosen = variant or manifest.default_variant
        manifest.variant_file(chosen)  # an unknown variant is an UnknownVariantError, before any loading
        key = (manifest.name, manifest.version, chosen)
        loaded = self._loaded.get(key)
        if loaded is not None:
            return loaded
        with self._lock:
            loaded = self._loaded.get(key)
            if loaded is None:
                loaded = self._load(manifest, chosen)
                self._loaded[key] = loaded
        return loaded

    def prefetch(self, name: str, variant: str | None = None) -> None:
        """Start fetching and verifying a model's files in the background (cold start: the download
        overlaps with the imports and session set-up that follow); get() picks the bytes up."""
        manifest = self.manifest(name)
        key = (manifest.name, manifest.version, variant or manifest.default_variant)
        if key in self._loaded or key in self._prefetched:
            return
        self._prefetched[key] = _in_background(
            f"prefetch-{name}", lambda: {f: self.read_verified(manifest, f) for f in manifest.files_for(key[2])}
        )

    def task(
        self,
        name: str,
        variant: str | None = None,
        *,
        version: str | None = None,
        kind: str | None = None,
        labels: Sequence[str] | None = None,
        template: str | None = None,
    ) -> Task:
        """The task a call means on model `name` (`kind`, else zero-shot with `labels`, else the model's own).

        A model that cannot do it is a WrongTaskError before anything is loaded."""
        task_class(self.manifest(name, version), kind, labels=labels)
        return task_for(self.get(name, variant, version=version), kind, labels=labels, template=template)

    def embedder(self, name: str, variant: str | None = None) -> TextEmbedder:
        model = self.get(name, variant)
        if model.embedder is None:
            raise WrongTaskError(f"model {name!r} does {model.manifest.task}, not embedding")
        return model.embedder

    def classifier(self, name: str, variant: str | None = None) -> ImageClassifier:
        model = self.get(name, variant)
        if model.classifier is None:
            raise WrongTaskError(f"model {name!r} does {model.manifest.task}, not image-classification")
        return model.classifier

    def read_verified(self, manifest: ModelManifest, filename: str) -> bytes:
        """A file's bytes, only if their sha256 matches the manifest; kept in cache_dir for the next process."""
        manifest_entry(manifest, filename)
        path = self.cache_dir / manifest.name / manifest.version / filename
        if path.is_file():
            data = path.read_bytes()
            try:
                require_sha256(manifest, filename, data)
                return data
            except IntegrityError:
                path.unlink(missing_ok=True)  # a corrupt cache entry is dropped and fetched again
        data = self.source.read(manifest.name, manifest.version, filename)
        require_sha256(manifest, filename, data)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{threading.get_ident()}.part")
        partial.write_bytes(data)
        partial.replace(path)
        return data

    def _load(self, manifest: ModelManifest, variant: str) -> LoadedModel:
        from sif_inference.sessions import build_session, on_gpu, run_pool

        prefetched = self._prefetched.pop((manifest.name, manifest.version, variant), None)
        files = prefetched.result() if prefetched is not None else {}

        def read(filename: str) -> bytes:
            return files.get(filename) or self.read_verified(manifest, filename)

        graph = read(manifest.variant_file(variant))  # verified first: a file failing its sha256 is never served
        if manifest.task in TEXT_TASKS:
            if manifest.tokenizer is None:
                raise ModelNotFoundError(f"{manifest.name}: {manifest.task} model without a tokenizer")
            tok = TextTokenizer.from_bytes(read(manifest.tokenizer.file), manifest.tokenizer.max_length)
            # CPU: single-threaded runs, one text each, spread over one thread per usable CPU (sessions.run_pool).
            gpu = on_gpu()
            session = build_session(graph, threads=self.threads if gpu else 1)
            pool = None if gpu else run_pool(self.threads)
            signature = graph_signature(session)
            if manifest.task == "embedding":
                embedder = TextEmbedder(session, tok, manifest, pool=pool)
                return LoadedModel(
                    manifest, variant, session, embedder=embedder, text=embedder.runner, signature=signature
                )
            width = len(manifest.labels) or manifest.output.dim or None
            runner = TextRunner(session, tok, output=manifest.output.name or None, width=width, pool=pool)
            return LoadedModel(manifest, variant, session, text=runner, signature=signature)
        session = build_session(graph, threads=self.threads)
        signature = graph_signature(session)
        if manifest.task == "image-classification":
            from sif_inference.images import ImageClassifier

            classifier = ImageClassifier(session, manifest)
            return LoadedModel(manifest, variant, session, classifier=classifier, signature=signature)
        return LoadedModel(manifest, variant, session, signature=signature)  # tabular, tensor: the session is all
