"""The torch frontend: ``ir.from_torch(module, example_inputs)`` → :class:`ir.Model`.

The model is captured with ``torch.export`` (non-strict by default) as an ATen
graph and translated by :mod:`graft.ir.torch_import`: each ATen call becomes a node in
the ``aten`` domain named by its overload (``"linear.default"``), parameters and
buffers become initializers under their fully qualified names, and every node
keeps the user's module path in ``node.meta["torch.module"]``. Lowering the ATen
ops to ONNX ops is a separate rule set (``rules/lower_aten_*.py``, pipeline
``lower_aten``).

When capture fails, the error says what failed and what to try: example inputs
that do not fit ``forward`` or a layer (named, with the shape the layer
expects), or a construct ``torch.export`` cannot trace (data-dependent control
flow, a dynamic dim the code specializes), with its source line.
"""
from __future__ import annotations

import contextlib
import inspect
import io
import linecache
import logging
import os
import sys
import traceback
from typing import Any

import torch

from graft.ir._core import Model
from graft.ir.torch_import import TorchImportError, import_program


class TorchCaptureError(ValueError):
    """``torch.export`` could not capture the model; the message names the construct and what to try."""


class ExampleInputError(TorchCaptureError):
    """The example inputs do not fit the model (names the input and the shape it expected)."""


def from_torch(module, example_inputs=None, dynamic_shapes=None, *, example_kwargs: dict | None = None,
               strict: bool = False, decompose: bool = False) -> Model:
    """Capture a torch model into graft's IR.

    Args:
        module: a ``torch.nn.Module``, a ``torch.fx.GraphModule`` (e.g. from
            ``torch.fx.symbolic_trace``) or a ``torch.export.ExportedProgram``.
            A module is captured in eval mode (dropout off, BatchNorm on running
            statistics); its training flag is restored afterwards.
        example_inputs: positional inputs: a tensor, a tuple of tensors, or a dict
            of keyword inputs. Their shapes are the ones captured; not needed for
            an ExportedProgram.
        dynamic_shapes: as ``torch.export.export`` takes it, e.g.
            ``{"input_ids": {0: Dim("batch"), 1: Dim("seq")}}``; the Dim names
            become the IR's symbolic dim names.
        example_kwargs: keyword inputs besides ``example_inputs``.
        strict: capture with TorchDynamo (``strict=True``) instead of Python tracing.
        decompose: run torch's core-ATen decompositions first (``convolution``,
            ``addmm``, ``native_layer_norm``... instead of ``conv2d``, ``linear``,
            ``layer_norm``).

    Returns:
        an :class:`ir.Model` whose op nodes are in the ``aten`` domain (ONNX opset
        18 is imported for the few shape ops the frontend writes), inputs named as
        ``forward``'s parameters, outputs named by the output structure
        (``last_hidden_state``; ``output`` or ``output_<i>`` for tuples).

    Raises:
        ExampleInputError: the inputs do not fit ``forward`` or a layer.
        TorchCaptureError: ``torch.export`` failed (message: the construct, where, what to try).
        TorchImportError: the captured graph holds something graft cannot represent
            (control flow, buffer updates).
    """
    if isinstance(module, torch.export.ExportedProgram):
        ep = module
        dim_names: dict[str, str] = {}
    else:
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"from_torch needs a torch.nn.Module, torch.fx.GraphModule or ExportedProgram, "
                            f"got {type(module).__name__}")
        args, kwargs = _normalize_inputs(module, example_inputs, example_kwargs)
        _check_signature(module, args, kwargs)
        _check_dynamic_shapes(module, args, kwargs, dynamic_shapes)
        with eval_mode(module):
            ep = _export(module, args, kwargs, dynamic_shapes, strict)
        dim_names = _dim_names(ep, args, kwargs, dynamic_shapes, module)
    if decompose:
        ep = ep.run_decompositions()
    elif _has_mutation(ep):
        # in-place ops (`x += y`, ReLU(inplace=True), buffer updates): functionalize, keeping every op
        ep = ep.run_decompositions({})
    model = import_program(ep, dim_names)
    if not isinstance(module, torch.export.ExportedProgram):
        model.graph.name = type(module).__name__
        # torch.export traces with fake tensors, whose kernels skip some checks (a float Linear fed
        # int64 captures fine); one eager run catches inputs the model cannot actually take
        with eval_mode(module):
            failure = _eager_failure(module, args, kwargs)
        if failure is not None:
            raise failure
    return model


@contextlib.contextmanager
def eval_mode(module):
    """Put ``module`` and every submodule in eval mode; restore each one's own training flag after
    (``module.train(flag)`` would set every submodule to the top-level flag)."""
    flags = [(m, m.training) for m in module.modules()]
    for m, _ in flags:  # not module.eval(): an ExportedProgram's module() refuses it
        m.training = False
    try:
        yield module
    finally:
        for m, flag in flags:
            m.training = flag


