"""The calibration table: what an analysis hands to quantization rules.

A :class:`CalibrationTable` maps tensor (value) names to :class:`Observer` statistics and
resolves each to a range with the chosen :mod:`method <graft.compiler.techniques.calibration.observers>`.
Ranges can be overridden (``set_range``), which is how the driver equalizes tensors that
must share one scale (inputs and output of a Concat, the two sides of a data-movement op).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

from graft.compiler.techniques.calibration.observers import METHODS, Observer


class CalibrationWarning(UserWarning):
    """A tensor whose statistics are unusable as they are (never finite, partly non-finite)."""


@dataclass
class CalibrationTable:
    """Per-tensor statistics from one calibration run.

    Attributes:
        observers: tensor name → :class:`Observer`.
        method: default range method (``minmax``, ``percentile``, ``entropy``, ``mse``).
        percentile: for the ``percentile`` method.
        source: where the data came from (printed in reports).
        synthetic: the data was random (smoke test only).
        samples: feeds run.
        captures: tensor name → list of raw arrays, one per feed (only tensors asked for).
    """

    observers: dict[str, Observer] = field(default_factory=dict)
    method: str = "minmax"
    percentile: float = 99.99
    source: str = ""
    synthetic: bool = False
    samples: int = 0
    captures: dict[str, list[np.ndarray]] = field(default_factory=dict)
    _overrides: dict[str, tuple[float, float]] = field(default_factory=dict)
    _warned: set = field(default_factory=set)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown calibration method {self.method!r}; choose one of {', '.join(METHODS)}")

    def __contains__(self, name: str) -> bool:
        return name in self.observers or name in self._overrides

    def range(self, name: str, *, symmetric: bool = False, method: str | None = None) -> tuple[float, float]:
        """The range of tensor ``name`` (an override if one was set).

        Raises:
            KeyError: the tensor was not calibrated.
        """
        if name in self._overrides:
            return self._overrides[name]
        obs = self.observers.get(name)
        if obs is None:
            raise KeyError(f"tensor {name!r} was not calibrated")
        self._warn_once(obs)
        m = method or self.method
        if m != "minmax" and obs.hist is None:
            m = "minmax"
        return obs.range(m, percentile=self.percentile, symmetric=symmetric)

    def set_range(self, name: str, lo: float, hi: float) -> None:
        self._overrides[name] = (float(lo), float(hi))

    def channel_absmax(self, name: str) -> np.ndarray | None:
        obs = self.observers.get(name)
        return None if obs is None else obs.channel_absmax

    def _warn_once(self, obs: Observer) -> None:
        if obs.name in self._warned:
            return
        if not obs.seen_finite:
            self._warned.add(obs.name)
            warnings.warn(CalibrationWarning(
                f"tensor {obs.name!r}: no finite value in {obs.batches} calibration batch(es) "
                f"({obs.nonfinite} inf/NaN); its range is taken as [0, 0] and gets a safe scale"), stacklevel=3)
        elif obs.nonfinite:
            self._warned.add(obs.name)
            warnings.warn(CalibrationWarning(
                f"tensor {obs.name!r}: {obs.nonfinite} inf/NaN value(s) during calibration were ignored "
                f"(range from the {obs.count} finite values)"), stacklevel=3)
        elif obs.min == obs.max:
            self._warned.add(obs.name)
            warnings.warn(CalibrationWarning(
                f"tensor {obs.name!r}: constant {obs.min:g} over all calibration data; the range is widened to "
                f"include 0"), stacklevel=3)
