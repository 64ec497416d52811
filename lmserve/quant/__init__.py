"""Quantized weight formats and their matmuls.

`gguf_blocks` decodes GGUF's block layouts into integer values with per-group scales;
`packed` holds weights in packed form and multiplies by them (PyTorch's int4/int8 weight-only
kernels where a format maps onto them, dequantize-then-matmul otherwise). Models never see this:
`layers.linear.Linear` and `layers.embedding` pick a packed weight when the loader hands one over.
"""
