"""ONNX Runtime quantization (int8 dynamic / static, int4 MatMulNBits). Not built yet: see issue 5."""
