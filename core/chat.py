"""Chat examples -> token ids with response masks, and right-padded batches.

Loss and distillation apply to response tokens only: ``labels`` is ``-100`` (``IGNORE``) on the prompt.
An answer ends with the chat template's end-of-turn token (``<|im_end|>``, ``<|eot_id|>``, ``</s>``, ...),
which is what the model must learn to emit and what generation stops on; tokenizers without a pad token
(Llama-3, Mistral) pad with it (``ensure_pad``: padding is masked out of attention and every loss).
torch is imported only when batching.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

IGNORE = -100
_SENTINEL = "\u2063ANSWER\u2063"  # an answer the template cannot mistake for anything else
_EOT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class ChatTemplateError(ValueError):
    """A tokenizer that cannot format chat examples."""


def end_of_turn_id(tokenizer) -> int:
    """The token the chat template writes right after an assistant message (its end-of-turn marker),
    found by rendering a sentinel answer; the tokenizer's eos when the template writes none."""
    if tokenizer in _EOT:
        return _EOT[tokenizer]
    eot = tokenizer.eos_token_id
    if getattr(tokenizer, "chat_template", None):
        msgs = [{"role": "user", "content": "x"}, {"role": "assistant", "content": _SENTINEL}]
        text = tokenizer.apply_chat_template(msgs, tokenize=False)
        tail = text[text.rindex(_SENTINEL) + len(_SENTINEL) :] if _SENTINEL in text else ""
        special = set(tokenizer.all_special_ids) | {
            i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)
        }
        for t in tokenizer(tail, add_special_tokens=False)["input_ids"] if tail.strip() else []:
            if t in special:
                eot = t
                break
    if eot is None:
        raise ChatTemplateError(
            "the tokenizer has no eos token and its chat template writes no end-of-turn token after an answer; "
            "set one (tokenizer.eos_token) and save the tokenizer again"
        )
    _EOT[tokenizer] = eot
    return eot


def stop_ids(tokenizer) -> list[int]:
    """Token ids that end an answer in generation: the end-of-turn token, then eos if it differs."""
    eot, eos = end_of_turn_id(tokenizer), tokenizer.eos_token_id
    return [eot] + ([eos] if eos is not None and eos != eot else [])


def ensure_pad(tokenizer) -> str | None:
    """Give a tokenizer without a pad token (Llama-3, Mistral) one: its end-of-turn token. Padded positions
    are masked out of attention and every loss, so the choice never trains; it is saved with the student's
    tokenizer. Returns the token chosen, or None when the tokenizer had a pad token."""
    if tokenizer.pad_token_id is not None:
        return None
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(end_of_turn_id(tokenizer))
    return tokenizer.pad_token


def check_template(tokenizer, key: str) -> list[str]:
    """Problems formatting chat examples with this tokenizer (empty when fine)."""
    if not getattr(tokenizer, "chat_template", None):
        return [
            f"{key}: the tokenizer has no chat template, so prompts cannot be formatted the way the model will "
            "be asked in the car; save the model's chat template with its tokenizer (chat_template.jinja, or "
            "tokenizer.chat_template = ... then save_pretrained)"
        ]
    try:
        end_of_turn_id(tokenizer)
    except Exception as err:  # a template that does not render a two-message chat
        return [f"{key}: the chat template does not format a user / assistant exchange ({err})"]
    return []


def call_format(tokenizer) -> str:
    """The syntax this tokenizer's chat template writes tool calls in (``core.toolcalls.FORMATS``)."""
    from core.toolcalls import format_of

    return format_of(getattr(tokenizer, "chat_template", None))


def render(tokenizer, messages: Sequence[dict], tools: Sequence[dict] | None = None, generation: bool = False) -> str:
    """The chat template's text of ``messages`` (with the function schemas ``tools`` where given), ending in
    the assistant's generation prompt when ``generation``."""
    if not getattr(tokenizer, "chat_template", None):
        return "".join(m.get("content") or "" for m in messages)
    kw = {"tools": list(tools)} if tools else {}
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation, **kw)


def prompt_text(tokenizer, messages: Sequence[dict], tools: Sequence[dict] | None = None) -> str:
    """Everything before the final assistant answer, ready for generation."""
    return render(tokenizer, messages[:-1], tools, generation=True)


TARGETS = ("last", "all")  # which assistant turns of a conversation are training targets (data.targets)