def _has_mutation(ep) -> bool:
    return any(n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) and
               n.target._schema.is_mutable for n in ep.graph.nodes)


# --------------------------------------------------------------------------- inputs
def _normalize_inputs(module, example_inputs, example_kwargs) -> tuple[tuple, dict]:
    kwargs = dict(example_kwargs or {})
    if example_inputs is None:
        args: tuple = ()
    elif isinstance(example_inputs, dict):
        args, kwargs = (), {**example_inputs, **kwargs}
    elif isinstance(example_inputs, torch.Tensor):
        args = (example_inputs,)
    elif isinstance(example_inputs, (list, tuple)):
        args = tuple(example_inputs)
    else:
        raise ExampleInputError(f"example_inputs must be a tensor, a tuple of tensors or a dict of keyword "
                                f"inputs, got {type(example_inputs).__name__}")
    if not args and not kwargs and _required_params(module):
        raise ExampleInputError(f"{type(module).__name__}.forward needs inputs "
                                f"({', '.join(_required_params(module))}); pass example_inputs")
    return args, kwargs


def _required_params(module) -> list[str]:
    try:
        sig = inspect.signature(module.forward)
    except (TypeError, ValueError):
        return []
    return [p.name for p in sig.parameters.values()
            if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _check_signature(module, args, kwargs) -> None:
    try:
        sig = inspect.signature(module.forward)
    except (TypeError, ValueError):
        return
    try:
        sig.bind(*args, **kwargs)
    except TypeError as e:
        raise ExampleInputError(f"example inputs do not fit {type(module).__name__}.forward{sig}: {e}. "
                                f"Got {len(args)} positional input(s) ({_shapes(args)}) and keyword "
                                f"input(s) {sorted(kwargs) or 'none'}") from None


def _shapes(args) -> str:
    return ", ".join(_describe(a) for a in args) or "none"


def _describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"{'x'.join(str(d) for d in t.shape) or 'scalar'} {str(t.dtype).removeprefix('torch.')}"
    return type(t).__name__


def _input_names(module, args, kwargs) -> dict[int, str]:
    """id(example tensor) → the forward parameter it binds to."""
    names = {}
    try:
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
        for k, v in bound.arguments.items():
            names[id(v)] = k
    except (TypeError, ValueError):
        for i, a in enumerate(args):
            names[id(a)] = f"input {i}"
    for k, v in kwargs.items():
        names.setdefault(id(v), k)
    return names


def _check_dynamic_shapes(module, args, kwargs, dynamic_shapes) -> None:
    """Catch the ``dynamic_shapes`` mistakes whose torch errors do not say which input they mean:
    a key that is not an input, and an example size outside a ``Dim``'s range or of 0/1 (which
    torch.export specializes to a constant)."""
    if not dynamic_shapes:
        return
    try:
        sig = inspect.signature(module.forward)
        bound = sig.bind(*args, **kwargs).arguments
    except (TypeError, ValueError):
        return
    names = list(bound)
    if isinstance(dynamic_shapes, dict):
        odd = [k for k in dynamic_shapes if k not in bound]
        if odd:
            raise ExampleInputError(
                f"dynamic_shapes names {', '.join(repr(k) for k in odd)}, not among the example inputs given to "
                f"{type(module).__name__}.forward ({', '.join(names) or 'none'}); key dynamic_shapes by those "
                f"names, or give a tuple with one entry per positional input")
        specs = dict(dynamic_shapes)
    elif isinstance(dynamic_shapes, (list, tuple)):
        specs = dict(zip(names, dynamic_shapes))
    else:
        return
    from torch.export.dynamic_shapes import Dim

    for name, spec in specs.items():
        t = bound.get(name)
        if not isinstance(t, torch.Tensor) or not isinstance(spec, (dict, list, tuple)):
            continue
        items = spec.items() if isinstance(spec, dict) else enumerate(spec)
        for axis, dim in items:
            if type(dim) is not Dim or not isinstance(axis, int) or not -t.dim() <= axis < t.dim():
                continue  # derived dims and Dim.AUTO/DYNAMIC hints: torch checks them
            size = t.shape[axis]
            lo, hi = int(dim.min), dim.max
            hi_txt = "inf" if not isinstance(hi, int) or hi >= 2**62 else str(int(hi))
            if size < 2:
                raise ExampleInputError(
                    f"example input {name!r} has size {size} at dim {axis}, marked dynamic as Dim "
                    f"{dim.__name__!r}: torch.export treats sizes 0 and 1 as constants (0/1 specialization), "
                    f"so give an example of size >= 2 there")
            if size < lo or (hi_txt != "inf" and size > int(hi)):
                raise ExampleInputError(
                    f"example input {name!r} has size {size} at dim {axis}, outside the range [{lo}, {hi_txt}] "
                    f"of Dim {dim.__name__!r}; give an example inside the range or widen the Dim")


def _dim_names(ep, args, kwargs, dynamic_shapes, module) -> dict[str, str]:
    """Symbol (``s43``) → ``Dim`` name given in ``dynamic_shapes`` (matched through the input placeholders)."""
    if not dynamic_shapes:
        return {}
    per_input: dict[str, Any] = {}
    params = list(inspect.signature(module.forward).parameters)
    if isinstance(dynamic_shapes, dict):
        per_input = dict(dynamic_shapes)
    else:
        per_input = {params[i] if i < len(params) else f"arg{i}": s for i, s in enumerate(dynamic_shapes)}
    out = {}
    user = [n for n in ep.graph.nodes if n.op == "placeholder" and n.name in per_input]
    for n in user:
        spec = per_input[n.name]
        val = n.meta.get("val")
        if spec is None or not hasattr(val, "shape"):
            continue
        items = spec.items() if isinstance(spec, dict) else enumerate(spec)
        for axis, dim in items:
            name = getattr(dim, "__name__", None)
            if name is None or axis >= len(val.shape):
                continue
            d = val.shape[axis]
            if isinstance(d, torch.SymInt) and not getattr(d.node.expr, "is_number", True):
                out.setdefault(str(d.node.expr), name)
    return out


# --------------------------------------------------------------------------- capture
def _export(module, args, kwargs, dynamic_shapes, strict):
    try:
        with _quiet_torch_logs():
            return torch.export.export(module, args, kwargs, dynamic_shapes=dynamic_shapes, strict=strict)
    except Exception as e:  # torch raises many types here; each is diagnosed below
        err = e
    located = _eager_failure(module, args, kwargs)
    if located is not None:
        raise located from err
    raise _capture_error(module, err, strict, dynamic_shapes) from err


@contextlib.contextmanager
def _quiet_torch_logs():
    """torch.export logs the partial graph and guard details on failure; graft's error says what matters."""
    loggers = [logging.getLogger(n) for n in list(logging.root.manager.loggerDict)
               if n == "torch" or n.startswith("torch.")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    buf = io.StringIO()
    try:
        with contextlib.redirect_stderr(buf):  # torch prints the partial graph of a failed export there
            yield
    except BaseException:
        raise
    else:
        sys.stderr.write(buf.getvalue())  # a successful capture keeps its warnings
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)


def _eager_failure(module, args, kwargs) -> ExampleInputError | None:
    """Run the module eagerly with module hooks; if it fails too, blame the layer and the input."""
    stack: list[tuple[str, Any, tuple]] = []
    names = {m: n for n, m in module.named_modules()}

    def pre(mod, inputs):
        stack.append((names.get(mod, "?"), mod, inputs))

    def post(mod, inputs, output):
        if stack:
            stack.pop()

    handles = []
    for m in names:
        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post))
    try:
        with torch.no_grad():
            module(*args, **kwargs)
        return None
    except Exception as e:
        if not stack:
            given = ", ".join(p for p in (_shapes(args) if args else "", _kw_shapes(kwargs)) if p)
            return ExampleInputError(f"{type(module).__name__} fails on the example inputs ({given}). "
                                     f"torch says: {_first_line(e)}")
        path, mod, inputs = stack[-1]
        if mod is module:
            unknown = _unknown_keywords(module, kwargs)
            hint = f"; {unknown}" if unknown else ""
            given = ", ".join(p for p in (_shapes(args) if args else "", _kw_shapes(kwargs)) if p)
            return ExampleInputError(f"{type(module).__name__} fails on the example inputs ({given}){hint}. "
                                     f"torch says: {_first_line(e)}")
        tensor = next((t for t in inputs if isinstance(t, torch.Tensor)), None)
        in_names = _input_names(module, args, kwargs)
        who = in_names.get(id(tensor))
        got = _describe(tensor) if tensor is not None else "no tensor"
        subject = f"example input {who!r} ({got})" if who else f"its input ({got}, computed from the example inputs)"
        expected = _expected(mod)
        exp = f"; it expects {expected}" if expected else ""
        where = f"module '{path}'" if path else "the top-level module"
        return ExampleInputError(f"{where} ({type(mod).__name__}) rejects {subject}{exp}. "
                                 f"torch says: {_first_line(e)}")
    finally:
        for h in handles:
            h.remove()
        stack.clear()


