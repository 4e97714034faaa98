"""One pydantic model per request and response body; the OpenAPI document is generated from these."""

from __future__ import annotations

from datetime import date
from typing import Annotated, Any, Literal

from aws_lambda_powertools.event_handler.openapi.types import OpenAPIResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from sif_inference.manifest import VARIANT_PATTERN
from sif_inference.manifest import Task as TaskName
from sif_inference.tasks import MAX_LABEL_CHARS, MAX_LABELS, MAX_TEMPLATE_CHARS

ModelName = Annotated[
    str,
    Field(
        min_length=1,
        max_length=192,
        description="`name`, `name@version` or `name@alias` (no suffix: the `latest` alias)",
        examples=["all-minilm-l6-v2"],
    ),
]
Variant = Annotated[
    str,
    Field(
        pattern=VARIANT_PATTERN,
        max_length=32,
        description="one of the model's variants (GET /v1/models/{name}); default: its default variant",
        examples=["fp32"],
    ),
]
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
        400: "bad request (e.g. an unknown variant, a model used for the wrong task, an undecodable image)",
        401: "missing or unknown API key",
        404: "unknown model (or version, or alias; another tenant's private model) or route",
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
    """One model as sif describes it, and as OpenAI's model object (`id`, `object`, `created`, `owned_by`)."""

    id: str = Field(description="the model's name (what `model` takes)")
    object: Literal["model"] = "model"
    created: int = Field(description="when this version was published (Unix seconds; 0 when unknown)")
    owned_by: str = Field(description='"sif" for a public model, your tenant id for your private one')
    name: str
    version: str = Field(description="the version `name` (the `latest` alias) serves now")
    task: TaskName
    sha256: str = Field(description="sha256 of the default variant's ONNX file")
    route: Literal["cpu", "gpu"]
    limits: ModelLimits
    description: str = ""
    default_variant: str
    variants: dict[str, str] = Field(description="variant -> sha256 of its ONNX file")
    dim: int = Field(description="embedding size, or the number of labels")
    labels: list[str] = Field(default_factory=list)
    price: ModelPrice
    versions: list[str] = Field(default_factory=list, description="the versions that serve (`name@version`)")
    aliases: dict[str, dict[str, int]] = Field(
        default_factory=dict, description="alias -> {version: weight} (`name@alias`; two versions: a canary)"
    )


class ModelList(BaseModel):
    """OpenAI's list shape (`object`, `data`: what `client.models.list()` reads) and sif's `models` (the same)."""

    object: Literal["list"] = "list"
    data: list[ModelInfo]
    models: list[ModelInfo]


# ---------------------------------------------------------------- embeddings (OpenAI-compatible)
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class EmbeddingsRequest(BaseModel):
    # The openai client may send fields we do not use (e.g. `user`); they are ignored.
    model_config = ConfigDict(extra="ignore")

    model: ModelName
    input: (
        Text | Annotated[list[Text], Field(min_length=1)] | TokenIds | Annotated[list[TokenIds], Field(min_length=1)]
    ) = Field(
        description="one text, a list of texts, or token ids (one input as a list of integers, or a list of "
        "them, as OpenAI takes them): ids are read as the text they stand for in the model's vocabulary",
        examples=[["The quick brown fox", "hello"]],
    )
    encoding_format: Literal["float", "base64"] = Field(
        default="float", description="base64: each vector as little-endian float32 bytes (the openai client default)"
    )
    dimensions: int | None = Field(default=None, gt=0, description="must equal the model's size if given")
    user: str | None = None
    variant: Variant | None = None


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


# A tabular model's named features ({"age": 41, "plan": "pro"}, or {"features": {...}}), or a tensor
# model's named tensors ({"x": [0.1, 0.2]}, or {"inputs": {...}}); the task checks names and types.
ObjectInstance = Annotated[dict[str, Any], Field(description="named features (tabular) or named tensors (tensor)")]


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    instances: Annotated[list[Text | ImageInstance | ObjectInstance], Field(min_length=1)] = Field(
        description='texts (strings), images ({"b64": ...}), a tabular model\'s named features or a tensor '
        "model's named tensors (objects)",
        examples=[["A man is eating food."]],
    )
    parameters: PredictParameters | None = None
    variant: Variant | None = None


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


