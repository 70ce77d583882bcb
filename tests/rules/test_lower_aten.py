"""ATen → ONNX lowering rules: each op family captured from a small torch function, lowered,
checked with onnx.checker, run in onnxruntime and compared with eager torch; plus the torch
backend on the lowered graph, dynamic shapes, refusals and provenance."""
from __future__ import annotations

import collections
import math
import warnings

import numpy as np
import onnx
import pytest

import torch
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from graft import ir  # noqa: E402
from graft.compiler.techniques import numeric  # noqa: E402
from graft.ir.torch_aten import UnloweredOpError, check_lowered, overload, unlowered_ops  # noqa: E402
from graft.rules.lower_aten_pipeline import LOWERING_RULES, lower  # noqa: E402

warnings.filterwarnings("ignore", category=UserWarning)


class Fn(nn.Module):
    """Wrap a function of tensors as a module (parameters, if any, are given as buffers/params)."""

    def __init__(self, fn, **params):
        super().__init__()
        self.fn = fn
        for k, v in params.items():
            self.register_parameter(k, nn.Parameter(v))

    def forward(self, *xs):
        return self.fn(self, *xs)


def _eager(module, inputs):
    with torch.no_grad():
        out = module(*inputs)
    return [o.numpy() for o in (out if isinstance(out, (tuple, list)) else (out,))]


def lowered(module, inputs, dynamic_shapes=None, decompose=False):
    model = ir.from_torch(module, tuple(inputs), dynamic_shapes=dynamic_shapes, decompose=decompose)
    lower(model)
    return model


def assert_lowers(module, inputs, atol=1e-5, decompose=False, expect=()):
    """Lower fully, check ONNX validity, compare onnxruntime and the torch backend with eager."""
    module = module.eval()
    model = lowered(module, inputs, decompose=decompose)
    assert unlowered_ops(model) == [], unlowered_ops(model)
    proto = ir.to_onnx(model)
    onnx.checker.check_model(proto, full_check=True)
    ops = {n.op_type for n in proto.graph.node}
    for e in expect:
        assert e in ops, f"expected an ONNX {e} node, got {sorted(ops)}"
    ref = _eager(module, inputs)
    names = [i.name for i in proto.graph.input]
    got = list(numeric.run(proto, {n: t.numpy() for n, t in zip(names, inputs)}).values())
    assert len(got) == len(ref)
    for r, g in zip(ref, got):
        assert r.shape == g.shape and r.dtype == g.dtype, (r.shape, g.shape, r.dtype, g.dtype)
        np.testing.assert_allclose(g, r, atol=atol, rtol=1e-5)
    gm = ir.to_torch(model)
    with torch.no_grad():
        back = gm(*inputs)
    back = back if isinstance(back, tuple) else (back,)
    for r, b in zip(ref, back):
        np.testing.assert_allclose(b.numpy(), r, atol=atol, rtol=1e-5)
    return model, proto


