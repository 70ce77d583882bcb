"""Weight-only quantization: blockwise int4/int8 weights, float activations.

The rules and their math live in :mod:`graft.rules.quantize_nbits` (round-to-nearest along K in
blocks, emitted as standard ONNX ``MatMul(x, DequantizeLinear(q, s, axis=0, block_size))`` or as
onnxruntime's ``com.microsoft.MatMulNBits``); this module keeps the factory the quantization
driver used before they did, bound to a :class:`~graft.rules.quantize_context.QuantContext`.
"""
from __future__ import annotations

from graft.compiler.engine import Rule
from graft.rules.quantize_context import QuantContext
from graft.rules.quantize_nbits import MIN_OPSET_DQ, NBitsOptions, nbits_rules
from graft.rules.quantize_params import INT4_SYM

MIN_OPSET = MIN_OPSET_DQ


def weight_only_rules(ctx: QuantContext, opts: NBitsOptions | None = None) -> list[Rule]:
    """MatMul/Gemm constant weights → ``opts``'s form (default: the DequantizeLinear form with
    ``ctx``'s bits — 4 for :data:`INT4_SYM`, else 8 — and block size, symmetric)."""
    if opts is None:
        opts = NBitsOptions(bits=4 if ctx.weight == INT4_SYM else 8, block_size=ctx.block_size or 32)
    return nbits_rules(ctx, opts)


RULES: list[Rule] = []  # needs a context (block size, grid): see weight_only_rules(ctx)
