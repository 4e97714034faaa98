"""The model manifest: what a model is, its files with sha256, its signature, limits, route and prices.

One manifest per immutable version (`models/{name}/{version}/manifest.json`). What differs by task:

- `embedding`: `tokenizer`, `output.dim`, and `embedding` (pooling / normalisation done outside the
  graph; the default says the graph already pools and normalises, as sentence-transformers exports do);
- `text-classification`: `tokenizer`, `labels` (one per logit) and `classification` (softmax or sigmoid);
- `image-classification`: `preprocessing` (resize, crop, channel order, layout, scale, mean/std), `labels`;
- `tabular`: `features` (named numeric or categorical inputs), `labels`, and `tabular` (which outputs are
  the label and the probabilities);
- `tensor`: nothing more: raw named tensors in and out, as the `signature` says.

`signature` is the graph's inputs and outputs as `sif models publish` read them (KServe v2 metadata
and the tensor task use it).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, model_validator

Task = Literal["embedding", "text-classification", "image-classification", "tabular", "tensor"]
TASK_NAMES: tuple[str, ...] = ("embedding", "text-classification", "image-classification", "tabular", "tensor")
Route = Literal["cpu", "gpu"]
# A model name as the models bucket lays it out; anything else is simply not a model.
NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,127}$"
# A version is a positive integer; an alias is a lower-case name that is not one.
VERSION_PATTERN = r"^[1-9][0-9]{0,8}$"
ALIAS_PATTERN = r"^[a-z][a-z0-9_-]{0,62}$"
VARIANT_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,31}$"


class FileEntry(BaseModel):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)


class TokenizerConfig(BaseModel):
    file: str
    max_length: int = Field(gt=0)


class ImagePreprocessing(BaseModel):
    """How an image becomes the model's input: resize the short side... (see images.preprocess).

    value = (pixel * scale - mean[c]) / std[c], channels in `channel_order`, laid out as `layout`.
    open-nsfw is resize 256, crop 224, JPEG round trip, BGR, NHWC, scale 1, mean (104, 117, 123)."""

    resize: int = Field(default=256, gt=0)
    crop: int = Field(default=224, gt=0)
    channel_order: Literal["RGB", "BGR"] = "RGB"
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    scale: float = 1.0 / 255.0
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    jpeg_reencode: bool = False
    resize_mode: Literal["square", "shorter_side"] = "square"

    @model_validator(mode="before")
    @classmethod
    def _legacy_mean_bgr(cls, data: object) -> object:
        # the first manifests wrote open-nsfw's mean as `mean_bgr` (pixels 0-255, BGR order)
        if isinstance(data, dict) and "mean_bgr" in data:
            data = dict(data)
            data.setdefault("mean", data.pop("mean_bgr"))
            data.setdefault("channel_order", "BGR")
            data.setdefault("scale", 1.0)
        return data

    @model_validator(mode="after")
    def _crop_fits(self) -> ImagePreprocessing:
        if self.crop > self.resize:
            raise ValueError(f"crop {self.crop} is larger than resize {self.resize}")
        if any(s == 0 for s in self.std):
            raise ValueError("std must not contain 0")
        return self


class EmbeddingConfig(BaseModel):
    """What the graph leaves to sif: `pooling` none means the graph's output is already one vector per text."""

    pooling: Literal["none", "mean", "cls"] = "none"
    normalize: bool = False


class ClassificationConfig(BaseModel):
    """Logits -> scores: softmax (one label) or sigmoid (multi-label); `none` when the graph gives probabilities."""

    activation: Literal["softmax", "sigmoid", "none"] = "softmax"
    top_k: int | None = Field(default=None, gt=0, description="labels returned per input (default: all)")


class FeatureSpec(BaseModel):
    """One named input of a tabular model: a number, or a category (a string)."""

    name: str = Field(min_length=1, max_length=128)
    type: Literal["number", "category"] = "number"
    categories: list[str] | None = None  # known values of a category, when the publisher declares them


