"""Resource translators: a template resource's properties -> the AWS API calls that create it in moto.

One module per AWS service; `TRANSLATORS` maps each resource type the emulator creates to its
translator. A translator creates the resource and binds its Ref and attributes in the template, so
later resources (and the functions' environments) resolve to the local names and ARNs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sif_emulator.resources import batch, dynamodb, iam, logs, s3, sns, sqs
from sif_emulator.resources.common import Creation
from sif_emulator.resources.ec2 import local_network

Translator = Callable[[Creation, str, dict[str, Any]], None]

TRANSLATORS: dict[str, Translator] = {
    "AWS::S3::Bucket": s3.create_bucket,
    "AWS::S3::BucketPolicy": s3.create_bucket_policy,
    "AWS::SQS::Queue": sqs.create_queue,
    "AWS::SQS::QueuePolicy": sqs.create_queue_policy,
    "AWS::DynamoDB::Table": dynamodb.create_table,
    "AWS::SNS::Topic": sns.create_topic,
    "AWS::IAM::Role": iam.create_role,
    "AWS::IAM::InstanceProfile": iam.create_instance_profile,
    "AWS::Logs::LogGroup": logs.create_log_group,
    "AWS::Batch::ComputeEnvironment": batch.create_compute_environment,
    "AWS::Batch::JobQueue": batch.create_job_queue,
    "AWS::Batch::JobDefinition": batch.create_job_definition,
}
# Failing to create one of these breaks a product path: that is an error, not a warning.
REQUIRED = frozenset({"AWS::S3::Bucket", "AWS::SQS::Queue", "AWS::SQS::QueuePolicy", "AWS::DynamoDB::Table"})

__all__ = ["REQUIRED", "TRANSLATORS", "Creation", "Translator", "local_network"]
