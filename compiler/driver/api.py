"""``compiler.compile``: load → pipeline → check → numeric verification → result.

::

    from graft.compiler import compile
    res = compile("model.onnx", pipeline="optimize")   # or a zoo name, a ModelProto, an ir.Model
    print(res.report())
    res.save("model.opt.onnx")                         # atomic

A compile that produces an invalid model raises :class:`InvalidOutputError`
naming the rule(s) whose nodes are involved; one whose outputs drift beyond
``atol`` raises :class:`NumericMismatchError` naming the first rule whose value
diverges (see :mod:`graft.compiler.driver.blame`). Both carry the partial result.
"""
from __future__ import annotations

import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from graft import ir
from graft.ir import gc_paused
from graft.compiler.driver.blame import Blame, rules_failing_checker, rules_in_message
from graft.compiler.techniques.numeric import OutputAgreement
from graft.compiler.engine.passes import PassRecord, Pipeline
from graft.compiler.engine.rewriter import StopReason
from graft.compiler.driver.verification import (OutputDoesNotRun, UnloweredOps, Verification, check_dim_sizes,
                                   default_dim_sizes, one_line, symbolic_dims, verify_onnx, verify_torch)

__all__ = ["CompileError", "CompileResult", "InvalidOutputError", "ModelStats", "NumericMismatchError", "Verification",
           "compile", "default_dim_sizes", "model_stats", "unknown_dims"]


class CompileError(Exception):
    """A compile that cannot produce a trustworthy result. ``.result`` holds what was computed."""

    def __init__(self, message: str, result: "CompileResult | None" = None):
        super().__init__(message)
        self.result = result


class InvalidOutputError(CompileError):
    """The pipeline produced a model that fails ``ir.verify`` / ``onnx.checker`` / onnxruntime.

    Attributes:
        rules: [(rule, node name)] implicated by provenance.
    """

    def __init__(self, message: str, result=None, rules=()):
        super().__init__(message, result)
        self.rules = list(rules)


class NumericMismatchError(CompileError):
    """An output differs from the input model's beyond tolerance. ``.blame`` names the rule."""

    def __init__(self, message: str, result=None, blame: Blame | None = None):
        super().__init__(message, result)
        self.blame = blame


@dataclass
class ModelStats:
    """Size of a model: nodes (subgraphs included), parameters (elements) and bytes of constant data.

    Constant data is initializers plus ``Constant``-node tensors, so turning Constant nodes
    into initializers does not count as growth.
    """

    nodes: int
    parameters: int
    bytes: int


def model_stats(model: ir.Model) -> ModelStats:
    nodes = params = nbytes = 0
    for g in model.all_graphs():
        nodes += len(g)
        for v in g.initializers.values():
            params += v.const.size
            nbytes += v.const.nbytes
        for n in g:
            t = n.attrs.get("value") if n.op_type == "Constant" and n.domain == "" else None
            if isinstance(t, ir.Tensor):
                params += t.size
                nbytes += t.nbytes
    return ModelStats(nodes, params, nbytes)