def r(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def ri(lo, hi, *shape, seed=0):
    return torch.randint(lo, hi, shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- nn ops
CONV = nn.ModuleDict({
    "c1": nn.Conv1d(4, 6, 3, padding=1), "c2same": nn.Conv2d(4, 6, 3, padding="same", dilation=2),
    "c2grp": nn.Conv2d(4, 6, 3, stride=2, groups=2, bias=False), "c3": nn.Conv3d(4, 2, 2),
    "t2": nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2),
    "t1": nn.ConvTranspose1d(4, 2, 4, stride=2),
})

NN_CASES = {
    "conv1d": (lambda m, x: CONV["c1"](x), [r(2, 4, 9)], ["Conv"]),
    "conv2d_same_dilated": (lambda m, x: CONV["c2same"](x), [r(2, 4, 9, 8)], ["Conv"]),
    "conv2d_grouped_strided": (lambda m, x: CONV["c2grp"](x), [r(2, 4, 9, 8)], ["Conv"]),
    "conv3d": (lambda m, x: CONV["c3"](x), [r(1, 4, 3, 4, 5)], ["Conv"]),
    "conv_transpose2d": (lambda m, x: CONV["t2"](x), [r(2, 4, 5, 6)], ["ConvTranspose"]),
    "conv_transpose1d": (lambda m, x: CONV["t1"](x), [r(2, 4, 7)], ["ConvTranspose"]),
    "linear_2d_gemm": (lambda m, x: F.linear(x, m.w, m.b), [r(3, 8)], ["Gemm"]),
    "linear_3d_matmul": (lambda m, x: F.linear(x, m.w), [r(2, 3, 8)], ["MatMul"]),
    "mm_bmm_matmul": (lambda m, x, y: (torch.mm(x[0], y[0]), torch.bmm(x, y), x @ y), [r(2, 3, 4), r(2, 4, 5)],
                      ["MatMul"]),
    "layer_norm_2d": (lambda m, x: F.layer_norm(x, (3, 4), eps=1e-6), [r(2, 3, 4)], ["LayerNormalization"]),
    "group_norm": (lambda m, x: F.group_norm(x, 4, m.gw, m.gb), [r(2, 8, 3, 5)], ["InstanceNormalization"]),
    "group_norm_3d": (lambda m, x: F.group_norm(x, 2, m.gw, m.gb), [r(2, 8, 7)], ["InstanceNormalization"]),
    "embedding": (lambda m, i: F.embedding(i, m.w), [ri(0, 6, 2, 5)], ["Gather"]),
    "sdpa_bool_mask": (lambda m, q, k, v, mask: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                       [r(2, 2, 5, 4), r(2, 2, 6, 4, seed=1), r(2, 2, 6, 3, seed=2),
                        torch.rand(5, 6, generator=torch.Generator().manual_seed(3)) > 0.3], ["Softmax"]),
    "sdpa_float_mask_scale": (lambda m, q, k, v, mask: F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                                                      scale=0.3),
                              [r(2, 5, 4), r(2, 5, 4, seed=1), r(2, 5, 4, seed=2), r(5, 5, seed=3)], ["Softmax"]),
    "sdpa_causal": (lambda m, q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                    [r(1, 2, 5, 4), r(1, 2, 5, 4, seed=1), r(1, 2, 5, 4, seed=2)], ["Where"]),
    "max_pool": (lambda m, x: (F.max_pool2d(x, 3, 2, 1), F.max_pool2d(x, 2, ceil_mode=True), F.max_pool1d(x[0], 2)),
                 [r(2, 3, 7, 9)], ["MaxPool"]),
    "avg_pool": (lambda m, x: (F.avg_pool2d(x, 3, 2, 1, count_include_pad=False), F.avg_pool2d(x, 2)),
                 [r(2, 3, 8, 8)], ["AveragePool"]),
    "adaptive_avg_pool": (lambda m, x: (F.adaptive_avg_pool2d(x, 1), F.adaptive_avg_pool2d(x, (2, 4)),
                                        F.adaptive_avg_pool1d(x[0], 1)), [r(2, 3, 8, 8)],
                          ["GlobalAveragePool", "AveragePool"]),
    "activations": (lambda m, x: (F.relu(x), F.gelu(x), F.gelu(x, approximate="tanh"), F.silu(x), torch.sigmoid(x),
                                  torch.tanh(x), F.hardswish(x), F.hardsigmoid(x), F.relu6(x * 4),
                                  F.hardtanh(x, -0.5, 0.5), F.leaky_relu(x, 0.2), F.elu(x), F.mish(x),
                                  F.softplus(x)),
                    [r(3, 7)], ["Erf", "Tanh", "HardSwish", "HardSigmoid", "Clip", "LeakyRelu"]),
    "softmax": (lambda m, x: (x.softmax(1), F.log_softmax(x, -1), x.softmax(-1, dtype=torch.float64)), [r(2, 3, 4)],
                ["Softmax", "LogSoftmax"]),
}
NN_PARAMS = {"w": r(5, 8), "b": r(5), "gw": r(8), "gb": r(8)}


