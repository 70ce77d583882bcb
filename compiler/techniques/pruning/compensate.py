"""Compensation: removed channels that do not depend on the input are folded into the consumer.

A channel whose producing weights are zero still carries a value: its bias, moved by a
BatchNormalization shift, an activation, a padded convolution. That value does not depend
on the model's input, so the consumer's output changes by a constant when it is removed;
adding that constant back keeps the model's function exactly:

    Conv:   y' = Conv(x', W') + M,   M = Conv(x_removed, W[:, removed])   (no bias)
    MatMul: y' = x' @ W' + v @ W[removed, :]
    Gemm:   C' = beta * C + alpha * v @ B'[removed, :]   (B' = B^T if transB)

A uniform channel (value ``v_c`` everywhere) after a Conv without padding gives
``M[o] = sum_c v_c * sum_k W[o, c, k]`` per output channel, a bias. A constant map (a
uniform channel through zero padding, or a depthwise convolution with padding) gives a
map ``M`` of shape (C_out, H_out, W_out), added after the Conv; it needs the output's
spatial size to be fixed in the model. Non-uniform values are read off one onnxruntime
run of the model (they are the same for every input and every batch element).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


def compensate(analysis, keep_mask, edit_of) -> None:
    """Set ``bias_delta`` / ``bias_map`` on the plan edits of consumers that read removed static channels."""
    captures = []
    for leak in analysis.leaks:
        if leak.weight_axis is None or leak.weight is None:
            continue
        keep = keep_mask(leak.atoms).ravel()
        cval = leak.cval.ravel()
        known = ~np.isnan(cval)
        static = leak.static.ravel() if leak.static is not None else known
        removed = ~keep & ~leak.wzero.ravel()
        uniform = removed & known & (cval != 0) & leak.compensable
        mapped = removed & static & ~(known & ((cval == 0) | leak.compensable)) & leak.map_ok
        delta = _scalar(leak, np.flatnonzero(uniform), cval) if uniform.any() else None
        if delta is not None:
            _add(leak, delta, None, keep_mask, edit_of)
        if mapped.any():
            captures.append((leak, np.flatnonzero(mapped)))
    if not captures:
        return
    try:
        values = _capture(analysis, [leak.node.inputs[0] for leak, _ in captures])
    except Exception as e:  # noqa: BLE001 - ORT cannot run the model (ops it lacks): say what needed the run
        from graft.rules.prune_plan import PlanError

        node = captures[0][0].node
        raise PlanError(f"removing input-independent channels read by {node.op_type} node {node.name!r} needs "
                        f"their values from one onnxruntime run of the model, which failed "
                        f"({type(e).__name__}: {str(e)[:200]}); prune with a ratio that keeps them, or make "
                        f"the model runnable in onnxruntime first") from None
    for leak, idx in captures:
        x = values[leak.node.inputs[0].name][:1]
        if leak.node.op_type == "Conv":
            m = _conv_map(leak, idx, x[:, idx])
            per_channel = m.reshape(m.shape[0], -1)
            if np.allclose(per_channel, per_channel[:, :1], rtol=0, atol=1e-7 * max(1.0, np.abs(m).max())):
                _add(leak, per_channel[:, 0], None, keep_mask, edit_of)
            else:
                _add(leak, None, m, keep_mask, edit_of)
        else:
            _add(leak, _scalar(leak, idx, x.reshape(x.shape[0], -1)[0].astype(np.float64)), None, keep_mask, edit_of)


def _scalar(leak, idx: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Per-output constant from removed inputs ``idx`` holding values ``v[idx]``."""
    w = leak.weight.astype(np.float64)
    node = leak.node
    vals = v[idx].astype(np.float64)
    if node.op_type == "Conv":
        return w[:, idx].reshape(w.shape[0], len(idx), -1).sum(axis=2) @ vals
    if node.op_type == "MatMul":
        return vals @ w[idx, :]
    wk = w.T if node.attrs.get("transB", 0) else w
    return float(node.attrs.get("alpha", 1.0)) * (vals @ wk[idx, :])


def _add(leak, delta, bias_map, keep_mask, edit_of) -> None:
    node = leak.node
    pe = edit_of(node, node.op_type.lower())
    out_keep = keep_mask(leak.out_atoms) if leak.out_atoms is not None else None
    if delta is not None:
        delta = delta if out_keep is None else delta[out_keep]
        pe.bias_delta = delta if pe.bias_delta is None else pe.bias_delta + delta
    if bias_map is not None:
        bias_map = bias_map if out_keep is None else bias_map[out_keep]
        pe.bias_map = bias_map if pe.bias_map is None else pe.bias_map + bias_map


def _capture(analysis, values) -> dict[str, np.ndarray]:
    """The given values on one onnxruntime run at the analysis' input sizes (random inputs)."""
    from graft import ir
    from graft.compiler.techniques import numeric

    model = analysis.model
    proto = ir.to_onnx(model)
    sizes = {v.name: analysis.shapes[v] for v in model.graph.inputs if v in analysis.shapes}
    for vi in proto.graph.input:
        if vi.name in sizes:
            dims = vi.type.tensor_type.shape
            del dims.dim[:]
            for d in sizes[vi.name]:
                dims.dim.add().dim_value = int(d)
    have = {o.name for o in proto.graph.output}
    for v in values:
        if v.name not in have:
            proto.graph.output.append(helper.make_tensor_value_info(v.name, int(v.dtype or 1), None))
            have.add(v.name)
    return numeric.run(proto, numeric.make_inputs(proto, seed=0))


def _conv_map(leak, idx: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Conv(x, W[:, idx]) without bias, with the node's attributes: the removed channels' contribution,
    shape (C_out, H_out, W_out), computed in onnxruntime."""
    from graft.compiler.techniques import numeric

    node = leak.node
    w = np.ascontiguousarray(leak.weight[:, idx]).astype(np.float32)
    attrs = {k: v for k, v in node.attrs.items() if k != "group"}
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], **attrs)], "compensation",
                          [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, list(x.shape))],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(w, "w")])
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    return numeric.run(proto, {"x": np.ascontiguousarray(x, dtype=np.float32)})["y"][0].astype(np.float64)
