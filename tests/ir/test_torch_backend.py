"""ir.to_torch: ONNX and aten graphs as trainable torch.fx GraphModules, checked against onnxruntime."""
from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest

import torch

from graft import ir  # noqa: E402
from graft.compiler.techniques import numeric  # noqa: E402
from examples.torch_models import resnet_style  # noqa: E402
from graft.ir.torch_backend import TorchBackendError, load_module, save_module  # noqa: E402
import onnx.parser  # noqa: E402
import onnx.shape_inference  # noqa: E402
from conftest import parse_model  # noqa: E402

warnings.filterwarnings("ignore", category=UserWarning)


def run_both(proto: onnx.ModelProto, feeds: dict[str, np.ndarray], atol=1e-5):
    """onnxruntime vs the torch backend on the same feeds; returns the GraphModule."""
    ref = numeric.run(proto, feeds)
    gm = ir.to_torch(ir.from_onnx(proto))
    with torch.no_grad():
        out = gm(*[torch.from_numpy(feeds[i.name]) for i in proto.graph.input if i.name in feeds])
    out = out if isinstance(out, tuple) else (out,)
    assert len(out) == len(ref)
    for (name, r), o in zip(ref.items(), out):
        assert tuple(o.shape) == r.shape, name
        np.testing.assert_allclose(o.numpy().astype(r.dtype), r, atol=atol, err_msg=name)
    return gm


def step_changes_parameters(gm, inputs) -> int:
    """One SGD step on sum(outputs); how many parameters changed."""
    params = dict(gm.named_parameters())
    assert params, "no trainable parameters"
    before = {k: v.detach().clone() for k, v in params.items()}
    opt = torch.optim.SGD(gm.parameters(), lr=0.05)
    out = gm(*inputs)
    # a weighted sum: a plain sum of softmax outputs has zero gradient
    loss = sum((o.float() * torch.linspace(-1, 1, o.numel()).reshape(o.shape)).sum()
               for o in (out if isinstance(out, tuple) else (out,)))
    loss.backward()
    opt.step()
    return sum(not torch.equal(before[k], v) for k, v in params.items())


# ----------------------------------------------------------------------------- real ONNX models
ZOO_FEEDS = {
    "ppocr-cls": lambda rng: {"x": rng.standard_normal((1, 3, 48, 192)).astype(np.float32)},
    "ppocr-det": lambda rng: {"x": rng.standard_normal((1, 3, 64, 96)).astype(np.float32)},
    "ppocr-rec": lambda rng: {"x": rng.standard_normal((1, 3, 48, 160)).astype(np.float32)},
}


@pytest.mark.parametrize("name", sorted(ZOO_FEEDS))
def test_ppocr_onnx_to_torch_matches_onnxruntime(name):
    from graft.ir import zoo

    proto = onnx.load(str(zoo.ppocr_path(name)))
    feeds = ZOO_FEEDS[name](np.random.default_rng(0))
    gm = run_both(proto, feeds, atol=1e-4)
    n_params = sum(p.numel() for p in gm.parameters())
    assert n_params > 100_000  # the conv weights (Constant nodes in these files) are trainable
    bn_stats = [b for k, b in gm.named_buffers()]
    assert bn_stats, "BatchNormalization statistics stay buffers"
    if name == "ppocr-cls":
        x = torch.from_numpy(feeds["x"])
        assert step_changes_parameters(gm, (x,)) > 50


def test_minilm_onnx_to_torch_matches_onnxruntime(minilm_onnx_path):
    proto = onnx.load(str(minilm_onnx_path))
    rng = np.random.default_rng(0)
    mask = np.ones((2, 12), np.int64)
    mask[1, 8:] = 0
    feeds = {"input_ids": rng.integers(0, 1000, (2, 12)).astype(np.int64), "attention_mask": mask}
    gm = run_both(proto, feeds, atol=1e-4)
    assert sum(p.numel() for p in gm.parameters()) > 20_000_000


# ----------------------------------------------------------------------------- op semantics vs onnxruntime
def _m(body: str, opset: int = 18, inputs="float[2,3,6,8] x", outputs="float y") -> onnx.ModelProto:
    """A model from ONNX text; outputs are declared without a shape (the text syntax would make them scalars)."""
    m = onnx.parser.parse_model(f'<ir_version: 8, opset_import: ["" : {opset}]>\n'
                                f'agraph ({inputs}) => ({outputs}) {{\n{body}\n}}')
    for o in m.graph.output:
        if not o.type.tensor_type.shape.dim:
            o.type.tensor_type.ClearField("shape")
    return m