@pytest.mark.parametrize("name", sorted(NN_CASES))
def test_nn_op_lowers_and_matches_eager(name):
    fn, inputs, expect = NN_CASES[name]
    mod = Fn(fn, **{k: v.clone() for k, v in NN_PARAMS.items()})
    mod.convs = CONV
    if name == "embedding":
        mod.w = nn.Parameter(r(6, 3))
    assert_lowers(mod, inputs, atol=2e-5, expect=expect)


def test_batch_norm_without_affine_lowers_to_batchnormalization():
    bn = nn.BatchNorm2d(3, affine=False).eval()
    bn.running_mean.copy_(r(3))
    bn.running_var.copy_(r(3).abs() + 0.5)
    _, proto = assert_lowers(nn.Sequential(bn), [r(2, 3, 4, 4)], expect=["BatchNormalization"])
    assert [n.op_type for n in proto.graph.node] == ["BatchNormalization"]


def test_dropout_in_eval_disappears():
    mod = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.ReLU())
    _, proto = assert_lowers(mod, [r(2, 4)])
    assert [n.op_type for n in proto.graph.node] == ["Gemm", "Relu"]


# ----------------------------------------------------------------------------- math
MATH_CASES = {
    "scalar_arith": (lambda x: (x + 2, 3 - x, x * 0.5, x / 3, 2 ** x, x ** 2, x - 1.5), [r(3, 4)]),
    "tensor_arith_alpha": (lambda x, y: (torch.add(x, y, alpha=2), torch.sub(x, y, alpha=0.5), x * y, x / y),
                           [r(3, 4), r(4, seed=1)]),
    "int_promotion": (lambda i, x: (i / 2, i * 0.5 + x, i + 1, i * i, i // 3, torch.div(i, 3, rounding_mode="trunc")),
                      [ri(-9, 9, 3, 4), r(3, 4)]),
    "float_rounding_div": (lambda x, y: (torch.div(x, y, rounding_mode="floor"), torch.div(x, y, rounding_mode="trunc"),
                                         torch.remainder(x, y), torch.fmod(x, y)), [r(3, 4) * 5, r(3, 4, seed=1)]),
    "min_max_clamp": (lambda x, y: (torch.maximum(x, y), torch.minimum(x, y), x.clamp(min=-0.5), x.clamp(-1, 1),
                                    x.clamp(max=0.2)), [r(3, 4), r(3, 4, seed=1)]),
    "where_masked_fill": (lambda x: (torch.where(x > 0, x, 0.0), x.masked_fill(x < 0, -7.0),
                                     torch.where(x > 0.5, x, x * 2)), [r(3, 4)]),
    "comparisons": (lambda x, y: (x == y, x != 0.5, x < y, x <= 0, x > y, x >= 0.25, x.eq(x)), [r(3, 4), r(3, 4, seed=1)]),
    "int_compare_with_float": (lambda i: (i > 0.5, i == 2), [ri(0, 4, 5)]),
    "logic": (lambda x, y: ((x > 0) & (y > 0), (x > 0) | (y > 0), ~(x > 0), torch.logical_and(x, y),
                            torch.logical_not(x > 0), (x > 0) ^ (y > 0)), [r(3, 4), r(3, 4, seed=1)]),
    "bitwise_ints": (lambda i, j: (i & j, i | j, i ^ j, ~i), [ri(0, 16, 5), ri(0, 16, 5, seed=1)]),
    "unary": (lambda x: (x.abs(), -x, x.exp(), (x.abs() + 1).log(), x.abs().sqrt(), (x.abs() + 0.1).rsqrt(),
                         (x + 5).reciprocal(), x.sin(), x.cos(), x.floor(), x.ceil(), (x * 3).round(), x.sign(),
                         torch.erf(x), torch.square(x), torch.log1p(x.abs()), torch.isnan(x)), [r(3, 4)]),
    "dtype_conversions": (lambda x: (x.to(torch.int64), (x * 10).int().float(), x.double(), x.clone(),
                                     x.t().contiguous(), (x > 0).long()), [r(3, 4)]),
    "reductions": (lambda x: (x.mean(dim=1, keepdim=True), x.sum(), x.sum(dim=(0, 2)), x.amax(-1), x.amin(0),
                              x.max(dim=1).values, x.max(), x.min(), x.prod(1), torch.logsumexp(x, 1), x.mean()),
                   [r(2, 3, 4)]),
    "arg_reductions": (lambda x: (x.argmax(1), x.argmin(-1, keepdim=True), x.argmax(), x.cumsum(1), x.triu(1),
                                  x.tril()), [r(3, 4)]),
    "int_sum": (lambda i: (i.sum(1), (i > 2).sum()), [ri(0, 5, 3, 4)]),
    "creation": (lambda x: (torch.arange(5) + x.shape[0], torch.arange(1.0, 2.0, 0.25), torch.full((2, 3), 1.5),
                            torch.zeros_like(x), torch.ones_like(x, dtype=torch.int64), x.new_ones((2,)),
                            torch.full_like(x, 7.0), x + torch.zeros(4)), [r(3, 4)]),
}


@pytest.mark.parametrize("name", sorted(MATH_CASES))
def test_math_op_lowers_and_matches_eager(name):
    fn, inputs = MATH_CASES[name]
    assert_lowers(Fn(lambda m, *xs: fn(*xs)), inputs, atol=1e-5)


# ----------------------------------------------------------------------------- shapes
SHAPE_CASES = {
    "view_reshape_flatten": (lambda x: (x.view(2, -1), x.reshape(-1), x.flatten(1), x.flatten(0, 1),
                                        x.flatten(1, 2), x.reshape(4, 3, 2)),
                             [r(2, 3, 4)]),
    "permute_transpose_t": (lambda x: (x.permute(2, 0, 1), x.transpose(-1, 0), x[0].t(), x.mT), [r(2, 3, 4)]),
    "expand_repeat": (lambda x: (x[:, :1].expand(2, 3, 4), x.expand(5, -1, -1, -1), x.repeat(2, 1, 1),
                                 x[0].repeat(2, 2, 1)), [r(2, 3, 4)]),
    "squeeze_unsqueeze": (lambda x: (x.squeeze(1), x.squeeze(0), x.squeeze(), x.squeeze((1, 3)), x.unsqueeze(-1),
                                     x.unsqueeze(0)), [r(2, 1, 4, 1)]),
    "cat_stack": (lambda x, y: (torch.cat([x, y], -1), torch.cat([x, y.int().float()]), torch.stack([x, y], 1)),
                  [r(2, 3), r(2, 3, seed=1)]),
    "split_chunk_unbind": (lambda x: (*x.split(2, 1), *x.split([1, 3, 3], 1), *x.chunk(3, 1), *x.unbind(0)),
                           [r(2, 7)]),
    "slice_select": (lambda x: (x[:, 1:], x[..., ::2], x[:, -3:-1], x[:, 1], x[-1], x[:, :, 3:100]), [r(2, 5, 6)]),
    "index_gather": (lambda x, i: (x.index_select(1, i[0]), torch.gather(x, 1, i[:, :2].unsqueeze(-1).expand(2, 2, 3)),
                                   x[i[0]], x[:, i[0]], x[i, i], x[:, i, i], x[i[0], :, i[1]]),
                     [r(3, 4, 3), ri(0, 3, 2, 2)]),
    "pad_interpolate_shuffle": (lambda x: (F.pad(x, (1, 2, 0, 1), value=0.5), F.pad(x[0], (1, 2), mode="reflect"),
                                           F.pad(x, (1, 1, 2, 0), mode="replicate"), F.interpolate(x, scale_factor=2),
                                           F.interpolate(x, size=(5, 7), mode="bilinear"),
                                           F.interpolate(x, size=(5, 7), mode="bilinear", align_corners=True),
                                           F.pixel_shuffle(x, 2)), [r(1, 4, 3, 4)]),
}


@pytest.mark.parametrize("name", sorted(SHAPE_CASES))
def test_shape_op_lowers_and_matches_eager(name):
    fn, inputs = SHAPE_CASES[name]
    assert_lowers(Fn(lambda m, *xs: fn(*xs)), inputs, atol=1e-5)


def test_every_lowering_names_a_real_aten_overload_once():
    names = [rule.name for rule in LOWERING_RULES]
    assert len(names) == len(set(names))
    op_types = [rule.roots[0].op_type for rule in LOWERING_RULES]
    assert len(op_types) == len(set(op_types))
    for t in op_types:
        overload(t)  # raises for an op torch does not have
    assert len(op_types) >= 120


# ----------------------------------------------------------------------------- dynamic shapes
class Dyn(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        b, s = x.shape[0], x.shape[1]
        pos = torch.arange(s).unsqueeze(0).expand(b, s)
        y = self.lin(x).view(b * s, -1).softmax(-1).view(b, s, 4)
        return y + pos.unsqueeze(-1), y[:, 1:].reshape(b, (s - 1) * 4)


def test_dynamic_shapes_lower_to_shape_computations_valid_for_other_sizes():
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", min=3, max=64)
    mod = Dyn().eval()
    model = lowered(mod, (r(2, 6, 4),), dynamic_shapes=({0: batch, 1: seq},))
    assert model.graph.inputs[0].shape == ("batch", "seq", 4)
    check_lowered(model)
    assert any(n.op_type == "Shape" for n in model.graph)
    proto = ir.to_onnx(model)
    onnx.checker.check_model(proto, full_check=True)
    gm = ir.to_torch(model)
    for shape in [(2, 6, 4), (3, 9, 4), (1, 3, 4)]:
        x = r(*shape, seed=5)
        ref = _eager(mod, (x,))
        got = list(numeric.run(proto, {"x": x.numpy()}).values())
        with torch.no_grad():
            back = gm(x)
        for a, b, c in zip(ref, got, back):
            np.testing.assert_allclose(b, a, atol=1e-5)
            np.testing.assert_allclose(c.numpy(), a, atol=1e-5)


def test_core_aten_decomposition_lowers_too():
    block = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Hardswish(), nn.MaxPool2d(2),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4), nn.LayerNorm(4), nn.GELU(),
                          nn.Softmax(-1)).eval()
    model, proto = assert_lowers(block, [r(2, 3, 8, 8)], decompose=True)
    ops = {n.op_type for n in proto.graph.node}
    assert {"Conv", "BatchNormalization", "Gemm", "LayerNormalization", "Softmax"} <= ops
    fired = {n.meta["graft.rule"] for n in model.graph}
    assert {"lower_aten_convolution", "lower_aten__native_batch_norm_legit_no_training", "lower_aten_addmm",
            "lower_aten_native_layer_norm"} <= fired


