"""`make bench`: sif against sentence-transformers (PyTorch, and its ONNX int8 export) side by side.

`run` drives it (`python -m sif_bench`); `peer` runs the peers in their own venv; `api`, `batch`
and `jobs` measure the HTTP, file and job paths over a local stack; `coldstart` times a cold
import-and-first-call; `report` writes docs/benchmarks.md, .json and the plot.
"""
