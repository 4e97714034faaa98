"""The model manifest: what a model is, its files with sha256, limits, route and prices."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

Task = Literal["embedding", "image-classification"]
Route = Literal["cpu", "gpu"]


class FileEntry(BaseModel):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)


class TokenizerConfig(BaseModel):
    file: str
    max_length: int = Field(gt=0)


class ImagePreprocessing(BaseModel):
    resize: int = 256
    crop: int = 224
    mean_bgr: tuple[float, float, float] = (104.0, 117.0, 123.0)
    jpeg_reencode: bool = True
    layout: Literal["NHWC"] = "NHWC"
    channel_order: Literal["BGR"] = "BGR"


class OutputSpec(BaseModel):
    name: str = ""
    dim: int


class Limits(BaseModel):
    max_inputs: int = Field(gt=0)
    max_tokens: int | None = None
    max_text_chars: int | None = None
    max_image_bytes: int | None = None
    max_image_pixels: int | None = None
    max_batch_rows: int = 1_000_000


class Cost(BaseModel):
    """Per-item figures the router uses to decide between Lambda and the GPU queue."""

    cpu_ms_per_item: float
    gpu_ms_per_item: float
    lambda_budget_ms: float


class Price(BaseModel):
    usd_per_call: float = 0.0
    usd_per_1k_inputs: float = 0.0
    usd_per_1m_tokens: float = 0.0
    usd_per_gpu_second: float = 0.0


class ModelManifest(BaseModel):
    name: str
    version: str
    task: Task
    description: str = ""
    variants: dict[str, str]
    default_variant: str
    files: dict[str, FileEntry] = Field(default_factory=dict)
    tokenizer: TokenizerConfig | None = None
    preprocessing: ImagePreprocessing | None = None
    output: OutputSpec
    labels: list[str] = Field(default_factory=list)
    limits: Limits
    route: Route
    archive_route: Route | None = None
    cost: Cost
    price: Price

    def variant_file(self, variant: str | None = None) -> str:
        from sif_inference.errors import ModelNotFoundError

        chosen = variant or self.default_variant
        if chosen not in self.variants:
            raise ModelNotFoundError(f"model {self.name!r} has no variant {chosen!r}; has {sorted(self.variants)}")
        return self.variants[chosen]

    def files_for(self, variant: str | None = None) -> list[str]:
        """The files one variant needs: the graph plus the tokenizer, if any."""
        names = [self.variant_file(variant)]
        if self.tokenizer is not None:
            names.append(self.tokenizer.file)
        return names
