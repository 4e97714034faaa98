"""S3: buckets (encryption, public access block, ownership, versioning, lifecycle, CORS, tags,
notifications) and bucket policies."""

from __future__ import annotations

import json
import logging
from typing import Any

from sif_emulator.resources.common import Creation, tag_list

log = logging.getLogger(__name__)


def create_bucket(c: Creation, lid: str, props: dict[str, Any]) -> None:
    s3 = c.client("s3")
    name = c.name(lid)
    kwargs: dict[str, Any] = {"Bucket": name}
    if c.region != "us-east-1":
        kwargs["CreateBucketConfiguration"] = {"LocationConstraint": c.region}
    s3.create_bucket(**kwargs)
    c.template.bind(lid, ref=name)
    if "BucketEncryption" in props:
        rules = []
        for rule in props["BucketEncryption"].get("ServerSideEncryptionConfiguration", []):
            api_rule: dict[str, Any] = {}
            if "ServerSideEncryptionByDefault" in rule:
                api_rule["ApplyServerSideEncryptionByDefault"] = rule["ServerSideEncryptionByDefault"]
            if "BucketKeyEnabled" in rule:
                api_rule["BucketKeyEnabled"] = bool(rule["BucketKeyEnabled"])
            rules.append(api_rule)
        s3.put_bucket_encryption(Bucket=name, ServerSideEncryptionConfiguration={"Rules": rules})
    if "PublicAccessBlockConfiguration" in props:
        s3.put_public_access_block(Bucket=name, PublicAccessBlockConfiguration=props["PublicAccessBlockConfiguration"])
    if "OwnershipControls" in props:
        s3.put_bucket_ownership_controls(Bucket=name, OwnershipControls=props["OwnershipControls"])
    if "VersioningConfiguration" in props:
        s3.put_bucket_versioning(Bucket=name, VersioningConfiguration=props["VersioningConfiguration"])
    if "LifecycleConfiguration" in props:
        rules = [_lifecycle_rule(r) for r in props["LifecycleConfiguration"].get("Rules", [])]
        s3.put_bucket_lifecycle_configuration(Bucket=name, LifecycleConfiguration={"Rules": rules})
    if "CorsConfiguration" in props:
        renames = {"MaxAge": "MaxAgeSeconds", "ExposedHeaders": "ExposeHeaders", "Id": "ID"}
        cors = [{renames.get(k, k): v for k, v in r.items()} for r in props["CorsConfiguration"]["CorsRules"]]
        s3.put_bucket_cors(Bucket=name, CORSConfiguration={"CORSRules": cors})
    if "Tags" in props:
        s3.put_bucket_tagging(Bucket=name, Tagging={"TagSet": tag_list(props["Tags"])})
    if "NotificationConfiguration" in props:
        s3.put_bucket_notification_configuration(
            Bucket=name, NotificationConfiguration=_notification(c, lid, props["NotificationConfiguration"])
        )


def _lifecycle_rule(rule: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"Status": rule.get("Status", "Enabled")}
    if "Id" in rule:
        out["ID"] = rule["Id"]
    out["Filter"] = {"Prefix": rule.get("Prefix", "")}
    expiration: dict[str, Any] = {}
    if "ExpirationInDays" in rule:
        expiration["Days"] = int(rule["ExpirationInDays"])
    if "ExpirationDate" in rule:
        expiration["Date"] = rule["ExpirationDate"]
    if "ExpiredObjectDeleteMarker" in rule:
        expiration["ExpiredObjectDeleteMarker"] = bool(rule["ExpiredObjectDeleteMarker"])
    if expiration:
        out["Expiration"] = expiration
    if "AbortIncompleteMultipartUpload" in rule:
        days = int(rule["AbortIncompleteMultipartUpload"]["DaysAfterInitiation"])
        out["AbortIncompleteMultipartUpload"] = {"DaysAfterInitiation": days}
    if "NoncurrentVersionExpiration" in rule:
        nve = rule["NoncurrentVersionExpiration"]
        out["NoncurrentVersionExpiration"] = {k: int(v) for k, v in nve.items()}
    elif "NoncurrentVersionExpirationInDays" in rule:
        out["NoncurrentVersionExpiration"] = {"NoncurrentDays": int(rule["NoncurrentVersionExpirationInDays"])}
    if "Transitions" in rule:
        out["Transitions"] = [
            {"StorageClass": t["StorageClass"], "Days": int(t["TransitionInDays"])} for t in rule["Transitions"]
        ]
    return out


def _notification(c: Creation, lid: str, config: dict[str, Any]) -> dict[str, Any]:
    def s3_filter(entry: dict[str, Any]) -> dict[str, Any]:
        rules = entry.get("Filter", {}).get("S3Key", {}).get("Rules", [])
        return {"Filter": {"Key": {"FilterRules": rules}}} if rules else {}

    out: dict[str, Any] = {}
    queues = [
        {"QueueArn": q["Queue"], "Events": [q["Event"]], **s3_filter(q)} for q in config.get("QueueConfigurations", [])
    ]
    topics = [
        {"TopicArn": t["Topic"], "Events": [t["Event"]], **s3_filter(t)} for t in config.get("TopicConfigurations", [])
    ]
    if queues:
        out["QueueConfigurations"] = queues
    if topics:
        out["TopicConfigurations"] = topics
    if config.get("LambdaConfigurations"):
        log.warning("%s: Lambda notifications are not emulated (functions run in-process)", lid)
    if config.get("EventBridgeConfiguration", {}).get("EventBridgeEnabled"):
        out["EventBridgeConfiguration"] = {}
    return out


def create_bucket_policy(c: Creation, lid: str, props: dict[str, Any]) -> None:
    policy = props["PolicyDocument"]
    policy = json.loads(policy) if isinstance(policy, str) else policy
    # The emulator speaks plain HTTP on 127.0.0.1, and moto evaluates bucket policies: a
    # deny-unless-TLS statement would deny every local call, so it is left out here.
    statements = policy.get("Statement", [])
    statements = [statements] if isinstance(statements, dict) else statements
    kept = [st for st in statements if "aws:SecureTransport" not in json.dumps(st.get("Condition", {}))]
    if len(kept) < len(statements):
        c.notes[lid] = "deny-insecure-transport statement not applied (the emulator is plain HTTP)"
        log.debug("%s: %s", lid, c.notes[lid])
    if kept:
        c.client("s3").put_bucket_policy(Bucket=props["Bucket"], Policy=json.dumps({**policy, "Statement": kept}))
    c.template.bind(lid, ref=props["Bucket"])