def _unknown_keywords(module, kwargs) -> str:
    """Keyword inputs that ``forward`` takes only through ``**kwargs`` (likely misspelled)."""
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return ""
    named = [p.name for p in params.values() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    odd = [k for k in kwargs if k not in named]
    if not odd:
        return ""
    return f"input(s) {', '.join(repr(k) for k in odd)} are not parameters of forward (it names: {', '.join(named)})"


def _kw_shapes(kwargs) -> str:
    return ", ".join(f"{k}={_describe(v)}" for k, v in kwargs.items())


def _expected(mod) -> str:
    """The input a standard layer expects, in the layer's own numbers."""
    nn = torch.nn
    if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                        nn.ConvTranspose3d)):
        spatial = {1: "L", 2: "H, W", 3: "D, H, W"}.get(len(mod.kernel_size), "...")
        return f"shape [N, {mod.in_channels}, {spatial}] (float)"
    if isinstance(mod, nn.Linear):
        return f"shape [..., {mod.in_features}] (float)"
    if isinstance(mod, nn.Embedding):
        return f"integer indices in [0, {mod.num_embeddings}) (int64), any shape"
    if isinstance(mod, nn.LayerNorm):
        return f"shape [..., {', '.join(str(d) for d in mod.normalized_shape)}]"
    if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm)):
        c = getattr(mod, "num_features", getattr(mod, "num_channels", "?"))
        return f"shape [N, {c}, ...]"
    return ""


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


