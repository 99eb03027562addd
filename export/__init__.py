"""ONNX export with KV cache (``export.onnx``: traced with torch.onnx, or ``export.fused`` written from the
weights), the torch-free runner (``export.runtime``: ONNX Runtime, OpenVINO, onnxruntime-genai) and the
release gate (``export.gate``: pure Python). ``python -m export`` exports and quantizes one HF folder."""