@dataclass
class CompileResult:
    """What :func:`compile` produced.

    Attributes:
        model: the compiled IR model.
        proto: the output ``onnx.ModelProto`` (target ``onnx``), checker-valid.
        module: the ``torch.fx.GraphModule`` (target ``torch``).
        source: where the model came from (path, zoo name, or a type name).
        pipeline: the pipeline that ran.
        counts: rule → rewrites, summed over passes.
        stop_reasons: rewrite pass → :class:`StopReason`.
        passes: per-pass records (time, changes).
        before, after: :class:`ModelStats`.
        verification: :class:`Verification`.
        timings: phase → seconds (load, pipeline, check, verify, total).
    """

    model: ir.Model
    proto: onnx.ModelProto | None
    module: Any
    target: str
    source: str
    pipeline: str
    counts: Counter
    stop_reasons: dict[str, StopReason]
    passes: list[PassRecord]
    before: ModelStats
    after: ModelStats
    verification: Verification
    timings: dict[str, float]
    notes: list[str] = field(default_factory=list)
    prune: Any = None  # graft.compiler.techniques.pruning.PruneReport when compiled with prune=...
    quantization: Any = None  # graft.compiler.techniques.quantization.QuantizeResult when compiled with quantize=...
    precision: Any = None  # graft.compiler.techniques.precision.PrecisionResult when compiled with precision=...
    staged: Any = None  # graft.compiler.driver.streaming.StagedOutput: a streamed compile's output, written once

    @property
    def outputs(self) -> list[OutputAgreement]:
        return self.verification.outputs

    @property
    def ok(self) -> bool:
        return self.verification.status != "failed"

    def save(self, path: str | os.PathLike):
        """Write the output atomically (temporary file, then rename; nothing left on failure).

        A ``torch`` target is written as data only (:mod:`graft.ir.torch_artifact`): a ``torch.export``
        program (``torch.export.load(path).module()``, no graft needed) when torch.export captures the
        module on inputs shaped as verification ran (or generated), else graft's ``graft-fx`` format;
        load either with ``graft.ir.torch_backend.load_module``. Which one, and the input shapes it
        accepts, is added to :attr:`notes`.

        Returns:
            the :class:`graft.ir.torch_artifact.SaveReport` for a ``torch`` target, else None.

        Raises:
            CompileError: there is no output to save, or ``path`` is the input model's file.
            graft.ir.torch_artifact.ArtifactError: the module holds a node no artifact format can name.
        """
        if os.path.exists(path) and os.path.exists(self.source) and os.path.samefile(path, self.source):
            raise CompileError(f"{path}: is the input model this result was compiled from; save to another path "
                               f"(the input is left as it is)")
        if self.module is not None and self.proto is None:
            from graft.ir.torch_artifact import example_inputs, save

            example = example_inputs(self.model, getattr(self.module, "graft_input_names", None),
                                     self.verification.inputs or None)
            report = save(self.module, path, example)
            if report.note() not in self.notes:
                self.notes.append(report.note())
            return report
        if self.proto is None:
            raise CompileError(f"{path}: this compile targeted {self.target!r}; only an ONNX result can be "
                               f"saved as .onnx (use target='onnx')")
        from graft.ir.onnx_io import save_proto

        save_proto(self.proto, path)

    def _save_as_checked(self, path: str | os.PathLike) -> None:
        """:meth:`save`, writing the serialization :func:`compile` made of :attr:`proto` for
        ``onnx.checker`` instead of serializing again. For ``graft compile``, which never edits
        the proto in between (an edit made after compile would not be written)."""
        checked = getattr(self, "_checked", None)
        if self.module is None and checked is not None and checked[0] is self.proto and checked[1] is not None:
            from graft.ir.onnx_io import save_proto

            save_proto(self.proto, path, data=checked[1])
        else:
            self.save(path)

    def report(self, width: int = 100) -> str:
        """The short rich-rendered summary (see :mod:`graft.compiler.driver.report`)."""
        from graft.compiler.driver.report import render_text

        return render_text(self, width=width)


# --------------------------------------------------------------------------- loading
def _is_torch_module(obj) -> bool:
    torch = sys.modules.get("torch")  # a torch module cannot exist unless torch is imported
    return torch is not None and (isinstance(obj, torch.nn.Module) or
                                  isinstance(obj, torch.export.ExportedProgram))


def _torch_entry(name: str):
    try:
        return getattr(ir, name)
    except ImportError as e:
        side = "frontend (ir/torch_frontend.py)" if name == "from_torch" else "backend (ir/torch_backend.py)"
        raise CompileError(f"the torch {side} is not available in this build ({e}); "
                           f"compile ONNX models, or install a graft with torch support") from None