# ----------------------------------------------------------------------------- refusals / provenance
class Special(nn.Module):
    def forward(self, x):
        return torch.special.bessel_j0(x) * 2


class WithSpecial(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 3)
        self.odd = Special()

    def forward(self, x, q):
        attn = F.scaled_dot_product_attention(q, q, q, dropout_p=0.5)
        return self.odd(self.proj(x)), attn


def test_unlowered_ops_stay_aten_and_are_listed_with_their_module():
    model = lowered(WithSpecial().eval(), (r(2, 3), r(1, 4, 3)))
    left = {(t, mod): why for t, mod, _name, why in unlowered_ops(model)}
    assert set(left) == {("special_bessel_j0.default", "odd"), ("scaled_dot_product_attention.default", "")}
    assert "dropout_p > 0" in left[("scaled_dot_product_attention.default", "")]
    with pytest.raises(UnloweredOpError) as e:
        check_lowered(model)
    msg = str(e.value)
    assert "aten::special_bessel_j0.default" in msg and "module 'odd'" in msg and "target='torch'" in msg
    # the torch backend still runs the mixed graph; gradients flow through the lowered Gemm
    mod = WithSpecial().eval()
    model = lowered(mod, (r(2, 3), r(1, 4, 3)))
    gm = ir.to_torch(model)
    x = r(2, 3)
    torch.testing.assert_close(gm(x, r(1, 4, 3))[0], mod(x, r(1, 4, 3))[0])


