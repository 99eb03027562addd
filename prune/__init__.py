"""Structured (width / depth) pruning of Hugging Face causal LMs. Not built yet: see issue 4."""
