"""Transformer fusions (rules/fuse_attention.py, fuse_gelu.py, fuse_layernorm.py) on real exports.

Models: transformers 5 BERT, ViT, CLIP text and vision towers, a Whisper encoder and wav2vec2 from
small configs (2 layers, 4 heads of 16) with random weights, exported by torch's TorchScript
exporter (eager and sdpa attention, dynamic and static shapes) and by the dynamo exporter
(tests/compiler/transformer_models.py), plus all-MiniLM-L6-v2 with its real weights. Each is
compiled once per session with the ``fuse_ort`` pipeline; every fused model must match the unfused
one within 1e-4 in onnxruntime, at the export's batch and (dynamic exports) at another one.
"""
from __future__ import annotations

import math
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from graft import ir
from graft.compiler import compile, explain, rewrite
from graft.rules import fuse_attention, fuse_gelu, fuse_layernorm
from graft.rules.pipelines import get_pipeline
from tests.compiler import transformer_models as tm

ATOL = 1e-4
LAYERS = tm.LAYERS

# TorchScript exports: every family eager and sdpa at dynamic shapes, and once at static shapes;
# the dynamo exporter for BERT (sdpa: K transposed through a 3-D view) and ViT (static, with the
# all-zero mask constant the exporter leaves).
VARIANTS = [
    *[tm.Variant(f, a, True) for f in tm.FAMILIES for a in ("eager", "sdpa")],
    *[tm.Variant(f, a, False) for f, a in zip(tm.FAMILIES, ("sdpa", "eager") * 3)],
    tm.Variant("bert", "sdpa", True, dynamo=True),
    tm.Variant("vit", "sdpa", False, dynamo=True),
]
# activation ops each family's MLP (and conv front-end) fuses into, per model
GELU_OPS = {"bert": {"BiasGelu": 2}, "vit": {"BiasGelu": 2}, "clip_text": {"QuickGelu": 2},
            "clip_vision": {"QuickGelu": 2}, "whisper_enc": {"BiasGelu": 2, "Gelu": 2},
            "wav2vec2": {"BiasGelu": 2, "Gelu": 8}}


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("transformer_exports")


_COMPILED: dict = {}


def fused(v: tm.Variant, export_dir, pipeline: str = "fuse_ort"):
    """(export path, CompileResult) — compiled once per session."""
    key = (v, pipeline)
    if key not in _COMPILED:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            path = tm.export(v, export_dir)
        _COMPILED[key] = path, compile(str(path), pipeline=pipeline, example_inputs=tm.feeds(v), atol=ATOL)
    return _COMPILED[key]


def ms_counts(proto) -> Counter:
    return Counter(n.op_type for n in proto.graph.node if n.domain == "com.microsoft")


def run(model, feeds) -> list[np.ndarray]:
    src = model if isinstance(model, (str, Path)) else model.SerializeToString()
    return ort.InferenceSession(str(src) if isinstance(src, Path) else src,
                                providers=["CPUExecutionProvider"]).run(None, feeds)


def max_err(a, b, feeds) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(run(a, feeds), run(b, feeds)))


@pytest.mark.parametrize("v", VARIANTS, ids=lambda v: v.key)
def test_every_attention_block_fuses_and_outputs_agree(v, export_dir):
    path, res = fused(v, export_dir)
    ops = ms_counts(res.proto)
    assert ops["Attention"] + ops["MultiHeadAttention"] == LAYERS, ops
    assert ops["Attention"] == LAYERS  # self-attention: Q, K and V packed into one projection
    plain = Counter(n.op_type for n in res.proto.graph.node)
    assert plain["Softmax"] == 0
    head_perms = [list(helper.get_attribute_value(a)) for n in res.proto.graph.node if n.op_type == "Transpose"
                  for a in n.attribute if a.name == "perm"]
    assert not [p for p in head_perms if len(p) == 4]  # no split/merge of heads left (conv transposes are 3-D)
    assert all(o.max_abs <= ATOL for o in res.verification.outputs), res.verification.outputs
    assert max_err(path, res.proto, tm.feeds(v)) <= ATOL
    if v.dynamic:  # the fused graph keeps the dynamic batch
        assert max_err(path, res.proto, tm.feeds(v, batch=3)) <= ATOL


