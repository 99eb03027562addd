"""Cached teacher signals: the teacher's top-k log-probabilities at every response token of the training
data, computed once per (teacher, data, tokenization, k, temperature) and shared by every student that
distils from them (a sweep over pruning budgets or quantization schemes runs the teacher once).

Stored as one safetensors file (DistillKit-style sparse logits): per token the k token ids (int32), their
log-probabilities at the distillation temperature (float32) and the log of the remaining mass (float32),
with per-example offsets. ``losses.topk_divergence`` documents the approximation this makes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from core.chat import IGNORE, collate

log = logging.getLogger("distill")
SIGNALS_VERSION = "topk/1"
FILE = "topk.safetensors"


def signals_key(teacher_hash: str, data_hash: str, max_length: int, k: int, temperature: float, vocab: int) -> dict:
    """What the cached signals depend on (its digest names the cache folder)."""
    return {
        "version": SIGNALS_VERSION,
        "teacher_hash": teacher_hash,
        "data_hash": data_hash,
        "max_length": max_length,
        "k": k,
        "temperature": temperature,
        "vocab": vocab,
    }


@torch.no_grad()
def compute_topk(
    teacher,
    data: Sequence[dict],
    pad_id: int,
    vocab: int,
    k: int,
    temperature: float,
    chunk_size: int,
    batch_size: int = 32,  # not a knob: changes no statistic
) -> dict[str, torch.Tensor]:
    """Top-k teacher log-probabilities (softmax of logits / T over the first ``vocab`` entries) at every
    position that predicts a response token, in example order. Logits are formed ``chunk_size`` response
    tokens at a time: one chunk of (tokens x vocab) is the largest tensor held."""
    from tqdm.auto import tqdm

    from families import backbone_and_head

    teacher.eval()
    body, head = backbone_and_head(teacher)
    device = head.weight.device
    idx_all, lp_all, tail_all, counts = [], [], [], []
    k = min(k, vocab)
    bar = tqdm(total=len(data), desc="teacher top-k", unit="ex")
    n_tok = 0
    for start in range(0, len(data), batch_size):
        rows = data[start : start + batch_size]
        b = {key: v.to(device) for key, v in collate(rows, pad_id).items()}
        sel = b["labels"][:, 1:] != IGNORE
        h = body(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state[:, :-1][sel]
        for c in range(0, h.shape[0], chunk_size):
            logits = head(h[c : c + chunk_size])[:, :vocab].float()
            logp = F.log_softmax(logits / temperature, dim=-1)
            top, idx = logp.topk(k, dim=-1)
            tail = logp.scatter(-1, idx, float("-inf")).logsumexp(-1)
            idx_all.append(idx.to(torch.int32).cpu())
            lp_all.append(top.cpu())
            tail_all.append(tail.cpu())
        counts += sel.sum(1).tolist()
        n_tok += int(sel.sum())
        bar.update(len(rows))
        bar.set_postfix(tokens=n_tok)
    bar.close()
    offsets = torch.zeros(len(counts) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(counts, dtype=torch.int64).cumsum(0)
    return {
        "indices": torch.cat(idx_all),
        "logp": torch.cat(lp_all),
        "tail": torch.cat(tail_all),
        "offsets": offsets,
    }


def save_signals(tensors: dict[str, torch.Tensor], folder: Path, meta: dict) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(Path(folder) / FILE), metadata={"meta": json.dumps(meta)})


class TopKSignals:
    """Cached top-k signals of one training set, read back for any batch of example indices."""

    def __init__(self, folder: str | Path):
        from safetensors.torch import load_file

        t = load_file(str(Path(folder) / FILE))
        self.indices, self.logp, self.tail, self.offsets = t["indices"], t["logp"], t["tail"], t["offsets"]
        self.k = self.indices.shape[1]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def batch(self, examples: Sequence[int], device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Signals for these examples, concatenated in order: the row order of the response positions of
        ``collate`` (right padding, row-major), which is how the student's hidden states are selected."""
        spans = [(int(self.offsets[i]), int(self.offsets[i + 1])) for i in examples]
        out = tuple(torch.cat([x[a:b] for a, b in spans]) for x in (self.indices, self.logp, self.tail))
        return tuple(x.to(device) for x in out) if device is not None else out

    @property
    def tokens(self) -> int:
        return int(self.offsets[-1])