def _load(model_or_path, example_inputs, dynamic_shapes=None, fold_initializer_inputs: bool | None = None,
          stream: bool | None = None):
    """(source label, reference proto or None, what onnxruntime loads for the reference, fresh IR model,
    torch module or None). A file's external data stays in its files (memory-mapped) unless ``stream`` is False."""
    if dynamic_shapes is not None and not _is_torch_module(model_or_path):
        raise CompileError("dynamic_shapes applies to torch models only (an ONNX model's dims are in its inputs)")
    if isinstance(model_or_path, (str, os.PathLike)):
        path = Path(model_or_path)
        if not path.exists() and isinstance(model_or_path, str):
            from graft.ir import zoo

            if model_or_path in zoo.NAMES:
                path = zoo.resolve(model_or_path)
        from graft.ir.onnx_io import has_lazy_tensors, inline_lazy_tensors, load_proto

        proto = load_proto(path, check=False, lazy=stream is not False)
        check_file(path, proto)
        if stream is False and has_lazy_tensors(proto):
            inline_lazy_tensors(proto)
        return str(model_or_path), proto, str(path), _from_proto(proto, str(path), fold_initializer_inputs), None
    if isinstance(model_or_path, onnx.ModelProto):
        from graft.ir.onnx_io import check_proto

        check_proto(model_or_path, where="input model")
        return ("ModelProto", model_or_path, model_or_path,
                _from_proto(model_or_path, "input model", fold_initializer_inputs), None)
    if isinstance(model_or_path, ir.Model):
        proto = ir.to_onnx(model_or_path)  # compile a copy: the caller's model is not edited
        return "ir.Model", proto, proto, _from_proto(proto, "input model", fold_initializer_inputs), None
    if _is_torch_module(model_or_path):
        import torch

        if example_inputs is None and not isinstance(model_or_path, torch.export.ExportedProgram):
            raise CompileError("compiling a torch model needs example_inputs (a tensor, a tuple of tensors, or a "
                               "dict of keyword inputs) to capture it")
        model = _torch_entry("from_torch")(model_or_path, example_inputs, dynamic_shapes)
        ref = model_or_path.module() if isinstance(model_or_path, torch.export.ExportedProgram) else model_or_path
        return type(model_or_path).__name__, None, None, model, ref
    raise TypeError(f"compile() takes a path, zoo name, onnx.ModelProto, ir.Model or torch.nn.Module, "
                    f"got {type(model_or_path).__name__}")


def check_file(path: Path, proto: onnx.ModelProto | None = None) -> None:
    """``onnx.checker`` on the file itself: faster than on the parsed proto, and external data stays put.

    ``proto``: the file's model when the caller has it; a graph input or output without a type is
    then reported by name (onnx.checker's message names no value).

    Raises:
        ModelLoadError: naming ``path`` and the fault.
    """
    from graft.ir.onnx_io import ModelLoadError, check_typed

    if proto is not None:
        check_typed(proto, str(path))
    try:
        onnx.checker.check_model(str(path))
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        graph = None
        if "topologically sorted" in str(e):  # the file is read again only when the caller has no proto
            graph = (proto if proto is not None else onnx.load(str(path), load_external_data=False)).graph
        cycle = _find_cycle(graph) if graph is not None else None
        if cycle:
            raise ModelLoadError(f"{path}: graph has a cycle: {' -> '.join(cycle)} (ONNX graphs must be "
                                 f"acyclic; re-export the model)") from None
        raise ModelLoadError(f"{path}: fails onnx.checker: {one_line(e)}") from None


def _find_cycle(graph: onnx.GraphProto) -> list[str] | None:
    """Names of the nodes on a cycle of the main graph (first repeated at the end), or None."""
    import networkx as nx

    producer = {o: i for i, n in enumerate(graph.node) for o in n.output if o}
    g = nx.DiGraph()
    for i, n in enumerate(graph.node):
        g.add_node(i)
        for name in n.input:
            if name in producer:
                g.add_edge(producer[name], i)
    try:
        edges = nx.find_cycle(g)
    except nx.NetworkXNoCycle:
        return None
    label = [graph.node[a].name or f"{graph.node[a].op_type}({graph.node[a].output[0]})" for a, _ in edges]
    return label + label[:1]


def _from_proto(proto, where, fold_initializer_inputs: bool | None = None):
    """The IR of ``proto``; initializers listed as graph inputs become constants when
    ``fold_initializer_inputs`` is true, or when it is None and the model's IR version is < 4
    (where every initializer had to be listed as an input, so none of them is meant to be
    overridden)."""
    from graft.ir.onnx_io import IR_VERSION_INITIALIZERS_NOT_INPUTS, ModelLoadError

    fold = proto.ir_version < IR_VERSION_INITIALIZERS_NOT_INPUTS if fold_initializer_inputs is None \
        else fold_initializer_inputs
    try:
        return ir.from_onnx(proto, fold_initializer_inputs=fold)
    except ModelLoadError as e:
        raise ModelLoadError(f"{where}: {e}") from None