@pytest.mark.parametrize("v", VARIANTS, ids=lambda v: v.key)
def test_gelu_variants_fuse(v, export_dir):
    _, res = fused(v, export_dir)
    ops = ms_counts(res.proto)
    assert {k: ops[k] for k in GELU_OPS[v.family]} == GELU_OPS[v.family]
    plain = Counter(n.op_type for n in res.proto.graph.node)
    assert plain["Erf"] == plain["Sigmoid"] == plain["Tanh"] == 0


def test_fused_nodes_carry_provenance(export_dir):
    _, res = fused(tm.Variant("bert", "sdpa", True), export_dir)
    att = [n for n in res.proto.graph.node if n.op_type == "Attention"]
    meta = {p.key: p.value for p in att[0].metadata_props}
    assert meta["graft.rule"] == "pack_qkv_into_attention"
    assert att[0].name.endswith("/attention/self/Attention")
    assert {a.name: helper.get_attribute_value(a) for a in att[0].attribute}["num_heads"] == 4


def test_optimize_never_emits_contrib_ops(export_dir):
    for v in (tm.Variant("bert", "sdpa", True), tm.Variant("clip_vision", "eager", True)):
        _, res = fused(v, export_dir, pipeline="optimize")
        assert not ms_counts(res.proto)
        assert "com.microsoft" not in {o.domain for o in res.proto.opset_import}


# --------------------------------------------------------------------------- all-MiniLM-L6-v2
@pytest.fixture(scope="module")
def minilm_fused(minilm_onnx_path):
    return {p: compile(str(minilm_onnx_path), pipeline=p, atol=ATOL) for p in ("fuse_ort", "fuse_ort_skiplayernorm")}


def test_minilm_real_weights_fuse_six_layers(minilm_onnx_path, minilm_fused):
    res = minilm_fused["fuse_ort"]
    assert ms_counts(res.proto) == Counter({"Attention": 6, "BiasGelu": 6})
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 30000, (2, 24)).astype(np.int64)
    mask = np.ones((2, 24), np.int64)
    mask[1, 15:] = 0
    assert max_err(minilm_onnx_path, res.proto, {"input_ids": ids, "attention_mask": mask}) <= ATOL


def test_skip_layernorm_pipeline_fuses_every_residual(minilm_onnx_path, minilm_fused):
    res = minilm_fused["fuse_ort_skiplayernorm"]
    assert ms_counts(res.proto)["SkipLayerNormalization"] == 12  # two residual norms per layer
    assert all(o.max_abs <= ATOL for o in res.verification.outputs)


def ort_fused_ops(proto, tmp_path) -> Counter:
    """Op counts of the graph onnxruntime's session optimizer makes of ``proto``."""
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "ort_optimized.onnx")
    so.log_severity_level = 3
    ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)


def test_optimize_adds_no_shape_facts_that_let_ort_fuse_skip_layernorm(minilm_onnx_path, tmp_path):
    """graft's shape inference names equal dims (unk__7); written out, they let onnxruntime fuse
    SkipLayerNormalization, which it does not do on the input (and which runs slower here)."""
    original = onnx.load(str(minilm_onnx_path))
    res = compile(str(minilm_onnx_path), pipeline="optimize")
    dims = [d.dim_param for vi in res.proto.graph.value_info for d in vi.type.tensor_type.shape.dim]
    assert not any(d.startswith("unk__") for d in dims)
    assert ort_fused_ops(original, tmp_path)["SkipLayerNormalization"] == 0
    assert ort_fused_ops(res.proto, tmp_path)["SkipLayerNormalization"] == 0


# --------------------------------------------------------------------------- hand-written modules
def _export(module, args, path, names, dynamic, opset=17):
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), args, str(path), input_names=names, output_names=["y"],
                          dynamic_axes=dynamic, opset_version=opset, dynamo=False)
    return str(path)


def _attention_module(hidden=64, heads=4, head_size=16, cross=False, seed=0):
    """Multi-head attention written out by hand: q/k/v projections of width heads·head_size (which
    need not equal ``hidden``), an optional additive mask, and K/V from a second input when
    ``cross``."""
    import torch

    torch.manual_seed(seed)

    class Attn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            inner = heads * head_size
            self.q, self.k, self.v = (torch.nn.Linear(hidden, inner) for _ in range(3))
            self.o = torch.nn.Linear(inner, hidden)

        def forward(self, x, other=None, mask=None):
            b, s, _ = x.shape
            src = other if cross else x
            t = src.shape[1]
            q = self.q(x).view(b, s, heads, head_size).transpose(1, 2)
            k = self.k(src).view(b, t, heads, head_size).transpose(1, 2)
            v = self.v(src).view(b, t, heads, head_size).transpose(1, 2)
            scores = q @ k.transpose(-1, -2) / math.sqrt(head_size)
            if mask is not None:
                scores = scores + mask
            y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, heads * head_size)
            return self.o(y)

    m = Attn()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape) * (1.5 / p.shape[-1] ** 0.5))
    return m


