"""The local event source mapping's rules: which messages Lambda deletes, and the SQS event it builds."""

from __future__ import annotations

import pytest

from sif_emulator.pollers import messages_to_delete, sqs_record

IDS = ["m1", "m2", "m3"]


@pytest.mark.parametrize(
    ("outcome", "result", "report", "deleted"),
    [
        ("ok", {"batchItemFailures": []}, True, IDS),
        ("ok", {"batchItemFailures": [{"itemIdentifier": "m2"}]}, True, ["m1", "m3"]),
        ("ok", {"batchItemFailures": [{"itemIdentifier": "m1"}, {"itemIdentifier": "m3"}]}, True, ["m2"]),
        ("ok", None, True, IDS),  # a handler that returns nothing succeeded for every message
        ("ok", {"batchItemFailures": [{"itemIdentifier": "nope"}]}, True, []),  # unknown id: whole batch fails
        ("ok", {"batchItemFailures": [{"itemIdentifier": ""}]}, True, []),
        ("ok", {"batchItemFailures": [{}]}, True, []),
        ("ok", {"batchItemFailures": [{"itemIdentifier": "m2"}]}, False, IDS),  # not reported: all deleted
        ("error", {"errorMessage": "boom"}, True, []),
        ("timeout", None, True, []),
        ("crashed", None, True, []),
        ("init_error", None, True, []),
    ],
)
def test_lambda_deletes_what_succeeded(outcome: str, result: object, report: bool, deleted: list[str]) -> None:
    assert messages_to_delete(outcome, result, IDS, report_batch_item_failures=report) == deleted


def test_sqs_record_has_lambdas_shape() -> None:
    message = {
        "MessageId": "id-1",
        "ReceiptHandle": "rh",
        "MD5OfBody": "abc",
        "Body": '{"x": 1}',
        "Attributes": {"ApproximateReceiveCount": "2", "SentTimestamp": "1700000000000", "SenderId": "AID"},
        "MD5OfMessageAttributes": "def",
        "MessageAttributes": {
            "tenant": {"StringValue": "t_1", "DataType": "String"},
            "blob": {"BinaryValue": b"\x00\x01", "DataType": "Binary"},
        },
    }
    record = sqs_record(message, "arn:aws:sqs:us-east-1:123456789012:q", "us-east-1")
    assert record == {
        "messageId": "id-1",
        "receiptHandle": "rh",
        "body": '{"x": 1}',
        "attributes": {"ApproximateReceiveCount": "2", "SentTimestamp": "1700000000000", "SenderId": "AID"},
        "messageAttributes": {
            "tenant": {"stringValue": "t_1", "stringListValues": [], "binaryListValues": [], "dataType": "String"},
            "blob": {"binaryValue": "AAE=", "stringListValues": [], "binaryListValues": [], "dataType": "Binary"},
        },
        "md5OfBody": "abc",
        "md5OfMessageAttributes": "def",
        "eventSource": "aws:sqs",
        "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:q",
        "awsRegion": "us-east-1",
    }
