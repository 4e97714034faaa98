"""Child processes for the cold-start benchmark: start fresh, embed one text, say so, exit.

`ours`: fetch the model from the models bucket, check its sha256, build the session (what a
Lambda cold start does). `baseline`: sentence-transformers loading the same checkpoint from disk.
The parent times spawn -> the READY line, so interpreter teardown is not counted.
"""

from __future__ import annotations

import sys
import tempfile
import time

READY = "READY"


def ours(bucket: str, model: str) -> None:
    from pathlib import Path

    from sif_core.aws import client
    from sif_core.model_store import S3ModelSource
    from sif_inference import ModelRegistry

    registry = ModelRegistry(S3ModelSource(client("s3"), bucket), Path(tempfile.mkdtemp(prefix="sif-cold-")))
    registry.prefetch(model)  # as the handlers do at import: the download overlaps onnxruntime's import
    registry.embedder(model).embed(["hello world"])


def baseline(checkpoint: str, threads: int) -> None:
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(threads)
    SentenceTransformer(checkpoint, device="cpu").encode(["hello world"])


def main() -> None:
    start = time.perf_counter()
    kind, *args = sys.argv[1:]
    if kind == "ours":
        ours(*args)
    elif kind == "baseline":
        baseline(args[0], int(args[1]))
    else:
        raise SystemExit(f"unknown kind {kind!r}")
    sys.stdout.write(f"{READY} {time.perf_counter() - start:.4f}\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
