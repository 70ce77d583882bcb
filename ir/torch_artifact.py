"""Files for the torch target that load without running code taken from the file.

:func:`save` writes a ``torch.fx.GraphModule`` from :func:`graft.ir.to_torch` in one of two formats:

``pt2``
    A ``torch.export`` ExportedProgram archive (``torch.export.save``): the graph as JSON in
    ATen ops, the weights as raw bytes, no pickled object (no example inputs either), graft's
    metadata in ``extra/graft.json``. It loads without graft: ``torch.export.load(path).module()``.
    Written when ``torch.export`` captures the module and the captured program reproduces it on
    the example inputs (max abs difference at most :data:`EXPORT_ATOL` times the output's
    magnitude). Values known before run time (a Reshape's constant shape) are inlined first
    (:func:`static_inputs`). Symbolic input dims stay dynamic when the graph computes no shape
    from them at run time; otherwise (``Shape`` → ``Reshape`` chains, as in most ONNX exports)
    those shapes are fixed at the example inputs' sizes and the program accepts those shapes only
    (:class:`SaveReport` and the metadata say which).
``graft-fx``
    When ``torch.export`` cannot capture the module (an op reads values that exist only at run
    time as Python numbers: a Reshape whose shape is a graph input, an ``If`` on a computed
    condition, a ``Resize`` reading its scales tensor) or no example inputs are given: graft's
    own data-only format (:mod:`graft.ir.torch_artifact_fx`: JSON graph + safetensors weights).
    It needs graft to load (the graph calls :mod:`graft.ir.torch_ops`).

:func:`load` reads either and never unpickles. A ``pt2`` archive is checked first
(:mod:`graft.ir.torch_artifact_pt2`: only the members ``torch.export.save`` writes, no pickled
weight, constant or example input, every node an allowed ATen op, symbolic expressions of symbols
and arithmetic only, every name an identifier) and only then handed to ``torch.export.load``,
which on its own unpickles some entries unrestricted and resolves node targets by walking
attributes of ``torch``. A ``graft-fx`` file's targets resolve only from an allowlist. Anything
else raises :class:`ArtifactError` naming the entry (node, target, member) before anything from
the file runs. Files written by earlier graft with ``torch.save`` are pickles: they load only
with ``trust=True``.

Both formats keep parameter and buffer names (``state_dict`` keys, less constants inlined into a
``pt2`` graph) and which tensors are trainable; the loaded module trains (``backward``, optimizer
steps). A module loaded from ``pt2`` does not support ``.train()``/``.eval()`` (``torch.export``
modules raise); it has no mode-dependent op (ONNX inference semantics: no dropout, BatchNorm on
running statistics).
"""
from __future__ import annotations

import contextlib
import inspect
import io
import json
import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import torch
import torch.fx

from graft.ir.torch_artifact_fx import (FX_ROOT, GRAFT_FX, ArtifactError, attach_names, first_line, graft_fx_bytes,
                                        read_graft_fx)
from graft.ir.torch_artifact_pt2 import check_pt2

PT2 = "pt2"
META_FILE = "graft.json"  # in a pt2 archive: extra/graft.json
EXPORT_ATOL = 1e-5        # captured program vs module, relative to max(1, |output|)
BATCH_SIZE = 2            # example size of a symbolic axis 0 (torch.export specializes a size of 1)
OTHER_SIZE = 32           # example size of other symbolic axes

__all__ = ["PT2", "GRAFT_FX", "ArtifactError", "ExampleInputs", "SaveReport", "example_inputs", "save", "load",
           "static_inputs"]


# --------------------------------------------------------------------------- example inputs
@dataclass
class ExampleInputs:
    """Inputs to capture a module with.

    Attributes:
        tensors: one tensor per ``forward`` argument, in order.
        dims: per argument, axis → dim name for the axes that are symbolic in the graph.
        names: the graph-input names (``graft_input_names``).
    """

    tensors: tuple
    dims: tuple[dict[int, str], ...]
    names: tuple[str, ...]


