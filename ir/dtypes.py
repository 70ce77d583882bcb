"""ONNX element types (``TensorProto.DataType``) and their numpy equivalents.

Low-precision types (bfloat16, float8, int4) map to ``ml_dtypes``, the same
mapping ``onnx.numpy_helper`` uses.
"""
from __future__ import annotations

import enum

import numpy as np
import onnx
from onnx import helper


class DataType(enum.IntEnum):
    UNDEFINED = 0
    FLOAT = 1
    UINT8 = 2
    INT8 = 3
    UINT16 = 4
    INT16 = 5
    INT32 = 6
    INT64 = 7
    STRING = 8
    BOOL = 9
    FLOAT16 = 10
    DOUBLE = 11
    UINT32 = 12
    UINT64 = 13
    COMPLEX64 = 14
    COMPLEX128 = 15
    BFLOAT16 = 16
    FLOAT8E4M3FN = 17
    FLOAT8E4M3FNUZ = 18
    FLOAT8E5M2 = 19
    FLOAT8E5M2FNUZ = 20
    UINT4 = 21
    INT4 = 22
    FLOAT4E2M1 = 23
    FLOAT8E8M0 = 24
    UINT2 = 25
    INT2 = 26

    @classmethod
    def _missing_(cls, value):
        # A newer onnx may define types this table lacks: keep the number.
        obj = int.__new__(cls, value)
        obj._name_ = f"TYPE_{value}"
        obj._value_ = value
        return obj

    @classmethod
    def from_numpy(cls, dtype) -> "DataType":
        try:  # rules ask this per constant: remember each dtype's answer
            return _FROM_NUMPY[dtype]
        except (KeyError, TypeError):
            pass
        key = dtype
        dtype = np.dtype(dtype)
        if dtype.kind in "US" or dtype == object:
            result = cls.STRING
        else:
            result = cls(helper.np_dtype_to_tensor_dtype(dtype))
        try:
            _FROM_NUMPY[key] = result
        except TypeError:  # unhashable dtype spec
            pass
        return result

    def to_numpy(self) -> np.dtype:
        if self == DataType.STRING:
            return np.dtype(object)
        return helper.tensor_dtype_to_np_dtype(int(self))

    @property
    def bitwidth(self) -> int:
        bits = _BITWIDTH.get(self)
        if bits is not None:
            return bits
        if self in (DataType.UINT4, DataType.INT4, DataType.FLOAT4E2M1):
            bits = 4
        elif self in (DataType.UINT2, DataType.INT2):
            bits = 2
        elif self == DataType.STRING:
            bits = 0
        else:
            bits = self.to_numpy().itemsize * 8
        _BITWIDTH[self] = bits  # to_numpy goes through onnx.helper: answer each type once
        return bits

    @property
    def is_float(self) -> bool:
        """float, double, float16 or bfloat16 (not the float8/float4 storage types)."""
        return self in _FLOATS  # a set: enum member lookups in a tuple cost ~0.3 µs per call


_FLOATS = frozenset({DataType.FLOAT, DataType.DOUBLE, DataType.FLOAT16, DataType.BFLOAT16})
_FROM_NUMPY: dict = {}
_BITWIDTH: dict = {}
_BY_CODE: dict[int, DataType] = {int(t): t for t in DataType}


def dtype_of(code: int) -> DataType:
    """``DataType(code)`` by a plain dict lookup (the enum call costs ~1 µs; importers and shape
    inference ask once per tensor or value). Raises ValueError for a code ONNX does not define."""
    dt = _BY_CODE.get(code)
    return dt if dt is not None else DataType(code)


def name_of(t: int) -> str:
    try:
        return onnx.TensorProto.DataType.Name(int(t)).lower()
    except ValueError:
        return f"type{int(t)}"