def encode(
    tokenizer,
    messages: Sequence[dict],
    max_length: int | None = None,
    *,
    tools: Sequence[dict] | None = None,
    targets: str = "all",
) -> dict[str, list[int]]:
    """Token ids of a conversation rendered by the chat template (with ``tools``), with labels on the
    assistant turns that are targets (``last``: the final answer; ``all``: every assistant turn) and
    ``-100`` everywhere else: system, user and tool turns, the template's headers, and any text after an
    answer's end-of-turn token. ``prompt_len``: where the final answer starts (evaluation generates from
    there).

    The prompt (everything before the final answer, with the generation prompt) is tokenized as one text,
    exactly as the car's runtime tokenizes a conversation; the final answer (what the full rendering adds,
    up to and including the end-of-turn token, so a call is learned as the template writes it, e.g.
    ``<tool_call>...``) apart from it: its tokens are what greedy decoding after the prompt has to produce.
    Earlier assistant turns (``all``) are labelled where their tokens lie inside the turn's text, found by
    rendering the conversation up to and through each of them (a fast tokenizer's offsets).
    """
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("the last message must be the assistant's answer")
    if targets not in TARGETS:
        raise ValueError(f"targets must be one of {TARGETS}, got {targets!r}")
    eot = end_of_turn_id(tokenizer)
    prompt = render(tokenizer, messages[:-1], tools, generation=True)
    full = render(tokenizer, messages, tools)
    if not full.startswith(prompt):
        raise ChatTemplateError(_NOT_PREFIX.format(turn=len(messages) - 1))
    earlier = [i for i, m in enumerate(messages[:-1]) if m["role"] == "assistant"] if targets == "all" else []
    if earlier:
        enc = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
        labels = [IGNORE] * len(ids)
        for start, end in _assistant_spans(tokenizer, messages, tools, earlier, prompt, eot):
            for k, (a, b) in enumerate(offsets):
                if a >= start and b <= end and b > a:
                    labels[k] = ids[k]
    else:
        ids = _tokens(tokenizer, prompt)
        labels = [IGNORE] * len(ids)
    answer = _tokens(tokenizer, full[len(prompt) :])
    # the answer ends with its end-of-turn token (nothing after it is learned); a template that writes
    # none ends it with eos (end_of_turn_id)
    answer = answer[: answer.index(eot) + 1] if eot in answer else answer + [eot]
    prompt_len = len(ids)
    ids, labels = ids + answer, labels + answer
    if max_length is not None and len(ids) > max_length:
        raise ValueError(f"example of {len(ids)} tokens exceeds max_length={max_length}")
    return {"input_ids": ids, "labels": labels, "prompt_len": prompt_len}


_NOT_PREFIX = (
    "the chat template does not render a conversation as a prefix of its continuation (it rewrites earlier "
    "turns), so assistant turn {turn} cannot be masked; set data.targets=last or use a template that renders "
    "turns in order (data.chat_template)"
)


def _assistant_spans(tokenizer, messages, tools, turns, prompt: str, eot: int) -> list[tuple[int, int]]:
    """Character spans of ``prompt`` that hold the assistant turns ``turns`` (each up to and including its
    end-of-turn token's text)."""
    if not getattr(tokenizer, "is_fast", False):
        raise ChatTemplateError(
            "data.targets=all on multi-turn data needs a fast tokenizer (its offsets find each turn); "
            "set data.targets=last"
        )
    eot_text = tokenizer.convert_ids_to_tokens(eot)
    spans = []
    for t in turns:
        before = render(tokenizer, messages[:t], tools, generation=True)
        through = render(tokenizer, messages[: t + 1], tools)
        if not through.startswith(before) or not prompt.startswith(through):
            raise ChatTemplateError(_NOT_PREFIX.format(turn=t))
        at = through.find(eot_text, len(before))
        spans.append((len(before), at + len(eot_text) if at >= 0 else len(through)))
    return spans


def _tokens(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


PROBE_TOOL = {
    "type": "function",
    "function": {
        "name": "probe_zq_lamp",
        "description": "probe",
        "parameters": {
            "type": "object",
            "properties": {"probe_zq_key": {"type": "string"}},
            "required": ["probe_zq_key"],
        },
    },
}
PROBE_CHAT = [
    {"role": "user", "content": "x"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"type": "function", "function": {"name": "probe_zq_lamp", "arguments": {"probe_zq_key": "probe_zq_value"}}}
        ],
    },
    {"role": "tool", "name": "probe_zq_lamp", "content": "probe_zq_result"},
    {"role": "assistant", "content": "ok"},
]


