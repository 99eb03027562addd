"""A tied embedding stored once in an int4 file: the embedding lookup reads the LM head's integers."""

from __future__ import annotations


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def tied_tables(model) -> set[tuple[str, str]]:
    """(MatMul weight, Gather table) initializer names of a float graph that hold the same tensor, the
    weight transposed: a tied LM head and embedding."""
    import numpy as np
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    tables = {n.input[0] for n in model.graph.node if n.op_type == "Gather" and n.input[0] in inits}
    weights = {n.input[1] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits}
    shapes = {name: tuple(inits[name].dims) for name in tables | weights}
    return {
        (w, t)
        for t in tables
        for w in weights
        if shapes[w] == shapes[t][::-1]
        and np.array_equal(numpy_helper.to_array(inits[w]).T, numpy_helper.to_array(inits[t]))
    }


def share_tied_embedding(model, tied: set[tuple[str, str]]) -> dict | None:
    """Store a tied embedding once (in place): the int4 embedding lookup (``GatherBlockQuantized``, its own
    copy of the table) is rewired to read the LM head's ``MatMulNBits`` integers (as onnxruntime-genai's
    builder does, but as the constant itself, not through a Reshape, which OpenVINO refuses). Only when the
    source graph's embedding table and LM head weight are the same tensor (``tied``, from ``tied_tables``)
    and both are blocked the same way; the table then takes the head's grid (round-half-away,
    where ORT's embedding quantizer rounds half to even: a few exact ties may move one step;
    ``elements_changed`` counts them, 0 for a QAD-trained grid). Returns what was done, or None."""
    import numpy as np
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    gathers = [n for n in g.node if n.op_type == "GatherBlockQuantized" and n.input[0] in inits]
    if len(gathers) != 1 or (len(gathers[0].input) > 3 and gathers[0].input[3]):
        return None
    emb = gathers[0]
    ea = _attrs(emb)
    table = numpy_helper.to_array(inits[emb.input[0]])
    if table.ndim != 2 or ea.get("gather_axis", 0) != 0 or ea.get("quantize_axis", 1) != 1:
        return None
    vocab, hidden = table.shape
    block = ea["block_size"]
    for head in g.node:
        if head.op_type != "MatMulNBits" or head.input[1] not in inits or (len(head.input) > 3 and head.input[3]):
            continue
        ha = _attrs(head)
        if (ha["N"], ha["K"], ha["bits"], ha["block_size"]) != (vocab, hidden, 4, block):
            continue
        # tied in the source: the float embedding table is the LM head weight (stored transposed)
        if (head.input[1].removesuffix("_Q4"), emb.input[0].removesuffix("_Q4")) not in tied:
            continue
        packed = numpy_helper.to_array(inits[head.input[1]])  # (vocab, blocks, block / 2), low nibble first
        q = np.stack([packed & 0x0F, packed >> 4], -1).reshape(vocab, -1)[:, :hidden].astype(np.int16) - 8
        signed = table.astype(np.int16) - (8 if table.min() >= 0 and table.max() > 7 else 0)  # int4 or uint4
        changed = int((q != signed).sum())
        blocks = packed.shape[1]
        # the head's integers as the table itself (a constant, as OpenVINO requires): rows of (blocks, block/2)
        # bytes, one scale per (row, block); the looked-up rows come out (..., blocks, block) and are flattened,
        # then cut back to the hidden size when the blocks pad it. Only the (small) scales are stored twice.
        scales = numpy_helper.to_array(inits[head.input[2]]).reshape(vocab, blocks, 1)
        scales_init = numpy_helper.from_array(scales, f"{head.input[2]}_table")
        flat_shape = numpy_helper.from_array(np.array([0, 0, blocks * block], np.int64), f"{emb.name}_row_shape")
        padded = blocks * block
        looked_up, flat = f"{emb.output[0]}_blocks", emb.output[0] if padded == hidden else f"{emb.output[0]}_padded"
        nodes = [
            helper.make_node(
                "GatherBlockQuantized",
                [head.input[1], emb.input[1], scales_init.name],
                [looked_up],
                name=f"{emb.name}_shared",
                domain="com.microsoft",
                bits=4,
                block_size=block,
                gather_axis=0,
                quantize_axis=2,
            ),
            helper.make_node("Reshape", [looked_up, flat_shape.name], [flat], name=f"{emb.name}_rows"),
        ]
        extra = [scales_init, flat_shape]
        if padded != hidden:  # the head's blocks pad the hidden size: cut the looked-up rows back
            ends = numpy_helper.from_array(np.array([hidden], np.int64), f"{emb.name}_hidden")
            zero = numpy_helper.from_array(np.array([0], np.int64), f"{emb.name}_zero")
            axis = numpy_helper.from_array(np.array([-1], np.int64), f"{emb.name}_last_axis")
            extra += [ends, zero, axis]
            nodes.append(
                helper.make_node(
                    "Slice", [flat, zero.name, ends.name, axis.name], [emb.output[0]], name=f"{emb.name}_cut"
                )
            )
        at = list(g.node).index(emb)
        g.node.remove(emb)
        for k, node in enumerate(nodes):
            g.node.insert(at + k, node)
        used = {i for n in g.node for i in n.input}
        freed = 0
        for name in (emb.input[0], emb.input[2]):
            if name not in used:
                freed += len(inits[name].raw_data) or inits[name].ByteSize()
                g.initializer.remove(inits[name])
        g.initializer.extend(extra)
        return {"with": head.name, "bytes_saved": freed, "elements_changed": changed}
    return None
