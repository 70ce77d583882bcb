"""graft IR: the model representation every frontend lowers into and every rule rewrites.

Public API:
    Model, Graph, Node, Value, Tensor, DataType — the IR objects.
    load(path), save(model, path), from_onnx(proto), to_onnx(model) — ONNX in and out.
    verify(model) — structural checks (topological order, dangling values, arity).
    print_graph(graph) — stable one-line-per-node text.
    to_networkx(graph) — a networkx.MultiDiGraph view.
    outer_scope_values(graph) — what a subgraph reads from the graphs around it.
    gc_paused() — a context manager pausing the cyclic GC around bulk IR work (import, rewrite).
    from_torch / to_torch — torch frontend/backend (imported lazily; need torch).
"""
from graft.ir._core import Graph, IRError, Model, Node, Tensor, Value, outer_scope_values
from graft.ir._gc import gc_paused
from graft.ir.dtypes import DataType
from graft.ir.onnx_io import ModelLoadError, from_onnx, load, save, to_onnx


def __getattr__(name):
    # torch is heavy: only pull it in when a torch path is used.
    if name == "from_torch":
        from graft.ir.torch_frontend import from_torch
        return from_torch
    if name == "to_torch":
        from graft.ir.torch_backend import to_torch
        return to_torch
    if name in ("verify", "VerifyError"):
        import graft.ir.verifier as _v
        return getattr(_v, name)
    if name == "print_graph":
        from graft.ir.printer import print_graph
        return print_graph
    if name == "to_networkx":
        from graft.ir.nx_view import to_networkx
        return to_networkx
    raise AttributeError(f"module 'graft.ir' has no attribute {name!r}")


__all__ = ["Graph", "IRError", "Model", "Node", "Tensor", "Value", "DataType", "ModelLoadError",
           "from_onnx", "load", "save", "to_onnx", "from_torch", "to_torch", "verify", "VerifyError",
           "print_graph", "to_networkx", "outer_scope_values", "gc_paused"]
