"""Tasks: what a model does with raw inputs, written once for every caller (API, files, jobs, GPU worker).

A task turns a chunk of raw inputs (texts; images as bytes, base64 text or {"b64": ...}; a file
row's value) into a `TaskResult`: a prediction per good input, an error per bad one, what the call
used and which texts were cut at the token limit. It owns decoding (one base64 decoder), limits
(the manifest's), batch sizes (a `BatchProfile` per provider), rounding (7 significant digits) and
the JSON text of a prediction, so callers differ only in what they do with the result.

The shape is fastembed's: `predict` = `preprocess` (each input checked and made ready, `prepare`)
-> `run` (the session) -> `postprocess` (a prediction per row); a task overrides the steps that
differ. A new task is a class here plus one entry in `TASKS`.

Two error modes. `strict=True` (the API): the first bad input raises the core's own error,
prefixed with its index (over a limit: InputLimitError; bad base64 or text: BadInputError; an
image that does not decode: ImageDecodeError; an input of the wrong kind: WrongTaskError).
Otherwise (files, jobs): it becomes that input's entry in `errors` and the others are scored.
"""

from __future__ import annotations

import re
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, NamedTuple

import numpy as np

from sif_inference.b64 import decode_b64
from sif_inference.batching import iter_batch
from sif_inference.embedder import MAX_BATCH_ITEMS
from sif_inference.errors import BadInputError, ImageDecodeError, InferenceError, InputLimitError, WrongTaskError
from sif_inference.manifest import ModelManifest
from sif_inference.rounding import compact_json, format_vectors, round_significant

if TYPE_CHECKING:
    from sif_inference.embedder import TextEmbedder
    from sif_inference.images import ImageClassifier
    from sif_inference.registry import LoadedModel

Field = Literal["text", "b64"]

# Cosine similarities of normalised sentence embeddings sit in a narrow band; a temperature of
# 0.05 (as in contrastive training of such models) turns them into usable label probabilities.
ZERO_SHOT_TEMPERATURE = 0.05
# Zero-shot labels are embedded per call (each label phrased by the template): bounded so that a
# call's label work stays under a second and a half however the template repeats its slot.
MAX_LABELS = 64
MAX_LABEL_CHARS = 100
MAX_TEMPLATE_CHARS = 500
LABEL_CACHE_SIZE = 4096
CUDA = "CUDAExecutionProvider"


@dataclass(frozen=True)
class BatchProfile:
    """How a task cuts its work; one per provider (a GPU wants wide tensors and has the memory)."""

    window_rows: int  # file rows scored together (the file scorer reads this many at a time)
    max_items: int  # inputs per session run
    max_tokens: int = 0  # padded tokens per session run (text): onnxruntime's peak memory follows it
    call_chars: int = 0  # characters per tokenizer call (text): bounds the tokenizer's memory


# For 256-token rows onnxruntime peaks at ~170 MB with 2,048 tokens a run, ~560 MB at 8,192, at the
# same speed on CPU; the GPU sizes are the GPU worker's measured ones.
TEXT_CPU = BatchProfile(window_rows=1024, max_items=MAX_BATCH_ITEMS, max_tokens=2048, call_chars=256 * 1024)
TEXT_GPU = BatchProfile(window_rows=4096, max_items=256, max_tokens=256 * 128, call_chars=4 << 20)
IMAGE = BatchProfile(window_rows=32, max_items=16)


@dataclass
class TaskResult:
    """What a chunk of inputs gave: predictions and errors by input index, and what it used."""

    predictions: dict[int, Any] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)
    tokens: int = 0
    pixels: int = 0
    truncated: list[int] = field(default_factory=list)  # indices of texts cut at the token limit

    @property
    def inputs(self) -> int:
        """Inputs that were scored (what is billed per input)."""
        return len(self.predictions)


@dataclass
class Prepared:
    """`preprocess`'s output: the good inputs made ready for the session, and the others' errors."""

    index: list[int] = field(default_factory=list)
    items: list[Any] = field(default_factory=list)
    errors: dict[int, str] = field(default_factory=dict)


@dataclass
class RawOutput:
    """`run`'s output: one row per prepared item, and what the run used."""

    values: np.ndarray
    tokens: int = 0
    pixels: int = 0
    truncated: list[bool] = field(default_factory=list)


