"""Chat examples -> token ids with response masks, and right-padded batches.

Loss and distillation apply to response tokens only: ``labels`` is ``-100`` (``IGNORE``) on the prompt.
torch is imported only when batching.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

IGNORE = -100


def prompt_text(tokenizer, messages: Sequence[dict]) -> str:
    """Everything before the final assistant answer, ready for generation."""
    head = list(messages[:-1])
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(head, tokenize=False, add_generation_prompt=True)
    return "".join(m["content"] for m in head)


def encode(tokenizer, messages: Sequence[dict], max_length: int | None = None) -> dict[str, list[int]]:
    """Token ids of prompt + answer + eos, with labels only on answer and eos.

    Prompt and answer are tokenized separately so that the answer's tokens are exactly what
    greedy decoding after the prompt has to produce.
    """
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("the last message must be the assistant's answer")
    prompt = tokenizer(prompt_text(tokenizer, messages), add_special_tokens=False)["input_ids"]
    answer = tokenizer(messages[-1]["content"], add_special_tokens=False)["input_ids"]
    answer = answer + [tokenizer.eos_token_id]
    ids = prompt + answer
    if max_length is not None and len(ids) > max_length:
        raise ValueError(f"example of {len(ids)} tokens exceeds max_length={max_length}")
    return {"input_ids": ids, "labels": [IGNORE] * len(prompt) + answer, "prompt_len": len(prompt)}


def collate(features: Sequence[dict[str, Any]], pad_id: int):
    """Right-pad a list of encoded examples into tensors (input_ids, labels, attention_mask)."""
    import torch

    width = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    labels = torch.full((len(features), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        ids[i, :n] = torch.tensor(f["input_ids"])
        labels[i, :n] = torch.tensor(f["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
