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


def quantize_embedding_8bit(model, tied: set[tuple[str, str]], block_size: int) -> dict | None:
    """Store the float embedding table (a ``Gather`` of a float initializer) at 8 bits, in place, with standard
    ops only: the looked-up rows are gathered as bytes with their block scales and dequantized after the
    lookup (``Gather`` x2, ``Cast``, ``Sub``, ``Mul``, ``Reshape``), so ONNX Runtime and OpenVINO run it at any
    hidden size (``GatherBlockQuantized`` is 4-bit in ONNX Runtime's quantizer, and OpenVINO refuses it when
    the blocks do not divide the hidden size). A tied embedding (``tied``, from ``tied_tables``) reads the
    8-bit LM head's own ``MatMulNBits`` bytes and so is stored once; an untied one is quantized on the same
    grid (symmetric blocks of ``block_size`` along the hidden size, ``scale = absmax / -128``, ``q = round(w /
    scale) + 128``). Returns what was done, or None when the graph has no float embedding table."""
    import numpy as np
    from onnx import helper, numpy_helper

    from core.onnx_files import table_lookups

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    gathers = table_lookups(g)
    if len(gathers) != 1:
        return None
    emb = gathers[0]
    table = numpy_helper.to_array(inits[emb.input[0]])
    vocab, hidden = table.shape
    blocks = -(-hidden // block_size)
    source, head_name = None, None
    for head in g.node:
        if head.op_type != "MatMulNBits" or head.input[1] not in inits or (len(head.input) > 3 and head.input[3]):
            continue
        ha = _attrs(head)
        if (ha["N"], ha["K"], ha["bits"], ha["block_size"]) != (vocab, hidden, 8, block_size):
            continue
        if (head.input[1].removesuffix("_Q8"), emb.input[0]) not in tied:
            continue
        packed = numpy_helper.to_array(inits[head.input[1]]).reshape(vocab, blocks, block_size)
        scales = numpy_helper.to_array(inits[head.input[2]]).reshape(vocab, blocks, 1).astype(np.float32)
        source, head_name = (head.input[1], packed, scales), head.name
        break
    if source is None:  # untied (or a head in another format): the table on the same 8-bit grid
        padded = np.zeros((vocab, blocks * block_size), np.float32)
        padded[:, :hidden] = table
        w = padded.reshape(vocab, blocks, block_size)
        absmax = np.take_along_axis(w, np.abs(w).argmax(-1)[..., None], -1)
        scales = (absmax / -128.0).astype(np.float32)
        safe = np.where(scales == 0, 1, scales)
        packed = (np.clip(np.round(w / safe), -128, 127) + 128).astype(np.uint8)
        name = f"{emb.input[0]}_Q8_table"
        model.graph.initializer.append(numpy_helper.from_array(packed, name))
        source = (name, packed, scales)
    name, packed, scales = source
    # the bytes must read back as the table (within a step of its block's grid: rounding, or the clip of +128
    # steps to +127 when the block's largest magnitude is negative); else a layout this code does not know.
    # Only the hidden size's elements: the quantizer's padding of the last block is cut off after the lookup
    step = np.repeat(np.abs(scales), block_size, -1).reshape(vocab, -1)[:, :hidden]
    deq = ((packed.astype(np.float32) - 128) * scales).reshape(vocab, -1)[:, :hidden]
    diff = np.abs(deq - table)
    if not np.all(diff <= step * 1.001 + 1e-7):
        return None
    err = float(diff.max())
    p = f"{emb.name}_q8"
    scales_init = numpy_helper.from_array(scales, f"{p}/scales")
    extra = [
        scales_init,
        numpy_helper.from_array(np.array(128, np.float32), f"{p}/zero"),
        numpy_helper.from_array(np.array([0, 0, blocks * block_size], np.int64), f"{p}/row_shape"),
    ]
    ids = emb.input[1]
    flat = emb.output[0] if blocks * block_size == hidden else f"{p}/padded"
    nodes = [
        helper.make_node("Gather", [name, ids], [f"{p}/bytes"], name=f"{p}/gather", axis=0),
        helper.make_node("Gather", [scales_init.name, ids], [f"{p}/row_scales"], name=f"{p}/gather_scales", axis=0),
        helper.make_node("Cast", [f"{p}/bytes"], [f"{p}/float"], name=f"{p}/cast", to=1),
        helper.make_node("Sub", [f"{p}/float", extra[1].name], [f"{p}/centered"], name=f"{p}/center"),
        helper.make_node("Mul", [f"{p}/centered", f"{p}/row_scales"], [f"{p}/blocks"], name=f"{p}/scale"),
        helper.make_node("Reshape", [f"{p}/blocks", extra[2].name], [flat], name=f"{p}/rows"),
    ]
    if flat != emb.output[0]:  # the blocks pad the hidden size: cut the rows back
        extra += [
            numpy_helper.from_array(np.array([0], np.int64), f"{p}/start"),
            numpy_helper.from_array(np.array([hidden], np.int64), f"{p}/end"),
            numpy_helper.from_array(np.array([-1], np.int64), f"{p}/axis"),
        ]
        nodes.append(
            helper.make_node("Slice", [flat, f"{p}/start", f"{p}/end", f"{p}/axis"], [emb.output[0]], name=f"{p}/cut")
        )
    at = list(g.node).index(emb)
    g.node.remove(emb)
    for k, node in enumerate(nodes):
        g.node.insert(at + k, node)
    freed = table.nbytes
    g.initializer.remove(inits[emb.input[0]])
    g.initializer.extend(extra)
    return {
        "bits": 8,
        "shared_with": head_name,  # None: the table is stored on its own at 8 bits
        "bytes_saved": int(freed - (0 if head_name else packed.nbytes) - scales.nbytes),
        "max_abs_error": err,
    }
