"""Usage as CloudWatch metrics (EMF on stdout), with tenant and model dimensions.

A separate EphemeralMetrics set per emission: the function's own Metrics (cold starts, errors)
keep their dimensions, and each usage record becomes one EMF blob that CloudWatch turns into
per-tenant, per-model series.
"""

from __future__ import annotations

from aws_lambda_powertools.metrics import EphemeralMetrics, MetricUnit

from sif_metering.ledger import Usage


class UsageMetrics:
    def __init__(self, namespace: str | None = None, service: str | None = None) -> None:
        self.namespace = namespace
        self.service = service

    def emit(self, usage: Usage) -> None:
        metrics = EphemeralMetrics(namespace=self.namespace, service=self.service)
        metrics.add_dimension(name="tenant", value=usage.tenant)
        metrics.add_dimension(name="model", value=usage.model)
        metrics.add_metric(name="Calls", unit=MetricUnit.Count, value=usage.calls)
        metrics.add_metric(name="Inputs", unit=MetricUnit.Count, value=usage.inputs)
        if usage.tokens:
            metrics.add_metric(name="Tokens", unit=MetricUnit.Count, value=usage.tokens)
        if usage.pixels:
            metrics.add_metric(name="Pixels", unit=MetricUnit.Count, value=usage.pixels)
        metrics.add_metric(name="ComputeTime", unit=MetricUnit.Milliseconds, value=usage.compute_ms)
        if usage.gpu_ms:
            metrics.add_metric(name="GpuTime", unit=MetricUnit.Milliseconds, value=usage.gpu_ms)
        metrics.flush_metrics()