class Task(ABC):
    """preprocess -> run -> postprocess over a loaded model; subclasses override what differs."""

    name: ClassVar[str]
    model_task: ClassVar[str]  # the manifest task a model needs to do this task
    field: ClassVar[Field]  # the row field files carry this task's inputs in
    cpu_profile: ClassVar[BatchProfile]
    gpu_profile: ClassVar[BatchProfile]

    def __init__(self, model: LoadedModel, *, profile: BatchProfile | None = None) -> None:
        self.model = model
        self.manifest: ModelManifest = model.manifest
        self.variant = model.variant
        self.provider = model.session.get_providers()[0]
        self.profile = profile or (self.gpu_profile if self.provider == CUDA else self.cpu_profile)

    # ------------------------------------------------------------------ the pipeline
    def predict(self, inputs: Sequence[Any], *, strict: bool = False) -> TaskResult:
        """Score `inputs`; `strict` raises on the first bad one, else it becomes that input's error."""
        if strict:
            self.check_count(len(inputs))
        prepared = self.preprocess(inputs, strict=strict)
        return self.postprocess(prepared, self.run(prepared.items))

    def check_count(self, count: int) -> None:
        cap = self.manifest.limits.max_inputs
        if count > cap:
            raise InputLimitError(f"{count} inputs; {self.manifest.name} takes at most {cap} per call")

    def preprocess(self, inputs: Sequence[Any], *, strict: bool = False) -> Prepared:
        prepared = Prepared()
        for i, raw in enumerate(inputs):
            try:
                item = self.prepare(raw)
            except InferenceError as exc:
                if strict:
                    raise type(exc)(f"input {i}: {exc}") from exc
                prepared.errors[i] = str(exc)
                continue
            prepared.index.append(i)
            prepared.items.append(item)
        return prepared

    @abstractmethod
    def prepare(self, raw: Any) -> Any:
        """One raw input, checked and ready for `run`; raises an InferenceError if it cannot be."""

    @abstractmethod
    def run(self, items: list[Any]) -> RawOutput: ...

    def postprocess(self, prepared: Prepared, output: RawOutput) -> TaskResult:
        cut = output.truncated or [False] * len(prepared.index)
        return TaskResult(
            predictions={i: self.prediction(output.values[k]) for k, i in enumerate(prepared.index)},
            errors=prepared.errors,
            tokens=output.tokens,
            pixels=output.pixels,
            truncated=[i for i, was_cut in zip(prepared.index, cut, strict=True) if was_cut],
        )

    def prediction(self, row: np.ndarray) -> Any:
        """One output row as this task's prediction (default: the row itself)."""
        return row

    # ------------------------------------------------------------------ numbers out
    def to_json(self, prediction: Any) -> Any:
        """A prediction as JSON-able values, floats at 7 significant digits (what the API returns)."""
        return prediction

    def dumps(self, prediction: Any) -> str:
        """A prediction as compact JSON text (what files and jobs write per line)."""
        return compact_json(self.to_json(prediction))

    def dumps_all(self, predictions: dict[int, Any]) -> dict[int, str]:
        return {i: self.dumps(p) for i, p in predictions.items()}


# ---------------------------------------------------------------------- text
_WORDS = re.compile(r"\S+")


def _kind(raw: Any) -> str:
    if isinstance(raw, dict):
        return "images" if "b64" in raw else "texts" if "text" in raw else "an object without text or b64"
    return "texts" if isinstance(raw, str) else type(raw).__name__


def _call_spans(texts: list[str], budget: int) -> Iterator[tuple[int, int]]:
    """Consecutive spans of `texts` of at most `budget` characters (a longer text is a span of its own)."""
    start = 0
    while start < len(texts):
        end, size = start, 0
        while end < len(texts) and (end == start or size + len(texts[end]) <= budget):
            size += len(texts[end])
            end += 1
        yield start, end
        start = end