def finish(model: onnx.ModelProto, **arrays) -> onnx.ModelProto:
    """A copy with ``arrays`` as initializers and output shapes from ONNX shape inference, checked."""
    m = onnx.ModelProto.FromString(model.SerializeToString())
    for o in m.graph.output:
        if not o.type.tensor_type.shape.dim:  # ONNX text makes `float y` a scalar: let inference type it
            o.type.tensor_type.ClearField("shape")
    for name, arr in arrays.items():
        m.graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(arr), name))
    m = onnx.shape_inference.infer_shapes(m, strict_mode=True)
    onnx.checker.check_model(m, full_check=True)
    return m


X = np.random.default_rng(1).standard_normal((2, 3, 6, 8)).astype(np.float32)
OP_CASES = {
    "resize_nearest_asym_floor": (_m('s = Constant<value = float[4] {1, 1, 2, 1.5}>()\n'
                                     'y = Resize<mode="nearest", coordinate_transformation_mode="asymmetric", '
                                     'nearest_mode="floor">(x, , s)'), {"x": X}),
    "resize_nearest_half_pixel": (_m('s = Constant<value = int64[4] {2, 3, 5, 11}>()\n'
                                     'y = Resize<mode="nearest">(x, , , s)'), {"x": X}),
    "resize_linear": (_m('s = Constant<value = int64[4] {2, 3, 9, 13}>()\ny = Resize<mode="linear">(x, , , s)'),
                      {"x": X}),
    "resize_opset11_align": (_m('r = Constant<value = float[0] {}>()\ns = Constant<value = float[4] {1, 1, 2, 2}>()\n'
                                'y = Resize<mode="linear", coordinate_transformation_mode="align_corners">(x, r, s)',
                                opset=11), {"x": X}),
    "pad_modes": (_m('p = Constant<value = int64[8] {0, 0, 1, 2, 0, 0, 2, 1}>()\n'
                     'a = Pad<mode="reflect">(x, p)\nb = Pad<mode="edge">(x, p)\nc = Pad(x, p)\nt = Add(b, c)\ny = Add(a, t)'),
                  {"x": X}),
    "slice_negative_step": (_m('s = Constant<value = int64[2] {-1, 5}>()\ne = Constant<value = int64[2] {-100, 0}>()\n'
                               'a = Constant<value = int64[2] {3, 2}>()\nt = Constant<value = int64[2] {-2, -1}>()\n'
                               'y = Slice(x, s, e, a, t)'), {"x": X}),
    "split_uneven_num_outputs": (_m('a, b, c = Split<axis=3, num_outputs=3>(x)\ny = Concat<axis=3>(c, b, a)'),
                                 {"x": X}),
    "softmax_opset11_coerced": (_m('y = Softmax<axis=1>(x)', opset=11), {"x": X}),
    "gather_negative": (_m('i = Constant<value = int64[2,2] {-1, 0, 2, -3}>()\ny = Gather<axis=3>(x, i)'), {"x": X}),
    "gather_elements_nd": (_m('i = Constant<value = int64[2,1,1,1] {1, -1}>()\na = GatherElements<axis=0>(x, i)\n'
                              'j = Constant<value = int64[2,2] {0, 1, 1, 2}>()\nb = GatherND(x, j)\n'
                              'ra = ReduceSum(a)\nrb = ReduceSum(b)\ny = Add(ra, rb)'), {"x": X}),
    "conv_same_upper_strided": (_m('y = Conv<auto_pad="SAME_UPPER", strides=[2, 2]>(x, w)'), {"x": X}),
    "conv_asymmetric_pads": (_m('y = Conv<pads=[0, 1, 2, 0], group=3>(x, wg)'), {"x": X}),
    "conv_transpose_pads_outpad": (_m('y = ConvTranspose<strides=[2, 2], pads=[1, 0, 0, 1], output_padding=[1, 1], '
                                      'group=3>(x, wt)'), {"x": X}),
    "conv_transpose_output_shape": (_m('y = ConvTranspose<strides=[2, 2], output_shape=[13, 16]>(x, wt3)'), {"x": X}),
    "maxpool_asym_ceil": (_m('y = MaxPool<kernel_shape=[3, 2], pads=[0, 1, 1, 0], strides=[2, 2], ceil_mode=1>(x)'),
                          {"x": X}),
    "avgpool_pads_exclude": (_m('y = AveragePool<kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2]>(x)'),
                             {"x": X}),
    "avgpool_asym_exclude": (_m('y = AveragePool<kernel_shape=[2, 3], pads=[1, 0, 0, 2]>(x)'), {"x": X}),
    "reduce_opset13_attr": (_m('y = ReduceMean<axes=[1, -1], keepdims=0>(x)', opset=13), {"x": X}),
    "reduce_opset18_input": (_m('y = ReduceMax<keepdims=0>(x, ax)'), {"x": X}),
    "argmax_last_cumsum_trilu": (_m('a = ArgMax<axis=3, select_last_index=1>(x)\nf = Cast<to=1>(a)\n'
                                    'k = Constant<value = int64 {1}>()\nt = Trilu<upper=0>(x, k)\n'
                                    'cax = Constant<value = int64 {2}>()\nc = CumSum<exclusive=1, reverse=1>(t, cax)\n'
                                    'rc = ReduceSum<keepdims=0>(c)\ny = Add(f, rc)'), {"x": X}),
    "int_div_mod": (_m('y = Div(a, b)\nz = Mod(a, b)\nw = Mod<fmod=1>(a, b)',
                       inputs="int64[7] a, int64[7] b", outputs="int64 y, int64 z, int64 w"),
                    {"a": np.array([7, -7, 7, -7, 0, 9, -1]), "b": np.array([2, 2, -2, -2, 3, 4, 5])}),
    "clip_opset6_attrs": (_m('y = Clip<min=-0.5, max=0.25>(x)', opset=6), {"x": X}),
    "layernorm_three_outputs": (_m('y, m, s = LayerNormalization<axis=2, epsilon=0.01>(x, g)',
                                   outputs="float y, float m, float s"), {"x": X}),
    "norms_instance_group": (_m('a = InstanceNormalization<epsilon=0.001>(x, s3, b3)\n'
                                'b = GroupNormalization<num_groups=3>(x, s3, b3)\ny = Add(a, b)',
                                opset=21, outputs="float[2,3,6,8] y"), {"x": X}),
    "elementwise_mix": (_m('a = HardSigmoid<alpha=0.3, beta=0.4>(x)\nb = LeakyRelu<alpha=0.2>(x)\n'
                           'gt = Greater(x, a)\ne = Expand(b, sh)\nt = Tile(a, rp)\nc = Where(gt, e, t)\nd = Flatten<axis=2>(c)\n'
                           'y = Einsum<equation="ij->ji">(d)'), {"x": X}),
    "shape_range_constant_of_shape": (_m('s = Shape<start=2>(x)\nn = ReduceProd<keepdims=0>(s)\n'
                                         'z = Constant<value = int64 {0}>()\no = Constant<value = int64 {1}>()\n'
                                         'r = Range(z, n, o)\nc = ConstantOfShape<value = float[1] {0.5}>(s)\n'
                                         'f = Cast<to=1>(r)\nrf = ReduceSum<keepdims=0>(f)\nrc = ReduceSum<keepdims=0>(c)\ny = Add(rf, rc)'),
                                      {"x": X}),
}
RNG = np.random.default_rng(2)
WEIGHTS = {"w": RNG.standard_normal((4, 3, 3, 3)).astype(np.float32),
           "wg": RNG.standard_normal((6, 1, 3, 2)).astype(np.float32),
           "wt": RNG.standard_normal((3, 2, 3, 3)).astype(np.float32),
           "wt3": RNG.standard_normal((3, 2, 3, 3)).astype(np.float32),
           "g": RNG.standard_normal((6, 8)).astype(np.float32),
           "s3": RNG.standard_normal(3).astype(np.float32), "b3": RNG.standard_normal(3).astype(np.float32),
           "ax": np.array([2], np.int64), "sh": np.array([2, 3, 6, 8], np.int64), "rp": np.array([1, 1, 1, 1], np.int64)}