def example_inputs(model, names=None, shapes: dict[str, tuple] | None = None,
                   dim_sizes: dict[str, int] | None = None) -> ExampleInputs:
    """Example inputs for the graph inputs of IR ``model`` (non-initializer inputs, in order).

    Args:
        model: the IR model the module was built from.
        names: the graph inputs the module takes (``module.graft_input_names``); default all.
        shapes: input name → concrete shape to use (e.g. the shapes verification ran with).
        dim_sizes: size of a named symbolic dim; otherwise a symbolic axis 0 gets :data:`BATCH_SIZE`
            and other symbolic axes :data:`OTHER_SIZE`.

    Returns:
        :class:`ExampleInputs`: float inputs standard normal (seed 0), integer inputs zeros (a valid
        index for any gather), bool inputs False.

    Raises:
        ArtifactError: an input whose element type has no torch dtype.
    """
    from graft.ir.torch_aten import ONNX_TO_TORCH_DTYPE

    g = model.graph
    inits = set(g.initializers.values())
    values = [v for v in g.inputs if not (v.const is not None and v in inits)]
    if names is not None:
        by_name = {v.name: v for v in values}
        values = [by_name[n] for n in names]
    gen = torch.Generator().manual_seed(0)
    tensors, dims = [], []
    for v in values:
        given = (shapes or {}).get(v.name)
        sym = {i: (d if isinstance(d, str) else "?") for i, d in enumerate(v.shape or ()) if not isinstance(d, int)}
        if given is not None:
            shape = tuple(int(d) for d in given)
        else:
            shape = tuple(d if isinstance(d, int) else
                          (dim_sizes or {}).get(d, BATCH_SIZE if i == 0 else OTHER_SIZE) if isinstance(d, str) else
                          (BATCH_SIZE if i == 0 else OTHER_SIZE) for i, d in enumerate(v.shape or ()))
        name = ONNX_TO_TORCH_DTYPE.get(v.dtype)
        if name is None:
            raise ArtifactError(f"graph input {v.name!r} has element type {v.dtype.name}, which has no torch dtype")
        dtype = getattr(torch, name)
        if dtype.is_floating_point:
            t = torch.randn(shape, generator=gen).to(dtype)
        else:
            t = torch.zeros(shape, dtype=dtype)
        tensors.append(t)
        dims.append(sym)
    return ExampleInputs(tuple(tensors), tuple(dims), tuple(v.name for v in values))


# --------------------------------------------------------------------------- save
@dataclass
class SaveReport:
    """What :func:`save` wrote.

    Attributes:
        path: the file.
        format: :data:`PT2` or :data:`GRAFT_FX`.
        shapes: forward argument → the shape the program accepts (an int per axis, or the dim name
            for an axis that stayed dynamic); empty for ``graft-fx`` (any shape the graph allows).
        reason: why the file is ``graft-fx``, or why some symbolic dims were fixed; "" otherwise.
    """

    path: Path
    format: str
    shapes: dict[str, list] = field(default_factory=dict)
    reason: str = ""

    def note(self) -> str:
        """One line for a compile summary."""
        if self.format == GRAFT_FX:
            return (f"{self.path.name}: graft-fx format, which needs graft to load "
                    f"(graft.ir.torch_backend.load_module): {self.reason}")
        shapes = ", ".join(f"{k}{v}" for k, v in self.shapes.items())
        head = f"{self.path.name}: torch.export program (loads without graft: torch.export.load)"
        if self.reason:
            return f"{head} for input shapes {shapes} only: {self.reason}"
        return f"{head}, inputs {shapes}"


