"""Tasks: what a model does with raw inputs, written once for every caller (API, files, jobs, GPU worker).

The pipeline every task shares (preprocess -> run -> postprocess, strict and per-row errors) is
sif_inference.taskbase; this module holds the text and image tasks and the catalogue. A new task is
a class plus one entry in `TASKS`.

task                  model (manifest task)  input (file row field)            prediction (as JSON)
embedding             embedding              a text (`text`)                   [float, ...]
zero-shot             embedding              a text (`text`)                   {"label", "labels": [best 1st], "scores"}
text-classification   text-classification    a text (`text`)                   {"label", "labels": [best 1st], "scores"}
image-classification  image-classification   an image (`b64`)                  {label: score, ...}
tabular               tabular                {feature: value} (`features`)     {"label", "probabilities": {label: p}}
tensor                any model              {input: nested list} (`inputs`)   {output: nested list, ...}
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from sif_inference.b64 import decode_b64
from sif_inference.batching import iter_batch
from sif_inference.errors import BadInputError, ImageDecodeError, InferenceError, InputLimitError, WrongTaskError
from sif_inference.manifest import ModelManifest
from sif_inference.rounding import float32_base64, format_vectors, round_significant
from sif_inference.scores import activate, classification, ranked, scores_by_label
from sif_inference.tabular import TabularTask
from sif_inference.taskbase import (
    CUDA,
    FIELDS,
    BatchProfile,
    Field,
    Prepared,
    RawOutput,
    Task,
    TaskResult,
    kind_of,
)
from sif_inference.tensors import TensorTask, run_tensors
from sif_inference.text import MAX_BATCH_ITEMS, TextRows

if TYPE_CHECKING:
    from sif_inference.embedder import TextEmbedder
    from sif_inference.images import ImageClassifier
    from sif_inference.registry import LoadedModel
    from sif_inference.text import TextRunner

__all__ = [
    "CUDA",
    "FIELDS",
    "IMAGE",
    "TASKS",
    "TEXT_CPU",
    "TEXT_GPU",
    "BatchProfile",
    "Field",
    "ImageClassification",
    "LabelCache",
    "Prepared",
    "RawOutput",
    "TabularTask",
    "Task",
    "TaskResult",
    "TensorTask",
    "TextClassification",
    "TextEmbedding",
    "TextTask",
    "ZeroShot",
    "run_tensors",
    "task_class",
    "task_for",
]

# Cosine similarities of normalised sentence embeddings sit in a narrow band; a temperature of
# 0.05 (as in contrastive training of such models) turns them into usable label probabilities.
ZERO_SHOT_TEMPERATURE = 0.05
# Zero-shot labels are embedded per call (each label phrased by the template): bounded so that a
# call's label work stays under a second and a half however the template repeats its slot.
MAX_LABELS = 64
MAX_LABEL_CHARS = 100
MAX_TEMPLATE_CHARS = 500
LABEL_CACHE_SIZE = 4096

# For 256-token rows onnxruntime peaks at ~170 MB with 2,048 tokens a run, ~560 MB at 8,192, at the
# same speed on CPU; the GPU sizes are the GPU worker's measured ones.
TEXT_CPU = BatchProfile(window_rows=1024, max_items=MAX_BATCH_ITEMS, max_tokens=2048, call_chars=256 * 1024)
TEXT_GPU = BatchProfile(window_rows=4096, max_items=256, max_tokens=256 * 128, call_chars=4 << 20)
IMAGE = BatchProfile(window_rows=32, max_items=16)


# ---------------------------------------------------------------------- text
_WORDS = re.compile(r"\S+")


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
    """Tasks over a text model: texts are checked, clipped and run the same way for all (TextRunner)."""

    model_task = "embedding"
    field = "text"
    cpu_profile = TEXT_CPU
    gpu_profile = TEXT_GPU

    def __init__(self, model: LoadedModel, *, profile: BatchProfile | None = None) -> None:
        super().__init__(model, profile=profile)
        if model.text is None:
            raise WrongTaskError(f"model {self.manifest.name!r} does {self.manifest.task}, not {self.name}")
        self.runner: TextRunner = model.text
        self.max_text_tokens = self.runner.tokenizer.max_length
        self.cut_chars = 32 * self.max_text_tokens

    def prepare(self, raw: Any) -> str:
        text = raw.get("text") if isinstance(raw, dict) else raw
        if isinstance(raw, dict) and "ids" in raw and "text" not in raw:
            text = self.text_of_ids(raw["ids"])
        if not isinstance(text, str):
            raise WrongTaskError(f"model {self.manifest.name!r} takes texts (strings), not {kind_of(raw)}")
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

    def text_of_ids(self, ids: Any) -> str:
        """Token ids (OpenAI's token-array input) as the text they stand for; then checked as any text."""
        if not isinstance(ids, list) or not ids or not all(type(i) is int for i in ids):
            raise BadInputError("ids must be a non-empty list of token ids (integers)")
        if len(ids) > self.cut_chars:
            raise InputLimitError(f"{len(ids)} token ids; the limit is {self.cut_chars}")
        return self.runner.tokenizer.decode_ids(ids)

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

    def text_rows(self, texts: list[str], *, max_items: int, max_tokens: int) -> TextRows:
        """The model's rows for one tokenizer call's worth of texts."""
        return self.runner.run(texts, max_items=max_items, max_tokens=max_tokens)

    def run_texts(self, texts: list[str]) -> RawOutput:
        """Rows of `texts` in calls of at most `call_chars` characters, micro-batched by the profile."""
        parts: list[np.ndarray] = []
        tokens = 0
        truncated: list[bool] = []
        for start, end in _call_spans(texts, self.profile.call_chars or 1 << 62):
            result = self.text_rows(
                texts[start:end], max_items=self.profile.max_items, max_tokens=self.profile.max_tokens
            )
            parts.append(result.values)
            tokens += result.total_tokens
            truncated += result.truncated
        values = np.concatenate(parts) if parts else self.text_rows([], max_items=1, max_tokens=1).values
        return RawOutput(values, tokens=tokens, truncated=truncated)

    def run(self, items: list[Any]) -> RawOutput:
        return self.run_texts(items)


class EmbeddingModelTask(TextTask):
    """Tasks over a text embedding model (embeddings, zero-shot): texts through its TextEmbedder."""

    def __init__(self, model: LoadedModel, *, profile: BatchProfile | None = None) -> None:
        super().__init__(model, profile=profile)
        if model.embedder is None:
            raise WrongTaskError(f"model {self.manifest.name!r} does {self.manifest.task}, not {self.name}")
        self.embedder: TextEmbedder = model.embedder

    def text_rows(self, texts: list[str], *, max_items: int, max_tokens: int) -> TextRows:
        return self.embedder.embed(texts, max_items=max_items, max_tokens=max_tokens)


class TextEmbedding(EmbeddingModelTask):
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

    def dumps_base64(self, predictions: dict[int, Any]) -> dict[int, str]:
        """Each vector as a JSON string of its float32 bytes, base64 (`encoding_format: "base64"`, as the
        OpenAI API and POST /v1/embeddings write it): exact, and under half the size of dumps_all."""
        return {i: '"' + float32_base64(p) + '"' for i, p in predictions.items()}


class TextClassification(TextTask):
    """Labels of a text classifier (a tokenizer and a graph giving one score per label), best first.

    The graph's values go through `classification.activation` (softmax: single label; sigmoid:
    independent labels; none: as given) and `top_k` labels are kept (default: all): the same
    prediction as zero-shot's."""

    name = "text-classification"
    model_task = "text-classification"

    def __init__(self, model: LoadedModel, *, profile: BatchProfile | None = None) -> None:
        super().__init__(model, profile=profile)
        self.cfg = classification(self.manifest)
        width = self.runner.width or self.manifest.output.dim
        self.labels = list(self.manifest.labels) or [str(i) for i in range(width)]
        if not self.labels:
            raise InferenceError(f"model {self.manifest.name!r}: a text classifier needs its labels in the manifest")
        if self.runner.width and self.runner.width != len(self.labels):
            raise InferenceError(
                f"model {self.manifest.name!r} has {len(self.labels)} labels and {self.runner.width} scores per text"
            )

    def run(self, items: list[Any]) -> RawOutput:
        output = self.run_texts(items)
        return replace(output, values=activate(output.values, self.cfg.activation))

    def prediction(self, row: np.ndarray) -> dict[str, Any]:
        return ranked(row, self.labels, self.cfg.top_k)


class LabelCache:
    """Label embeddings per model variant and phrasing: zero-shot calls repeat the same labels."""

    def __init__(self, size: int = LABEL_CACHE_SIZE) -> None:
        self.size = size
        self._items: OrderedDict[tuple[str, str, str, str], tuple[np.ndarray, int]] = OrderedDict()
        self._lock = threading.Lock()

    def embed(self, task: EmbeddingModelTask, phrases: list[str]) -> tuple[np.ndarray, int]:
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


class ZeroShot(EmbeddingModelTask):
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
        texts = self.run_texts(items)
        if not items:
            return RawOutput(np.zeros((0, len(self.labels)), dtype=np.float32))
        phrases = [self.template.replace("{}", label) for label in self.labels]
        label_vectors, label_tokens = self.cache.embed(self, phrases)
        logits = (texts.values @ label_vectors.T) / ZERO_SHOT_TEMPERATURE  # both L2-normalised: cosines
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        return RawOutput(probs.astype(np.float32), tokens=texts.tokens + label_tokens, truncated=texts.truncated)

    def prediction(self, row: np.ndarray) -> dict[str, Any]:
        return ranked(row, self.labels)


# ---------------------------------------------------------------------- images
class PreparedImage(NamedTuple):
    array: np.ndarray  # the model's input tensor for one image
    pixels: int  # of the image as sent (what is billed)


class ImageClassification(Task):
    """Scores per label for each image; an image that does not decode fails only itself.

    The prediction is `{label: score}`: every label in the manifest's order, or, when the manifest
    sets `classification.top_k`, the k best, best first (the API adds the best label)."""

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
        self.top_k = classification(self.manifest).top_k

    def prepare(self, raw: Any) -> PreparedImage:
        if isinstance(raw, bytes | bytearray | memoryview):
            data = bytes(raw)
        else:
            b64 = raw.get("b64") if isinstance(raw, dict) else raw
            if not isinstance(b64, str):
                raise WrongTaskError(
                    f'model {self.manifest.name!r} takes images (bytes, base64 or {{"b64": ...}}), not {kind_of(raw)}'
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
        return scores_by_label(row, self.labels, self.top_k)


# ---------------------------------------------------------------------- the catalogue
TASKS: dict[str, type[Task]] = {
    "embedding": TextEmbedding,
    "zero-shot": ZeroShot,
    "text-classification": TextClassification,
    "image-classification": ImageClassification,
    "tabular": TabularTask,
    "tensor": TensorTask,
}


def task_class(manifest: ModelManifest, kind: str | None = None, *, labels: Sequence[str] | None = None) -> type[Task]:
    """Which task a call means: `kind`, else zero-shot when labels are given, else the model's own.

    Every model also does `tensor` (raw named tensors, as KServe v2 serves any model); an
    embedding model also does `zero-shot`. Raises WrongTaskError when the model cannot do it
    (checked on the manifest, before any loading)."""
    name = kind or ("zero-shot" if labels is not None else manifest.task)
    cls = TASKS.get(name)
    if cls is None:
        raise WrongTaskError(f"unknown task {name!r}; the tasks are {sorted(TASKS)}")
    if not cls.serves(manifest.task):
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
