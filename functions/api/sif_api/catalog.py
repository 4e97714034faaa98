"""What the API says about models, and which one serves a request.

`Catalog.resolve` decides once per request what a model reference (`name`, `name@version`,
`name@alias`) and a variant mean for the caller (a canary alias picks by the request id; another
tenant's private model is unknown); `Served` is that decision, carried into the response headers.
The rest describes models in each protocol's words: sif's and OpenAI's list and model object,
TF-Serving's version status and signature metadata, KServe v2's model metadata and readiness.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from aws_lambda_powertools import Logger

from sif_api import tensors
from sif_api.caller import Caller
from sif_api.errors import BadRequestError
from sif_api.schemas import (
    ModelInfo,
    ModelLimits,
    ModelList,
    ModelPrice,
    TfMetadata,
    TfModelMetadata,
    TfModelSpec,
    TfModelStatus,
    TfSignatureDef,
    TfSignatureDefMap,
    TfVersionStatus,
    V2ModelMetadata,
    V2ModelReady,
    V2TensorMetadata,
)
from sif_inference.errors import BadModelRefError, InferenceError, ModelNotFoundError
from sif_inference.manifest import ALIAS_PATTERN, VERSION_PATTERN, ModelManifest, Signature
from sif_inference.registry import ModelRegistry
from sif_inference.tasks import MAX_LABEL_CHARS, MAX_LABELS, MAX_TEMPLATE_CHARS
from sif_inference.tensors import graph_signature
from sif_inference.versions import ModelRef

logger = Logger(child=True)

_VERSION = re.compile(VERSION_PATTERN)
_ALIAS = re.compile(ALIAS_PATTERN)
# Models whose v2 input is BYTES (texts) run through their task; the others take their graph's tensors.
TEXT_TASKS = frozenset({"embedding", "text-classification"})
TEXT_INPUT = "text"


@dataclass(frozen=True)
class Served:
    """The model version and variant that serve a request (resolved once; what runs and is billed)."""

    manifest: ModelManifest
    variant: str

    @property
    def sha256(self) -> str:
        return self.manifest.sha256(self.variant)

    def headers(self) -> dict[str, str]:
        """What every inference response says about what served it."""
        return {
            "x-sif-model-version": self.manifest.version,
            "x-sif-model-variant": self.variant,
            "x-sif-model-sha256": self.sha256,
        }


def model_ref(name: str, *, version: str | None = None, alias: str | None = None) -> str:
    """The reference a path spells with `/versions/{v}` or `/labels/{alias}` (BadModelRefError, a 404, if
    the name already carries a tag or the tag is not a version / an alias)."""
    if "@" in name:
        raise BadModelRefError(f"{name!r}: name the version in the path once")
    if version is not None:
        if not _VERSION.match(version):
            raise BadModelRefError(f"model {name!r} has no version {version!r}")
        return f"{name}@{version}"
    if alias is not None:
        if not _ALIAS.match(alias):
            raise BadModelRefError(f"model {name!r} has no alias {alias!r}")
        return f"{name}@{alias}"
    return name


def one_variant(*asked: str | None) -> str | None:
    """The variant a request names (body, query or parameters); two different ones are a 400."""
    named = {v for v in asked if v}
    if len(named) > 1:
        raise BadRequestError(f"the request names two variants: {sorted(named)}")
    return named.pop() if named else None


def text_output(manifest: ModelManifest) -> str:
    if manifest.task == "embedding":
        return manifest.output.name or "embedding"
    return "scores"


def text_width(manifest: ModelManifest) -> int:
    return manifest.output.dim if manifest.task == "embedding" else len(manifest.labels) or manifest.output.dim


class Catalog:
    """The registry as the API describes it; publish times looked up once per version."""

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry
        self._published: dict[tuple[str, str], int] = {}

    # ------------------------------------------------------------ which model serves
    def resolve(self, caller: Caller, ref: str, request_id: str | None = None, variant: str | None = None) -> Served:
        """What `ref` (`name`, `name@version`, `name@alias`) and `variant` mean for this request, decided
        once: a canary alias picks its version by the request id; a model private to another tenant is
        unknown (404); a variant the model does not have is an UnknownVariantError (400)."""
        manifest = self.registry.resolve(ref, routing_key=request_id, tenant=caller.tenant_id)
        chosen = variant or manifest.default_variant
        manifest.variant_file(chosen)
        return Served(manifest, chosen)

    def manifest(self, ref: str, caller: Caller | None = None) -> ModelManifest:
        """The manifest `ref` means now (for a caller: only a model it may see)."""
        return self.registry.resolve(ref, tenant=caller.tenant_id if caller else None)

    # ------------------------------------------------------------ models
    def model_info(self, caller: Caller, ref: str) -> ModelInfo:
        return self.describe(self.manifest(ref, caller))

    def models(self, caller: Caller) -> ModelList:
        """Every model the caller may see (public ones and its own private ones). One that cannot be
        described is logged and left out, never a 500 for the others."""
        infos = []
        for manifest in self.registry.manifests(caller.tenant_id):
            try:
                infos.append(self.describe(manifest))
            except Exception:
                logger.exception("cannot describe model", extra={"model": manifest.name})
        return ModelList(data=infos, models=infos)

    def describe(self, manifest: ModelManifest) -> ModelInfo:
        versions, index = self.registry.versions(manifest.name)
        retired = set(index.retired) if index else set()
        info = describe(manifest)
        info.created = self._published_at(manifest)
        info.versions = [v for v in versions if v not in retired]
        info.aliases = dict(index.aliases) if index else {}
        return info

    def _published_at(self, manifest: ModelManifest) -> int:
        """When the version was published (its manifest's upload time), looked up once per version."""
        key = (manifest.name, manifest.version)
        if key not in self._published:
            lookup = getattr(self.registry.source, "published_at", None)
            try:
                when = lookup(manifest.name, manifest.version) if lookup is not None else None
            except Exception:
                logger.warning("no publish time", extra={"model": manifest.name}, exc_info=True)
                when = None
            self._published[key] = int(when or 0)
        return self._published[key]

    def version_status(self, caller: Caller, name: str, version: str) -> TfModelStatus:
        """TF-Serving's status of one version: AVAILABLE, or END once retired (unknown: 404)."""
        ModelRef.parse(model_ref(name, version=version))  # a model name and a version, nothing else (404)
        versions, index = self.registry.versions(name)
        if version not in versions:
            raise ModelNotFoundError(f"model {name!r} has no version {version!r}")
        if not self.registry.manifest(name, version).visible_to(caller.tenant_id):
            raise ModelNotFoundError(f"unknown model {name!r}")
        retired = index is not None and version in index.retired
        status = TfVersionStatus(version=version, state="END" if retired else "AVAILABLE")
        return TfModelStatus(model_version_status=[status])

    def signature(self, served: Served) -> Signature:
        """The graph's inputs and outputs: the manifest's `signature`, else what the loaded session says."""
        declared = served.manifest.signature
        if declared is not None and (declared.inputs or declared.outputs):
            return declared
        model = self.registry.get(served.manifest.name, served.variant, version=served.manifest.version)
        return model.signature or graph_signature(model.session)

    def tf_metadata(self, caller: Caller, ref: str) -> TfModelMetadata:
        served = self.resolve(caller, ref)
        sig = self.signature(served)
        signature = TfSignatureDef(
            inputs={t.name: tensors.tf_tensor_info(t) for t in sig.inputs},
            outputs={t.name: tensors.tf_tensor_info(t) for t in sig.outputs},
        )
        return TfModelMetadata(
            model_spec=TfModelSpec(name=served.manifest.name, version=served.manifest.version),
            metadata=TfMetadata(signature_def=TfSignatureDefMap(signature_def={"serving_default": signature})),
        )

    # ------------------------------------------------------------ KServe v2 metadata
    def v2_metadata(self, caller: Caller, ref: str) -> V2ModelMetadata:
        """A text model's tensors are what infer takes (BYTES texts in, FP32 out); any other model's are its graph's."""
        served = self.resolve(caller, ref)
        manifest = served.manifest
        versions, index = self.registry.versions(manifest.name)
        retired = set(index.retired) if index else set()
        if manifest.task in TEXT_TASKS:
            inputs = [V2TensorMetadata(name=TEXT_INPUT, datatype="BYTES", shape=[-1])]
            outputs = [V2TensorMetadata(name=text_output(manifest), datatype="FP32", shape=[-1, text_width(manifest)])]
        else:
            sig = self.signature(served)  # v2 carries tensors only (a ZipMap output, say, is left out)
            inputs = [tensors.v2_metadata(t) for t in sig.inputs if tensors.is_tensor(t)]
            outputs = [tensors.v2_metadata(t) for t in sig.outputs if tensors.is_tensor(t)]
        return V2ModelMetadata(
            name=manifest.name,
            versions=[v for v in versions if v not in retired],
            inputs=inputs,
            outputs=outputs,
            parameters={
                "version": manifest.version,
                "variant": served.variant,
                "sha256": manifest.sha256(served.variant),
                "task": manifest.task,
            },
        )

    def v2_ready(self, caller: Caller, ref: str) -> V2ModelReady:
        """Ready once the model's session is loaded (verified); a model that cannot load is not ready."""
        served = self.resolve(caller, ref)
        try:
            self.registry.get(served.manifest.name, served.variant, version=served.manifest.version)
        except InferenceError:
            logger.warning("model not ready", extra={"model": served.manifest.name}, exc_info=True)
            return V2ModelReady(name=served.manifest.name, ready=False)
        return V2ModelReady(name=served.manifest.name, ready=True)


def describe(manifest: ModelManifest) -> ModelInfo:
    """A manifest as GET /v1/models shows it (the service adds versions, aliases and the publish time)."""
    variants = {v: manifest.files[f].sha256 for v, f in manifest.variants.items() if f in manifest.files}
    limits = manifest.limits
    zero_shot = manifest.task == "embedding"  # text models also classify against labels
    return ModelInfo(
        id=manifest.name,
        created=0,
        owned_by=manifest.tenant or "sif",
        name=manifest.name,
        version=manifest.version,
        task=manifest.task,
        sha256=variants.get(manifest.default_variant, ""),
        route=manifest.route,
        limits=ModelLimits(
            max_inputs=limits.max_inputs,
            max_tokens=limits.max_tokens,
            max_text_chars=limits.max_text_chars,
            max_image_bytes=limits.max_image_bytes,
            max_image_pixels=limits.max_image_pixels,
            max_labels=MAX_LABELS if zero_shot else None,
            max_label_chars=MAX_LABEL_CHARS if zero_shot else None,
            max_template_chars=MAX_TEMPLATE_CHARS if zero_shot else None,
        ),
        description=manifest.description,
        default_variant=manifest.default_variant,
        variants=variants,
        dim=manifest.output.dim,
        labels=manifest.labels,
        price=ModelPrice(
            usd_per_call=manifest.price.usd_per_call,
            usd_per_1k_inputs=manifest.price.usd_per_1k_inputs,
            usd_per_1m_tokens=manifest.price.usd_per_1m_tokens,
        ),
    )