def save(module: torch.fx.GraphModule, path, example: ExampleInputs | tuple | None = None, *,
         format: str = "auto") -> SaveReport:
    """Write ``module`` (a GraphModule from :func:`graft.ir.to_torch`) to ``path`` atomically
    (temporary file in the same folder, then rename; nothing left on failure).

    Args:
        module: the GraphModule.
        path: the file to write (``.pt2`` by convention, for either format).
        example: :class:`ExampleInputs` (from :func:`example_inputs`), or a tuple of tensors (all
            dims then static). Needed for the ``pt2`` format; without it the file is ``graft-fx``.
        format: ``"auto"`` (``pt2`` when torch.export captures the module, else ``graft-fx``),
            ``"pt2"`` (fail instead of falling back) or ``"graft-fx"``.

    Returns:
        :class:`SaveReport`.

    Raises:
        ArtifactError: ``format="pt2"`` and torch.export cannot capture the module; a node the
            ``graft-fx`` format cannot name (its target is not a graft op, an ATen op, or an
            allowlisted torch / operator function); a bad ``format``.
        OSError: the file cannot be written.
    """
    if format not in ("auto", PT2, GRAFT_FX):
        raise ArtifactError(f"format must be 'auto', 'pt2' or 'graft-fx', got {format!r}")
    path = Path(path)
    if isinstance(example, (tuple, list)):
        example = ExampleInputs(tuple(example), tuple({} for _ in example),
                                tuple(getattr(module, "graft_input_names", ())) or
                                tuple(str(i) for i in range(len(example))))
    reason = ""
    if format != GRAFT_FX:
        if example is None:
            reason = "no example inputs were given to capture it with torch.export"
        else:
            got = _capture(module, example)
            if isinstance(got, tuple):
                ep, shapes, why = got
                meta = _metadata(module, PT2, shapes=shapes, note=why)
                meta["buffers"] = list(ep.graph_signature.buffers)  # less constants inlined into the graph
                _atomic_write(path, lambda f: _write_pt2(ep, f, meta))
                return SaveReport(path, PT2, shapes, why)
            reason = got
        if format == PT2:
            raise ArtifactError(f"{path}: cannot write a torch.export program: {reason}")
    blob = graft_fx_bytes(module, _metadata(module, GRAFT_FX, note=reason))
    _atomic_write(path, lambda f: f.write(blob))
    return SaveReport(path, GRAFT_FX, {}, reason or "format='graft-fx' was asked for")


def _atomic_write(path: Path, write: Callable) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp makes the file private; the result is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _metadata(module, kind: str, **extra) -> dict:
    import graft

    params = [n for n, _ in module.named_parameters()]
    buffers = [n for n, _ in module.named_buffers()]
    return {"format": kind, "version": 1, "graft_version": graft.__version__,
            "torch_version": torch.__version__,
            "graft_input_names": list(getattr(module, "graft_input_names", [])),
            "graft_output_names": list(getattr(module, "graft_output_names", [])),
            "graft_state_names": dict(getattr(module, "graft_state_names", {})),
            "parameters": params, "buffers": buffers, **extra}


# --------------------------------------------------------------------------- capture with torch.export
# ONNX inputs the torch_ops functions read as Python values (through ints()/item()): a constant there
# becomes a literal in the captured copy, since torch.export cannot read a buffer's values.
_STATIC_INPUTS = {"Reshape": ("shape",), "Expand": ("shape",), "Tile": ("repeats",), "Squeeze": ("axes",),
                  "Unsqueeze": ("axes",), "Split": ("split",), "Slice": ("starts", "ends", "axes", "steps"),
                  "ConstantOfShape": ("shape",), "Trilu": ("k",), "CumSum": ("axis",), "TopK": ("k",),
                  "OneHot": ("depth",), "Pad": ("pads", "axes")}
_LITERAL_LIMIT = 4096  # elements: static inputs are shapes, axes and pads


