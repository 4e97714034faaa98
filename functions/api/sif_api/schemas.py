"""One pydantic model per request and response body; the OpenAPI document is generated from these."""

from __future__ import annotations

from datetime import date
from typing import Annotated, Any, Literal

from aws_lambda_powertools.event_handler.openapi.types import OpenAPIResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from sif_inference.tasks import MAX_LABEL_CHARS, MAX_LABELS, MAX_TEMPLATE_CHARS

ModelName = Annotated[str, Field(min_length=1, max_length=128, examples=["all-minilm-l6-v2"])]
# A text to embed. The document says non-empty; the inference core refuses "" (400 "input N: text is
# empty"), the one rule for calls, files and jobs, so the schema does not check it a second time.
Text = Annotated[str, Field(json_schema_extra={"minLength": 1})]


# ---------------------------------------------------------------- errors
class ErrorDetail(BaseModel):
    type: str = Field(examples=["not_found"])
    message: str
    request_id: str
    details: list[dict[str, Any]] | None = Field(default=None, description="validation errors (422 only)")


class ErrorResponse(BaseModel):
    error: ErrorDetail


def error_responses(*statuses: int, ok: int | None = None) -> dict[int, OpenAPIResponse]:
    """OpenAPI `responses` for a route's error statuses, all with the one error body.

    Passing `responses` hides the success response that powertools derives from the return
    annotation; `ok=200` (or 202...) lists it again, with that annotation as its schema.
    """
    what = {
        400: "bad request (e.g. a model used for the wrong task, an undecodable image)",
        401: "missing or unknown API key",
        404: "unknown model or route",
        413: "body over 6 MB, or more inputs / larger inputs than the model takes",
        415: "a body that is not application/json",
        422: "the body or the query does not validate",
        429: "monthly quota used up (see Retry-After)",
        500: "internal error (the message carries the request id)",
    }
    responses: dict[int, OpenAPIResponse] = {}
    if ok is not None:
        responses[ok] = {"description": "OK"}  # no content: powertools uses the return annotation
    for s in statuses:
        responses[s] = {"description": what.get(s, "error"), "content": {"application/json": {"model": ErrorResponse}}}
    return responses


# ---------------------------------------------------------------- meta
class Health(BaseModel):
    status: Literal["ok"] = "ok"


# ---------------------------------------------------------------- models
class ModelLimits(BaseModel):
    max_inputs: int
    max_tokens: int | None = None
    max_text_chars: int | None = None
    max_image_bytes: int | None = None
    max_image_pixels: int | None = None
    max_labels: int | None = Field(default=None, description="zero-shot: labels per call")
    max_label_chars: int | None = Field(default=None, description="zero-shot: characters per label")
    max_template_chars: int | None = Field(default=None, description="zero-shot: characters of the template")


class ModelPrice(BaseModel):
    usd_per_call: float
    usd_per_1k_inputs: float
    usd_per_1m_tokens: float


class ModelInfo(BaseModel):
    name: str
    version: str
    task: Literal["embedding", "image-classification"]
    sha256: str = Field(description="sha256 of the default variant's ONNX file")
    route: Literal["cpu", "gpu"]
    limits: ModelLimits
    description: str = ""
    default_variant: str
    variants: dict[str, str] = Field(description="variant -> sha256 of its ONNX file")
    dim: int = Field(description="embedding size, or the number of labels")
    labels: list[str] = Field(default_factory=list)
    price: ModelPrice


class ModelList(BaseModel):
    models: list[ModelInfo]


# ---------------------------------------------------------------- embeddings (OpenAI-compatible)
class EmbeddingsRequest(BaseModel):
    # The openai client may send fields we do not use (e.g. `user`); they are ignored.
    model_config = ConfigDict(extra="ignore")

    model: ModelName
    input: Text | Annotated[list[Text], Field(min_length=1)] = Field(
        description="one text or a list of texts", examples=[["The quick brown fox", "hello"]]
    )
    encoding_format: Literal["float", "base64"] = Field(
        default="float", description="base64: each vector as little-endian float32 bytes (the openai client default)"
    )
    dimensions: int | None = Field(default=None, gt=0, description="must equal the model's size if given")
    user: str | None = None


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingsUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int
    truncated_inputs: list[int] = Field(default_factory=list, description="indices of inputs cut at the token limit")
    compute_ms: int = Field(description="inference time, as metered")
    cost_usd: float


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingsUsage


# ---------------------------------------------------------------- predict (TF-Serving style)
class ImageInstance(BaseModel):
    model_config = ConfigDict(extra="forbid")

    b64: str = Field(
        min_length=1,
        description="the image file's bytes, base64 (standard or URL-safe alphabet, padding optional) or a "
        "data:<mime>;base64, URL",
    )


class PredictParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    labels: (
        Annotated[
            list[Annotated[str, Field(min_length=1, max_length=MAX_LABEL_CHARS)]],
            Field(min_length=1, max_length=MAX_LABELS),
        ]
        | None
    ) = Field(default=None, description="zero-shot classification of text instances against these labels")
    template: str = Field(
        default="{}",
        max_length=MAX_TEMPLATE_CHARS,
        json_schema_extra={"pattern": r"\{\}"},  # documents _has_slot, which says why it refuses
        description="how a label is phrased before embedding, e.g. 'This text is about {}.'",
    )

    @field_validator("template")
    @classmethod
    def _has_slot(cls, value: str) -> str:
        if "{}" not in value:
            raise ValueError("template must contain {} where the label goes")
        return value


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    instances: Annotated[list[Text | ImageInstance], Field(min_length=1)] = Field(
        description='texts (strings) or images ({"b64": ...})', examples=[["A man is eating food."]]
    )
    parameters: PredictParameters | None = None


class ZeroShotPrediction(BaseModel):
    label: str
    labels: list[str] = Field(description="labels, best first")
    scores: list[float] = Field(description="softmax over the labels' cosine similarities, same order as labels")


class ImagePrediction(BaseModel):
    label: str
    scores: dict[str, float]


class PredictUsage(BaseModel):
    inputs: int
    tokens: int = 0
    pixels: int = 0
    truncated_inputs: list[int] = Field(default_factory=list)
    compute_ms: int
    cost_usd: float


class PredictResponse(BaseModel):
    predictions: list[list[float] | ZeroShotPrediction | ImagePrediction]
    model: str
    model_version: str
    usage: PredictUsage


# ---------------------------------------------------------------- usage
class Period(BaseModel):
    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)

    from_: date = Field(alias="from")
    to: date


class UsageTotals(BaseModel):
    calls: int = 0
    inputs: int = 0
    tokens: int = 0
    pixels: int = 0
    compute_ms: int = 0
    cost_usd: float = 0.0


class UsageByModelDay(BaseModel):
    model: str
    day: date
    calls: int = 0
    inputs: int = 0
    tokens: int = 0
    pixels: int = 0
    compute_ms: int = 0
    cost_usd: float = 0.0


class UsageResponse(BaseModel):
    tenant: str
    period: Period
    total: UsageTotals
    by_model_day: list[UsageByModelDay]
