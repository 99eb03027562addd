"""ONNX export with KV cache and the ONNX-Runtime-only runner. Not built yet: see issue 5."""