@lru_cache(maxsize=1)
def static_inputs() -> dict[Callable, frozenset[int]]:
    """torch_ops function → indices of its positional arguments that it reads as Python values
    (``ints()``/``item()``: shapes, axes, pads, ``k``), for every registered version of the ops in
    ``_STATIC_INPUTS`` and the ``Reduce*`` ops, plus the ``ints``/``item`` helpers themselves. Passing a
    Python list there means the same as passing the tensor (tests/ir/test_torch_artifact.py checks)."""
    from graft.ir import torch_ops

    wanted = dict(_STATIC_INPUTS)
    for op in torch_ops.supported_ops():
        if op.startswith("Reduce"):
            wanted[op] = ("axes",)
    out: dict[Callable, frozenset[int]] = {torch_ops.ints: frozenset({0}), torch_ops.item: frozenset({0})}
    for op, names in wanted.items():
        for fn in _versions(op):
            try:
                params = [p for p in inspect.signature(fn).parameters.values()
                          if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
            except (TypeError, ValueError):
                continue
            idx = frozenset(i for i, p in enumerate(params) if p.name in names)
            if idx:
                out[fn] = idx
    return out


def _versions(op: str) -> list[Callable]:
    """Every function registered for ONNX op ``op``, oldest first."""
    import onnx

    from graft.ir.torch_ops import lookup

    seen: list[Callable] = []
    for v in range(1, onnx.defs.onnx_opset_version() + 1):
        fn = lookup(op, v)
        if fn is not None and fn not in seen:
            seen.append(fn)
    return seen


_RANDOM_OPS = ("RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli",
               "Dropout")


@lru_cache(maxsize=1)
def _random_targets() -> frozenset:
    """graft's functions for ONNX ops that draw random numbers: never evaluated ahead of run time."""
    return frozenset(fn for op in _RANDOM_OPS for fn in _versions(op))


def _is_random(target) -> bool:
    if isinstance(target, torch._ops.OpOverload):
        return torch.Tag.nondeterministic_seeded in target.tags
    try:
        return target in _random_targets()
    except TypeError:  # an unhashable target
        return False


@lru_cache(maxsize=1)
def _shape_sources() -> frozenset:
    """Targets whose result depends only on their input's shape."""
    aten = torch.ops.aten
    return frozenset([*_versions("Shape"), *_versions("Size"), aten.sym_size.int, aten.sym_size.default,
                      aten.sym_numel.default, aten.sym_stride.int, aten.sym_storage_offset.default])


_CONST, _SHAPE, _VALUE = 0, 1, 2  # what a node's result depends on: constants, input shapes, input values


def _classify(gm: torch.fx.GraphModule) -> dict[torch.fx.Node, int]:
    params = {n for n, _ in gm.named_parameters()}
    sources = _shape_sources()
    kind: dict[torch.fx.Node, int] = {}
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            kind[n] = _VALUE
        elif n.op == "get_attr":
            kind[n] = _VALUE if n.target in params else _CONST  # parameters change as the module trains
        elif n.op == "call_function":
            k = max((kind[a] for a in n.all_input_nodes), default=_CONST)
            if _is_random(n.target):
                k = _VALUE  # a new value on every call
            elif n.target in sources:
                k = min(k, _SHAPE)
            kind[n] = k
        else:
            kind[n] = _VALUE
    return kind


def _literal(t):
    return t.item() if t.dim() == 0 else t.tolist()


_LITERAL_DTYPES = frozenset({torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
                             torch.float16, torch.bfloat16, torch.float32, torch.float64})


def _prepared(gm: torch.fx.GraphModule, example: ExampleInputs, with_shapes: bool):
    """A copy of ``gm`` (sharing its parameters) that torch.export can trace: values known before run
    time — computed from constants only, and, if ``with_shapes``, from input shapes — are inlined.

    torch.export traces with value-less tensors, so an op that reads a tensor's values as Python numbers
    (a Reshape's shape, a Range's limit) cannot be traced from a buffer or a Shape result. In the copy,
    such a value at a static input (:data:`_STATIC_INPUTS`) becomes a Python literal, and a one-element
    one becomes a ``torch.tensor`` literal (whose value torch.export's fake tensors track).

    Returns:
        (copy, number of static inputs computed from input shapes).
    """
    kind = _classify(gm)
    static = static_inputs()
    known = (_CONST, _SHAPE) if with_shapes else (_CONST,)
    at_static: dict[torch.fx.Node, list[int]] = {}
    shape_uses = 0
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target not in static:
            continue
        for i in static[n.target]:
            a = n.args[i] if i < len(n.args) else None
            if isinstance(a, torch.fx.Node):
                shape_uses += kind[a] == _SHAPE
                if kind[a] in known:
                    at_static.setdefault(n, []).append(i)
    def read_elsewhere(n: torch.fx.Node) -> bool:
        """``n`` feeds some argument other than a static input being inlined."""
        for u in n.users:
            if any(x is n for x in u.kwargs.values()):
                return True
            inlined = at_static.get(u, ())
            if any(a is n and i not in inlined for i, a in enumerate(u.args)):
                return True
            if any(isinstance(a, (list, tuple)) and any(x is n for x in a) for a in u.args):
                return True
        return False

    # one-element known values read elsewhere (Range limits, a Pad value): candidates for a tensor literal
    scalars = {n for n in gm.graph.nodes if n.op in ("call_function", "get_attr") and kind[n] in known
               and n.target not in _shape_sources() and read_elsewhere(n)}
    wanted = {n.args[i] for n, idx in at_static.items() for i in idx} | scalars
    values: dict[torch.fx.Node, Any] = {}
    if wanted:
        class _Grab(torch.fx.Interpreter):
            def run_node(self, node):
                out = super().run_node(node)
                if node in wanted:
                    values[node] = out
                return out

        with torch.no_grad():
            _Grab(gm).run(*example.tensors)
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for n in gm.graph.nodes:
        v = values.get(n)
        if n in scalars and isinstance(v, torch.Tensor) and v.numel() == 1 and v.dtype in _LITERAL_DTYPES:
            env[n] = graph.call_function(torch.tensor, (_literal(v),), {"dtype": v.dtype})
        elif n in at_static:
            args = list(n.args)
            for i in at_static[n]:
                v = values[args[i]]
                if isinstance(v, torch.Tensor) and v.numel() <= _LITERAL_LIMIT:
                    args[i] = _literal(v)
            env[n] = graph.create_node("call_function", n.target, torch.fx.map_arg(tuple(args), env.__getitem__),
                                       torch.fx.map_arg(n.kwargs, env.__getitem__), n.name)
        else:
            env[n] = graph.node_copy(n, env.__getitem__)
    graph.eliminate_dead_code()
    return torch.fx.GraphModule(gm, graph, class_name=type(gm).__name__), shape_uses


def _capture(gm: torch.fx.GraphModule, example: ExampleInputs):
    """(ExportedProgram, accepted shapes, note) or a one-line reason why torch.export cannot capture it."""
    names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    if len(names) != len(example.tensors):
        return f"the module takes {len(names)} input(s), {len(example.tensors)} example input(s) were given"
    try:
        ref = _seeded_run(gm, example)
    except Exception as e:  # noqa: BLE001 — reported as the reason, the module itself is unchanged
        return f"the module fails on the example inputs ({type(e).__name__}: {first_line(e)})"
    symbolic = any(example.dims)
    errors: list[str] = []
    # symbolic dims stay dynamic unless a shape is computed from them at run time; else fixed sizes
    for dynamic in ((True, False) if symbolic else (False,)):
        prepared, shape_uses = _prepared(gm, example, with_shapes=not dynamic)
        if dynamic and shape_uses:
            continue  # a static input computed from an input shape: only its captured value can be inlined
        why = ""
        if symbolic and not dynamic:
            why = ("the graph computes shapes from its inputs at run time (Shape → Reshape); the program keeps "
                   "the sizes it was captured with" if shape_uses else "torch.export could not keep the symbolic "
                   "dims")
        dyn = tuple({ax: torch.export.Dim.AUTO for ax in d} or None for d in example.dims) if dynamic else None
        try:
            # on failure torch.export prints the partial graph to stderr; the reason is reported instead
            with contextlib.redirect_stderr(io.StringIO()):
                ep = torch.export.export(prepared, tuple(example.tensors), dynamic_shapes=dyn, strict=False)
        except Exception as e:  # noqa: BLE001 — any capture failure means: not this way
            msg = f"{type(e).__name__}: {first_line(e)}"
            if msg not in errors:
                errors.append(msg)
            continue
        bad = _disagreement(ep, example, ref)
        if bad:
            errors.append(bad)
            continue
        ep.example_inputs = None  # torch.export.save would pickle them
        shapes = _accepted_shapes(ep, example)
        fixed = [f"{n}[{ax}]" for n, d in zip(example.names, example.dims) for ax in d
                 if isinstance(shapes[n][ax], int)]
        if dynamic and fixed:
            why = f"torch.export fixed the size of {', '.join(fixed)}: the graph needs that size"
        return ep, shapes, why
    return "torch.export cannot capture it (" + "; ".join(errors) + ")"


def _seeded_run(module, example: ExampleInputs):
    """``module`` on the example inputs with the RNG seeded (random ops draw the same numbers in the module
    and the captured program), leaving the caller's RNG state as it was."""
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(0)
        return module(*example.tensors)


def _disagreement(ep, example: ExampleInputs, ref) -> str:
    got = _seeded_run(ep.module(), example)
    refs = ref if isinstance(ref, (tuple, list)) else (ref,)
    gots = got if isinstance(got, (tuple, list)) else (got,)
    if len(refs) != len(gots):
        return f"the captured program returns {len(gots)} output(s), the module {len(refs)}"
    for i, (a, b) in enumerate(zip(refs, gots)):
        if a.shape != b.shape or a.dtype != b.dtype:
            return f"output {i}: captured {tuple(b.shape)} {b.dtype}, module {tuple(a.shape)} {a.dtype}"
        if a.numel() and (a.dtype.is_floating_point or a.dtype.is_complex):
            scale = max(1.0, float(a.abs().max()))
            diff = float((a.to(torch.float64) - b.to(torch.float64)).abs().max())
            if not diff <= EXPORT_ATOL * scale:
                return f"output {i}: the captured program differs from the module by {diff:.3g}"
        elif not torch.equal(a, b):
            return f"output {i}: the captured program differs from the module"
    return ""


def _accepted_shapes(ep, example: ExampleInputs) -> dict[str, list]:
    """Graph input name → the shape the program takes: ints, and the dim name where it stayed dynamic."""
    vals = {n.name: n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder"}
    out = {}
    for name, arg, dims, t in zip(example.names, ep.graph_signature.user_inputs, example.dims, example.tensors):
        v = vals.get(arg)
        out[name] = [dims.get(ax, "?") if isinstance(d, torch.SymInt) else int(d)
                     for ax, d in enumerate(v.shape if v is not None else t.shape)]
    return out


def _write_pt2(ep, f, meta: dict) -> None:
    torch.export.save(ep, f, extra_files={META_FILE: json.dumps(meta)})


# --------------------------------------------------------------------------- load
def load(path, *, trust: bool = False) -> torch.nn.Module:
    """Read a module written by :func:`save` without running code from the file.

    Args:
        path: a ``pt2`` or ``graft-fx`` file (a ``torch.export.save`` archive from elsewhere is
            checked the same way).
        trust: also load files that can run code when read: the ``torch.save`` pickles earlier
            graft wrote, or any archive torch's own loaders read. Only for files you trust.

    Returns:
        a ``torch.fx.GraphModule``: ``forward(*inputs)`` in graph-input order; attributes
        ``graft_input_names``, ``graft_output_names`` and ``graft_state_names`` when the file holds them.

    Raises:
        ArtifactError: a file the checks refuse (named entry), a pickle without ``trust=True``, or
            not a torch artifact at all.
        OSError: the file cannot be read.
    """
    path = Path(path)
    data = path.read_bytes()  # read once: what is checked is what is loaded
    where = str(path)
    if data[:2] == b"PK":
        try:
            z = zipfile.ZipFile(io.BytesIO(data))
            names = z.namelist()
        except zipfile.BadZipFile as e:
            raise ArtifactError(f"{where}: corrupt zip archive ({e})") from None
        if f"{FX_ROOT}/module.json" in names:
            return read_graft_fx(z, where)
        if any(n.endswith("/archive_format") for n in names):
            if not trust:
                check_pt2(z, where)
            try:
                module = torch.export.load(io.BytesIO(data)).module()
            except Exception as e:  # noqa: BLE001 — torch's own refusals of a malformed program, on one line
                raise ArtifactError(f"{where}: torch.export.load cannot read it ({type(e).__name__}: "
                                    f"{first_line(e)})") from None
            attach_names(module, _pt2_meta(z))
            return module
        if any(n.endswith("/data.pkl") for n in names):
            return _legacy(data, where, trust)
        raise ArtifactError(f"{where}: a zip archive that is neither a torch.export program nor a graft-fx module")
    if data[:1] == b"\x80":
        return _legacy(data, where, trust)
    raise ArtifactError(f"{where}: not a torch artifact graft writes (expected a .pt2 from graft compile "
                        f"--target torch)")


def _pt2_meta(z: zipfile.ZipFile) -> dict:
    """graft's metadata in a pt2 archive (``extra/graft.json``), or {}."""
    member = next((n for n in z.namelist() if n.endswith(f"/extra/{META_FILE}")), None)
    try:
        meta = json.loads(z.read(member)) if member else {}
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


def _legacy(data: bytes, where: str, trust: bool):
    if not trust:
        raise ArtifactError(f"{where}: a pickle (torch.save, as earlier graft wrote --target torch); loading it "
                            f"can run code stored in it. If you trust the file: load_module(path, trust=True), then "
                            f"save_module it again to get a file that loads safely")
    return torch.load(io.BytesIO(data), weights_only=False)