class TextTask(Task):
    """Tasks over a text embedding model: texts are checked, clipped and embedded the same way for all."""

    model_task = "embedding"
    field = "text"
    cpu_profile = TEXT_CPU
    gpu_profile = TEXT_GPU

    def __init__(self, model: LoadedModel, *, profile: BatchProfile | None = None) -> None:
        super().__init__(model, profile=profile)
        if model.embedder is None:
            raise WrongTaskError(f"model {self.manifest.name!r} does {self.manifest.task}, not {self.name}")
        self.embedder: TextEmbedder = model.embedder
        self.max_text_tokens = self.embedder.tokenizer.max_length
        self.cut_chars = 32 * self.max_text_tokens

    def prepare(self, raw: Any) -> str:
        text = raw.get("text") if isinstance(raw, dict) else raw
        if not isinstance(text, str):
            raise WrongTaskError(f"model {self.manifest.name!r} takes texts (strings), not {_kind(raw)}")
        if not text:  # one rule for every path: the file reader refuses an empty field the same way
            raise BadInputError("text is empty")
        limit = self.manifest.limits.max_text_chars
        if limit is not None and len(text) > limit:
            raise InputLimitError(f"text has {len(text)} characters; the limit is {limit}")
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:  # a lone surrogate ("\ud800" in JSON): the tokenizer cannot take it
                bad = f"U+{ord(text[exc.start]):04X} at character {exc.start}"
                raise BadInputError(f"text is not valid Unicode (a lone surrogate, {bad})") from exc
        return self.clip(text)

    def clip(self, text: str) -> str:
        """`text`, or a head of it that tokenizes to the same first max_length tokens.

        A text far longer than the model reads is cut at a whitespace once its head surely holds
        more words than the model keeps tokens: the tokenizer would otherwise build every token of
        it, overflow included, before truncating."""
        if len(text) <= self.cut_chars:
            return text
        cut = max(text.rfind(" ", 0, self.cut_chars), text.rfind("\n", 0, self.cut_chars))
        # Every whitespace-separated word is at least one token (punctuation only adds more), and a
        # cut at whitespace leaves the tokens before it as they were: with twice max_length words
        # in the head, the first max_length tokens of head and text are the same.
        if cut > 0 and len(_WORDS.findall(text, 0, cut)) >= 2 * self.max_text_tokens:
            return text[:cut]
        return text

    def embed(self, texts: list[str]) -> RawOutput:
        """Vectors of `texts` in calls of at most `call_chars` characters, micro-batched by the profile."""
        vectors = np.empty((len(texts), self.embedder.dim), dtype=np.float32)
        tokens = 0
        truncated: list[bool] = []
        for start, end in _call_spans(texts, self.profile.call_chars or 1 << 62):
            result = self.embedder.embed(
                texts[start:end], max_items=self.profile.max_items, max_tokens=self.profile.max_tokens
            )
            vectors[start:end] = result.vectors
            tokens += result.total_tokens
            truncated += result.truncated
        return RawOutput(vectors, tokens=tokens, truncated=truncated)

    def run(self, items: list[Any]) -> RawOutput:
        return self.embed(items)


class TextEmbedding(TextTask):
    """A vector per text: the raw float32 row is the prediction; JSON rounds it to 7 significant digits."""

    name = "embedding"

    def to_json(self, prediction: Any) -> Any:
        return round_significant(prediction).tolist()

    def dumps(self, prediction: Any) -> str:
        return format_vectors(np.asarray(prediction)[None, :])[0]

    def dumps_all(self, predictions: dict[int, Any]) -> dict[int, str]:
        if not predictions:
            return {}
        return dict(zip(predictions, format_vectors(np.stack(list(predictions.values()))), strict=True))


class LabelCache:
    """Label embeddings per model variant and phrasing: zero-shot calls repeat the same labels."""

    def __init__(self, size: int = LABEL_CACHE_SIZE) -> None:
        self.size = size
        self._items: OrderedDict[tuple[str, str, str, str], tuple[np.ndarray, int]] = OrderedDict()
        self._lock = threading.Lock()

    def embed(self, task: TextTask, phrases: list[str]) -> tuple[np.ndarray, int]:
        """Vectors of `phrases` and the tokens they cost (billed whether cached or not)."""
        model = (task.manifest.name, task.manifest.version, task.variant)
        with self._lock:
            cached = {p: self._items[(*model, p)] for p in phrases if (*model, p) in self._items}
        missing = [p for p in dict.fromkeys(phrases) if p not in cached]
        if missing:
            profile = task.profile
            result = task.embedder.embed(missing, max_items=profile.max_items, max_tokens=profile.max_tokens)
            fresh = {p: (result.vectors[i], result.tokens[i]) for i, p in enumerate(missing)}
            with self._lock:
                for p, value in fresh.items():
                    self._items[(*model, p)] = value
                while len(self._items) > self.size:
                    self._items.popitem(last=False)
            cached.update(fresh)
        return np.stack([cached[p][0] for p in phrases]), sum(cached[p][1] for p in phrases)


LABEL_CACHE = LabelCache()


