"""Gradients for the first-order Taylor criterion, from calibration data.

The model (ONNX ops) is turned into a ``torch.fx.GraphModule`` with ``ir.to_torch``
(ONNX operator semantics on differentiable torch ops); its parameters (every trainable
floating-point constant: weights, biases, scales — not BatchNormalization statistics)
require grad, the calibration feeds are run through it, and
``dL/dw`` is summed over the batches, per initializer name.

Calibration data has no labels, so the loss is label-free: for an output of shape
``(N, C)`` with ``C > 1`` (class scores) it is the cross-entropy against the model's
own prediction (pseudo-labels, ``argmax``); for any other output ``0.5 * mean(y^2)``.
The criterion (:mod:`graft.compiler.techniques.pruning.importance`) is then
``I(c) = |sum_{w in c} w * dL/dw|`` (Molchanov et al. 2019, eq. 3-4, group form).
"""
from __future__ import annotations

import numpy as np

from graft.ir import Model


class TaylorError(ValueError):
    """Gradients cannot be computed (no calibration data, a model the torch backend cannot run)."""


def gradients(model: Model, calibration, max_batches: int = 16) -> dict[str, np.ndarray]:
    """``{initializer name: dL/dw}`` summed over up to ``max_batches`` calibration feeds.

    Args:
        model: an IR model with ONNX ops.
        calibration: an ``.npz`` path, a directory of ``.npy`` files, a
            :class:`graft.compiler.techniques.calibration.CalibrationData` or an iterable of feeds (dict input → array).

    Raises:
        TaylorError: no calibration data, or the torch backend cannot run the model.
        graft.compiler.techniques.calibration.data.CalibrationDataError: feeds that do not fit the model.
    """
    import torch

    from graft import ir
    from graft.compiler.techniques.calibration.data import as_calibration_data

    if calibration is None:
        raise TaylorError("the taylor criterion needs calibration data (an .npz file, a directory of .npy files, "
                          "or feeds)")
    try:
        gm = ir.to_torch(model)
    except Exception as e:  # noqa: BLE001 - TorchBackendError and friends: say why Taylor is unavailable
        raise TaylorError(f"the taylor criterion runs the model in torch, which failed: {e}") from None
    leaves = {}
    params = dict(gm.named_parameters())  # trainable constants (not BatchNormalization statistics)
    for path, name in gm.graft_state_names.items():
        t = params.get(path)
        if t is not None:
            t.requires_grad_(True)
            leaves[name] = t
    data = as_calibration_data(calibration, model)
    order = list(gm.graft_input_names)
    total: dict[str, np.ndarray] = {}
    n = 0
    gm.eval()
    for feed in data:
        if n >= max_batches:
            break
        args = [torch.from_numpy(np.ascontiguousarray(feed[k])) for k in order]
        out = gm(*args)
        outs = out if isinstance(out, tuple) else (out,)
        loss = sum(_loss(y) for y in outs if y.is_floating_point())
        for t in leaves.values():
            t.grad = None
        loss.backward()
        for name, t in leaves.items():
            if t.grad is not None:
                g = t.grad.detach().numpy().astype(np.float64)
                total[name] = total[name] + g if name in total else g
        n += 1
    if n == 0:
        raise TaylorError("the calibration data holds no samples")
    return total


def _loss(y):
    import torch

    if y.ndim == 2 and y.shape[1] > 1:
        return torch.nn.functional.cross_entropy(y, y.detach().argmax(dim=1))
    return 0.5 * (y * y).mean()
