"""The official openai client against the local API, unchanged (base64 is its default encoding)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import openai
import pytest

if TYPE_CHECKING:
    from tests.e2e.conftest import ApiClient

pytestmark = pytest.mark.e2e


def test_openai_client_embeddings(client: ApiClient, minilm_reference: dict) -> None:
    oai = openai.OpenAI(base_url=client.url + "/v1", api_key=client.key, max_retries=0)
    texts = minilm_reference["texts"]
    result = oai.embeddings.create(model="all-minilm-l6-v2", input=texts)
    assert result.model == "all-minilm-l6-v2"
    vectors = np.array([d.embedding for d in result.data], dtype=np.float32)
    assert vectors.shape == (len(texts), 384)
    ref = np.array(minilm_reference["embeddings"], dtype=np.float32)
    assert (vectors * ref).sum(1).min() >= 0.97
    assert result.usage.prompt_tokens == result.usage.total_tokens > 0

    single = oai.embeddings.create(model="all-minilm-l6-v2", input="hello", encoding_format="float")
    assert len(single.data) == 1 and len(single.data[0].embedding) == 384
    # int8 activations are quantized per batch, so "hello" alone is close to, not equal to, "hello" in a batch
    assert float(np.dot(single.data[0].embedding, vectors[1])) >= 0.97


def test_openai_client_errors(client: ApiClient) -> None:
    bad_key = openai.OpenAI(base_url=client.url + "/v1", api_key="sif_wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.embeddings.create(model="all-minilm-l6-v2", input="x")
    oai = openai.OpenAI(base_url=client.url + "/v1", api_key=client.key, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        oai.embeddings.create(model="no-such-model", input="x")
    with pytest.raises(openai.BadRequestError):
        oai.embeddings.create(model="open-nsfw", input="x")