@pytest.mark.parametrize("name", sorted(OP_CASES))
def test_onnx_op_semantics_match_onnxruntime(name):
    model, feeds = OP_CASES[name]
    used = {i for n in model.graph.node for i in n.input}
    run_both(finish(model, **{k: v for k, v in WEIGHTS.items() if k in used}), feeds, atol=1e-5)


# ----------------------------------------------------------------------------- quantization
QDQ = '''<ir_version: 8, opset_import: ["" : 13]>
agraph (float[2,3,8,8] x) => (float y) {
    xq = QuantizeLinear(x, xs, xz)
    xd = DequantizeLinear(xq, xs, xz)
    wq = QuantizeLinear<axis=0>(w, ws, wz)
    wd = DequantizeLinear<axis=0>(wq, ws, wz)
    c = Conv<pads=[1, 1, 1, 1]>(xd, wd, b)
    cq = QuantizeLinear(c, cs, cz)
    y = DequantizeLinear(cq, cs, cz)
}'''


@pytest.fixture(scope="module")
def qdq_model():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    return finish(onnx.parser.parse_model(QDQ), w=w, b=rng.standard_normal(4).astype(np.float32),
                             xs=np.array(0.02, np.float32), xz=np.array(128, np.uint8),
                             ws=(np.abs(w).reshape(4, -1).max(1) / 127).astype(np.float32),
                             wz=np.zeros(4, np.int8), cs=np.array(0.05, np.float32), cz=np.array(3, np.int8))