class TabularPrediction(BaseModel):
    label: str | int | float = Field(description="the class (or a regressor's value)")
    probabilities: dict[str, float] | None = Field(default=None, description="per class, when the model gives them")


class PredictResponse(BaseModel):
    predictions: list[list[float] | ZeroShotPrediction | ImagePrediction | TabularPrediction | dict[str, Any]] = Field(
        description="per instance: a vector (embedding); {label, labels, scores} (zero-shot, text-classification); "
        "{label, scores} (image); {label, probabilities} (tabular); {output: tensor} (tensor)"
    )
    model: str
    model_version: str = Field(description="the version that served (an alias resolved, once per request)")
    variant: str = Field(description="the variant that served")
    usage: PredictUsage


# ---------------------------------------------------------------- TF-Serving (model status and metadata)
class TfStatus(BaseModel):
    error_code: str = "OK"
    error_message: str = ""


class TfVersionStatus(BaseModel):
    version: str
    state: Literal["AVAILABLE", "END"] = Field(description="END: the version is retired and no longer serves")
    status: TfStatus = Field(default_factory=TfStatus)


class TfModelStatus(BaseModel):
    model_version_status: list[TfVersionStatus]


class TfModelSpec(BaseModel):
    name: str
    signature_name: str = ""
    version: str


class TfDim(BaseModel):
    size: str = Field(description='"-1" where the axis is dynamic')
    name: str = ""


class TfTensorShape(BaseModel):
    dim: list[TfDim]
    unknown_rank: bool = False


class TfTensorInfo(BaseModel):
    dtype: str = Field(examples=["DT_FLOAT"])
    tensor_shape: TfTensorShape
    name: str


class TfSignatureDef(BaseModel):
    inputs: dict[str, TfTensorInfo]
    outputs: dict[str, TfTensorInfo]
    method_name: str = "tensorflow/serving/predict"


class TfSignatureDefMap(BaseModel):
    signature_def: dict[str, TfSignatureDef]


class TfMetadata(BaseModel):
    signature_def: TfSignatureDefMap


class TfModelMetadata(BaseModel):
    model_spec: TfModelSpec
    metadata: TfMetadata


# ---------------------------------------------------------------- KServe v2 / Open Inference Protocol
V2Datatype = Literal[
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES"
]
Parameters = dict[str, str | int | float | bool | None]


class V2ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str] = Field(default_factory=list)


class V2ServerLive(BaseModel):
    live: bool


class V2ServerReady(BaseModel):
    ready: bool


class V2ModelReady(BaseModel):
    name: str
    ready: bool


class V2TensorMetadata(BaseModel):
    name: str
    datatype: V2Datatype
    shape: list[int] = Field(description="-1 where the axis is dynamic")


class V2ModelMetadata(BaseModel):
    name: str
    versions: list[str] = Field(description="the versions that may be asked for (`/versions/{v}`)")
    platform: Literal["onnxruntime_onnx"] = "onnxruntime_onnx"
    inputs: list[V2TensorMetadata]
    outputs: list[V2TensorMetadata]
    parameters: Parameters = Field(
        default_factory=dict, description="sif's: the version these tensors are of, its default variant, sha256, task"
    )


MAX_TENSOR_DIM = 2**31 - 1  # one axis's length (a longer one is a 422, not numpy's overflow)


class V2RequestInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=256)
    shape: list[Annotated[int, Field(ge=0, le=MAX_TENSOR_DIM)]] = Field(max_length=8)
    datatype: V2Datatype
    parameters: Parameters | None = None
    data: list[Any] = Field(description="the elements in row-major order (nested lists are flattened); BYTES: strings")


class V2RequestOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=256)
    parameters: Parameters | None = None


class V2InferRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str | None = Field(default=None, max_length=256)
    parameters: Parameters | None = Field(default=None, description='`{"variant": "fp32"}` picks a variant')
    inputs: Annotated[list[V2RequestInput], Field(min_length=1, max_length=64)] = Field(
        examples=[[{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["A man is eating food.", "hello"]}]]
    )
    outputs: list[V2RequestOutput] | None = Field(default=None, max_length=64, description="default: every output")


class V2ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: V2Datatype
    parameters: Parameters | None = None
    data: list[Any]


class V2InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str = Field(description="the request's id, else the API request id")
    parameters: Parameters = Field(default_factory=dict, description="sif's: variant, sha256 and usage that served")
    outputs: list[V2ResponseOutput]


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
