"""The models bucket as a ModelSource: models/{name}/{version}/{file}, with manifest.json beside the files,
and models/{name}/aliases.json (the model's aliases and retired versions)."""

from __future__ import annotations

import json
from typing import Any

from sif_core.settings import Settings
from sif_inference.errors import ModelNotFoundError
from sif_inference.manifest import ModelManifest
from sif_inference.registry import ModelRegistry
from sif_inference.sources import INDEX_FILE, MANIFEST_FILE, version_key
from sif_inference.versions import ModelIndex

PREFIX = "models/"


class S3ModelSource:
    def __init__(self, s3: Any, bucket: str, prefix: str = PREFIX) -> None:
        self.s3 = s3
        self.bucket = bucket
        self.prefix = prefix

    def _list(self, prefix: str) -> list[str]:
        names: list[str] = []
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix, Delimiter="/"):
            names += [p["Prefix"][len(prefix) :].rstrip("/") for p in page.get("CommonPrefixes", [])]
        return names

    def list_models(self) -> list[str]:
        return sorted(self._list(self.prefix))

    def list_versions(self, name: str) -> list[str]:
        # versions with a manifest only: a version being published gets its manifest last
        prefix = f"{self.prefix}{name}/"
        versions: list[str] = []
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                version, _, rest = obj["Key"][len(prefix) :].partition("/")
                if rest == MANIFEST_FILE:
                    versions.append(version)
        if not versions:
            raise ModelNotFoundError(f"unknown model {name!r}")
        return sorted(versions, key=version_key)

    def read_index(self, name: str) -> ModelIndex | None:
        try:
            obj = self.s3.get_object(Bucket=self.bucket, Key=f"{self.prefix}{name}/{INDEX_FILE}")
        except self.s3.exceptions.NoSuchKey:
            return None
        return ModelIndex.model_validate_json(obj["Body"].read())

    def read_manifest(self, name: str, version: str) -> ModelManifest:
        try:
            obj = self.s3.get_object(Bucket=self.bucket, Key=f"{self.prefix}{name}/{version}/{MANIFEST_FILE}")
        except self.s3.exceptions.NoSuchKey as exc:
            raise ModelNotFoundError(f"unknown model {name!r} version {version!r}") from exc
        return ModelManifest.model_validate(json.loads(obj["Body"].read()))

    def published_at(self, name: str, version: str) -> int | None:
        """When the version's manifest was uploaded (Unix seconds): a version is published with its manifest."""
        try:
            head = self.s3.head_object(Bucket=self.bucket, Key=f"{self.prefix}{name}/{version}/{MANIFEST_FILE}")
        except self.s3.exceptions.ClientError:
            return None
        return int(head["LastModified"].timestamp())

    def read(self, name: str, version: str, filename: str) -> bytes:
        # One GET into memory: the registry hashes these bytes and builds the session from them.
        try:
            obj = self.s3.get_object(Bucket=self.bucket, Key=f"{self.prefix}{name}/{version}/{filename}")
        except self.s3.exceptions.NoSuchKey as exc:
            raise ModelNotFoundError(f"{name}/{version} has no file {filename!r}") from exc
        return bytes(obj["Body"].read())


def registry_from_settings(settings: Settings) -> ModelRegistry:
    from sif_core.aws import client

    return ModelRegistry(
        S3ModelSource(client("s3"), settings.models_bucket),
        settings.model_cache_dir,
        index_ttl_s=settings.model_index_ttl_s,
    )
