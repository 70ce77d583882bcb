"""Passes, pipelines and the pipeline registry (compiler/passes.py, rules/pipelines.py)."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from graft import ir
from graft.compiler import Const, Rule, RuleDefinitionError, RuleError, RuleSet, StopReason, Var, op
from graft.compiler.engine.passes import FunctionPass, Pass, PassResult, Pipeline, RewritePass
from graft.rules.pipelines import get_pipeline, pipeline_doc, pipeline_names, register_pipeline, unregister_pipeline
from compile_models import conv_bn_model
from conftest import assert_same_outputs, parse_model
from graft.rules import fold_batchnorm
from graft.rules.cleanup import remove_identity
from graft.rules.pipelines import with_user_rules

IDENTITY_CHAIN = """<ir_version: 10, opset_import: ["" : 17]>
g (float[2, 3] x) => (float[2, 3] y) {
    a = Identity (x)
    b = Identity (a)
    c = Relu (b)
    y = Identity (c)
}"""


def ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


def test_rewrite_pass_counts_and_saturates():
    model = ir.from_onnx(parse_model(IDENTITY_CHAIN))
    res = RewritePass([remove_identity], "ids")(model)
    assert isinstance(res, PassResult) and res.model is model and res.modified
    assert ops(model) == ["Relu"]
    assert res.stats.counts == Counter({"remove_identity": 3})
    assert res.stats.stop_reasons == {"ids": StopReason.SATURATED}
    rec = res.stats.passes[0]
    assert (rec.name, rec.kind, rec.changes, rec.modified) == ("ids", "rewrite", 3, True)
    assert [r.rule for r in res.stats.rewrites] == ["remove_identity"] * 3
    # graph-output name kept
    assert [v.name for v in model.graph.outputs] == ["y"]


def test_rewrite_pass_iteration_limit_is_typed():
    model = ir.from_onnx(parse_model(IDENTITY_CHAIN))
    res = RewritePass(RuleSet([remove_identity]), "ids", max_rewrites=1)(model)
    assert res.stats.stop_reasons["ids"] is StopReason.ITERATION_LIMIT
    assert res.stats.counts["remove_identity"] == 1
    assert ops(model).count("Identity") == 2
    ir.verify(model)


def test_rewrite_pass_unmodified_model():
    model = ir.from_onnx(parse_model(IDENTITY_CHAIN.replace("Identity", "Neg")))
    res = RewritePass([remove_identity], "ids")(model)
    assert not res.modified and res.stats.counts == Counter() and res.stats.passes[0].changes == 0


def test_function_pass_reports_changes_and_analysis_never_modifies():
    model = ir.from_onnx(parse_model(IDENTITY_CHAIN))
    seen = []

    def count_relus(m):
        seen.append(m)
        return sum(n.op_type == "Relu" for n in m.graph)

    res = FunctionPass(count_relus)(model)
    assert seen == [model] and res.modified and res.stats.passes[0].changes == 1
    assert res.stats.passes[0].name == "count_relus"
    res = FunctionPass(count_relus, "analysis", analysis=True)(model)
    assert not res.modified and res.stats.passes[0].changes == 1


def test_function_pass_must_return_int():
    model = ir.from_onnx(parse_model(IDENTITY_CHAIN))
    with pytest.raises(TypeError, match="must return the number of changes"):
        FunctionPass(lambda m: None, "bad")(model)


def test_pass_rejects_non_ir_model():
    with pytest.raises(TypeError, match="ir.from_onnx"):
        RewritePass([remove_identity], "ids")(parse_model(IDENTITY_CHAIN))


def test_pipeline_composes_and_sums_counts_across_passes():
    proto = conv_bn_model()
    model = ir.from_onnx(proto)
    ids = RewritePass([remove_identity], "ids")
    inner = Pipeline("inner", [ids, RewritePass(fold_batchnorm.RULES, "bn")])
    calls = []
    outer = Pipeline("outer", [inner, FunctionPass(lambda m: calls.append(1) or 0, "noop"), inner])
    res = outer(model)
    assert res.modified and calls == [1]
    assert res.stats.counts == Counter({"remove_identity": 1, "fold_batchnorm_into_conv": 1})
    assert [p.name for p in res.stats.passes] == [
        "outer/inner/ids", "outer/inner/bn", "outer/noop", "outer/inner#2/ids", "outer/inner#2/bn"]
    assert res.stats.stop_reasons["outer/inner#2/bn"] is StopReason.SATURATED
    assert [r.pass_name for r in res.stats.rewrites] == ["outer/inner/ids", "outer/inner/bn"]
    assert ops(model) == ["Conv", "Relu", "Div", "Mul"]
    assert_same_outputs(proto, ir.to_onnx(model), atol=1e-4)
    assert outer.describe() == "inner → noop → inner"
    assert [p.name for p in outer.leaf_passes()] == ["ids", "bn", "noop", "ids", "bn"]


def test_pipeline_rejects_non_pass():
    with pytest.raises(TypeError, match="not a Pass"):
        Pipeline("p", [remove_identity])


def test_registry_lookup_and_errors():
    assert {"cleanup", "optimize", "none"} <= set(pipeline_names())
    with pytest.raises(KeyError, match="known pipelines: .*cleanup.*optimize"):
        get_pipeline("optimise")
    try:
        register_pipeline("test_only_ids", lambda: Pipeline("test_only_ids", [RewritePass([remove_identity], "ids")]),
                          "identity removal only\nsecond line ignored")
        assert "test_only_ids" in pipeline_names()
        a, b = get_pipeline("test_only_ids"), get_pipeline("test_only_ids")
        assert a is not b and a.passes[0] is not b.passes[0]  # fresh passes per lookup
        assert pipeline_doc("test_only_ids") == "identity removal only"
        with pytest.raises(ValueError, match="already registered"):
            register_pipeline("test_only_ids", lambda: Pipeline("x", []))
        register_pipeline("test_bad_factory", lambda: [])
        with pytest.raises(TypeError, match="not a Pipeline"):
            get_pipeline("test_bad_factory")
    finally:
        unregister_pipeline("test_only_ids")
        unregister_pipeline("test_bad_factory")
    assert "test_only_ids" not in pipeline_names()


def test_builtin_pipeline_stages():
    cleanup = get_pipeline("cleanup")
    assert [p.name for p in cleanup.passes] == ["infer_shapes", "cleanup_rules", "dead_code"]
    assert isinstance(cleanup.passes[0], FunctionPass) and cleanup.passes[0].analysis
    names = {r.name for r in cleanup.passes[1].ruleset}
    assert {"remove_identity", "constant_to_initializer", "fold_constants"} <= names
    optimize = get_pipeline("optimize")
    assert [p.name for p in optimize.passes] == ["cleanup", "fold_batchnorm", "fuse", "cleanup"]
    assert get_pipeline("none").passes == []


def test_optimize_pipeline_on_small_model():
    proto = conv_bn_model()
    model = ir.from_onnx(proto)
    res = get_pipeline("optimize")(model)
    assert res.stats.counts["fold_batchnorm_into_conv"] == 1
    assert res.stats.counts["remove_identity"] == 1
    assert ops(model) == ["Conv", "Relu", "Div", "Mul"]
    assert all(r is StopReason.SATURATED for r in res.stats.stop_reasons.values())
    assert {p.name for p in res.stats.passes} >= {"optimize/cleanup/infer_shapes", "optimize/cleanup#2/dead_code"}
    assert_same_outputs(proto, ir.to_onnx(model), atol=1e-4)


def _div_to_mul():
    x, c = Var("x"), Const("c", where=lambda a: a.dtype.kind == "f" and bool(np.all(a != 0)))

    def replacement(op, m):
        return op.Mul(m[x], op.const((1 / m[c]).astype(m[c].dtype)))

    return Rule("div_to_mul", op.Div(x, c), replacement)


def test_with_user_rules_appends_a_pass():
    user = [_div_to_mul()]
    p = with_user_rules("optimize", user)
    assert p.name == "optimize" and [q.name for q in p.passes][-1] == "user_rules"
    alone = with_user_rules("none", user)
    assert [q.name for q in alone.passes] == ["user_rules"]
    assert with_user_rules(None, None).passes == []
    assert [len(q.ruleset) for q in with_user_rules(None, user[0]).passes] == [1]
    with pytest.raises(RuleDefinitionError, match="defined twice"):
        with_user_rules("none", [user[0], user[0]])
    proto = conv_bn_model()
    model = ir.from_onnx(proto)
    res = p(model)
    assert res.stats.counts["div_to_mul"] == 1
    assert ops(model) == ["Conv", "Relu", "Mul", "Mul"]
    assert_same_outputs(proto, ir.to_onnx(model), atol=1e-4)
    with pytest.raises(KeyError):
        with_user_rules("nope", user)


def test_rule_error_propagates_with_rule_and_node():
    x = Var("x")

    def replacement(op, m):
        raise ZeroDivisionError("boom")

    bad = Rule("bad_relu", op.Relu(x), replacement)
    model = ir.from_onnx(conv_bn_model())
    with pytest.raises(RuleError, match=r"rule 'bad_relu'.*ZeroDivisionError: boom.*Relu node"):
        with_user_rules("none", [bad])(model)


def test_replaces_is_transitive_to_the_input_models_value():
    """Relu → Clip → Max: the final value still names the input model's value it replaces."""
    x = Var("x")
    zero = Const("zero", where=lambda a: a.size == 1 and float(a) == 0.0)

    def relu_to_clip(op, m):
        return op.Clip(m[x], op.const(np.array(0.0, np.float32)))

    def clip_to_max(op, m):
        return op.Max(m[x], op.const(np.array(0.0, np.float32)))

    rules = [Rule("relu_to_clip", op.Relu(x), relu_to_clip), Rule("clip_to_max", op.Clip(x, zero), clip_to_max)]
    proto = parse_model(IDENTITY_CHAIN)
    model = ir.from_onnx(proto)
    res = RewritePass(rules, "chain")(model)
    assert res.stats.counts == Counter({"relu_to_clip": 1, "clip_to_max": 1})
    mx = next(n for n in model.graph if n.op_type == "Max")
    assert mx.meta["graft.rule"] == "clip_to_max"
    assert mx.output.meta["graft.replaces"] == "c"
    assert_same_outputs(proto, ir.to_onnx(model))


def test_pass_base_requires_run():
    class Nothing(Pass):
        name = "nothing"

    with pytest.raises(NotImplementedError, match="must implement run"):
        Nothing()(ir.from_onnx(parse_model(IDENTITY_CHAIN)))
    assert repr(Nothing()) == "Nothing('nothing')"


def test_custom_pass_in_a_pipeline_is_timed_and_checked():
    class Renamer(Pass):
        name = "renamer"

        def run(self, model):
            model.graph.name = "renamed"
            return PassResult(model, True)

    class Broken(Pass):
        name = "broken"

        def run(self, model):
            return model

    model = ir.from_onnx(parse_model(IDENTITY_CHAIN))
    res = Pipeline("p", [Renamer(), Renamer()])(model)
    assert model.graph.name == "renamed" and res.modified
    assert [(p.name, p.kind) for p in res.stats.passes] == [("p/renamer", "custom"), ("p/renamer#2", "custom")]
    with pytest.raises(TypeError, match="not a PassResult"):
        Pipeline("p", [Broken()])(model)
