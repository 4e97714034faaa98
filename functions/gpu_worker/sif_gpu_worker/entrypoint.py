"""The GPU batch worker: `python -m sif_gpu_worker.entrypoint --spec s3://results/.../spec.json`.

AWS Batch runs this in the GPU container (the job definition's command, the spec URI as its
`spec` parameter); the local stack's Batch executor runs the same command as a local process.
It reads the `GpuJobSpec` and runs the job or the dropped file through the same file engine,
lifecycle, quota and events as the Lambda functions (`sif_core.jobs`, `sif_core.filebatch`), on
CUDA when onnxruntime has it and on CPU otherwise (the inference core's sessions choose; the task
layer picks GPU-wide micro-batches on CUDA). A retried Batch attempt resumes from the checkpoint.

Exit codes: 0 when the work finished (succeeded, or failed on purpose and marked failed); 1 when
something unexpected happened (the work is marked failed with the error first, so nothing is
left hanging in queued/running); 2 for a bad command line.
"""

from __future__ import annotations

import argparse
import logging
import sys

from sif_core.filebatch import FileBatches
from sif_core.jobs import Jobs, describe_error
from sif_core.routing import read_spec
from sif_core.services import lifecycle
from sif_core.settings import Settings

log = logging.getLogger("sif_gpu_worker")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sif_gpu_worker", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--spec", required=True, help="s3:// URI of the job spec (GpuJobSpec JSON)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    work = lifecycle(Settings(), batch=None)
    try:
        spec = read_spec(work.s.s3, args.spec)
    except Exception as exc:
        log.exception("cannot read the job spec %s", args.spec)
        print(f"sif_gpu_worker: cannot read the job spec {args.spec}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    try:
        outcome = Jobs(work).run_gpu(spec) if spec.kind == "job" else FileBatches(work).run_gpu(spec)
        log.info("%s %s: %s", spec.kind, spec.id, outcome.as_dict())
    except Exception as exc:
        log.exception("%s %s failed", spec.kind, spec.id)
        record = work.s.store.get(spec.tenant, spec.kind, spec.id)
        if record is not None:
            work.fail(record, f"GPU worker error: {describe_error(exc)}", metering_id=spec.metering_id)
        return EXIT_FAILED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
