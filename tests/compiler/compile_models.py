"""Small models and rule files shared by test_passes / test_api / test_cli."""
from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnx.parser
from onnx import TensorProto, helper

from conftest import with_initializers

HEADER = '<ir_version: 10, opset_import: ["" : 17]>\n'


def conv_bn_model(seed: int = 0) -> onnx.ModelProto:
    """x[1,3,8,8] → Conv → BatchNormalization → Identity → Relu → Div(·, 2) → Mul(·, 3) → y.

    BN folding, Identity removal, and a Div and a Mul by constants for user rules to work on.
    """
    rng = np.random.default_rng(seed)
    text = HEADER + """
    g (float[1, 3, 8, 8] x) => (float[1, 4, 8, 8] y) {
        c = Conv <pads = [1, 1, 1, 1], kernel_shape = [3, 3]> (x, w, b)
        n = BatchNormalization (c, gamma, beta, mean, var)
        i = Identity (n)
        r = Relu (i)
        d = Div (r, two)
        y = Mul (d, three)
    }"""
    return with_initializers(
        onnx.parser.parse_model(text),
        w=rng.normal(size=(4, 3, 3, 3)).astype(np.float32), b=rng.normal(size=4).astype(np.float32),
        gamma=rng.uniform(0.5, 1.5, 4).astype(np.float32), beta=rng.normal(size=4).astype(np.float32),
        mean=rng.normal(size=4).astype(np.float32), var=rng.uniform(0.5, 2.0, 4).astype(np.float32),
        two=np.array(2.0, np.float32), three=np.array(3.0, np.float32))


def custom_domain_model() -> onnx.ModelProto:
    """x → Identity → my.domain::Scale → Relu → y: onnxruntime cannot run it, graft must keep the op."""
    text = """<ir_version: 10, opset_import: ["" : 17, "my.domain" : 1]>
    g (float[2, 4] x) => (float[2, 4] y) {
        i = Identity (x)
        s = my.domain.Scale <factor = 2.0> (i)
        y = Relu (s)
    }"""
    m = onnx.parser.parse_model(text)
    onnx.checker.check_model(m)
    return m


def cycle_model() -> onnx.ModelProto:
    """Two Relu nodes reading each other's output (not a DAG)."""
    a = helper.make_node("Relu", ["b_out"], ["a_out"], name="relu_a")
    b = helper.make_node("Relu", ["a_out"], ["b_out"], name="relu_b")
    g = helper.make_graph([a, b], "cyclic", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("b_out", TensorProto.FLOAT, [2])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def checker_failing_model() -> onnx.ModelProto:
    """A Conv node with one input: the schema wants 2..3."""
    n = helper.make_node("Conv", ["x"], ["y"], name="bad_conv")
    g = helper.make_graph([n], "bad", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 4, 4])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def save(proto: onnx.ModelProto, path: Path) -> Path:
    onnx.save_model(proto, str(path))
    return path


# --------------------------------------------------------------------------- user rule files
RULE_HEADER = "from graft.compiler import Const, Rule, Var, op\nimport numpy as np\n"

WRONG_DIV = """
x, c = Var("x"), Const("c")

def replacement(op, m):
    return op.Mul(m[x], op.const(m[c]))  # wrong on purpose: should multiply by 1/c

div_to_mul_wrong = Rule("div_to_mul_wrong", op.Div(x, c), replacement)
"""

DROP_MUL = """
x, c = Var("x"), Const("c")

def replacement(op, m):
    return m[x]  # wrong on purpose: drops Mul(x, c) whatever c is

drop_mul_wrong = Rule("drop_mul_wrong", op.Mul(x, c), replacement)
"""

RAISES_AT_IMPORT = """
x = Var("x")
scale = 1 / 0
"""

RAISES_IN_REWRITE = """
x = Var("x")

def replacement(op, m):
    raise ValueError("this rule is broken")

broken_relu = Rule("broken_relu", op.Relu(x), replacement)
"""

INVALID_GRAPH = """
x = Var("x")

def replacement(op, m):
    return op.Conv(m[x])  # Conv needs a weight: the result is not a valid model

relu_to_bad_conv = Rule("relu_to_bad_conv", op.Relu(x), replacement)
"""

BAD_DTYPE = """
x = Var("x")

def replacement(op, m):
    return op.Add(m[x], op.const(np.array(1, dtype=np.int64)))  # float + int64: fails type inference

relu_to_bad_add = Rule("relu_to_bad_add", op.Relu(x), replacement)
"""

REMOVE_MUL_ONE = """
x = Var("x")
one = Const("one", where=lambda a: bool(np.all(a == 1)))

def replacement(op, m):
    return m[x]

remove_mul_one = Rule("remove_mul_one", op.Mul(x, one), replacement)
RULES = [remove_mul_one]
"""


def rule_file(tmp_path: Path, body: str, name: str = "my_rules.py") -> Path:
    p = tmp_path / name
    p.write_text(RULE_HEADER + textwrap.dedent(body))
    return p
