"""Round trip and rewriting of onnx.helper-built models: opsets 11–23, If/Loop/Scan with
outer-scope references, custom domains, external data."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from graft import ir
import ir_models
from graft.compiler import Rule, Var, op, rewrite
from graft.compiler.techniques import numeric
from graft.compiler.engine.rewriter import PROVENANCE_REPLACED, PROVENANCE_RULE
from graft.ir.verifier import problems
from graft.rules.fold_batchnorm import fold_batchnorm_into_conv


def roundtrip(proto: onnx.ModelProto) -> onnx.ModelProto:
    model = ir.from_onnx(proto)
    assert problems(model) == []
    out = ir.to_onnx(model)
    onnx.checker.check_model(out, full_check=True)
    assert out.SerializeToString() == proto.SerializeToString()
    return out


def assert_bit_identical(a: onnx.ModelProto, b: onnx.ModelProto, feeds: dict) -> dict:
    ra, rb = numeric.run(a, feeds), numeric.run(b, feeds)
    assert list(ra) == list(rb)
    for k in ra:
        assert np.array_equal(ra[k], rb[k]), k
    return ra


# --------------------------------------------------------------------------- opsets
@pytest.mark.parametrize("opset", range(11, 24))
def test_opset_roundtrip_and_fold(opset):
    proto = ir_models.opset_model(opset)
    out = roundtrip(proto)
    feeds = {"x": np.random.default_rng(opset).standard_normal((1, 3, 8, 8)).astype(np.float32)}
    ref = assert_bit_identical(proto, out, feeds)

    model = ir.from_onnx(proto)
    res = rewrite(model, [fold_batchnorm_into_conv])
    assert res.counts == {"fold_batchnorm_into_conv": 1}
    assert [n.op_type for n in model.graph] == ["Conv", "Relu", "ReduceMean", "Add"]
    assert problems(model) == []
    folded = ir.to_onnx(model)
    assert folded.opset_import[0].version == opset and folded.ir_version == proto.ir_version
    got = numeric.run(folded, feeds)
    np.testing.assert_allclose(got["y"], ref["y"], rtol=1e-5, atol=1e-5)


def test_value_info_metadata_and_doc_strings_preserved():
    proto = onnx.shape_inference.infer_shapes(ir_models.if_model())
    assert len(proto.graph.value_info) >= 1
    then_g = proto.graph.node[1].attribute[1].g
    assert then_g.name == "then_branch" and len(then_g.value_info) == 1  # typed inside the branch too
    onnx.helper.set_model_props(proto, {"author": "graft-tests", "note": "ünïcode"})
    proto.doc_string = "model doc"
    proto.graph.doc_string = "graph doc"
    proto.graph.node[0].doc_string = "node doc"
    e = proto.graph.node[0].metadata_props.add()
    e.key, e.value = "origin", "hand-written"
    e = proto.graph.metadata_props.add()
    e.key, e.value = "stage", "test"
    proto.graph.initializer[0].doc_string = "weights"
    out = roundtrip(proto)
    assert [(p.key, p.value) for p in out.metadata_props] == [("author", "graft-tests"), ("note", "ünïcode")]
    assert [v.name for v in out.graph.value_info] == [v.name for v in proto.graph.value_info]
    assert out.graph.node[0].metadata_props[0].value == "hand-written"
    for cond in (True, False):
        assert_bit_identical(proto, out, _if_feeds(cond))


# --------------------------------------------------------------------------- subgraphs
def _if_feeds(cond: bool):
    return {"x": np.random.default_rng(3).standard_normal((1, 3, 8, 8)).astype(np.float32),
            "cond": np.array(cond)}


def test_if_roundtrip_outer_scope():
    proto = ir_models.if_model()
    out = roundtrip(proto)
    for cond in (True, False):
        assert_bit_identical(proto, out, _if_feeds(cond))
    model = ir.from_onnx(proto)
    if_node = [n for n in model.graph if n.op_type == "If"][0]
    then_g = if_node.attrs["then_branch"]
    assert then_g.parent is model.graph and then_g.model is model
    conv = then_g.nodes[0]
    # the branch reads main-graph values by reference, not copies
    assert conv.inputs[0] is model.graph.inputs[0]
    assert conv.inputs[1] is model.graph.initializers["W"]
    assert (conv, 1) in model.graph.initializers["W"].uses()


def test_rule_rewrites_inside_if_branch():
    proto = ir_models.if_model()
    model = ir.from_onnx(proto)
    res = rewrite(model, [fold_batchnorm_into_conv])
    assert res.counts == {"fold_batchnorm_into_conv": 1}
    if_node = [n for n in model.graph if n.op_type == "If"][0]
    then_g, else_g = if_node.attrs["then_branch"], if_node.attrs["else_branch"]
    assert [n.op_type for n in then_g] == ["Conv"]
    assert [n.op_type for n in else_g] == ["Conv", "Relu"]
    new_conv = then_g.nodes[0]
    assert new_conv.meta[PROVENANCE_RULE] == "fold_batchnorm_into_conv"
    assert new_conv.meta[PROVENANCE_REPLACED] == "then_bn,then_conv"
    # folded constants live in the branch; the shared outer W is untouched and still read by else
    assert new_conv.inputs[1].graph is then_g and new_conv.inputs[1].name in then_g.initializers
    w_outer = model.graph.initializers["W"]
    assert [u.name for u in w_outer.users()] == ["else_conv"]
    assert np.array_equal(w_outer.const.array, onnx.numpy_helper.to_array(proto.graph.initializer[0]))
    # the branch output keeps its name (the If's interface)
    assert [v.name for v in then_g.outputs] == ["then_out"]
    assert problems(model) == []
    out = ir.to_onnx(model)
    onnx.checker.check_model(out, full_check=True)
    for cond in (True, False):
        ref, got = numeric.run(proto, _if_feeds(cond)), numeric.run(out, _if_feeds(cond))
        np.testing.assert_allclose(got["z"], ref["z"], rtol=1e-5, atol=1e-5)
        assert np.array_equal(got["xs"], ref["xs"])


def test_tiny_custom_rule_inside_loop_if():
    """A rule written here (Sub(a, c) → Add(a, -c)) rewrites the If nested in a Loop body."""
    a, c = Var("a"), Var("c")

    def replacement(op, m):
        return op.Add(m[a], op.Neg(m[c]))

    sub_to_add = Rule("sub_to_add_neg", op.Sub(a, c), replacement)
    proto = ir_models.loop_model()
    model = ir.from_onnx(proto)
    assert rewrite(model, [sub_to_add]).counts == {"sub_to_add_neg": 1}
    inner_then = model.graph.nodes[0].attrs["body"].nodes[3].attrs["then_branch"]
    assert [n.op_type for n in inner_then] == ["Neg", "Add"]
    neg = inner_then.nodes[0]
    assert neg.inputs[0] is model.graph.initializers["step"]  # two scopes up, by reference
    assert problems(model) == []
    out = ir.to_onnx(model)
    onnx.checker.check_model(out, full_check=True)
    feeds = {"M": np.array(4, np.int64), "x": np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32),
             "flag": np.array(True)}
    ref, got = numeric.run(proto, feeds), numeric.run(out, feeds)
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("flag", [True, False])
def test_loop_roundtrip_nested_outer_scope(flag):
    proto = ir_models.loop_model()
    out = roundtrip(proto)
    feeds = {"M": np.array(3, np.int64), "x": np.arange(6, dtype=np.float32).reshape(2, 3), "flag": np.array(flag)}
    res = assert_bit_identical(proto, out, feeds)
    assert res["scans"].shape == (3, 2, 3)
    model = ir.from_onnx(proto)
    body = model.graph.nodes[0].attrs["body"]
    inner = body.nodes[3].attrs["then_branch"]
    assert inner.parent is body and body.parent is model.graph
    sub = inner.nodes[0]
    assert sub.inputs[0] is body.inputs[2] and sub.inputs[1] is model.graph.initializers["step"]
    from graft.ir._core import outer_scope_values

    assert [v.name for v in outer_scope_values(body)] == ["step", "x", "flag"]
    assert [v.name for v in outer_scope_values(inner)] == ["acc_in", "step"]


def test_scan_roundtrip_outer_scope():
    proto = ir_models.scan_model()
    out = roundtrip(proto)
    rng = np.random.default_rng(5)
    feeds = {"init": rng.standard_normal(3).astype(np.float32), "seq": rng.standard_normal((5, 3)).astype(np.float32)}
    res = assert_bit_identical(proto, out, feeds)
    # the Scan computes what its body says: state_t = state_{t-1} + x_t + bias
    state = feeds["init"].copy()
    for t in range(5):
        state = state + feeds["seq"][t] + np.array([0.1, -0.2, 0.3], np.float32)
    np.testing.assert_allclose(res["final"], state, rtol=1e-6)


# --------------------------------------------------------------------------- custom domains
def test_custom_domain_passes_through_untouched():
    proto = ir_models.custom_domain_model()
    roundtrip(proto)
    model = ir.from_onnx(proto)
    res = rewrite(model, [fold_batchnorm_into_conv])
    assert res.counts == {"fold_batchnorm_into_conv": 1}
    assert problems(model) == []  # an unknown op is never an arity error
    out = ir.to_onnx(model)
    onnx.checker.check_model(out, full_check=True)
    custom_in = [n for n in proto.graph.node if n.domain == "my.domain"][0]
    custom_out = [n for n in out.graph.node if n.domain == "my.domain"][0]
    assert custom_out.op_type == "Swizzle" and custom_out.name == "custom"
    assert list(custom_out.attribute) == list(custom_in.attribute)
    assert list(custom_out.output) == ["sw", "sw_aux"]
    assert custom_out.input[1] == "W"  # still reads the original weight, not the folded copy
    conv = [n for n in out.graph.node if n.op_type == "Conv"][0]
    assert custom_out.input[0] == conv.output[0]  # now reads the folded Conv directly
    assert [(o.domain, o.version) for o in out.opset_import] == [("", 17), ("my.domain", 1)]
    assert [n.op_type for n in out.graph.node] == ["Conv", "Swizzle", "Relu"]


# --------------------------------------------------------------------------- external data
def test_external_data_load_save_reload(tmp_path):
    proto = ir_models.opset_model(17, c_in=8, c_out=16)  # W: 16*8*3*3 floats = 4.5 KiB
    src = tmp_path / "src" / "m.onnx"
    src.parent.mkdir()
    to_save = onnx.ModelProto()
    to_save.CopyFrom(proto)  # save_model(save_as_external_data=True) rewrites its argument in place
    onnx.save_model(to_save, str(src), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    assert (src.parent / "weights.bin").stat().st_size > 4608
    on_disk = onnx.load(str(src), load_external_data=False)
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in on_disk.graph.initializer)

    model = ir.load(src)
    assert np.array_equal(model.graph.initializers["W"].const.array,
                          onnx.numpy_helper.to_array(proto.graph.initializer[0]))
    dst = tmp_path / "dst" / "m.onnx"
    ir.save(model, dst, external_data=False)  # asked for: one self-contained file
    assert sorted(p.name for p in dst.parent.iterdir()) == ["m.onnx"]
    kept = tmp_path / "kept" / "m.onnx"
    ir.save(model, kept)  # the input had external data: so does the output (issue 11)
    assert sorted(p.name for p in kept.parent.iterdir()) == ["m.onnx", "m.onnx.data"]
    again = onnx.load(str(dst))
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 8, 8, 8)).astype(np.float32)}
    assert_bit_identical(proto, again, feeds)

    ext = tmp_path / "ext" / "m.onnx"
    ir.save(model, ext, external_data=True)
    assert sorted(p.name for p in ext.parent.iterdir()) == ["m.onnx", "m.onnx.data"]
    header = onnx.load(str(ext), load_external_data=False)
    where = {t.name: t.data_location for t in header.graph.initializer}
    assert where["W"] == onnx.TensorProto.EXTERNAL
    assert where["B"] == onnx.TensorProto.DEFAULT  # tensors under 1 KiB stay inline
    w = [t for t in header.graph.initializer if t.name == "W"][0]
    assert {e.key: e.value for e in w.external_data}["location"] == "m.onnx.data"
    assert_bit_identical(proto, onnx.load(str(ext)), feeds)
    assert ir.to_onnx(ir.load(ext)).graph.node == proto.graph.node


def test_external_data_requested_but_all_tensors_small(tmp_path):
    """ir.save(external_data=True) of a model whose tensors are all under 1 KiB: one file, no crash."""
    proto = ir_models.opset_model(17)
    p = tmp_path / "m.onnx"
    ir.save(ir.from_onnx(proto), p, external_data=True)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["m.onnx"]
    assert onnx.load(str(p)).graph == proto.graph