def test_qdq_pairs_become_fake_quantize_per_tensor_and_per_channel(qdq_model):
    x = np.random.default_rng(4).standard_normal((2, 3, 8, 8)).astype(np.float32)
    gm = run_both(qdq_model, {"x": x}, atol=1e-5)
    code = gm.code
    assert code.count("fake_quantize(") == 3 and "QuantizeLinear" not in code and "DequantizeLinear" not in code
    from graft.ir import torch_ops_nn

    calls = [n for n in gm.graph.nodes if n.target is torch_ops_nn.fake_quantize]
    assert sorted((n.kwargs["quant_min"], n.kwargs["quant_max"]) for n in calls) == [(-128, 127), (-128, 127),
                                                                                      (0, 255)]
    # the float weight is a trainable parameter seen through per-channel fake quantization (STE gradient)
    assert [k for k, _ in gm.named_parameters()] == ["w", "b"]
    xt = torch.from_numpy(x).requires_grad_()
    gm(xt).sum().backward()
    assert xt.grad is not None and gm.w.grad is not None and gm.w.grad.abs().sum() > 0
    assert {k for k, _ in gm.named_buffers()} >= {"xs", "xz", "ws", "wz", "cs", "cz"}


def test_lone_quantize_and_dequantize_run_as_is():
    m = onnx.parser.parse_model('''<ir_version: 8, opset_import: ["" : 13]>
agraph (float[6] x, uint8[6] q) => (uint8[6] a, float[6] b) {
    a = QuantizeLinear(x, s, z)
    b = DequantizeLinear(q, s, z)
}''')
    m = finish(m, s=np.array(0.1, np.float32), z=np.array(10, np.uint8))
    x = np.array([-2.0, -0.05, 0.05, 0.15, 0.25, 30.0], np.float32)
    gm = run_both(m, {"x": x, "q": np.array([0, 9, 10, 11, 200, 255], np.uint8)}, atol=0)
    assert "QuantizeLinear" in gm.code and "DequantizeLinear" in gm.code


# ----------------------------------------------------------------------------- state, errors, files
def test_torch_origin_state_dict_keeps_fqns_and_kinds():
    m, inp = resnet_style()
    gm = ir.to_torch(ir.from_torch(m, inp))
    ref = m.state_dict()
    got = gm.state_dict()
    assert set(got) == {k for k in ref if not k.endswith("num_batches_tracked")}
    for k, v in got.items():
        assert torch.equal(v, ref[k]), k
    params = {k for k, _ in gm.named_parameters()}
    assert "stem.0.0.weight" in params and "fc.bias" in params
    assert "stem.0.1.running_mean" not in params and "stem.0.1.running_mean" in dict(gm.named_buffers())
    with torch.no_grad():
        torch.testing.assert_close(gm(*inp), m(*inp), rtol=0, atol=1e-5)


@pytest.mark.parametrize("with_inputs", [True, False], ids=["pt2", "graft-fx"])
def test_save_and_load_round_trip(tmp_path, with_inputs):
    m, inp = resnet_style()
    gm = ir.to_torch(ir.from_torch(m, inp))
    path = tmp_path / "model.pt2"
    report = save_module(gm, path, tuple(inp) if with_inputs else None)
    assert report.format == ("pt2" if with_inputs else "graft-fx")
    back = load_module(path)
    with torch.no_grad():
        torch.testing.assert_close(back(*inp), gm(*inp), rtol=0, atol=1e-6)
    assert {k for k, _ in back.named_parameters()} == {k for k, _ in gm.named_parameters()}
    assert step_changes_parameters(back, inp) == len(list(back.parameters()))
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt2"]


