"""The quantization methods, by name. Torch-free: the driver checks --quantization without importing torch
(model/quantize.py does the quantizing)."""

METHODS = ("none", "int8", "nf4", "fp4", "int8-dynamic", "int8-weight-only")
BITSANDBYTES = ("int8", "nf4", "fp4")
