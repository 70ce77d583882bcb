"""graft: a declarative graph-rewriting compiler for neural-network models.

The distribution installs one top-level package, ``graft``:

- ``graft.ir``: the IR (Model, Graph, Node, Value, Tensor), ONNX and torch in and out;
- ``graft.compiler``: the engine (pattern, match, rule, rewriter, passes), the
  compression techniques and the compile driver;
- ``graft.rules``: the built-in rules and the named pipelines.

Typical use::

    import graft
    from graft.compiler import compile, Rule, Var, op

    result = compile("model.onnx", pipeline="optimize")
    model = graft.ir.load("model.onnx")

``ARCHITECTURE.md`` in the source tree maps the layers.
"""
from importlib import import_module

__version__ = "0.1.0"


def __getattr__(name):
    # graft.ir / graft.compiler / graft.rules load on first use, so `import graft` stays cheap
    if name in ("ir", "compiler", "rules"):
        return import_module(f"graft.{name}")
    raise AttributeError(f"module 'graft' has no attribute {name!r}")


__all__ = ["ir", "compiler", "rules", "__version__"]
