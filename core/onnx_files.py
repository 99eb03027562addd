"""What an exported ONNX folder holds, by name (written by ``export``, read by ``quantize`` and the runner)."""

from __future__ import annotations

import shutil
from pathlib import Path

ONNX_FILE = "model.onnx"
EXTERNAL_DATA_FILE = "model.onnx.data"
CONFIG_FILE = "onnx_config.json"
GENAI_CONFIG_FILE = "genai_config.json"  # onnxruntime-genai's runtime (C, C++, C#, Java, Python) loads the folder
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
TOKEN_MAP_FILE = "token_map.json"  # the kept token ids of a vocabulary-trimmed graph (export.vocab)
TWO_GB = 2**31  # protobuf's hard limit for one message
# The graph's contract, whatever the exporter: these inputs, then one past key / value pair per layer in;
# logits, then one present key / value pair per layer out (B, kv_heads, length, head_dim)
INPUTS = ("input_ids", "attention_mask", "position_ids")


def past_names(num_layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def present_names(num_layers: int) -> list[str]:
    return [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def onnx_bytes(folder: str | Path) -> int:
    """Bytes on disk of the ONNX graph and its external data (what ships to the car)."""
    folder = Path(folder)
    return sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith(ONNX_FILE))


def copy_runtime_files(src: Path, dst: Path) -> None:
    """Tokenizer files, ``onnx_config.json``, ``genai_config.json`` and a trimmed graph's token map from one ONNX
    (or HF) folder to another."""
    for name in (*TOKENIZER_FILES, CONFIG_FILE, GENAI_CONFIG_FILE, TOKEN_MAP_FILE):
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def table_lookups(graph) -> list:
    """The ``Gather`` nodes (axis 0) of an ONNX graph that read rows of a 2-D float initializer: its float
    embedding tables."""
    from onnx import TensorProto, helper

    inits = {i.name: i for i in graph.initializer}
    out = []
    for n in graph.node:
        if n.op_type != "Gather" or n.input[0] not in inits:
            continue
        table = inits[n.input[0]]
        axis = next((helper.get_attribute_value(a) for a in n.attribute if a.name == "axis"), 0)
        if len(table.dims) == 2 and table.data_type == TensorProto.FLOAT and axis == 0:
            out.append(n)
    return out
