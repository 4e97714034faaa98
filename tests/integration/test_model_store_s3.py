"""The publisher's S3 store on moto's server: conditional writes keep versions and the index consistent
when operators race (real boto3 calls, If-None-Match / If-Match as S3 has them)."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import boto3
import pytest

from sif_emulator.moto_server import AwsEmulator
from sif_inference.versions import ModelIndex
from sif_modelbuild import catalog
from sif_modelbuild.publish import publish
from sif_modelbuild.stores import S3Store
from tests import onnx_factory as factory

pytestmark = pytest.mark.integration


@pytest.fixture
def store(aws_server: AwsEmulator) -> S3Store:
    s3 = boto3.client("s3", endpoint_url=aws_server.endpoint_url)
    bucket = f"models-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    return S3Store(s3, bucket)


def test_claims_and_manifests_are_written_once(store: S3Store) -> None:
    assert store.claim("m", "1", {"by": "a"}) is True
    assert store.claim("m", "1", {"by": "b"}) is False
    assert store.version_numbers("m") == {1}
    assert store.put_manifest("m", "1", b"{}") is True
    assert store.put_manifest("m", "1", b"{}") is False
    store.release("m", "1", published=True)
    keys = [o["Key"] for o in store.s3.list_objects_v2(Bucket=store.bucket)["Contents"]]
    assert keys == ["models/m/1/manifest.json"]


def test_a_stale_index_write_is_refused(store: S3Store) -> None:
    assert store.write_index("m", ModelIndex(aliases={"latest": {"1": 1}}), None) is True
    index, token = store.read_index("m")
    assert index is not None and token
    assert store.write_index("m", ModelIndex(aliases={"latest": {"2": 1}}), token) is True
    assert store.write_index("m", ModelIndex(aliases={"latest": {"3": 1}}), token) is False  # changed since
    assert store.write_index("m", ModelIndex(), None) is False  # exists now
    assert store.read_index("m")[0] == ModelIndex(aliases={"latest": {"2": 1}})


def test_racing_alias_changes_are_both_kept(store: S3Store) -> None:
    for v in ("1", "2"):
        assert store.claim("m", v, {}) and store.put_manifest("m", v, b"{}")
    threads = [
        threading.Thread(target=catalog.alias, args=("m", f"a{i}", {"1": 1}), kwargs={"store": store}) for i in range(6)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    index, _ = store.read_index("m")
    assert index is not None and sorted(index.aliases) == [f"a{i}" for i in range(6)]


def test_concurrent_publishes_get_distinct_versions(store: S3Store, tmp_path: Path) -> None:
    model = factory.tensor_model(tmp_path / "t.onnx")
    versions: list[str] = []
    threads = [
        threading.Thread(target=lambda: versions.append(publish(model, name="race", store=store).version))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(versions) == ["1", "2", "3"]
    keys = {o["Key"] for o in store.s3.list_objects_v2(Bucket=store.bucket)["Contents"]}
    assert not any(k.endswith("/.claim") for k in keys)
    assert {f"models/race/{v}/manifest.json" for v in versions} <= keys