def check_tools_template(tokenizer, key: str) -> list[str]:
    """Problems rendering function-calling data with this tokenizer's chat template (empty when fine): a
    probe conversation must show the tools, the call with its arguments and the tool's result, and a
    conversation must render as a prefix of its continuation."""
    fix = (
        "; set data.chat_template=tool_chatml (ChatML with Hermes <tool_call> tags, shipped in conf/templates) "
        "or to your own Jinja file that renders tools, tool_calls and tool turns"
    )
    if not getattr(tokenizer, "chat_template", None):
        return [f"{key}: the tokenizer has no chat template" + fix]
    try:
        listed = render(tokenizer, PROBE_CHAT[:1], [PROBE_TOOL], generation=True)
        text = render(tokenizer, PROBE_CHAT, [PROBE_TOOL])
    except Exception as err:  # noqa: BLE001 - a template that raises on tools or tool turns
        return [f"{key}: the chat template fails on a conversation with tools and tool calls ({err})" + fix]
    missing = [
        what
        for what, needle, where in (
            ("the tools", "probe_zq_lamp", listed),
            ("the assistant's tool calls", "probe_zq_value", text),
            ("tool results", "probe_zq_result", text),
        )
        if needle not in where
    ]
    if missing:
        return [f"{key}: the chat template drops {' and '.join(missing)}" + fix]
    try:
        encode(tokenizer, PROBE_CHAT, tools=[PROBE_TOOL], targets="all")
    except ChatTemplateError as err:
        return [f"{key}: {err}"]
    return []


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


def collate_packed(features: Sequence[dict[str, Any]], pad_id: int):
    """Pack encoded examples into shared rows (first fit, longest first), instead of one padded row each;
    rows are 1, 1.5, 2 or 3 times the longest example, whichever leaves the fewest positions.

    Returns input_ids, labels, ``position_ids`` restarting at 0 for every example (transformers then
    builds a block-diagonal causal mask: no example attends to another, and each sees the positions it
    would alone), ``attention_mask`` None, and ``order``: the examples in the order their tokens appear
    (row-major). A row's first example token is never a target (as in ``collate``, where position 0 is
    never predicted), so no example learns from the one before it. The same tokens and targets as
    ``collate``, without its padding."""
    import torch

    longest = max(len(f["input_ids"]) for f in features)
    # rows as long as the longest example leave much of each row empty when examples are half as long:
    # try a few widths and keep the one with the fewest positions (ties: the narrower)
    rows, width = min(
        ((_first_fit(features, w), w) for w in sorted({longest, *(int(longest * m) for m in PACK_WIDTHS)})),
        key=lambda rw: (len(rw[0]) * rw[1], rw[1]),
    )
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    for r, members in enumerate(rows):
        at = 0
        for i in members:
            f = features[i]
            n = len(f["input_ids"])
            ids[r, at : at + n] = torch.tensor(f["input_ids"])
            labels[r, at + 1 : at + n] = torch.tensor(f["labels"][1:])
            pos[r, at : at + n] = torch.arange(n)
            at += n
        pos[r, at:] = torch.arange(width - at)  # the row's padding: a segment of its own, never a target
    return {
        "input_ids": ids,
        "labels": labels,
        "position_ids": pos,
        "attention_mask": None,
        "order": [i for members in rows for i in members],
        "tokens": sum(len(f["input_ids"]) for f in features),
    }


PACK_WIDTHS = (1.5, 2, 3)  # row widths tried by collate_packed, in multiples of the longest example


def _first_fit(features, width: int) -> list[list[int]]:
    """Example indices per row: longest first, each into the first row with room."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(features)), key=lambda i: -len(features[i]["input_ids"])):
        n = len(features[i]["input_ids"])
        r = next((r for r, left in enumerate(room) if left >= n), None)
        if r is None:
            rows.append([])
            room.append(width)
            r = len(rows) - 1
        rows[r].append(i)
        room[r] -= n
    return rows


def real_tokens(batch) -> int:
    """Tokens of a collated batch that are not padding (``collate`` or ``collate_packed``)."""
    if batch.get("attention_mask") is not None:
        return int(batch["attention_mask"].sum())
    return int(batch["tokens"])
