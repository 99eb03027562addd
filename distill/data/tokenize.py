"""Tokenizer training for the bootstrapped teacher, chat formatting, response masks, batching.

Loss and distillation apply to response tokens only: ``labels`` is ``-100`` on the prompt.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

IGNORE = -100
# "<|endoftext|>" is the unknown token: AutoTokenizer loads Qwen2 folders as Qwen2Tokenizer, which
# otherwise appends it as a new token, growing the vocabulary past the embedding on reload.
SPECIAL_TOKENS = ["<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>", "<|endoftext|>"]
# A deliberately small chat template: the bootstrapped model never sees anything else.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}<|end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """Byte-level BPE whose pre-tokenizer makes values copyable from request to JSON answer.

    Whitespace is its own piece (so ``Alice`` is spelled the same after a space and after a quote),
    every digit is its own piece, and every CJK character is its own piece.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\s"), behavior="isolated"),
            pre_tokenizers.Split(Regex(r"[\u3000-\u303f\u3400-\u9fff\uf900-\uff60]"), behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|pad|>",
        eos_token="<|end|>",
        unk_token="<|endoftext|>",
        bos_token=None,
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "right"
    return fast


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