def test_head_size_that_does_not_divide_hidden_fuses_with_projection_width(tmp_path):
    """hidden 66, 4 heads of 16: the heads split the 64-wide projections, not the 66-wide input."""
    import torch

    x = torch.randn(2, 5, 66)
    path = _export(_attention_module(hidden=66), (x,), tmp_path / "a.onnx", ["x"], {"x": {0: "b", 1: "s"}})
    res = compile(path, pipeline="fuse_ort", atol=ATOL)
    att = [n for n in res.proto.graph.node if n.op_type == "Attention"]
    assert len(att) == 1
    w = next(t for t in res.proto.graph.initializer if t.name == att[0].input[1])
    assert list(w.dims) == [66, 192]
    assert max_err(path, res.proto, {"x": np.random.default_rng(1).standard_normal((3, 7, 66)).astype(np.float32)}) \
        <= ATOL


def test_cross_attention_fuses_to_multihead_attention(tmp_path):
    import torch

    x, other = torch.randn(2, 5, 64), torch.randn(2, 9, 64)
    path = _export(_attention_module(cross=True), (x, other), tmp_path / "cross.onnx", ["x", "other"],
                   {"x": {0: "b", 1: "s"}, "other": {0: "b", 1: "t"}})
    res = compile(path, pipeline="fuse_ort", atol=ATOL)
    assert ms_counts(res.proto) == Counter({"MultiHeadAttention": 1})  # not packed: K/V read another input
    rng = np.random.default_rng(2)
    feeds = {"x": rng.standard_normal((2, 4, 64)).astype(np.float32),
             "other": rng.standard_normal((2, 11, 64)).astype(np.float32)}
    assert max_err(path, res.proto, feeds) <= ATOL
    model = ir.load(path)
    get_pipeline("fuse_ort")(model)
    hits, misses = explain(model, fuse_attention.pack_qkv_into_attention)
    assert not hits and "must be the same value" in misses[0][1].reason


@pytest.mark.parametrize("mask_shape", [(5, 5), (1, 5, 5), (2, 1, 1, 5)], ids=["rank2", "rank3", "rank4_padding"])
def test_masks_of_lower_rank_are_broadcast_correctly(tmp_path, mask_shape):
    import torch

    x = torch.randn(2, 5, 64)
    mask = torch.zeros(mask_shape)
    path = _export(_attention_module(), (x, None, mask), tmp_path / "m.onnx", ["x", "mask"], None)
    res = compile(path, pipeline="fuse_ort", atol=ATOL)
    assert ms_counts(res.proto)["Attention"] == 1
    rng = np.random.default_rng(3)
    m = np.where(rng.random(mask_shape) < 0.3, -1e4, 0.0).astype(np.float32)
    feeds = {"x": rng.standard_normal((2, 5, 64)).astype(np.float32), "mask": m}
    assert max_err(path, res.proto, feeds) <= ATOL


