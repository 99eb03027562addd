"""ONNX Runtime plumbing every scheme shares: calibration/probe feeds (``SequenceReader``), the weight
MatMuls of a graph, the ``quantization.json`` record with its ``vs_source`` comparison, and the guarded
temporary folder each variant is built in. No torch."""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from core.files import building
from core.onnx_files import ONNX_FILE, copy_runtime_files, onnx_bytes

log = logging.getLogger("quantize")
logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # it logs every node at INFO


def op_counts(path: Path) -> dict[str, int]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return dict(sorted(Counter(n.op_type for n in model.graph.node).items()))


def const_matmuls(model) -> list[str]:
    """MatMul nodes whose second input is an initializer: the weight matmuls (LM head included). ``model``:
    a loaded ``ModelProto`` or the path of one."""
    import onnx

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]


class SequenceReader:
    """ONNX Runtime ``CalibrationDataReader`` over token sequences (prompt + answer), fed one at a time
    as full prefill steps with an empty KV cache."""

    def __init__(self, sequences: Sequence[Sequence[int]], meta: dict):
        self.sequences = [list(s) for s in sequences]
        self.meta = meta
        self._it = None

    def _feeds(self) -> Iterable[dict]:
        import numpy as np

        n, kv, hd = self.meta["num_hidden_layers"], self.meta["num_key_value_heads"], self.meta["head_dim"]
        for s in self.sequences:
            ids = np.array([s], dtype=np.int64)
            feed = {
                "input_ids": ids,
                "attention_mask": np.ones_like(ids),
                "position_ids": np.arange(len(s), dtype=np.int64)[None],
            }
            for i in range(n):
                for k in ("key", "value"):
                    feed[f"past_key_values.{i}.{k}"] = np.zeros((1, kv, 0, hd), dtype=np.float32)
            yield feed

    def get_next(self):
        if self._it is None:
            self._it = iter(self._feeds())
        return next(self._it, None)

    def rewind(self):
        self._it = None

    def __iter__(self):
        return iter(self._feeds())

    def __deepcopy__(self, memo):  # ORT's GPTQ path deep-copies the reader
        return SequenceReader(self.sequences, self.meta)


def read_meta(src: Path) -> dict:
    return json.loads((src / "onnx_config.json").read_text())


def compare_to_source(src: str | Path, variant: str | Path, sequences: Sequence[Sequence[int]]) -> dict:
    """Next-token distributions of ``variant`` against ``src`` (two exported folders) on ``sequences``, each
    run alone with an empty cache (batch 1): mean KL(src || variant) per token, share of positions whose
    argmax agrees, largest absolute logit difference. ONNX Runtime only: this is what a quantizer changed."""
    import numpy as np
    import onnxruntime as ort

    src, variant = Path(src), Path(variant)
    sessions = [ort.InferenceSession(str(f / ONNX_FILE), providers=["CPUExecutionProvider"]) for f in (src, variant)]
    kl, agree, tokens, diff = 0.0, 0, 0, 0.0
    for feed in SequenceReader(sequences, read_meta(src)):
        p, q = (s.run(["logits"], feed)[0][0].astype(np.float64) for s in sessions)
        lp, lq = (x - x.max(-1, keepdims=True) for x in (p, q))
        lp, lq = (x - np.log(np.exp(x).sum(-1, keepdims=True)) for x in (lp, lq))  # log-softmax
        kl += float((np.exp(lp) * (lp - lq)).sum())
        agree += int((p.argmax(-1) == q.argmax(-1)).sum())
        tokens += p.shape[0]
        diff = max(diff, float(np.abs(p - q).max()))
    return {
        "sequences": len(sequences),
        "tokens": tokens,
        "kl": kl / max(tokens, 1),
        "agreement": agree / max(tokens, 1),
        "max_logit_diff": diff,
    }


def finish(
    src: Path,
    tmp: Path,
    scheme: str,
    settings: dict,
    probe: Sequence[Sequence[int]] = (),
    reference: Path | None = None,
) -> None:
    """Write ``quantization.json``. ``reference``: the fp32 student's export when ``src`` is another float
    model (QAD's fake-quantized student): ``vs_source`` is then measured against the reference (what the
    quantization costs), and ``vs_fake_quant`` against ``src`` (how exactly the file reproduces it)."""
    copy_runtime_files(src, tmp)
    weights, left = const_matmuls(src / ONNX_FILE), const_matmuls(tmp / ONNX_FILE)
    info = {
        "scheme": scheme,
        "settings": settings,
        "source": str(src),
        "quantized": {
            "weight_matmuls": len(weights) - len(left),
            "weight_matmuls_left_float": left,
            "lm_head": any("lm_head" in n for n in weights) and not any("lm_head" in n for n in left),
            "embedding": bool(settings.get("embedding")),
        },
        "ops_before": op_counts(src / ONNX_FILE),
        "ops_after": op_counts(tmp / ONNX_FILE),
        "bytes": onnx_bytes(tmp),
        "source_bytes": onnx_bytes(src),
    }
    if probe:
        info["vs_source"] = compare_to_source(reference or src, tmp, probe)
        if reference:
            info["vs_fake_quant"] = compare_to_source(src, tmp, probe)
    (tmp / "quantization.json").write_text(json.dumps(info, indent=2))
    vs = info.get("vs_source")
    log.info(
        "quantize %s: %s -> %s bytes (%.2fx)%s",
        scheme,
        info["source_bytes"],
        info["bytes"],
        info["bytes"] / info["source_bytes"],
        f", KL to the source {vs['kl']:.5f}, agreement {vs['agreement']:.4f}" if vs else "",
    )


def guard(dest: Path, build) -> Path:
    """Build into a temporary sibling folder, renamed onto ``dest`` when complete. ORT's quantizers log
    every node on the root logger at INFO, and advise pre-processing on every call at WARNING (we
    pre-process where it matters: static int8), so the root logger is quietened meanwhile."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        with building(dest) as tmp:
            build(tmp)
    finally:
        root.setLevel(level)
    return dest