class TabularConfig(BaseModel):
    """Which graph outputs are the predicted label and the class probabilities (skl2onnx names by default)."""

    label_output: str = "output_label"
    probabilities_output: str | None = "output_probability"
    # one float tensor [N, features] as input (in `features` order), or one [N, 1] input per feature
    input_mode: Literal["matrix", "named"] = "named"


class TensorSpec(BaseModel):
    """A graph input or output: name, element type (onnx names: float, int64, string, ...) and shape
    (None or a name where an axis is dynamic)."""

    name: str
    dtype: str
    shape: list[int | str | None] = Field(default_factory=list)


class Signature(BaseModel):
    inputs: list[TensorSpec] = Field(default_factory=list)
    outputs: list[TensorSpec] = Field(default_factory=list)


class OutputSpec(BaseModel):
    name: str = ""
    dim: int = 0


class Limits(BaseModel):
    max_inputs: int = Field(gt=0)
    max_tokens: int | None = None
    max_text_chars: int | None = None
    max_image_bytes: int | None = None
    max_image_pixels: int | None = None
    max_batch_rows: int = 1_000_000
    max_tensor_elements: int | None = None


class Cost(BaseModel):
    """Per-item figures the router uses to decide between Lambda and the GPU queue."""

    cpu_ms_per_item: float
    gpu_ms_per_item: float
    lambda_budget_ms: float
    measured: bool = False  # True when `sif models publish` timed it on the publisher's machine


class Price(BaseModel):
    usd_per_call: float = 0.0
    usd_per_1k_inputs: float = 0.0
    usd_per_1m_tokens: float = 0.0
    usd_per_gpu_second: float = 0.0


class ModelManifest(BaseModel):
    name: str = Field(pattern=NAME_PATTERN)
    version: str = Field(pattern=VERSION_PATTERN)
    task: Task
    description: str = ""
    variants: dict[str, str]
    default_variant: str
    files: dict[str, FileEntry] = Field(default_factory=dict)
    tokenizer: TokenizerConfig | None = None
    preprocessing: ImagePreprocessing | None = None
    embedding: EmbeddingConfig | None = None
    classification: ClassificationConfig | None = None
    features: list[FeatureSpec] = Field(default_factory=list)
    tabular: TabularConfig | None = None
    signature: Signature | None = None
    output: OutputSpec = Field(default_factory=OutputSpec)
    labels: list[str] = Field(default_factory=list)
    limits: Limits
    route: Route = "cpu"
    archive_route: Route | None = None
    cost: Cost
    price: Price = Field(default_factory=Price)
    # None: every tenant sees the model; a tenant id: only that tenant does (the others get 404)
    tenant: str | None = None

    @model_validator(mode="after")
    def _default_variant_exists(self) -> ModelManifest:
        if self.default_variant not in self.variants:
            raise ValueError(f"default_variant {self.default_variant!r} is not one of {sorted(self.variants)}")
        return self

    def variant_file(self, variant: str | None = None) -> str:
        from sif_inference.errors import UnknownVariantError

        chosen = variant or self.default_variant
        if chosen not in self.variants:
            raise UnknownVariantError(f"model {self.name!r} has no variant {chosen!r}; it has {sorted(self.variants)}")
        return self.variants[chosen]

    def files_for(self, variant: str | None = None) -> list[str]:
        """The files one variant needs: the graph plus the tokenizer, if any."""
        names = [self.variant_file(variant)]
        if self.tokenizer is not None:
            names.append(self.tokenizer.file)
        return names

    def sha256(self, variant: str | None = None) -> str:
        """The sha256 of a variant's graph (what `x-sif-model-sha256` says)."""
        entry = self.files.get(self.variant_file(variant))
        return entry.sha256 if entry is not None else ""

    def visible_to(self, tenant: str | None) -> bool:
        return self.tenant is None or self.tenant == tenant
