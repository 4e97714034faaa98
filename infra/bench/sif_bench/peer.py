"""The strong peer for `make bench`: sentence-transformers' own ONNX backend with its int8 export.

sentence-transformers' ONNX backend needs optimum-onnx, whose one release pins transformers<4.58,
so the peer lives in its own venv (PEER_VENV, built on first use from PEER_PINS, torch and
onnxruntime at the project venv's versions) and runs as a child process that this module is
both sides of:

- in the project venv, `PeerProcess` builds the venv if its pins changed, starts the child and
  asks it to time calls;
- in the peer venv (`python -I bench_peer.py serve ...`), the child exports the checkpoint once
  (`SentenceTransformer(ckpt, backend="onnx")` then `export_dynamic_quantized_onnx_model`,
  cached under PEER_MODELS), loads the int8 file with ORT's intra-op threads set, and answers.

The timing protocol (`time_calls`, `percentile`) is here, stdlib only, so the peer and the
in-process contenders are timed by the same lines. Nothing here imports sif code: the peer venv
has none of the project's packages.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parents[3]
PEER_VENV = REPO / ".cache" / "peer-venv"
PEER_MODELS = REPO / ".cache" / "peer-models"
# sentence-transformers 5.7 is the last release that accepts transformers 4.x; optimum-onnx 0.1.0
# (the ONNX backend's extra) wants transformers<4.58 and optimum~=2.1.0.
PEER_PINS = (
    "sentence-transformers==5.7.0",
    "transformers==4.57.6",
    "optimum-onnx[onnxruntime]==0.1.0",
    "optimum==2.1.0",
)
QUANTIZATION = "avx512_vnni"  # the int8 file sentence-transformers' docs and the Hub ship for this model
STAMP = ".sif-peer-setup.json"  # the pins it was built with, and how long that took


# ---------------------------------------------------------------------- the timing protocol (both sides)
def time_calls(embed: Callable[[list[str]], Any], calls: Sequence[list[str]]) -> list[float]:
    """Seconds per call of `embed(call)`, after one untimed call of the first."""
    embed(calls[0])
    samples = []
    for call in calls:
        start = time.perf_counter()
        embed(call)
        samples.append(time.perf_counter() - start)
    return samples


def percentile(values: Sequence[float], q: float) -> float:
    """numpy's default (linear) percentile, without numpy."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


# ---------------------------------------------------------------------- the project venv's side
def peer_pins() -> list[str]:
    """PEER_PINS plus torch and onnxruntime at this (the project) venv's versions."""
    from importlib.metadata import version

    torch = version("torch").split("+")[0]  # 2.13.0+cpu -> 2.13.0: the CPU wheel on disk matches it
    return [f"torch=={torch}", f"onnxruntime=={version('onnxruntime')}", *PEER_PINS]


def ensure_peer_venv(venv: Path = PEER_VENV, log: IO[str] = sys.stderr) -> dict[str, Any]:
    """Create or update the peer venv when its pins changed; returns the pins, versions and setup time."""
    pins = peer_pins()
    stamp = venv / STAMP
    python = venv / "bin" / "python"
    installed = json.loads(stamp.read_text()) if stamp.exists() else {}
    if not (python.exists() and installed.get("pins") == pins):
        print(f"==> peer venv: installing {' '.join(pins)} into {venv}", file=log, flush=True)
        started = time.perf_counter()
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q"]
        # torch alone first, from the CPU wheel, so that nothing after it can pull a CUDA build.
        subprocess.run([*pip, pins[0]], check=True)
        subprocess.run([*pip, *pins], check=True)
        installed = {"pins": pins, "setup_s": time.perf_counter() - started, "date": time.strftime("%Y-%m-%d")}
        stamp.write_text(json.dumps(installed, indent=2) + "\n")
    frozen = subprocess.run(
        [str(python), "-m", "pip", "freeze", "--all"], check=True, capture_output=True, text=True
    ).stdout.split()
    wanted = {"torch", "onnxruntime", "onnx", "optimum", "optimum-onnx", "sentence-transformers", "transformers"}
    versions = {n: v for n, _, v in (line.partition("==") for line in frozen) if n.lower() in wanted}
    return {"venv": str(venv), "versions": versions, **installed}