def test_lowered_nodes_keep_module_path_and_rule_provenance():
    mod = nn.Sequential(nn.Linear(4, 5), nn.GELU()).eval()
    model = lowered(mod, (r(3, 4),))
    by_op = {n.op_type: n for n in model.graph}
    gemm = by_op["Gemm"]
    assert gemm.meta["torch.module"] == "0" and gemm.meta["torch.module_type"] == "Linear"
    assert gemm.meta["graft.rule"] == "lower_aten_linear" and gemm.name == "linear/Gemm"
    erf = by_op["Erf"]
    assert erf.meta["torch.module"] == "1" and erf.meta["graft.rule"] == "lower_aten_gelu"
    assert ir.to_onnx(model).graph.node[0].metadata_props[0].key in ("torch.module", "torch.module_type",
                                                                     "graft.rule", "graft.replaced", "torch.target")
    assert "aten" not in model.opset_imports and model.opset == 18


def test_gelu_erf_form_has_exporter_structure():
    model = lowered(Fn(lambda m, x: F.gelu(x)), (r(2, 3),))
    assert [n.op_type for n in model.graph] == ["Div", "Erf", "Add", "Mul", "Mul"]
    divisor = model.graph.nodes[0].inputs[1].constant()
    assert math.isclose(float(divisor), math.sqrt(2), rel_tol=1e-6)


