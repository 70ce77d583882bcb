"""What quantization analyses hand to quantization rules.

Rules stay declarative (pattern, check, replacement); the numbers they need — calibrated
activation ranges, which nodes are excluded, which tensors to quantize, the integer
schemes — come from a :class:`QuantContext` that a rule factory closes over::

    ctx = QuantContext(table=table, tensors={"conv1_out", ...})
    rules = graft.rules.quantize_static.static_rules(ctx)      # list[Rule] bound to ctx

The context also keeps the quantized copy of each weight, so a weight shared by several
nodes (tied embeddings, a reused Conv) is quantized once and every user reads the same
integers and scales.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from graft.rules.quantize_params import (INT4_SYM, INT8_SYM, INT32_BIAS, UINT8_ASYM, QParams, QType,
                                          QuantizationError, activation_params)
from graft.ir import Node, Value


QNAME_KEY = "_graft.qname"  # a node's name in the input model, kept across re-emits (not exported)


def node_key(node: Node) -> str:
    """The node's name in the input model (stable across quantization rewrites); an unnamed node
    is known by its first output's name."""
    key = node.meta.get(QNAME_KEY) or node.name
    if not key and node.outputs:
        key = node.outputs[0].name
        node.meta[QNAME_KEY] = key
    return key


@dataclass
class QuantContext:
    """Inputs of the quantization rules.

    Attributes:
        table: the :class:`~graft.compiler.techniques.calibration.CalibrationTable` (static mode), or None.
        tensors: names of the activations to quantize (chosen by the driver's analysis).
        activation: integer grid of activations (:data:`UINT8_ASYM` or :data:`INT8_SYM`).
        weight: integer grid of weights (:data:`INT8_SYM`; :data:`INT4_SYM` for weight-only).
        per_channel: per-output-channel weight scales (Conv axis 0, Gemm transB ? 0 : 1, MatMul (K, N) axis 1).
        excluded: node names left in float.
        nodes: names of the nodes whose weights the rules quantize (None: every eligible node).
        block_size: weight-only block length along K (0: not blockwise).
        min_weight_elements: weights smaller than this stay float (weight-only/dynamic modes).
        smoothing: activation name → SmoothQuant divisor s (per input channel), for the smoothing rule.
        embedding_min_rows: embedding tables (Gather on axis 0) with fewer rows stay float.
        embedding_per_row: one scale per table row (else one per table: ``DequantizeLinear``, one op fewer).
    """

    table: object | None = None
    tensors: set[str] = field(default_factory=set)
    activation: QType = UINT8_ASYM
    weight: QType = INT8_SYM
    per_channel: bool = True
    excluded: set[str] = field(default_factory=set)
    nodes: set[str] | None = None
    block_size: int = 0
    min_weight_elements: int = 0
    smoothing: dict[str, np.ndarray] = field(default_factory=dict)
    embedding_min_rows: int = 0
    embedding_per_row: bool = True
    weight_cache: dict[tuple, tuple[Value, ...]] = field(default_factory=dict)
    _act_cache: dict[str, QParams] = field(default_factory=dict)

    def selected(self, node: Node) -> bool:
        """The node may be quantized: not excluded, and in ``nodes`` when a selection is given."""
        key = node_key(node)
        if key in self.excluded:
            return False
        return self.nodes is None or key in self.nodes

    def why_not(self, node: Node) -> str | None:
        key = node_key(node)
        if key in self.excluded:
            return f"{node.op_type} node {key!r} is excluded from quantization"
        if self.nodes is not None and key not in self.nodes:
            return f"{node.op_type} node {key!r} was not selected for quantization"
        return None

    def act_params(self, name: str) -> QParams:
        """Parameters of calibrated activation ``name``.

        Raises:
            QuantizationError: the tensor has no calibrated range.
        """
        p = self._act_cache.get(name)
        if p is None:
            if self.table is None or name not in self.table:
                raise QuantizationError(f"tensor {name!r} has no calibrated range (calibrate it first)")
            lo, hi = self.table.range(name, symmetric=self.activation.symmetric)
            p = activation_params(lo, hi, self.activation, name)
            self._act_cache[name] = p
        return p


def dq_params(value: Value | None) -> QParams | None:
    """The parameters of ``value`` when it is a DequantizeLinear output with constant scale/zero point."""
    if value is None or value.producer is None:
        return None
    dq = value.producer
    if dq.op_type != "DequantizeLinear" or dq.domain != "":
        return None
    scale = dq.inputs[1].constant() if len(dq.inputs) > 1 and dq.inputs[1] is not None else None
    if scale is None:
        return None
    zpv = dq.inputs[2] if len(dq.inputs) > 2 else None
    zp = zpv.constant() if zpv is not None else None
    if zpv is not None and zp is None:
        return None
    qdtype = dq.inputs[0].dtype
    from graft.ir.dtypes import DataType

    if zp is None:
        zp = np.zeros(scale.shape, dtype=np.uint8 if qdtype in (None, DataType.UINT8) else qdtype.to_numpy())
    qtype = {DataType.UINT8: UINT8_ASYM, DataType.INT8: INT8_SYM, DataType.INT32: INT32_BIAS,
             DataType.INT4: INT4_SYM}.get(qdtype or DataType.UINT8)
    if qtype is None:
        return None
    axis = dq.attrs.get("axis", 1) if scale.size > 1 or scale.ndim == 1 else None
    return QParams(np.asarray(scale, dtype=np.float32), np.asarray(zp), qtype, axis, dq.attrs.get("block_size", 0))


def is_dequantized(value: Value | None) -> bool:
    """``value`` is the output of a per-tensor DequantizeLinear with constant parameters."""
    p = dq_params(value)
    return p is not None and p.scale.size == 1 and p.block_size == 0


def producer_is(op_type: str) -> Callable[[Value], bool]:
    return lambda v: v.producer is not None and v.producer.op_type == op_type and v.producer.domain == ""
