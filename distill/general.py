"""General text for distillation, written by a model itself (data-free, as in LLM-QAT): each sequence starts
from a random ordinary token and continues with tokens sampled from the model's own distribution. Mixed
into the task data (``distill.general.share`` of every batch), the pruned student is distilled on the
teacher's whole distribution, not only on the task's answers, so it keeps more of what pretraining gave it
(copying any name, reading a new phrasing). Every position but the first is a target.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from core.chat import IGNORE


def first_tokens(tokenizer) -> list[int]:
    """The ids a sequence may start from: every token but special and added ones."""
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    return [i for i in range(len(tokenizer)) if i not in special]


@torch.no_grad()
def sample_general(
    model, tokenizer, n: int, length: int, temperature: float, seed: int, batch_size: int, progress: bool = True
) -> list[list[int]]:
    """``n`` sequences of ``length`` tokens: a first token drawn uniformly from ``first_tokens``, then
    sampled from ``model`` at ``temperature`` (end of sequence suppressed). Deterministic for a seed."""
    from tqdm.auto import tqdm

    starts = first_tokens(tokenizer)
    device = next(model.parameters()).device
    model.eval()
    g = torch.Generator().manual_seed(seed)
    out: list[list[int]] = []
    bar = tqdm(total=n, desc="general text", unit="seq", disable=not progress)
    for b, i in enumerate(range(0, n, batch_size)):
        rows = min(batch_size, n - i)
        first = torch.tensor([starts[j] for j in torch.randint(len(starts), (rows,), generator=g).tolist()])
        torch.manual_seed(seed * 1000003 + b)
        ids = model.generate(
            input_ids=first[:, None].to(device),
            attention_mask=torch.ones(rows, 1, dtype=torch.long, device=device),
            do_sample=True,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=length - 1,
            min_new_tokens=length - 1,
            pad_token_id=tokenizer.pad_token_id,
        )
        out += ids.tolist()
        bar.update(rows)
    bar.close()
    return out


def as_examples(sequences: Sequence[Sequence[int]]) -> list[dict]:
    """Training examples of token sequences: every token after the first is a target."""
    return [
        {"input_ids": list(s), "labels": [IGNORE, *s[1:]], "prompt_len": 1, "answer": "", "tags": {}} for s in sequences
    ]