# ----------------------------------------------------------------------------- found by trying to break it
def test_unbatched_conv_pool_and_pixel_shuffle_run_as_a_batch_of_one():
    """torch layers take [C, *spatial] inputs; ONNX Conv/pool/DepthToSpace need a batch dim."""
    conv, convt, conv1 = nn.Conv2d(3, 4, 3, padding=1), nn.ConvTranspose2d(3, 2, 3, stride=2), nn.Conv1d(3, 4, 3)
    mod = Fn(lambda m, x: (m.conv(x), m.convt(x), m.conv1(x[:, 0]), F.max_pool2d(x, 2), F.avg_pool2d(x, 3, 1, 1),
                           F.adaptive_avg_pool2d(x, 2), F.max_pool1d(x[0], 2),
                           F.pixel_shuffle(x[:, :4, :4].repeat(4, 1, 1), 2)))
    mod.conv, mod.convt, mod.conv1 = conv, convt, conv1
    _, proto = assert_lowers(mod, [r(3, 8, 8)], expect=["Conv", "ConvTranspose", "MaxPool", "AveragePool",
                                                        "DepthToSpace", "Squeeze"])


def test_adaptive_pooling_uneven_windows_and_max():
    fn = lambda m, x: (F.adaptive_avg_pool2d(x, 3), F.adaptive_avg_pool2d(x, (5, 7)), F.adaptive_avg_pool1d(x[0], 3),
                       F.adaptive_max_pool2d(x, 1), F.adaptive_max_pool2d(x, 2), F.adaptive_max_pool2d(x, (3, 9)))
    _, proto = assert_lowers(Fn(fn), [r(2, 3, 8, 9)], expect=["GlobalMaxPool", "ReduceMean", "ReduceMax"])
    assert_lowers(Fn(lambda m, x: F.adaptive_max_pool2d(x, (2, 4))), [r(1, 2, 8, 8)], expect=["MaxPool"])


def test_indices_of_max_tensor_clamp_bounds_and_item():
    fn = lambda m, x, lo: (*x.max(1), *x.min(0, keepdim=True), x.clamp(min=lo), x.clamp(lo, lo + 0.5),
                           x * sum(v for v in x[0, :2].tolist()))
    assert_lowers(Fn(fn), [r(3, 4), r(4, seed=1)], expect=["ArgMax", "ArgMin", "Max", "Min"])


