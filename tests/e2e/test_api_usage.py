"""Metering over HTTP: exact usage after N calls, per model and day, and each tenant sees only its own."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.e2e.conftest import ApiClient

pytestmark = pytest.mark.e2e

MODEL = "all-minilm-l6-v2"


def tiny_png() -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (10, 200, 30)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_exact_usage_after_n_calls(new_tenant: Callable[..., ApiClient]) -> None:
    client = new_tenant("usage-exact")
    tokens = 0
    for texts in (["one"], ["two", "three"], ["four", "five", "six"]):
        tokens += client.embed(texts).json()["usage"]["total_tokens"]
    predicted = client.post(f"/v1/models/{MODEL}/predict", {"instances": ["seven", "eight"]}).json()["usage"]
    tokens += predicted["tokens"]
    image = client.post("/v1/models/open-nsfw/predict", {"instances": [{"b64": tiny_png()}]}).json()["usage"]
    client.get("/v1/models")  # not metered
    client.embed([])  # 422: not metered

    usage = client.get("/v1/usage").json()
    today = datetime.now(UTC).date().isoformat()
    rows = {(r["model"], r["day"]): r for r in usage["by_model_day"]}
    assert set(rows) == {(MODEL, today), ("open-nsfw", today)}
    text_row, image_row = rows[(MODEL, today)], rows[("open-nsfw", today)]
    assert (text_row["calls"], text_row["inputs"], text_row["tokens"]) == (4, 8, tokens)
    assert (image_row["calls"], image_row["inputs"], image_row["pixels"]) == (1, 1, 40 * 30)
    assert image_row["compute_ms"] == image["compute_ms"]
    total = usage["total"]
    assert (total["calls"], total["inputs"], total["tokens"]) == (5, 9, tokens)
    assert total["cost_usd"] == pytest.approx(text_row["cost_usd"] + image_row["cost_usd"])
    # cost from the manifests' price tables
    prices = {m["name"]: m["price"] for m in client.get("/v1/models").json()["models"]}
    p = prices[MODEL]
    expected = 4 * p["usd_per_call"] + 8 / 1000 * p["usd_per_1k_inputs"] + tokens / 1e6 * p["usd_per_1m_tokens"]
    assert text_row["cost_usd"] == pytest.approx(expected, rel=1e-6)


def test_usage_period_filter(new_tenant: Callable[..., ApiClient]) -> None:
    client = new_tenant("usage-period")
    client.embed("counted today")
    today = datetime.now(UTC).date().isoformat()
    assert client.get("/v1/usage", params={"from": today, "to": today}).json()["total"]["calls"] == 1
    past = client.get("/v1/usage", params={"from": "2020-01-01", "to": "2020-12-31"}).json()
    assert past["period"] == {"from": "2020-01-01", "to": "2020-12-31"}
    assert past["total"]["calls"] == 0 and past["by_model_day"] == []


def test_tenants_see_only_their_own_usage(new_tenant: Callable[..., ApiClient]) -> None:
    alice, bob = new_tenant("alice"), new_tenant("bob", header="x-api-key")
    for _ in range(3):
        alice.embed("alice's text")
    bob.embed("bob's text")
    a, b = alice.get("/v1/usage").json(), bob.get("/v1/usage").json()
    assert (a["tenant"], a["total"]["calls"]) == (alice.tenant_id, 3)
    assert (b["tenant"], b["total"]["calls"]) == (bob.tenant_id, 1)
    # nothing in the API takes a tenant id: a tenant cannot ask for another's usage
    assert bob.get("/v1/usage", params={"tenant": alice.tenant_id}).json()["tenant"] == bob.tenant_id


def test_sif_usage_cli_shows_the_callers_usage(
    new_tenant: Callable[..., ApiClient], api_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from sif_cli import main as cli

    client = new_tenant("usage-cli")
    client.embed(["one", "two"])
    assert cli.main(["usage", "--api-url", api_url, "--key", client.key, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["total"]["calls"], shown["total"]["inputs"]) == (1, 2)
    assert cli.main(["usage", "--api-url", api_url, "--key", client.key]) == 0
    table = capsys.readouterr().out
    assert MODEL in table and "total" in table
    assert cli.main(["usage", "--api-url", api_url, "--key", "sif_wrong"]) == 1
    assert "401" in capsys.readouterr().err
