"""The local Batch executor's rules, as AWS Batch applies them: the container command's `Ref::`
substitution, the job definition's retry strategy, and EventBridge's event patterns."""

from __future__ import annotations

from sif_emulator.batch import local_command, pattern_matches, resolve_command, retry_decision


def test_command_substitution_as_batch_does_it() -> None:
    command = ["python", "-m", "sif_gpu_worker.entrypoint", "--spec", "Ref::spec"]
    resolved = resolve_command(command, {"spec": "s3://r/k.json"})
    assert resolved[-1] == "s3://r/k.json"
    assert local_command(resolved, "/venv/bin/python")[0] == "/venv/bin/python"
    assert local_command(["/bin/true"], "/venv/bin/python") == ["/bin/true"]


def test_retry_strategy_like_the_template() -> None:
    strategy = {
        "attempts": 3,
        "evaluateOnExit": [
            {"onStatusReason": "Host EC2*", "action": "RETRY"},
            {"onReason": "CannotPullContainerError*", "action": "RETRY"},
            {"onReason": "*", "action": "EXIT"},
        ],
    }
    assert retry_decision(strategy, 1, "Essential container in task exited", "Essential container") == "EXIT"
    assert retry_decision(strategy, 137, "x", "Host EC2 (instance i-1) terminated.") == "RETRY"
    assert retry_decision({"attempts": 2}, 1, "x", "x") == "RETRY"


def test_event_patterns() -> None:
    pattern = {"source": ["aws.batch"], "detail": {"status": ["FAILED"], "jobQueue": ["q"]}}
    assert pattern_matches(pattern, {"source": "aws.batch", "detail": {"status": "FAILED", "jobQueue": "q", "x": 1}})
    assert not pattern_matches(pattern, {"source": "aws.batch", "detail": {"status": "SUCCEEDED", "jobQueue": "q"}})
    assert not pattern_matches(pattern, {"source": "aws.s3"})
