"""Quantization formats (modes), their opset needs, and the option parsing shared by the API and CLI."""
from __future__ import annotations

from dataclasses import dataclass

from graft.rules.quantize_params import QuantizationError

MODES = ("auto", "static", "static-per-tensor", "static-per-channel", "dynamic", "weight-only-int8",
         "weight-only-int4", "none")


@dataclass(frozen=True)
class Mode:
    """A concrete format: ``kind`` (static/dynamic/weight-only), per-channel weights, weight bits."""

    name: str
    kind: str
    per_channel: bool = True
    bits: int = 8

    @property
    def min_opset(self) -> int:
        """Lowest ai.onnx opset that can express the format, and why."""
        return self.opset_need()[0]

    def opset_need(self) -> tuple[int, str]:
        if self.kind == "weight-only":
            return 21, "DequantizeLinear with block_size" + (" and int4" if self.bits == 4 else "")
        if self.kind == "static" and self.per_channel:
            return 13, "per-channel QuantizeLinear/DequantizeLinear (the axis attribute)"
        if self.kind == "dynamic":
            return 11, "DynamicQuantizeLinear"
        return 10, "QuantizeLinear/DequantizeLinear"


def parse_mode(name: str) -> Mode:
    """The :class:`Mode` for a ``--quantize`` value (``auto`` and ``none`` are handled by the caller).

    Raises:
        QuantizationError: unknown name (lists the valid ones).
    """
    table = {
        "static": Mode("static-per-channel", "static", True),
        "static-per-channel": Mode("static-per-channel", "static", True),
        "static-per-tensor": Mode("static-per-tensor", "static", False),
        "dynamic": Mode("dynamic", "dynamic", True),
        "dynamic-per-tensor": Mode("dynamic-per-tensor", "dynamic", False),
        "weight-only-int8": Mode("weight-only-int8", "weight-only", True, 8),
        "weight-only-int4": Mode("weight-only-int4", "weight-only", True, 4),
    }
    if name not in table:
        raise QuantizationError(f"unknown quantization format {name!r}; choose one of {', '.join(MODES)}")
    return table[name]


def check_opset(mode: Mode, opset: int) -> None:
    """Raise if ``opset`` cannot express ``mode``.

    Raises:
        QuantizationError: names the format, the opset needed and why, and how to upgrade.
    """
    need, why = mode.opset_need()
    if opset < need:
        raise QuantizationError(
            f"quantization format {mode.name!r} needs ai.onnx opset >= {need} ({why}); the model imports opset "
            f"{opset}. Convert it first (onnx.version_converter.convert_version(model, {need})) or pass "
            f"upgrade_opset=True (CLI: --upgrade-opset)")
