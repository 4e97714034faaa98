"""The API's logic: models from the registry, metered inference, the caller's usage.

Built once per cold start from Settings (the handler reads the environment, this never does).
Every inference call goes: inputs checked -> quota checked -> inference timed -> exactly one
usage record for the request id (the ledger refuses it atomically if the quota ran out meanwhile)
-> usage metrics -> the response with its usage and cost.
"""

from __future__ import annotations

import calendar
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime
from functools import cache
from typing import Any, Protocol, TypeVar

import numpy as np
from aws_lambda_powertools import Logger

from sif_api import inference, tensors
from sif_api.caller import Caller, refused
from sif_api.catalog import TEXT_TASKS, Catalog, Served, one_variant, text_output, text_width
from sif_api.errors import BadRequestError
from sif_api.schemas import (
    Embedding,
    EmbeddingsRequest,
    EmbeddingsResponse,
    EmbeddingsUsage,
    Period,
    PredictRequest,
    PredictResponse,
    PredictUsage,
    UsageByModelDay,
    UsageResponse,
    UsageTotals,
    V2InferRequest,
    V2InferResponse,
    V2ResponseOutput,
)
from sif_core.settings import Settings, get_settings
from sif_inference.errors import BadInputError, ModelNotFoundError
from sif_inference.manifest import ModelManifest, Price
from sif_inference.registry import ModelRegistry
from sif_inference.tasks import Task
from sif_inference.tasks import TaskResult as Outcome
from sif_inference.tensors import graph_signature, has_batch_axis
from sif_inference.versions import ModelRef, choose_version
from sif_metering.ledger import QuotaExceededError, TenantInactiveError, Usage, UsageLedger
from sif_metering.metrics import UsageMetrics
from sif_metering.pricing import cost_usd
from sif_metering.quota import QuotaGate

logger = Logger(child=True)


def _today() -> date:
    return datetime.now(UTC).date()


def _elapsed_ms(start: float) -> int:
    return max(1, math.ceil((time.perf_counter() - start) * 1000))


class Metered(Protocol):
    """What a metered piece of work reports (a task's TaskResult, a raw tensor run)."""

    @property
    def inputs(self) -> int: ...

    @property
    def tokens(self) -> int: ...

    @property
    def pixels(self) -> int: ...


M = TypeVar("M", bound=Metered)


@contextmanager
def _bad_input_is_400() -> Iterator[None]:
    """The core's BadInputError (bad base64, text that is not Unicode, duplicate labels) is the caller's 400."""
    try:
        yield
    except BadInputError as exc:
        raise BadRequestError(str(exc)) from exc


