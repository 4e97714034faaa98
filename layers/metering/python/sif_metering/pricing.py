"""Cost from usage counters and the price table kept in each model's manifest."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # a type only: metering must not load the inference core (numpy, tokenizers) at import
    from sif_inference.manifest import Price


def cost_usd(price: Price, *, calls: int, inputs: int, tokens: int, gpu_ms: int = 0) -> float:
    return round(
        calls * price.usd_per_call
        + inputs / 1000 * price.usd_per_1k_inputs
        + tokens / 1_000_000 * price.usd_per_1m_tokens
        + gpu_ms / 1000 * price.usd_per_gpu_second,
        8,
    )
