"""The pipeline's stages, grouped by what they do, in the order ``distill.pipeline.run`` calls them:

- ``inputs``: the data splits, the teacher (cached), the extra training pools, the teacher's top-k signals;
- ``student``: prune, distill, quantization-aware distillation;
- ``measure``: teacher and student on test and heldout, misses, retention;
- ``ship``: export, quantize, evaluate every ONNX variant, the release gate.

Each stage goes through ``run.Run.stage`` (manifest in ``distill.manifest``: skip what is finished, redo
what changed).
"""