_INTERNAL = (os.sep + "torch" + os.sep, os.sep + "transformers" + os.sep + "utils",
             os.path.dirname(os.path.abspath(__file__)) + os.sep,  # graft's ir package itself
             "<frozen", os.sep + "contextlib.py", os.sep + "functools.py")


def _user_frame(e: BaseException) -> str | None:
    """``file:line: source`` of the deepest frame outside torch (where the construct is)."""
    frames = traceback.extract_tb(e.__traceback__)
    cause = e.__cause__ or e.__context__
    while cause is not None:
        frames += traceback.extract_tb(cause.__traceback__)
        cause = cause.__cause__ or cause.__context__
    best = None
    for f in frames:
        if not any(s in f.filename for s in _INTERNAL):
            best = f
    # Dynamo (strict) reports user code in the message text instead.
    import re

    hits = re.findall(r'File "([^"]+)", line (\d+)', str(e))
    hits = [h for h in hits if not any(s in h[0] for s in _INTERNAL)]
    if hits:
        fn, ln = hits[-1]
        return f"{fn}:{ln}: {linecache.getline(fn, int(ln)).strip()}"
    if best is None:
        return None
    return f"{best.filename}:{best.lineno}: {(best.line or '').strip()}"


def _capture_error(module, e: BaseException, strict: bool, dynamic_shapes) -> TorchCaptureError:
    msg = str(e)
    low = msg.lower()
    if "data-dependent" in low or "data dependent" in low or "guardondatadependent" in type(e).__name__.lower():
        what = "data-dependent control flow or shape (a Python branch or size that depends on tensor values)"
        tries = ["replace the branch with torch.where / torch.cond, or move .item()/.tolist() out of forward",
                 "if the value only matters for the example, make it a constructor argument"]
    elif "uninitialized parameter" in low or "lazymodule" in low:
        what = "a lazy module (nn.LazyLinear, nn.LazyConv2d...) whose parameters do not exist yet"
        tries = ["run the model once on an example input before capturing it (lazy modules create their "
                 "parameters on the first call)"]
    elif ".numpy()" in low or "tensor subclass" in low or "data pointer" in low or "data_ptr" in low:
        what = "code that needs real tensor data (.numpy(), numpy/Python math on tensor values, data pointers)"
        tries = ["compute it with torch ops inside forward, or move it before/after the compiled module"]
    elif "constraint" in low or "specializ" in low or "dynamic_shapes" in low or "dim" in low and "range" in low:
        detail = [ln.strip(" -") for ln in msg.splitlines()[1:] if ln.strip().startswith("- ")]
        what = "a dynamic dim that the code specializes or constrains" + \
            (f" ({detail[0].split('. If you')[0]})" if detail else "")
        tries = ["relax dynamic_shapes (drop the dim, give Dim(min=..., max=...), or use Dim.AUTO)",
                 "or export with static shapes (dynamic_shapes=None)"]
    else:
        what = f"{type(e).__name__}"
        tries = []
    if strict:
        tries.append("capture with strict=False (Python tracing instead of TorchDynamo)")
    elif dynamic_shapes is None:
        tries.append("if a dim must vary, pass dynamic_shapes; if tracing fails, try strict=True")
    else:
        tries.append("try strict=True or different dynamic_shapes")
    where = _user_frame(e)
    loc = f"\n  at {where}" if where else ""
    return TorchCaptureError(f"torch.export could not capture {type(module).__name__}: {what}{loc}\n"
                             f"  torch says: {_first_line(e)}\n  what to try: " + "; ".join(tries))


__all__ = ["from_torch", "TorchCaptureError", "ExampleInputError", "TorchImportError"]
