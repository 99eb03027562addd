"""Vocabulary trimming of an exported graph: the embedding and the LM head keep only the tokens a deployment
uses, while the graph's inputs and outputs stay those of the untrimmed model.

For a small model the embedding is a large share of the weights (SmolLM2-135M 21%, Gemma 3 270M 63%, more
after pruning the layers), and a car assistant uses a small part of a 49k-262k vocabulary. Trimming the
rows is the cheapest compression there is, but a token left out can never be generated: a contact name
whose token was trimmed cannot be spelled the way the tokenizer writes it. So what is kept is chosen from
data (``choose_tokens``) and its effect is measured on the held-out split, never assumed.

The tokenizer is unchanged, and so is the graph's contract (``export.onnx``): ``trim_vocabulary`` rewrites

    input_ids -> GatherND(token map) -> the kept rows of the embedding -> ... -> the kept columns of the LM head
    -> logits over the kept tokens -> Gather(back to every id) + Where(kept, ., FILL) -> logits (B, S, V)

so the runner, onnxruntime-genai and the release gate read full-vocabulary logits in which a trimmed token
has the logit ``FILL`` (probability 0 after a softmax, never the argmax). A trimmed token in the input is
read as the kept token whose embedding row is most similar (cosine), so an input never fails. The token
map (kept ids, in order) is also written to the folder as ``token_map.json``.

Pure ONNX and numpy: the quantizers then see an ordinary, smaller embedding and LM head (a tied pair stays
tied, so the int4 file still stores it once).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from core.onnx_files import TOKEN_MAP_FILE, table_lookups

__all__ = ["FILL", "TOKEN_MAP_FILE", "TrimError", "choose_tokens", "nearest_kept", "special_tokens", "trim_vocabulary"]
FILL = -1.0e4  # the logit of a trimmed token: exp(FILL - max) is 0 in float32 and float16, and finite in both
_PREFIX = "vocab_trim"


class TrimError(ValueError):
    """The graph or the kept set does not allow trimming."""


def choose_tokens(
    sequences: Iterable[Iterable[int]], vocab_size: int, *, top: int, always: Iterable[int] = ()
) -> list[int]:
    """The ids to keep, sorted: every id in ``sequences`` (the task's rendered chats, general text), every id in
    ``always`` (special tokens), and the first ``top`` ids (in a BPE vocabulary ids follow merge order and in a
    SentencePiece one their score, so the first ids are the most frequent pieces and the byte alphabet)."""
    keep = np.zeros(vocab_size, bool)
    keep[: min(top, vocab_size)] = True
    for ids in (*sequences, always):
        arr = np.fromiter(ids, np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
            raise TrimError(
                f"token id {int(arr.max() if arr.max() >= vocab_size else arr.min())} is outside "
                f"the vocabulary (0..{vocab_size - 1})"
            )
        keep[arr] = True
    return np.flatnonzero(keep).tolist()


def special_tokens(tokenizer) -> set[int]:
    """The ids a trimmed vocabulary always keeps: the tokenizer's special and added tokens (chat markers,
    end of sequence, tool-call tags)."""
    return {*tokenizer.all_special_ids, *getattr(tokenizer, "added_tokens_decoder", {})}


def _find(proto, vocab: int):
    """(embedding Gather, its table initializer, LM head MatMul, its weight initializer) of a float graph."""
    g = proto.graph
    inits = {i.name: i for i in g.initializer}
    gathers = [n for n in table_lookups(g) if inits[n.input[0]].dims[0] == vocab]
    heads = [
        n
        for n in g.node
        if n.op_type == "MatMul"
        and n.input[1] in inits
        and len(inits[n.input[1]].dims) == 2
        and inits[n.input[1]].dims[1] == vocab
    ]
    if len(gathers) != 1 or len(heads) != 1:
        raise TrimError(
            f"expected one embedding lookup and one LM head over {vocab} tokens in the float graph, found "
            f"{len(gathers)} and {len(heads)}: trim the vocabulary of the fp32 export, before quantization"
        )
    return gathers[0], inits[gathers[0].input[0]], heads[0], inits[heads[0].input[1]]


def nearest_kept(table: np.ndarray, keep: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """For every row of ``table`` the position in ``keep`` of the most cosine-similar kept row (a kept row maps
    to itself)."""
    unit = table / np.maximum(np.linalg.norm(table, axis=1, keepdims=True), 1e-12)
    kept = unit[keep].T.copy()
    out = np.empty(len(table), np.int64)
    for i in range(0, len(table), chunk):
        out[i : i + chunk] = (unit[i : i + chunk] @ kept).argmax(1)
    out[keep] = np.arange(len(keep))
    return out


def trim_vocabulary(proto, keep: Iterable[int], vocab_size: int) -> dict:
    """Rewrite a float graph in place to keep only the tokens ``keep`` (see the module docstring). Returns what
    was done: kept and total tokens, and the float bytes removed."""
    from onnx import helper, numpy_helper

    keep = np.asarray(sorted(set(keep)), np.int64)
    if keep.size == 0 or keep[0] < 0 or keep[-1] >= vocab_size:
        raise TrimError(f"the kept tokens must be a non-empty subset of 0..{vocab_size - 1}")
    g = proto.graph
    if "logits" not in [o.name for o in g.output]:
        raise TrimError("the graph has no 'logits' output")
    emb, table_init, head, weight_init = _find(proto, vocab_size)
    table, weight = numpy_helper.to_array(table_init), numpy_helper.to_array(weight_init)
    before = table.nbytes + (weight.nbytes if weight_init.name != table_init.name else 0)
    # inputs: every id to a kept row (itself, or its nearest kept row)
    token_map = nearest_kept(table, keep).astype(np.int32)
    map_init = numpy_helper.from_array(token_map, f"{_PREFIX}/token_map")
    mapped = f"{_PREFIX}/input_ids"
    table_init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(table[keep]), table_init.name))
    if weight_init.name != table_init.name:
        weight_init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(weight[:, keep]), weight_init.name))
    # GatherND, not Gather: the quantizers take every Gather of a constant for an embedding table to quantize
    axis = numpy_helper.from_array(np.array([-1], np.int64), f"{_PREFIX}/last_axis")
    column = f"{_PREFIX}/input_ids_column"
    map_nodes = [
        helper.make_node("Unsqueeze", [emb.input[1], axis.name], [column], name=f"{_PREFIX}/column"),
        helper.make_node("GatherND", [map_init.name, column], [mapped], name=f"{_PREFIX}/map"),
    ]
    emb.input[1] = mapped
    at = list(g.node).index(emb)
    for k, node in enumerate(map_nodes):
        g.node.insert(at + k, node)
    # outputs: the producer of "logits" now writes the kept columns; they are spread back over every id
    kept_logits = f"{_PREFIX}/logits_kept"
    for n in g.node:
        for k, o in enumerate(n.output):
            if o == "logits":
                n.output[k] = kept_logits
    position = np.zeros(vocab_size, np.int64)  # kept id -> its column; a trimmed id reads column 0, then Where
    position[keep] = np.arange(len(keep))
    is_kept = np.zeros(vocab_size, bool)
    is_kept[keep] = True
    extra = [
        map_init,
        axis,
        numpy_helper.from_array(position.astype(np.int32), f"{_PREFIX}/columns"),
        numpy_helper.from_array(is_kept, f"{_PREFIX}/kept"),
        numpy_helper.from_array(np.array(FILL, np.float32), f"{_PREFIX}/fill"),
    ]
    spread = f"{_PREFIX}/logits_spread"
    g.node.extend(
        [
            helper.make_node("Gather", [kept_logits, extra[2].name], [spread], name=f"{_PREFIX}/spread", axis=-1),
            helper.make_node("Where", [extra[3].name, spread, extra[4].name], ["logits"], name=f"{_PREFIX}/fill"),
        ]
    )
    g.initializer.extend(extra)
    # shape hints that named the full vocabulary for tensors that now hold the kept columns
    stale = [v for v in g.value_info if any(d.dim_value == vocab_size for d in v.type.tensor_type.shape.dim)]
    for v in stale:
        g.value_info.remove(v)
    after = numpy_helper.to_array(table_init).nbytes + (
        numpy_helper.to_array(weight_init).nbytes if weight_init.name != table_init.name else 0
    )
    return {
        "kept": int(len(keep)),
        "vocab_size": int(vocab_size),
        "float_bytes_removed": int(before - after),
        "map_bytes": int(sum(t.nbytes for t in (token_map, position.astype(np.int32), is_kept))),
    }