class ZeroShot(TextTask):
    """Zero-shot classification with the embedding model: softmax over text-label cosines, best first."""

    name = "zero-shot"

    def __init__(
        self,
        model: LoadedModel,
        *,
        labels: Sequence[str],
        template: str = "{}",
        profile: BatchProfile | None = None,
        cache: LabelCache | None = None,
    ) -> None:
        super().__init__(model, profile=profile)
        if not labels:
            raise BadInputError("zero-shot classification needs at least one label")
        if len(labels) > MAX_LABELS:
            raise InputLimitError(f"{len(labels)} labels; zero-shot classification takes at most {MAX_LABELS}")
        for i, label in enumerate(labels):
            if not label:
                raise BadInputError(f"label {i} is empty")
            if len(label) > MAX_LABEL_CHARS:
                raise InputLimitError(f"label {i} has {len(label)} characters; the limit is {MAX_LABEL_CHARS}")
        if len(template) > MAX_TEMPLATE_CHARS:
            raise InputLimitError(f"template has {len(template)} characters; the limit is {MAX_TEMPLATE_CHARS}")
        if len(set(labels)) != len(labels):
            raise BadInputError("labels has duplicates")
        if "{}" not in template:
            raise BadInputError("template must contain {} where the label goes")
        self.labels = list(labels)
        self.template = template
        self.cache = cache or LABEL_CACHE

    def run(self, items: list[Any]) -> RawOutput:
        texts = self.embed(items)
        if not items:
            return RawOutput(np.zeros((0, len(self.labels)), dtype=np.float32))
        phrases = [self.template.replace("{}", label) for label in self.labels]
        label_vectors, label_tokens = self.cache.embed(self, phrases)
        logits = (texts.values @ label_vectors.T) / ZERO_SHOT_TEMPERATURE  # both L2-normalised: cosines
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        return RawOutput(probs.astype(np.float32), tokens=texts.tokens + label_tokens, truncated=texts.truncated)

    def prediction(self, row: np.ndarray) -> dict[str, Any]:
        order = np.argsort(-row, kind="stable")
        labels = [self.labels[j] for j in order]
        return {"label": labels[0], "labels": labels, "scores": round_significant(row[order]).tolist()}


# ---------------------------------------------------------------------- images
class PreparedImage(NamedTuple):
    array: np.ndarray  # the model's input tensor for one image
    pixels: int  # of the image as sent (what is billed)


class ImageClassification(Task):
    """Scores per label for each image; an image that does not decode fails only itself."""

    name = "image-classification"
    model_task = "image-classification"
    field = "b64"
    cpu_profile = IMAGE
    gpu_profile = IMAGE

    def __init__(self, model: LoadedModel, *, profile: BatchProfile | None = None) -> None:
        super().__init__(model, profile=profile)
        if model.classifier is None:
            raise WrongTaskError(f"model {self.manifest.name!r} does {self.manifest.task}, not {self.name}")
        self.classifier: ImageClassifier = model.classifier
        self.labels = self.classifier.labels or [str(i) for i in range(self.manifest.output.dim)]

    def prepare(self, raw: Any) -> PreparedImage:
        if isinstance(raw, bytes | bytearray | memoryview):
            data = bytes(raw)
        else:
            b64 = raw.get("b64") if isinstance(raw, dict) else raw
            if not isinstance(b64, str):
                raise WrongTaskError(
                    f'model {self.manifest.name!r} takes images (bytes, base64 or {{"b64": ...}}), not {_kind(raw)}'
                )
            data = decode_b64(b64)
        try:  # one image decoded at a time, at the size the model needs, and freed once it is an input
            array, pixels = self.classifier.prepare(data)
        except ImageDecodeError as exc:
            raise ImageDecodeError(f"undecodable image: {exc}") from exc
        return PreparedImage(array, pixels)

    def run(self, items: list[Any]) -> RawOutput:
        parts = [
            self.classifier.score_arrays([i.array for i in chunk])
            for chunk in iter_batch(items, self.profile.max_items)
        ]
        values = np.concatenate(parts) if parts else np.zeros((0, len(self.labels)), dtype=np.float32)
        return RawOutput(values, pixels=sum(i.pixels for i in items))

    def prediction(self, row: np.ndarray) -> dict[str, float]:
        return dict(zip(self.labels, round_significant(row).tolist(), strict=True))


# ---------------------------------------------------------------------- the catalogue
TASKS: dict[str, type[Task]] = {
    "embedding": TextEmbedding,
    "zero-shot": ZeroShot,
    "image-classification": ImageClassification,
}


def task_class(manifest: ModelManifest, kind: str | None = None, *, labels: Sequence[str] | None = None) -> type[Task]:
    """Which task a call means: `kind`, else zero-shot when labels are given, else the model's own.

    Raises WrongTaskError when the model cannot do it (checked on the manifest, before any loading)."""
    name = kind or ("zero-shot" if labels is not None else manifest.task)
    cls = TASKS.get(name)
    if cls is None:
        raise WrongTaskError(f"unknown task {name!r}; the tasks are {sorted(TASKS)}")
    if cls.model_task != manifest.task:
        raise WrongTaskError(f"model {manifest.name!r} does {manifest.task}, not {name}")
    if labels is not None and not issubclass(cls, ZeroShot):
        raise WrongTaskError(f"labels are for zero-shot classification; {name} takes none")
    return cls


def task_for(
    model: LoadedModel,
    kind: str | None = None,
    *,
    labels: Sequence[str] | None = None,
    template: str | None = None,
    profile: BatchProfile | None = None,
) -> Task:
    """The task object for a loaded model (see `task_class` for which one)."""
    cls = task_class(model.manifest, kind, labels=labels)
    if issubclass(cls, ZeroShot):
        return cls(model, labels=labels or [], template=template or "{}", profile=profile)
    return cls(model, profile=profile)
