"""Fake quantization with ONNX Runtime's ``MatMulNBits`` numerics: the training side of ``int4_qad``.

ONNX Runtime's weight-only quantizer (round to nearest, symmetric) cuts each output row of a Linear
weight into blocks of ``block`` input weights (the last one zero-padded), and per block:

    big   = the element of largest magnitude (the maximum on a tie), with its sign
    scale = big / -2**(bits-1)                 (negative when big > 0; 0 for an all-zero block)
    q     = clamp(roundf(w * (1/scale) + 2**(bits-1)), 0, 2**bits - 1)    (0 when scale == 0)
    w'    = (q - 2**(bits-1)) * scale          (what the kernel multiplies by)

``block_grid`` computes exactly that (``tests/test_qad.py`` checks it bit for bit against ORT's C++
quantizer), ``fake_quantize`` returns ``w'`` with a straight-through gradient, and ``attach`` makes every
Linear of a causal LM (LM head included; a tied embedding with it) compute with ``w'`` during training.
``bake`` writes ``w'`` into the weights: the result is a plain float model whose weights lie on the grid,
so ORT's quantizer, run on its export, finds the same scales and integers again (the grid is a fixed
point: the block's largest element is ``-2**(bits-1) * scale`` exactly) and the int4 file computes what
the fake-quantized model computed in training.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize


def _roundf(x: torch.Tensor) -> torch.Tensor:
    """C's ``roundf`` for x >= 0 (half away from zero); exact, unlike floor(x + 0.5) near 0.5."""
    fl = torch.floor(x)
    return torch.where(x - fl >= 0.5, fl + 1, fl)


def block_grid(w: torch.Tensor, bits: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale) of a (out, in) weight: q (out, blocks, block) integers in [0, 2**bits) as float, scale
    (out, blocks). ONNX Runtime's symmetric round-to-nearest ``MatMulNBits`` quantization."""
    out, k = w.shape
    n_blocks = -(-k // block)
    wb = nn.functional.pad(w.float(), (0, n_blocks * block - k)).view(out, n_blocks, block)
    hi, lo = wb.amax(-1), wb.amin(-1)
    mid = 2 ** (bits - 1)
    scale = torch.where(hi.abs() > lo.abs(), hi, lo) / -mid
    recip = torch.where(scale != 0, 1.0 / torch.where(scale != 0, scale, 1.0), 0.0)
    q = _roundf((wb * recip[..., None] + mid).clamp(min=0)).clamp(max=2 * mid - 1)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """The weight the kernel multiplies by: (q - 2**(bits-1)) * scale, padding cut off."""
    w = (q - 2 ** (bits - 1)) * scale[..., None]
    return w.reshape(w.shape[0], -1)[:, :k]


def fake_quantize(w: torch.Tensor, bits: int, block: int) -> torch.Tensor:
    """``w`` on its quantization grid in the forward pass; the identity in the backward pass (straight-
    through estimator: the gradient of the quantized weight is applied to the float weight)."""
    with torch.no_grad():
        q, scale = block_grid(w, bits, block)
        wq = dequantize(q, scale, bits, w.shape[1]).to(w.dtype)
    return w + (wq - w).detach()


class BlockFakeQuant(nn.Module):
    """A parametrization (``torch.nn.utils.parametrize``): the module's weight as MatMulNBits computes it."""

    def __init__(self, bits: int, block: int):
        super().__init__()
        self.bits, self.block = bits, block

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return fake_quantize(w, self.bits, self.block)


def quantized_modules(model: nn.Module, embedding: bool = False) -> dict[str, nn.Module]:
    """The modules whose weights the ONNX file stores as ``MatMulNBits``: every ``nn.Linear`` (the
    exporter turns each into a MatMul on a constant weight), and the input embedding when it shares its
    weight with the LM head (one tensor, one grid) or when ``embedding`` (``GatherBlockQuantized``: the
    same blocks, along the hidden size)."""
    out = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if emb is not None and (embedding or (head is not None and _stored(emb) is _stored(head))):
        out[next(n for n, m in model.named_modules() if m is emb)] = emb
    return out


def _stored(m: nn.Module) -> torch.Tensor:
    """The weight parameter itself (under ``attach``: the original the parametrization reads)."""
    return m.parametrizations.weight.original if parametrize.is_parametrized(m, "weight") else m.weight


def attach(model: nn.Module, bits: int = 4, block: int = 32, embedding: bool = False) -> list[str]:
    """Make ``model`` compute with fake-quantized weights (in place); returns the module names. Tied
    weights stay one parameter (both modules' parametrizations hold the same original)."""
    if bits not in (4, 8):
        raise ValueError(f"fake quantization: bits must be 4 or 8 (MatMulNBits), got {bits}")
    names = []
    for name, m in quantized_modules(model, embedding).items():
        if not parametrize.is_parametrized(m, "weight"):
            parametrize.register_parametrization(m, "weight", BlockFakeQuant(bits, block))
            names.append(name)
    return names


@torch.no_grad()
def bake(model: nn.Module) -> int:
    """Remove ``attach``'s parametrizations, leaving each weight on its grid (tied weights stay tied).
    Returns how many weight tensors were written."""
    done: set[int] = set()
    for m in list(model.modules()):
        if not parametrize.is_parametrized(m, "weight"):
            continue
        fq = m.parametrizations.weight[0]
        original = m.parametrizations.weight.original
        wq = fake_quantize(original, fq.bits, fq.block)
        parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
        if id(original) not in done:
            original.copy_(wq)
            done.add(id(original))
    return len(done)


def on_grid(model: nn.Module, bits: int, block: int, embedding: bool = False) -> bool:
    """Whether every quantized weight of ``model`` already lies on its grid (what ``bake`` leaves)."""
    for m in quantized_modules(model, embedding).values():
        w = m.weight.detach()
        q, scale = block_grid(w, bits, block)
        if not torch.equal(dequantize(q, scale, bits, w.shape[1]).to(w.dtype), w):
            return False
    return True
