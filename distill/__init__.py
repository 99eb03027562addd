"""Knowledge distillation and compression of Hugging Face causal LMs for on-device inference.

Importing ``distill`` does not import torch: ``distill.metrics`` runs where only numpy and
onnxruntime exist. Stages live in submodules: ``distill.pipeline.run`` runs them all.
"""

__version__ = "0.1.0"