# --------------------------------------------------------------------------- refusals, by hand-built graphs
def _block(width=64, head=16, mask_shape=None, q_target=(0, 0, -1, 16)):
    """One attention block in ONNX with every intermediate typed (value_info), as shape inference
    would leave it; the block need not be runnable (the rule must refuse it on its own)."""
    rng = np.random.default_rng(0)
    f = TensorProto.FLOAT
    heads = width // head if width % head == 0 else 4
    inits = [helper.make_tensor(n, f, (64, width), rng.standard_normal((64, width)).astype(np.float32).ravel())
             for n in ("wq", "wk", "wv")]
    inits += [helper.make_tensor("tq", TensorProto.INT64, (4,), list(q_target)),
              helper.make_tensor("tkv", TensorProto.INT64, (4,), [0, 0, heads, head]),
              helper.make_tensor("tout", TensorProto.INT64, (3,), [0, 0, -1]),
              helper.make_tensor("scale", f, (), [0.25])]
    nodes = [helper.make_node("MatMul", ["x", w], [o]) for w, o in (("wq", "q"), ("wk", "k"), ("wv", "v"))]
    nodes += [helper.make_node("Reshape", ["q", "tq"], ["q4"]), helper.make_node("Reshape", ["k", "tkv"], ["k4"]),
              helper.make_node("Reshape", ["v", "tkv"], ["v4"]),
              helper.make_node("Transpose", ["q4"], ["qh"], perm=[0, 2, 1, 3]),
              helper.make_node("Transpose", ["k4"], ["kt"], perm=[0, 2, 3, 1]),
              helper.make_node("Transpose", ["v4"], ["vh"], perm=[0, 2, 1, 3]),
              helper.make_node("MatMul", ["qh", "kt"], ["qk"]), helper.make_node("Mul", ["qk", "scale"], ["s"])]
    inputs = [helper.make_tensor_value_info("x", f, ["B", "S", 64])]
    scores = "s"
    if mask_shape is not None:
        inputs.append(helper.make_tensor_value_info("mask", f, list(mask_shape)))
        nodes.append(helper.make_node("Add", ["s", "mask"], ["sm"]))
        scores = "sm"
    nodes += [helper.make_node("Softmax", [scores], ["p"], axis=-1), helper.make_node("MatMul", ["p", "vh"], ["c"]),
              helper.make_node("Transpose", ["c"], ["ct"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["ct", "tout"], ["y"])]
    scores_shape = ["B", heads, "S", "S"] if mask_shape is None or len(mask_shape) <= 4 else [1, "B", heads, "S", "S"]
    vi = [helper.make_tensor_value_info(n, f, s) for n, s in (
        ("q", ["B", "S", width]), ("k", ["B", "S", width]), ("v", ["B", "S", width]),
        ("q4", ["B", "S", "N", head]), ("k4", ["B", "S", heads, head]), ("v4", ["B", "S", heads, head]),
        ("qh", ["B", "N", "S", head]), ("kt", ["B", heads, head, "S"]), ("vh", ["B", heads, "S", head]),
        ("qk", ["B", heads, "S", "S"]), ("s", ["B", heads, "S", "S"]), ("sm", scores_shape),
        ("p", scores_shape), ("c", ["B", heads, "S", head]), ("ct", ["B", "S", heads, head]))]
    g = helper.make_graph(nodes, "block", inputs, [helper.make_tensor_value_info("y", f, ["B", "S", None])], inits,
                          value_info=vi)
    return ir.from_onnx(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))


def _refusal(model, rule=fuse_attention.fuse_attention):
    before = Counter(n.op_type for n in model.graph)
    hits, misses = explain(model, rule)
    rewrite(model, [rule])
    assert Counter(n.op_type for n in model.graph) == before  # nothing fused
    assert not hits
    return misses[0][1]


def test_control_block_fuses():
    """The hand-built block is a valid target: the refusals below are about what each one changes."""
    model = _block(mask_shape=("B", 1, "S", "S"))
    assert rewrite(model, [fuse_attention.fuse_attention]).counts["fuse_attention"] == 1


def test_head_size_not_dividing_the_width_is_refused():
    miss = _refusal(_block(width=60, q_target=(0, 0, -1, 16)))
    assert "head size 16 does not divide its width 60" in miss.reason
    assert miss.node.op_type == "Reshape"


def test_mask_of_rank_five_is_refused_at_the_add():
    miss = _refusal(_block(mask_shape=(1, "B", 1, "S", "S")))
    assert "rank 5 > 4" in miss.reason
    assert miss.node.op_type == "Add"


def test_probabilities_read_outside_the_block_are_refused(export_dir, tmp_path):
    """attentions returned to the caller (output_attentions): fusing would compute them twice."""
    path, _ = fused(tm.Variant("bert", "eager", True), export_dir)
    proto = onnx.load(str(path))
    softmax = next(n for n in proto.graph.node if n.op_type == "Softmax")
    proto.graph.output.append(helper.make_tensor_value_info(softmax.output[0], TensorProto.FLOAT, [None] * 4))
    model = ir.from_onnx(proto)
    get_pipeline("cleanup")(model)
    hits, misses = explain(model, fuse_attention.fuse_attention)
    assert len(hits) == LAYERS - 1
    reasons = [mi.reason for _, mi in misses if "graph output" in mi.reason]
    assert len(reasons) == 1 and softmax.output[0] in reasons[0]
    res = compile(proto, pipeline="fuse_ort", atol=ATOL)
    assert ms_counts(res.proto)["Attention"] == LAYERS - 1