class ApiService:
    def __init__(
        self,
        registry: ModelRegistry,
        ledger: UsageLedger,
        *,
        quota: QuotaGate | None = None,
        usage_metrics: UsageMetrics | None = None,
    ) -> None:
        self.registry = registry
        self.ledger = ledger
        self.quota = quota or QuotaGate(ledger)
        self.usage_metrics = usage_metrics
        self.catalog = Catalog(registry)

    @classmethod
    def from_settings(cls, settings: Settings) -> ApiService:
        from sif_core.aws import client
        from sif_core.model_store import registry_from_settings

        # with the tenants table: the usage transaction refuses a revoked key, a disabled or deleted tenant
        ledger = UsageLedger(client("dynamodb"), settings.usage_table, tenants_table=settings.tenants_table or None)
        return cls(registry_from_settings(settings), ledger, quota=QuotaGate(ledger), usage_metrics=UsageMetrics())

    def warm(self, wanted: str = "*") -> list[str]:
        """Load the default variant of the `wanted` models (comma-separated names, "*" for all; the
        setting `warm_models`) now, at the cold start, so no request pays for it.

        A model that fails to load is logged and skipped: its calls fail on their own (500),
        the other models keep serving.
        """
        loaded = []
        names = self.registry.names()
        if wanted.strip() != "*":
            listed = {n.strip() for n in wanted.split(",") if n.strip()}
            names = [n for n in names if n in listed]
        for name in names:  # every model downloads in the background while the first sessions are built
            try:
                self.registry.prefetch(name)
            except Exception:  # noqa: BLE001 - reported by the get() below
                logger.debug("prefetch failed", extra={"model": name})
        for name in names:
            try:  # the version `latest` means, private models included (they serve their tenant)
                versions, index = self.registry.versions(name)
                self.registry.get(name, version=choose_version(ModelRef(name), versions, index))
                loaded.append(name)
            except Exception:  # one broken model must not take the function down
                logger.exception("cannot load model", extra={"model": name})
        return loaded

    # ------------------------------------------------------------ which model serves
    def resolve(self, caller: Caller, ref: str, request_id: str | None = None, variant: str | None = None) -> Served:
        """What `ref` and `variant` mean for this request, decided once (see Catalog.resolve)."""
        return self.catalog.resolve(caller, ref, request_id, variant)

    def manifest(self, ref: str, caller: Caller | None = None) -> ModelManifest:
        """The manifest `ref` means now (for a caller: only a model it may see)."""
        return self.catalog.manifest(ref, caller)

    # ------------------------------------------------------------ inference
    def embeddings(
        self, caller: Caller, req: EmbeddingsRequest, request_id: str, variant: str | None = None
    ) -> tuple[EmbeddingsResponse, Served]:
        served = self.resolve(caller, req.model, request_id, one_variant(req.variant, variant))
        manifest = served.manifest
        task = self.registry.task(manifest.name, served.variant, version=manifest.version, kind="embedding")
        if req.dimensions is not None and req.dimensions != manifest.output.dim:
            raise BadRequestError(f"model {req.model!r} has {manifest.output.dim} dimensions, not {req.dimensions}")
        texts = inference.embedding_inputs(req.input)
        result, usage = self._infer(caller, manifest, request_id, task, texts)
        vectors = [result.predictions[i] for i in range(len(texts))]
        if req.encoding_format == "base64":  # the raw float32 vector, as the openai client expects
            data = [Embedding(index=i, embedding=inference.float32_base64(v)) for i, v in enumerate(vectors)]
        else:
            data = [Embedding(index=i, embedding=task.to_json(v)) for i, v in enumerate(vectors)]
        response = EmbeddingsResponse(
            data=data,
            model=req.model,
            usage=EmbeddingsUsage(
                prompt_tokens=usage.tokens,
                total_tokens=usage.tokens,
                truncated_inputs=result.truncated,
                compute_ms=usage.compute_ms,
                cost_usd=_cost(manifest.price, usage),
            ),
        )
        return response, served

    def predict(
        self, caller: Caller, ref: str, req: PredictRequest, request_id: str, variant: str | None = None
    ) -> tuple[PredictResponse, Served]:
        served = self.resolve(caller, ref, request_id, one_variant(req.variant, variant))
        manifest = served.manifest
        params = req.parameters
        labels = params.labels if params else None
        template = params.template if params else None
        with _bad_input_is_400():
            task = self.registry.task(
                manifest.name, served.variant, version=manifest.version, labels=labels, template=template
            )
        instances = inference.task_inputs(req.instances)
        result, usage = self._infer(caller, manifest, request_id, task, instances)
        response = PredictResponse(
            predictions=[inference.prediction_body(task, result.predictions[i]) for i in range(len(instances))],
            model=manifest.name,
            model_version=manifest.version,
            variant=served.variant,
            usage=PredictUsage(
                inputs=usage.inputs,
                tokens=usage.tokens,
                pixels=usage.pixels,
                truncated_inputs=result.truncated,
                compute_ms=usage.compute_ms,
                cost_usd=_cost(manifest.price, usage),
            ),
        )
        return response, served

    def infer(
        self, caller: Caller, ref: str, req: V2InferRequest, request_id: str, variant: str | None = None
    ) -> tuple[V2InferResponse, Served]:
        """KServe v2 infer: a text model's BYTES texts through its task; any other model's named tensors
        straight through its graph. Metered like every call: one unit per input (row of the batch axis)."""
        asked = (req.parameters or {}).get("variant")
        if asked is not None and not isinstance(asked, str):
            raise BadRequestError("parameters.variant must be a string")
        served = self.resolve(caller, ref, request_id, one_variant(asked, variant))
        manifest = served.manifest
        wanted = [o.name for o in req.outputs or []]
        with _bad_input_is_400():
            if manifest.task in TEXT_TASKS:
                outputs, usage = self._infer_texts(caller, served, request_id, req, wanted)
            else:
                outputs, usage = self._infer_tensors(caller, served, request_id, req, wanted)
        response = V2InferResponse(
            model_name=manifest.name,
            model_version=manifest.version,
            id=req.id if req.id is not None else request_id,
            parameters={
                "variant": served.variant,
                "sha256": served.sha256,
                "inputs": usage.inputs,
                "tokens": usage.tokens,
                "compute_ms": usage.compute_ms,
                "cost_usd": _cost(manifest.price, usage),
            },
            outputs=outputs,
        )
        return response, served

    def _infer_texts(
        self, caller: Caller, served: Served, request_id: str, req: V2InferRequest, wanted: list[str]
    ) -> tuple[list[V2ResponseOutput], Usage]:
        manifest = served.manifest
        name = text_output(manifest)
        unknown = [w for w in wanted if w != name]
        if unknown:
            raise BadRequestError(f"model {manifest.name!r} has no output {unknown[0]!r}; it has [{name!r}]")
        texts = tensors.texts(req.inputs)
        task = self.registry.task(manifest.name, served.variant, version=manifest.version)
        result, usage = self._infer(caller, manifest, request_id, task, texts)
        rows = [inference.scores_row(task, result.predictions[i]) for i in range(len(texts))]
        width = text_width(manifest)
        matrix = np.stack(rows).astype(np.float32) if rows else np.zeros((0, width), dtype=np.float32)
        return [tensors.encode(name, matrix)], usage

    def _infer_tensors(
        self, caller: Caller, served: Served, request_id: str, req: V2InferRequest, wanted: list[str]
    ) -> tuple[list[V2ResponseOutput], Usage]:
        manifest = served.manifest
        model = self.registry.get(manifest.name, served.variant, version=manifest.version)
        specs = {s.name: s for s in (model.signature or graph_signature(model.session)).inputs}
        feeds: dict[str, np.ndarray] = {}
        for tensor in req.inputs:
            if tensor.name in feeds:
                raise BadRequestError(f"input {tensor.name!r} is given twice")
            array = tensors.decode(tensor)
            spec = specs.get(tensor.name)
            if spec is not None:  # an unknown name is the core's error, with the model's input names
                tensors.check_datatype(tensor, spec)
            feeds[tensor.name] = array
        batched = bool(specs) and all(has_batch_axis(s) for s in specs.values())
        rows = max((int(a.shape[0]) for a in feeds.values() if a.ndim), default=1) if batched else 1
        run, usage = self._metered(
            caller, manifest, request_id, lambda: inference.run_tensors(model, feeds, wanted, rows), units=rows
        )
        return [tensors.encode(name, value) for name, value in run.outputs.items()], usage

    def _infer(
        self, caller: Caller, manifest: ModelManifest, request_id: str, task: Task, inputs: list[Any]
    ) -> tuple[Outcome, Usage]:
        """The task on every input or none (strict: the first bad input raises), metered."""
        with _bad_input_is_400():
            return self._metered(
                caller, manifest, request_id, lambda: task.predict(inputs, strict=True), units=len(inputs)
            )

    def _metered(
        self,
        caller: Caller,
        manifest: ModelManifest,
        request_id: str,
        work: Callable[[], M],
        units: int | None = None,
    ) -> tuple[M, Usage]:
        """Run `work` metered: the quota unit is the input, so a call draws one unit per input.

        `units` (the number of inputs, when the caller knows it before inference) lets the gate
        refuse a call that cannot fit before any inference runs; None checks 1 unit. The ledger then
        charges the inputs actually counted (at least 1), conditionally on the quota and on the
        caller's key and tenant being active (401/403 and nothing billed otherwise).
        """
        self.quota.check(caller.tenant_id, caller.monthly_calls, max(1, units or 1))
        start = time.perf_counter()
        outcome = work()
        usage = Usage(
            tenant=caller.tenant_id,
            model=manifest.name,
            request_id=request_id,
            inputs=outcome.inputs,
            tokens=outcome.tokens,
            pixels=outcome.pixels,
            compute_ms=_elapsed_ms(start),
        )
        charged = max(1, usage.inputs)
        try:
            fresh = self.ledger.record(usage, monthly_limit=caller.monthly_calls, key_hash=caller.key_hash or None)
        except TenantInactiveError as exc:
            raise refused(exc) from exc
        except QuotaExceededError:
            self.quota.exhausted(caller.tenant_id, caller.monthly_calls, charged)
            raise
        if fresh:
            self.quota.recorded(caller.tenant_id, charged)
            if self.usage_metrics is not None:
                self.usage_metrics.emit(usage)
        else:
            logger.info("request already metered (a retried invocation)", extra={"request_id": request_id})
        return outcome, usage

    # ------------------------------------------------------------ jobs and batches
    def reserve(self, caller: Caller, reservation_id: str, units: int) -> None:
        """Hold `units` of the caller's monthly quota for a job (429 when they do not fit, 401/403 when inactive)."""
        try:
            self.ledger.reserve(
                caller.tenant_id, reservation_id, units, caller.monthly_calls, key_hash=caller.key_hash or None
            )
        except TenantInactiveError as exc:
            raise refused(exc) from exc
        except QuotaExceededError:
            self.quota.exhausted(caller.tenant_id, caller.monthly_calls, max(1, units))
            raise
        self.quota.recorded(caller.tenant_id, units)

    def release(self, caller: Caller, reservation_id: str) -> None:
        self.ledger.release(caller.tenant_id, reservation_id)

    def check_quota(self, caller: Caller, units: int = 1) -> None:
        """Refuse early (429) when not even `units` are left this month (a batch before its file arrives)."""
        self.quota.check(caller.tenant_id, caller.monthly_calls, units)

    # ------------------------------------------------------------ usage
    def usage(self, caller: Caller, start: date | None, end: date | None) -> UsageResponse:
        today = _today()
        start = start or today.replace(day=1)
        end = end or today.replace(day=calendar.monthrange(today.year, today.month)[1])
        if start > end:
            raise BadRequestError(f"from ({start}) is after to ({end})")
        prices: dict[str, Price] = {}
        rows = []
        total = UsageTotals()
        for row in self.ledger.rows(caller.tenant_id, start, end):
            if row.model not in prices:
                prices[row.model] = self._price(row.model, caller)
            cost = cost_usd(prices[row.model], calls=row.calls, inputs=row.inputs, tokens=row.tokens, gpu_ms=row.gpu_ms)
            rows.append(
                UsageByModelDay(
                    model=row.model,
                    day=date.fromisoformat(row.day),
                    calls=row.calls,
                    inputs=row.inputs,
                    tokens=row.tokens,
                    pixels=row.pixels,
                    compute_ms=row.compute_ms,
                    cost_usd=cost,
                )
            )
            total.calls += row.calls
            total.inputs += row.inputs
            total.tokens += row.tokens
            total.pixels += row.pixels
            total.compute_ms += row.compute_ms
            total.cost_usd += cost
        total.cost_usd = round(total.cost_usd, 8)
        rows.sort(key=lambda r: (r.day, r.model))
        period = Period(from_=start, to=end)
        return UsageResponse(tenant=caller.tenant_id, period=period, total=total, by_model_day=rows)

    def _price(self, model: str, caller: Caller) -> Price:
        try:
            return self.manifest(model, caller).price
        except ModelNotFoundError:  # usage of a model since withdrawn: its price is gone with it
            return Price()


def _cost(price: Price, usage: Usage) -> float:
    return cost_usd(price, calls=usage.calls, inputs=usage.inputs, tokens=usage.tokens, gpu_ms=usage.gpu_ms)


# ---------------------------------------------------------------- the instance the routes use
@cache
def get_service() -> ApiService:
    """A Depends() provider for the routes: built once per cold start from the one Settings, reused while warm.

    Tests swap it the powertools way: `app.dependency_overrides[get_service] = lambda: other`."""
    return ApiService.from_settings(get_settings())
