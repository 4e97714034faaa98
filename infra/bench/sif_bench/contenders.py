"""The contenders' names, as the tables and the plot show them."""

SIF, SIF_FP32, TORCH, PEER = "sif int8", "sif fp32", "PyTorch (sentence-transformers)", "ST ONNX int8 (peer)"