class PeerProcess:
    """The peer child, asked over a pipe (one JSON line each way) so its timings interleave with ours."""

    def __init__(self, checkpoint: Path, *, venv: Path = PEER_VENV, models: Path = PEER_MODELS) -> None:
        self.setup = ensure_peer_venv(venv)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.proc = subprocess.Popen(
            [str(venv / "bin" / "python"), "-I", __file__, "serve", str(checkpoint), str(models)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        self.info: dict[str, Any] = self.ask({"op": "info"})
        self.session_threads: dict[str, int | None] = {}

    def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the peer child exited ({self.proc.wait()}) on {request['op']!r}")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"peer: {reply['error']}")
        return reply

    def time_calls(self, threads: int, calls: Sequence[list[str]]) -> list[float]:
        reply = self.ask({"op": "time", "threads": threads, "calls": list(calls)})
        self.session_threads[str(threads)] = reply["session_threads"]  # read back from the ORT session
        samples: list[float] = reply["seconds"]
        return samples

    def cosines(self, threads: int, texts: list[str], reference: Path) -> dict[str, float]:
        return self.ask({"op": "cosines", "threads": threads, "texts": texts, "reference": str(reference)})

    def coldstart_argv(self, threads: int) -> list[str]:
        """A fresh peer process that loads the int8 export, embeds one text and prints READY."""
        python = str(Path(self.setup["venv"]) / "bin" / "python")
        return [python, "-I", __file__, "coldstart", self.info["export_dir"], self.info["file_name"], str(threads)]

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


# ---------------------------------------------------------------------- the peer venv's side
def checkpoint_digest(checkpoint: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in checkpoint.rglob("*") if p.is_file()):
        digest.update(path.relative_to(checkpoint).as_posix().encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def build_export(checkpoint: Path, models: Path, config: str = QUANTIZATION) -> tuple[Path, str, dict[str, Any]]:
    """The int8 export, built once per (checkpoint, sentence-transformers, config) and reused."""
    import sentence_transformers
    from sentence_transformers import SentenceTransformer, export_dynamic_quantized_onnx_model

    key = f"{checkpoint_digest(checkpoint)}-st{sentence_transformers.__version__}-{config}"
    export_dir = models / key
    meta_path = export_dir / "sif-peer-export.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        return export_dir, meta["file_name"], meta
    started = time.perf_counter()
    models.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=key + ".", dir=models))
    model = SentenceTransformer(str(checkpoint), backend="onnx", device="cpu")  # exports model.onnx (fp32)
    model.save(str(work))
    export_dynamic_quantized_onnx_model(model, config, str(work))
    found = sorted(p.relative_to(work).as_posix() for p in work.glob("onnx/*qint8*.onnx"))
    if len(found) != 1:
        raise RuntimeError(f"expected one int8 file from the export, found {found}")
    meta = {"file_name": found[0], "config": config, "export_s": time.perf_counter() - started, "key": key}
    (work / "sif-peer-export.json").write_text(json.dumps(meta, indent=2) + "\n")
    shutil.rmtree(export_dir, ignore_errors=True)
    work.rename(export_dir)
    return export_dir, found[0], {**meta, "built_now": True}


def load_peer(export_dir: Path, file_name: str, threads: int) -> Any:
    """The int8 export through sentence-transformers' ONNX backend, ORT pinned to `threads` intra-op threads."""
    import onnxruntime as ort
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(threads)  # pooling and normalisation run in torch
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return SentenceTransformer(
        str(export_dir),
        backend="onnx",
        device="cpu",
        model_kwargs={"file_name": file_name, "provider": "CPUExecutionProvider", "session_options": options},
    )


def session_threads(model: Any) -> int | None:
    """The intra-op thread count the ORT session really got (None where optimum hides the session)."""
    session = getattr(model[0].auto_model, "session", None)
    if session is None or not hasattr(session, "get_session_options"):
        return None
    return int(session.get_session_options().intra_op_num_threads)


@contextmanager
def protocol_stdout() -> Iterator[IO[str]]:
    """The real stdout for the protocol; everything else that prints goes to stderr."""
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        yield out
    finally:
        out.close()


def serve(checkpoint: Path, models: Path) -> None:
    import numpy as np
    import torch

    export_dir, file_name, meta = build_export(checkpoint, models)
    peers: dict[int, Any] = {}

    def peer(threads: int) -> Any:
        if threads not in peers:
            peers[threads] = load_peer(export_dir, file_name, threads)
        torch.set_num_threads(threads)
        return peers[threads]

    def encode(model: Any, texts: list[str]) -> Any:
        return model.encode(texts, batch_size=32, normalize_embeddings=True, show_progress_bar=False)

    with protocol_stdout() as out:
        for line in sys.stdin:
            request = json.loads(line)
            op = request["op"]
            try:
                if op == "info":
                    reply: dict[str, Any] = {"export_dir": str(export_dir), "file_name": file_name, "export": meta}
                elif op == "time":
                    model = peer(request["threads"])
                    reply = {
                        "seconds": time_calls(partial(encode, model), request["calls"]),
                        "session_threads": session_threads(model),
                    }
                elif op == "cosines":
                    vectors = encode(peer(request["threads"]), request["texts"])
                    reference = np.load(request["reference"])
                    cos = np.sum(vectors * reference, axis=1) / (
                        np.linalg.norm(vectors, axis=1) * np.linalg.norm(reference, axis=1)
                    )
                    reply = {"mean": float(cos.mean()), "min": float(cos.min()), "p1": float(np.percentile(cos, 1))}
                else:
                    reply = {"error": f"unknown op {op!r}"}
            except Exception as exc:  # noqa: BLE001 - the parent reports it and stops
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            out.write(json.dumps(reply) + "\n")
            out.flush()


def coldstart(export_dir: str, file_name: str, threads: str) -> None:
    start = time.perf_counter()
    load_peer(Path(export_dir), file_name, int(threads)).encode(["hello world"])
    sys.stdout.write(f"READY {time.perf_counter() - start:.4f}\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="the sentence-transformers ONNX int8 peer (run in the peer venv)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="export once, then answer JSON requests on stdin")
    s.add_argument("checkpoint", type=Path)
    s.add_argument("models", type=Path)
    c = sub.add_parser("coldstart", help="load the export, embed one text, print READY")
    c.add_argument("export_dir")
    c.add_argument("file_name")
    c.add_argument("threads")
    args = parser.parse_args(argv)
    if args.cmd == "serve":
        serve(args.checkpoint, args.models)
    else:
        coldstart(args.export_dir, args.file_name, args.threads)


if __name__ == "__main__":
    main()