# --------------------------------------------------------------------------- compile
@gc_paused()  # the IR is a big cyclic object graph: keep the cyclic GC out of the compile (ir/_gc.py)
def compile(model_or_path, example_inputs=None, pipeline: str | Pipeline | None = "optimize", target: str = "onnx",
            rules=None, verify: bool = True, atol: float = 1e-4, dim_sizes: dict[str, int] | None = None, *,
            rtol: float = 0.0, seed: int = 0, prune=None, dynamic_shapes=None, quantize: str | None = None,
            calibration=None, calib_method: str = "minmax", exclude=None,
            quantize_options: dict | None = None, fold_initializer_inputs: bool | None = None,
            precision: str | None = None, precision_options: dict | None = None,
            stream: bool | None = None) -> CompileResult:
    """Compile a model with a pipeline (plus optional user rules) and check the result.

    Args:
        model_or_path: an ``.onnx`` path, a zoo name (``ppocr-cls``, ``minilm``, ...), an
            ``onnx.ModelProto``, an ``ir.Model`` (not modified), or a torch model (``torch.nn.Module``,
            ``torch.fx.GraphModule``, ``torch.export.ExportedProgram``): captured with ``ir.from_torch``
            and lowered to ONNX ops by the ``lower_aten`` pipeline before ``pipeline`` runs.
        example_inputs: inputs for verification (dict name → array, or a sequence in graph-input
            order); required for torch modules (used to capture them: a tensor, a tuple, or a dict of
            keyword inputs). Default: random inputs from the input types (seeded), symbolic dims sized
            by :func:`default_dim_sizes`.
        pipeline: a registered pipeline name (``optimize``, ``cleanup``, ``none``), a
            :class:`Pipeline`, or None for no pipeline.
        target: ``"onnx"`` (a ModelProto) or ``"torch"`` (a ``torch.fx.GraphModule``).
        rules: user rules (a RuleSet, a Rule, or a list of Rules and rule-file paths), run as their own
            pass after the pipeline. A rule may not take the name of another rule of the pipeline.
        verify: run both models in onnxruntime and compare outputs. Structural checks run always:
            ``ir.verify`` and ``onnx.checker``, with full_check (strict shape inference on the output)
            when ``verify`` is true, without it when false (the pipeline's own shape inference still
            ran; on a 10k-node model full_check costs 0.03–0.14 s more than the plain checker).
        atol, rtol: an output passes when its max abs error <= atol or max rel error <= rtol. For
            float16/bfloat16 outputs atol is raised to 8 units of roundoff (2**-11, 2**-8) times
            the largest finite output magnitude (at least 1); ``result.verification.atol`` says
            what was used.
        dim_sizes: sizes for named symbolic input dims (``dim_param``), e.g. ``{"batch": 1, "seq": 128}``.
            A name no graph input has is ignored with a note in ``result.notes`` (:func:`unknown_dims`).
        seed: seed of the generated inputs.
        prune: structured pruning before the pipeline: a :class:`graft.compiler.techniques.pruning.PruneConfig` or a
            ratio in [0, 1). Pruning with a ratio changes the outputs by design: their deviation is
            reported (``result.prune.deviation``) instead of failing verification; zero-only pruning
            (``PruneConfig(zero_only=True)``) is verified like any rewrite.
        dynamic_shapes: torch models only: ``torch.export`` dynamic shapes (e.g.
            ``{"input_ids": {0: Dim("batch"), 1: Dim("seq")}}``); the Dim names become symbolic dims.
        quantize: int8 quantization after the pipeline (:func:`graft.compiler.techniques.quantization.quantize`): ``auto``,
            ``static`` (= ``static-per-channel``), ``static-per-tensor``, ``dynamic``, ``weight-only-int8``,
            ``weight-only-int4``, or None/``none``. Quantized outputs differ by design: the accuracy report
            (``result.quantization.report``) replaces the numeric verification's pass/fail.
        calibration: calibration data for ``quantize`` (.npz path, directory of .npy, iterable of feeds);
            calibrated in torch for torch models, in onnxruntime otherwise.
        calib_method: ``minmax``, ``percentile``, ``entropy`` or ``mse``.
        exclude: node names, op types, name globs or patterns kept in float.
        quantize_options: more keyword arguments for :func:`graft.compiler.techniques.quantization.quantize`
            (e.g. ``{"smooth": "split", "eval_data": ..., "upgrade_opset": True}``).
        fold_initializer_inputs: ONNX models: treat initializers that are also listed as graph
            inputs as constants, so rules fold them (they are no longer inputs of the output, whose
            IR version becomes at least 4). None (default): only when the model's IR version is
            < 4, where every initializer is listed as an input; False: never (they stay inputs a
            caller may override, and are not folded). Ignored for torch models.
        precision: ``"fp16"`` or ``"bf16"``: float32 nodes move to the lower type after the pipeline (and
            after ``quantize``) where the schema allows it and the ranges measured on ``calibration``
            (else generated inputs) fit (:func:`graft.compiler.techniques.precision.convert_precision`);
            ``exclude`` nodes stay float32. Outputs differ by design: ``result.precision.report`` measures
            by how much. bf16 with target ``onnx`` and ``verify`` needs onnxruntime kernels for it
            (PrecisionError naming the ops otherwise); without ``verify`` it is only checked structurally.
        precision_options: more keyword arguments for ``convert_precision`` (``keep_io_types``: graph
            inputs/outputs stay float32, default True; ``headroom``, ``samples``, ...).
        stream: an ``.onnx`` file with external data is compiled without reading its weights into
            memory (:mod:`graft.compiler.driver.streaming`): they are memory-mapped where rules read
            them, the output is written once with external data and checked and verified from that
            file, and :meth:`CompileResult.save` writes it with external data too. None (default) or
            True: so whenever the file has external data; False: its weights are read in first.
            Before any work a streamed compile checks that it fits in memory (CompileError naming
            the sizes, and ``verify=False`` when only verification does not fit).

    Returns:
        a :class:`CompileResult`.

    Raises:
        ir.ModelLoadError: missing/unreadable/invalid input file (names the file).
        compiler.RuleError: a rule raised during rewriting (names the rule and node).
        InvalidOutputError: the result fails ir.verify / onnx.checker / cannot run in onnxruntime
            while the input could (names the rules whose nodes are involved).
        NumericMismatchError: an output differs beyond tolerance (names the first diverging rule).
        CompileError: torch paths without the torch frontend/backend, other unusable requests.
        KeyError: unknown pipeline name.
        ValueError: a negative atol/rtol, dim sizes that are not positive integers, example
            inputs that do not fit the model's inputs (name, dtype or shape).
        graft.compiler.driver.user_rules.UserRuleFileError: ``rules`` is a rule file that cannot be loaded.
    """
    if target not in ("onnx", "torch"):
        raise ValueError(f"target must be 'onnx' or 'torch', got {target!r}")
    for tol_name, tol in (("atol", atol), ("rtol", rtol)):
        if not isinstance(tol, (int, float)) or not tol >= 0:  # `not >=` also refuses NaN
            raise ValueError(f"{tol_name} must be a number >= 0, got {tol!r}")
    check_dim_sizes(dim_sizes)
    if isinstance(rules, (str, os.PathLike)):  # a rule file, as `graft compile --rules FILE` takes it
        rules = [rules]
    if isinstance(rules, (list, tuple)) and any(isinstance(r, (str, os.PathLike)) for r in rules):
        from graft.compiler.driver.user_rules import load_rule_file

        rules = [r for item in rules
                 for r in (load_rule_file(item) if isinstance(item, (str, os.PathLike)) else [item])]
    from graft.rules.pipelines import with_user_rules

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    pipe = with_user_rules(pipeline, rules)  # fail on a bad pipeline name before loading anything
    if prune is not None:  # pruning runs first, on the cleaned model, before BatchNormalization is folded
        from graft.compiler.techniques.pruning.api import as_config, prune_pipeline

        prune = as_config(prune, dim_sizes)
        pipe = Pipeline(pipe.name, [prune_pipeline(prune), *pipe.passes], doc=pipe.doc)
    t = time.perf_counter()
    source, ref_proto, ref_src, model, torch_module = _load(model_or_path, example_inputs, dynamic_shapes,
                                                            fold_initializer_inputs, stream)
    from graft.ir.onnx_io import FOLDED_INITIALIZER_INPUTS, has_lazy_initializers

    streamed = has_lazy_initializers(model)
    if streamed:
        _check_memory(model, source, verify=verify and target == "onnx", quantize=quantize)

    folded_inputs = model.meta.get(FOLDED_INITIALIZER_INPUTS)  # read now: quantization makes a new model
    timings["load"] = time.perf_counter() - t
    before = model_stats(model)
    if torch_module is not None:
        # ATen → ONNX lowering is a rule set too: it runs first, so the pipeline's ONNX rules see ONNX ops
        from graft.rules.lower_aten_pipeline import lower_aten

        pipe = Pipeline(pipe.name, [lower_aten(), *pipe.passes], doc=pipe.doc)

    t = time.perf_counter()
    pres = pipe(model)
    timings["pipeline"] = time.perf_counter() - t
    stats = pres.stats
    qres = None
    if quantize not in (None, "none"):
        from graft.compiler.techniques.quantization import quantize as _quantize

        t = time.perf_counter()
        opts = {"prepare_pipeline": None, "calib_backend": "torch" if torch_module is not None else "onnxruntime",
                **({"report": False} if streamed else {}), **(quantize_options or {})}
        qres = _quantize(model, quantize, calibration, exclude=exclude, calib_method=calib_method, **opts)
        model = qres.model
        stats.counts.update(qres.counts)
        timings["quantize"] = time.perf_counter() - t
    prec = None
    if precision not in (None, "none"):  # float16/bfloat16 after the pipeline (and int8): the remaining float ops
        from graft.compiler.techniques.precision import convert_precision

        t = time.perf_counter()
        opts = {"calibration": calibration, "exclude": exclude, "dim_sizes": dim_sizes, "seed": seed,
                "evaluate": verify, "runtime": "onnxruntime" if verify and target == "onnx" else None,
                **(precision_options or {})}
        prec = convert_precision(model, precision, **opts)
        model = prec.model
        stats.counts.update(prec.counts)
        timings["precision"] = time.perf_counter() - t

    result = CompileResult(model, None, None, target, source, pipe.name, stats.counts, stats.stop_reasons,
                           stats.passes, before, model_stats(model), Verification("off"), timings)
    result.quantization = qres
    result.precision = prec
    _note_folded_inputs(folded_inputs, ref_proto, fold_initializer_inputs, result)
    if prune is not None:
        from graft.compiler.techniques.pruning.api import attach_report

        attach_report(result, model, torch_module)
    _import_new_domains(model, result)
    if target == "onnx":
        from graft.ir.torch_aten import UnloweredOpError, check_lowered
        from graft.rules.pipelines import forget_inferred_symbols

        try:
            check_lowered(model)
        except UnloweredOpError as e:
            raise CompileError(str(e), result) from None
        # no more shape facts than the input had: inferred symbols let onnxruntime fuse slower kernels
        forget_inferred_symbols(model)
    if qres is not None and streamed and qres.report is None:
        result.notes.append("streamed compile: no per-layer accuracy report (it would hold both models in memory); "
                            "verification's output comparison measures the quantization error")
    t = time.perf_counter()
    if streamed and target == "onnx":
        out_proto, result.staged = _check_staged(model, result, ref_proto, ref_src, full=verify)
        out_bytes, out_src = None, str(result.staged.path)  # onnxruntime loads the staged file, external data and all
    else:
        out_proto, out_bytes = _check_structure(model, result, ref_proto, ref_src, full=verify)
        out_src = out_bytes
    timings["check"] = time.perf_counter() - t
    if ref_proto is not None and out_proto.ir_version > ref_proto.ir_version and not folded_inputs:
        result.notes.append(f"IR version raised from {ref_proto.ir_version} to {out_proto.ir_version}: the rules "
                            f"made initializers that are not graph inputs, which IR version "
                            f"{ref_proto.ir_version} does not allow (every initializer is an input there)")
    if target == "onnx":
        result.proto = out_proto
        result._checked = (out_proto, out_bytes)  # what _save_as_checked writes
    else:
        result.module = _torch_entry("to_torch")(model)
        if result.prune is not None and result.prune.config_updates and hasattr(torch_module, "config"):
            import copy

            result.module.config = copy.deepcopy(torch_module.config)  # the pruned shapes' head count etc.
            for k, val in result.prune.config_updates.items():
                setattr(result.module.config, k, val)

    t = time.perf_counter()
    if verify and dim_sizes and torch_module is None and example_inputs is None:
        bad = unknown_dims(ref_proto, dim_sizes)
        if bad:
            result.notes.append(bad + "; it was ignored")
    if torch_module is not None and torch_module is model_or_path and any(m.training for m in torch_module.modules()):
        result.notes.append(f"{source} was in training mode: captured (and verified) in eval mode, with dropout "
                            f"off and BatchNorm on its running statistics")
    skip = prec.verification_skip(target, torch_module is not None) if verify and prec is not None else None
    if skip is not None:
        result.verification = Verification("skipped", reason=skip)
    elif verify:
        try:
            if torch_module is not None:
                from graft.ir.torch_frontend import eval_mode

                with eval_mode(torch_module):  # as captured: the reference must not drop out or update statistics
                    result.verification = verify_torch(torch_module, example_inputs, result.module, result.proto,
                                                       model, atol=atol, rtol=rtol)
            else:
                result.verification = verify_onnx(ref_proto, ref_src, out_proto, out_src, model, example_inputs,
                                                  dim_sizes, seed, stats.rewrites, atol=atol, rtol=rtol)
        except OutputDoesNotRun as e:
            raise _invalid("does not run in onnxruntime (the input model does)", e.detail, model, out_proto,
                           result) from None
        except UnloweredOps as e:
            raise CompileError(str(e), result) from None
    timings["verify"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_start
    v = result.verification
    if result.prune is not None and not result.prune.zero_only:
        # removing channels with weights changes the outputs by design: report it, do not fail on it
        result.prune.deviation = list(v.outputs)
        if v.status == "failed" and v.outputs and all(o.max_abs < float("inf") for o in v.outputs):
            return result  # same shapes, finite values: the deviation is the report, not an error
    if qres is not None:
        return result  # quantized outputs differ by design: result.quantization.report measures by how much
    if prec is not None:
        return result  # so do float16/bfloat16 ones: result.precision.report measures by how much
    if v.status == "failed":
        bad = [o for o in v.outputs if not o.within(atol, rtol)]
        if not bad:
            raise NumericMismatchError(f"the compiled model disagrees with the input model: {v.reason}", result)
        worst = max(bad, key=lambda o: o.max_abs)
        where = f"; {v.blame.describe()}" if v.blame else \
            ("; no intermediate value could be tied to a rule" if result.counts else "")
        raise NumericMismatchError(
            f"output {worst.name!r} differs from the input model's by max abs {worst.max_abs:.3g} "
            f"(atol {atol:g}){where}", result, v.blame)
    return result


def _note_folded_inputs(folded: list[str] | None, ref_proto, asked: bool | None, result: "CompileResult") -> None:
    """Say in ``result.notes`` which initializer inputs became constants, and why."""
    from graft.ir.onnx_io import IR_VERSION_INITIALIZERS_NOT_INPUTS

    if not folded or ref_proto is None:
        return
    why = "as asked (fold_initializer_inputs)" if asked else \
        f"since the model's IR version {ref_proto.ir_version} lists every initializer as an input"
    result.notes.append(f"{len(folded)} initializer(s) also listed as graph inputs (e.g. {folded[0]!r}) were "
                        f"treated as constants {why}; the output no longer takes them as inputs (IR version "
                        f"{max(ref_proto.ir_version, IR_VERSION_INITIALIZERS_NOT_INPUTS)})")


def _import_new_domains(model: ir.Model, result: "CompileResult") -> None:
    """A rule may create ops of a domain the input model never imported (``op.domain("com.microsoft")``
    contrib ops, say); ONNX requires an opset import for it, so import version 1, the version of
    onnxruntime's contrib ops and the usual first version of a custom domain."""
    for n in model.all_nodes():
        d = n.domain
        if d not in ("", "ai.onnx") and d not in model.opset_imports:
            model.opset_imports[d] = 1
            result.notes.append(f"rule-created {d}::{n.op_type} nodes: added opset import {d!r} version 1")


def unknown_dims(proto: onnx.ModelProto, dim_sizes: dict[str, int] | None) -> str | None:
    """A one-line message when ``dim_sizes`` names a dim no graph input of ``proto`` has, else None.

    :func:`compile` notes it in the result (the inputs were generated with other sizes than
    asked for); ``graft compile --dim`` refuses it before compiling.
    """
    dims = symbolic_dims(proto)
    unknown = sorted(set(dim_sizes or ()) - {d for ds in dims.values() for d in ds if isinstance(d, str)})
    if not unknown:
        return None
    have = ", ".join(f"{k}[{', '.join(map(str, ds))}]" for k, ds in dims.items()) or "none"
    return (f"dim {', '.join(map(repr, unknown))} is not a dim of any graph input (the inputs are {have}; "
            f"_ is an unnamed dim, which cannot be sized)")


def _verify_ir(model: ir.Model, result: CompileResult, ref_proto) -> None:
    """``ir.verify`` on the output: a problem the input model did not have raises CompileError naming the
    rules involved; one the input already had becomes a note."""
    from graft.ir.verifier import problems

    found = problems(model)
    if found:
        before = set(problems(ir.from_onnx(ref_proto))) if ref_proto is not None else set()
        new = [p for p in found if p not in before]
        if new:
            raise _invalid("fails ir.verify", "; ".join(new[:3]) + (f" (and {len(new) - 3} more)" if len(new) > 3
                                                                     else ""), model, None, result)
        result.notes.append(f"ir.verify: the input model already has {len(found)} problem(s), e.g. {found[0]}")


def _check_structure(model: ir.Model, result: CompileResult, ref_proto, ref_src, *,
                     full: bool = True) -> tuple[onnx.ModelProto, bytes | None]:
    """``ir.verify`` then ``onnx.checker`` (full_check when ``full``); failures name the rules involved.

    A fault the input model already has is not the compile's: it goes into ``result.notes``
    (for full_check, the output is then held to the plain checker, as the input was).
    Returns the output proto and its serialization (None over 2 GiB), reused to run it.
    """
    from graft.ir.onnx_io import PROTOBUF_LIMIT, ModelLoadError, check_proto

    _verify_ir(model, result, ref_proto)
    proto = ir.to_onnx(model)
    data = None
    # constant data dominates a model's size; ByteSize() would cost as much as serializing
    if result.after.bytes < PROTOBUF_LIMIT - 2**26:
        try:
            data = proto.SerializeToString()
        except ValueError:  # over 2 GiB after all
            data = None
    def check(src, full: bool) -> str | None:
        try:
            if isinstance(src, (bytes, str)):
                onnx.checker.check_model(src, full_check=full)
            else:
                check_proto(src, where="model", full=full)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
            return one_line(e)
        except ModelLoadError as e:
            return str(e).split(": ", 2)[-1]
        return None

    out_src = data if data is not None else proto
    err = check(out_src, full)
    if err is not None:
        ref_err = check(ref_src, True) if full and ref_src is not None else None
        if ref_err is None or check(out_src, False) is not None:
            raise _invalid("fails onnx.checker", err, model, proto, result)
        result.notes.append(f"onnx.checker full_check fails on the input model too ({ref_err}); the output was "
                            f"checked without strict shape inference")
    return proto, data



def _check_memory(model: ir.Model, source: str, *, verify: bool, quantize: str | None) -> None:
    """Raise CompileError before any work when a streamed compile cannot fit in memory
    (:func:`graft.compiler.driver.streaming.memory_problem`)."""
    from graft.compiler.driver.streaming import memory_problem

    total = 0
    largest = ("", 0)
    for g in model.all_graphs():
        for name, v in g.initializers.items():
            n = v.const.nbytes
            total += n
            if n > largest[1]:
                largest = (name, n)
    try:
        why = memory_problem(source, total, largest, verify=verify, quantize=quantize)
    except ValueError as e:
        raise CompileError(str(e)) from None
    if why:
        raise CompileError(why)


def _check_staged(model: ir.Model, result: CompileResult, ref_proto, ref_src, *, full: bool):
    """:func:`_check_structure` for a streamed compile: ``ir.verify``, then the output written once
    with external data (:class:`graft.compiler.driver.streaming.StagedOutput`) and ``onnx.checker``
    run on that file. Returns (the staged proto, the StagedOutput)."""
    from graft.compiler.driver.streaming import StagedOutput

    _verify_ir(model, result, ref_proto)
    staged = StagedOutput(model)

    def check(src, full_check: bool) -> str | None:
        try:
            onnx.checker.check_model(str(src), full_check=full_check)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
            return one_line(e)
        return None

    err = check(staged.path, full)
    if err is not None:
        ref_err = check(ref_src, True) if full and isinstance(ref_src, str) else None
        if ref_err is None or check(staged.path, False) is not None:
            raise _invalid("fails onnx.checker", err, model, None, result)
        result.notes.append(f"onnx.checker full_check fails on the input model too ({ref_err}); the output was "
                            f"checked without strict shape inference")
    return staged.proto, staged


def _invalid(what: str, detail: str, model, proto, result) -> InvalidOutputError:
    involved = rules_in_message(model, detail)
    if not involved and proto is not None:
        involved = rules_failing_checker(model, proto)
    if involved:
        names = sorted({r for r, _ in involved})
        nodes = ", ".join(f"{n!r}" for _, n in involved[:5])
        who = f"rule{'s' if len(names) > 1 else ''} {', '.join(repr(r) for r in names)} (node{'s' if len(involved) > 1 else ''} {nodes})"
    elif result.counts:
        who = "one of the rules that fired: " + ", ".join(f"{r!r}" for r in sorted(result.counts))
    else:
        who = "no rule fired, so the pipeline's function passes"
    return InvalidOutputError(f"the compiled model {what}: {detail} — caused by {who}; no output written "
                              f"(fix or drop the rule)", result, involved)