def test_unsupported_ops_are_listed_with_node_names():
    m = parse_model('''<ir_version: 8, opset_import: ["" : 18, "my.ops": 1]>
agraph (float[4] x, seq(float[4]) s) => (float y, seq(float[4]) z) {
    y = my.ops.Frobnicate(x)
    z = SequenceMap(s) <body = g1 (float[4] e) => (float[4] o) { o = Neg(e) }>
}''')
    with pytest.raises(TorchBackendError) as e:
        ir.to_torch(ir.from_onnx(m))
    msg = str(e.value)
    assert "my.ops::Frobnicate" in msg and "custom domain" in msg
    assert "SequenceMap (node" in msg and "control flow" in msg


def test_every_onnx_op_the_lowering_emits_has_a_torch_implementation():
    """ONNX→torch covers the lowering tables: each op a lowering rule (or the frontend's glue) builds runs in torch."""
    import inspect
    import re

    import graft.ir.torch_import
    from graft.ir.torch_ops import lookup
    from graft.rules import lower_aten_math, lower_aten_nn, lower_aten_shape, lower_aten_stats, lower_aten_util

    emitted = set()
    for mod in (lower_aten_nn, lower_aten_math, lower_aten_shape, lower_aten_stats, lower_aten_util):
        emitted |= set(re.findall(r"\bop\.([A-Z][A-Za-z]+)\(", inspect.getsource(mod)))
        emitted |= set(re.findall(r'_(?:simple|unary)\("([A-Z][A-Za-z]+)"\)', inspect.getsource(mod)))
    # ops picked from tables by name
    emitted |= set(lower_aten_math._ARITH.values()) | set(lower_aten_math._CMP.values()) | \
        set(lower_aten_math._REDUCE.values()) | {o for pair in lower_aten_math._LOGIC.values() for o in pair}
    emitted |= set(re.findall(r'Node\("([A-Z][A-Za-z]+)"', inspect.getsource(graft.ir.torch_import)))
    emitted |= set(graft.ir.torch_import._SYM_OPS.values())
    emitted |= set(re.findall(r"\bop\.([A-Z][A-Za-z]+)\b", inspect.getsource(lower_aten_nn)))  # picked by name
    assert {"Conv", "Gemm", "LayerNormalization", "Resize", "GatherND", "ConstantOfShape", "Mod"} <= emitted
    missing = sorted(op for op in emitted if lookup(op, 18) is None)
    assert missing == []


# ----------------------------------------------------------------------------- found by trying to break it
class TiedLM(torch.nn.Module):
    """An embedding shared with the LM head (as GPT-2 and BERT's MLM head do), the head on 3-D hidden states."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(20, 8)
        self.proj = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 20, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.proj(self.emb(ids))))


def test_lowered_linear_keeps_source_names_and_tied_weights():
    """Linear on 3-D input lowers to MatMul(x, W^T): ONNX gets W^T, the torch module permutes the one W back."""
    from graft.rules.lower_aten_pipeline import lower

    torch.manual_seed(0)
    m = TiedLM().eval()
    ids = torch.randint(0, 20, (2, 5))
    model = ir.from_torch(m, (ids,))
    lower(model)
    assert not any(n.op_type == "Transpose" for n in model.graph)
    proto = ir.to_onnx(model)
    assert {"head.weight_T", "proj.weight_T"} <= {t.name for t in proto.graph.initializer}
    gm = ir.to_torch(model)
    assert set(dict(gm.named_parameters())) == {"head.weight", "proj.weight", "proj.bias"}
    with torch.no_grad():
        torch.testing.assert_close(gm(ids), m(ids), rtol=0, atol=1e-6)
        assert torch.equal(gm.proj.weight, m.proj.weight)  # source layout [out, in], not W^T
    gm.train()
    assert step_changes_parameters(gm, (ids,)) == 3
    # gradients from the Gather (embedding) and the MatMul (head) land on the same parameter
    m.train()
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    out = m(ids)
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    opt.step()
    torch.testing.assert_close(gm.head.weight, m.head.weight, rtol=0, atol=1e-6)


def test_aten_op_with_a_required_optional_argument_runs():
    """embedding_bag.padding_idx's `int? padding_idx` has no default: a None there must be passed, not dropped."""
    torch.manual_seed(0)
    bag = torch.nn.EmbeddingBag(10, 3, mode="mean").eval()
    idx = torch.tensor([[1, 2, 4], [3, 4, 9]])
    model = ir.from_torch(bag, (idx,))
    assert any(n.op_type.startswith("embedding_bag") for n in model.graph)
    with torch.no_grad():
        torch.testing.assert_close(ir.to_torch(model)(idx), bag(idx), rtol=0, atol=0)