# --------------------------------------------------------------------------- GELU forms and layer norms
def test_gelu_tanh_and_hand_written_forms(tmp_path):
    import torch

    class Mlp(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(32, 32), torch.nn.Linear(32, 32)

        def forward(self, x):
            y = torch.nn.functional.gelu(self.a(x), approximate="tanh")
            z = self.b(y)
            return (0.5 * z) * (1 + torch.erf(z / math.sqrt(2)))  # (½·x)·E: neither exporter's association

    torch.manual_seed(0)
    path = _export(Mlp(), (torch.randn(2, 3, 32),), tmp_path / "mlp.onnx", ["x"], {"x": {0: "b"}})
    res = compile(path, pipeline="fuse_ort", atol=ATOL)
    assert ms_counts(res.proto) == Counter({"FastGelu": 1, "BiasGelu": 1})
    assert max_err(path, res.proto, {"x": np.random.default_rng(4).standard_normal((3, 3, 32)).astype(np.float32)}) \
        <= ATOL


def _gelu_graph(half: float):
    """(x·(1 + erf(x/√2)))·half with the constants at ranks 1, 0 and 2 (x is (B, 8))."""
    f = TensorProto.FLOAT
    nodes = [helper.make_node("Div", ["x", "r2"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
             helper.make_node("Add", ["e", "one"], ["e1"]), helper.make_node("Mul", ["x", "e1"], ["xe"]),
             helper.make_node("Mul", ["xe", "half"], ["y"])]
    inits = [helper.make_tensor("r2", f, (1,), [math.sqrt(2)]), helper.make_tensor("one", f, (), [1.0]),
             helper.make_tensor("half", f, (1, 1), [half])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", f, ["B", 8])],
                          [helper.make_tensor_value_info("y", f, ["B", 8])], inits)
    return ir.from_onnx(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))


def test_gelu_with_wrong_constant_is_refused():
    hits, misses = explain(_gelu_graph(0.6), fuse_gelu.GELU_RULES[0])
    assert not hits and "is not the scalar ½" in misses[0][1].reason
    hits, _ = explain(_gelu_graph(0.5), fuse_gelu.GELU_RULES[0])  # [[0.5]] is ½ up to broadcasting
    assert len(hits) == 1


class _HandLayerNorm:
    """A LayerNorm written with tensor ops, the way custom modules (and opset < 17 exports) spell it."""

    @staticmethod
    def module():
        import torch

        class LN(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.w = torch.nn.Parameter(torch.randn(32))
                self.b = torch.nn.Parameter(torch.randn(32))

            def forward(self, x):
                mu = x.mean(-1, keepdim=True)
                d = x - mu
                var = d.pow(2).mean(-1, keepdim=True)
                return d / torch.sqrt(var + 1e-5) * self.w + self.b

        torch.manual_seed(5)
        return LN()


def test_decomposed_layernorm_fuses_with_its_affine(tmp_path):
    import torch

    path = _export(_HandLayerNorm.module(), (torch.randn(2, 3, 32),), tmp_path / "ln.onnx", ["x"],
                   {"x": {0: "b", 1: "s"}})
    res = compile(path, pipeline="fuse_ort", atol=ATOL)
    ops = Counter(n.op_type for n in res.proto.graph.node)
    assert ops == Counter({"LayerNormalization": 1})
    assert max_err(path, res.proto, {"x": np.random.default_rng(6).standard_normal((4, 7, 32)).astype(np.float32)}) \
        <= ATOL


def test_decomposed_layernorm_below_opset_17_is_refused_with_the_reason(tmp_path):
    import torch

    path = _export(_HandLayerNorm.module(), (torch.randn(2, 3, 32),), tmp_path / "ln14.onnx", ["x"],
                   {"x": {0: "b", 1: "s"}}, opset=14)
    model = ir.load(path)
    get_pipeline("cleanup")(model)
    hits, misses = explain(model, fuse_layernorm.fuse_layernorm)
    assert not hits and "opset 14 < 17" in misses[0][1].reason
