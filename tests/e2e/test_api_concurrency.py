"""The local gateway serves concurrent requests concurrently, each with its own request id."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import pytest

from sif_emulator.gateway import LocalApiGateway

if TYPE_CHECKING:
    from tests.e2e.conftest import ApiClient

pytestmark = pytest.mark.e2e


def test_concurrent_requests(api: LocalApiGateway, new_tenant: Callable[..., ApiClient]) -> None:
    client = new_tenant("concurrent")
    texts = [f"concurrent text number {i}" for i in range(24)]

    def call(text: str) -> tuple[int, str, list[float]]:
        resp = client.embed(text)
        return resp.status_code, resp.headers["x-amzn-RequestId"], resp.json()["data"][0]["embedding"]

    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(call, texts))
    assert [status for status, _, _ in results] == [200] * len(texts)
    assert len({rid for _, rid, _ in results}) == len(texts)
    alone = client.embed(texts[7]).json()["data"][0]["embedding"]
    assert results[7][2] == pytest.approx(alone, abs=1e-6)  # answers went back to the right callers
    assert api.stats()["ApiFunction"]["max_concurrent"] >= 2
    assert client.get("/v1/usage").json()["total"]["calls"] == len(texts) + 1