def _writes(x, y):
    x = x.clone()
    x[:, 0] = 0.0                 # select_scatter + fill
    x[:, 1:4] = y                 # slice_scatter
    x[..., ::2] = 1.5             # strided slice_scatter on the last dim
    return x, torch.diff(x, dim=1, prepend=x[:, :1]), x.flip(-1, 0), x.unflatten(1, (3, 2)), y.expand_as(x[:, 1:4])


def test_in_place_writes_diff_flip_unflatten_lower():
    _, proto = assert_lowers(Fn(lambda m, x, y: _writes(x, y)), [r(2, 6), r(2, 3, seed=1)],
                             expect=["Where", "Gather", "Sub", "Slice"])
    assert_lowers(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), [r(2, 5, 16)])  # MHA uses unflatten


def test_statistics_norms_einsum_topk_prelu_instance_norm():
    fn = lambda m, x: (x.var(-1), x.std((0, 2), keepdim=True), torch.var(x, 1, correction=0), x.norm(dim=-1),
                       torch.linalg.vector_norm(x, 1, dim=1), torch.linalg.vector_norm(x, float("inf")),
                       torch.linalg.vector_norm(x, 3.0, dim=-1), F.normalize(x, dim=-1),
                       torch.einsum("bij,bkj->bik", x, x), *x.topk(2, dim=-1), m.prelu(x), m.inorm(x))
    mod = Fn(fn)
    mod.prelu, mod.inorm = nn.PReLU(3), nn.InstanceNorm1d(3, affine=True)
    assert_lowers(mod, [r(2, 3, 5)], expect=["ReduceL2", "ReduceL1", "Einsum", "TopK", "PRelu",
                                             "InstanceNormalization"])


class DynOps(nn.Module):
    """Ops whose lowering needs run-time sizes: causal attention with seq unknown, splits along it,
    unflatten, upsampling by a scale factor."""

    def forward(self, x, img):
        b, s, c = x.shape
        q = x.unflatten(-1, (2, -1)).transpose(1, 2)                         # [b, 2, s, c/2]
        attn = F.scaled_dot_product_attention(q, q, q, is_causal=True)
        halves = x.chunk(2, dim=1)
        parts = x.split(s // 2, dim=1)  # a run-time split size; the piece count (2) is fixed
        return (attn.transpose(1, 2).flatten(2), halves[0] * 2, parts[-1].sum(1), parts[0],
                F.interpolate(img, scale_factor=2), F.interpolate(img, scale_factor=2, mode="bilinear"))


def test_dynamic_causal_attention_splits_and_upsampling_run_at_other_sizes():
    Dim = torch.export.Dim
    b, s, h = Dim("batch", max=16), Dim("half", min=2, max=32), Dim("h", min=2, max=32)
    mod = DynOps().eval()
    model = lowered(mod, (r(2, 8, 4), r(2, 3, 4, 5)), dynamic_shapes=({0: b, 1: 2 * s}, {0: b, 2: h, 3: h + 1}))
    check_lowered(model)
    ops = collections.Counter(n.op_type for n in model.graph)
    assert ops["Range"] == 2 and ops["Resize"] == 2 and ops["Split"] == 2  # causal mask, scales, run-time sizes
    proto = ir.to_onnx(model)
    onnx.checker.check_model(proto, full_check=True)
    gm = ir.to_torch(model)
    for shapes in [((2, 8, 4), (2, 3, 4, 5)), ((3, 14, 4), (3, 3, 6, 7)), ((1, 4, 4), (1, 3, 2, 3))]:
        xs = [r(*sh, seed=7) for sh in shapes]
        ref = _eager(mod, xs)
        got = list(numeric.run(proto, {"x": xs[0].numpy(), "img": xs[1].numpy()}).values())
        with torch.no_grad():
            back = gm(*xs)
        for a, o, t in zip(ref, got, back):
            assert o.shape == a.shape, (shapes, o.shape, a.shape)
            np.testing.assert_allclose(o, a, atol=1e-5)
            np.testing.assert_allclose(t.numpy(), a, atol=1e-5)
