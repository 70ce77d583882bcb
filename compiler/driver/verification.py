"""Numeric verification of a compile: run the input and the output model on the same inputs.

ONNX input: both models run in onnxruntime (``graft.compiler.techniques.numeric``, graph optimizations
off) on the caller's inputs or on seeded random ones; each output is compared by
max abs / max rel error and cosine similarity. Torch input: the eager module against
the compiled GraphModule (target ``torch``) or the ONNX output in onnxruntime.

Verification is *skipped*, with the reason, when the input model itself cannot run
(a custom-domain op onnxruntime has no kernel for, inputs it cannot take); it is
never skipped silently.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from dataclasses import dataclass, field

import numpy as np
import onnx

from graft.compiler.techniques import numeric
from graft.compiler.driver.blame import Blame, find_blame
from graft.compiler.techniques.numeric import (BATCH_DIM, OTHER_DIM, OutputAgreement, default_dim_sizes,
                                               symbolic_dims, to_numpy)

class OutputDoesNotRun(RuntimeError):
    """onnxruntime rejects the compiled model although it ran the input model; ``detail`` is its message."""

    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail


class UnloweredOps(RuntimeError):
    """The ONNX output of a torch model still holds ATen ops that onnxruntime cannot run."""


@dataclass
class Verification:
    """Numeric verification outcome.

    Attributes:
        status: ``"passed"``, ``"failed"``, ``"skipped"`` (could not run; ``reason`` says why) or ``"off"``.
        reason: why skipped (or, for torch, why failed without per-output numbers).
        outputs: per-output agreement (max abs, max rel, cosine) against the input model.
        atol, rtol: the tolerance applied (an output passes when max abs <= atol or max rel <= rtol).
        inputs: input name → shape used.
        blame: the first diverging rule when ``status == "failed"`` (ONNX input).
        generated: the inputs were generated (not given by the caller).
    """

    status: str
    reason: str = ""
    outputs: list[OutputAgreement] = field(default_factory=list)
    atol: float = 0.0
    rtol: float = 0.0
    inputs: dict[str, tuple] = field(default_factory=dict)
    blame: Blame | None = None
    generated: bool = True


def one_line(e: BaseException) -> str:
    """The message on one line (checker messages spread the node over several), at most 400 characters."""
    s = " ".join(str(e).split())
    return (s or type(e).__name__)[:400]


# Unit roundoff of the half-precision formats (IEEE 754 binary16: 2^-11; bfloat16: 2^-8).
_UNIT_ROUNDOFF = {"torch.float16": 2.0 ** -11, "torch.bfloat16": 2.0 ** -8,
                  "float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}  # torch tensors; numpy / ml_dtypes arrays


def _low_precision_atol(outputs) -> float:
    """Tolerance for half-precision outputs: 8 units of roundoff at the outputs' magnitude.

    Reordered fp16/bf16 arithmetic (e.g. addmm lowered to Gemm, BatchNormalization folded into
    weights) legitimately differs by a few roundoffs, far above an fp32 atol of 1e-4. 0.0 when
    every output is fp32 or wider. Takes torch tensors or numpy arrays; non-finite entries are
    ignored for the magnitude.
    """
    tol = 0.0
    for t in outputs:
        u = _UNIT_ROUNDOFF.get(str(getattr(t, "dtype", "")))
        if u is None:
            continue
        a = np.abs(to_numpy(t).astype(np.float32))
        a = a[np.isfinite(a)]  # an inf or NaN output must not make every difference acceptable
        mag = float(a.max()) if a.size else 0.0
        tol = max(tol, 8 * u * max(1.0, mag))
    return tol


def check_dim_sizes(dim_sizes) -> None:
    """Raise ValueError unless ``dim_sizes`` is None or a dict of dim name → positive int."""
    if dim_sizes is None:
        return
    if not isinstance(dim_sizes, dict):
        raise ValueError(f"dim_sizes must be a dict of dim name -> size, got {type(dim_sizes).__name__}")
    for k, v in dim_sizes.items():
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"dim_sizes[{k!r}] = {v!r}: a dim size must be a positive integer")


def make_feeds(proto: onnx.ModelProto, example_inputs=None, dim_sizes: dict[str, int] | None = None,
               seed: int = 0) -> dict[str, np.ndarray]:
    """Graph-input name → array: the caller's ``example_inputs`` (a dict, or a sequence in
    graph-input order; numpy or torch), else seeded random inputs (:func:`numeric.make_inputs`).

    Raises:
        ValueError: example inputs that do not fit the graph inputs, or an input type
            random inputs cannot be made for.
    """
    inits = {t.name for t in proto.graph.initializer}
    names = [vi.name for vi in proto.graph.input if vi.name not in inits]
    if example_inputs is None:
        sizes, default = default_dim_sizes(proto, dim_sizes)
        feeds = numeric.make_inputs(proto, seed=seed, dim_sizes=sizes, default_dim=default)
        # a rank-0 bool comes back as a numpy scalar, which onnxruntime refuses
        return {k: np.asarray(v) for k, v in feeds.items()}
    if isinstance(example_inputs, dict):
        missing = [n for n in names if n not in example_inputs]
        if missing:
            raise ValueError(f"example_inputs lacks graph input(s) {missing}; the model's inputs are {names}")
        feeds = {n: to_numpy(example_inputs[n]) for n in names}
    else:
        seq = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
        if len(seq) != len(names):
            raise ValueError(f"{len(seq)} example input(s) given, the model has {len(names)}: {names}")
        feeds = {n: to_numpy(x) for n, x in zip(names, seq)}
    _check_feeds(proto, feeds)
    return feeds


def _check_feeds(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> None:
    """Raise ValueError for a caller's input whose dtype, rank or fixed dims differ from the graph
    input's type: onnxruntime would refuse it, and verification would be skipped, not done."""
    for vi in proto.graph.input:
        a = feeds.get(vi.name)
        if a is None or not vi.type.HasField("tensor_type"):
            continue
        tt = vi.type.tensor_type
        try:
            want = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        except Exception:  # noqa: BLE001 — no numpy equivalent (e.g. bfloat16): leave it to onnxruntime
            want = None
        if want is not None and a.dtype != want:
            raise ValueError(f"example input {vi.name!r} is {a.dtype}[{', '.join(map(str, a.shape))}], the model's "
                             f"input is {np.dtype(want)}; convert it (e.g. np.asarray(x, np.{np.dtype(want)}))")
        if not tt.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim]
        if a.ndim != len(dims) or any(d is not None and d != n for d, n in zip(dims, a.shape)):
            want_shape = ", ".join("?" if d is None else str(d) for d in dims)
            raise ValueError(f"example input {vi.name!r} has shape {list(a.shape)}, the model's input is "
                             f"[{want_shape}]")


@contextlib.contextmanager
def _runnable(proto: onnx.ModelProto, data: bytes | None):
    """What onnxruntime loads: the bytes, or (over 2 GiB) a temporary file with external data."""
    if data is not None:
        yield data
        return
    with tempfile.TemporaryDirectory(prefix="graft-verify-") as d:
        path = os.path.join(d, "model.onnx")
        onnx.save_model(proto, path, save_as_external_data=True, location="model.onnx.data")
        yield path


class _SessionThread(threading.Thread):
    """Builds an onnxruntime session (:func:`graft.compiler.techniques.numeric._session`) in the background."""

    def __init__(self, src):
        super().__init__(name="graft-verify-session", daemon=True)
        self._src, self._sess, self._error = src, None, None
        self.start()

    def run(self) -> None:
        try:
            self._sess = numeric._session(self._src)
        except BaseException as e:  # noqa: BLE001 — re-raised in the caller's thread by result()
            self._error = e
        finally:
            self._src = None

    def result(self):
        """The session; raises what building it raised."""
        self.join()
        if self._error is not None:
            raise self._error
        return self._sess


def verify_onnx(ref_proto: onnx.ModelProto, ref_src, out_proto: onnx.ModelProto, out_bytes: bytes | None, model,
                example_inputs=None, dim_sizes=None, seed: int = 0, rewrites=(), *, atol: float = 1e-4,
                rtol: float = 0.0) -> Verification:
    """Compare ``out_proto`` with the input model in onnxruntime; on disagreement, find the blame.

    Args:
        ref_proto / ref_src: the input model, and what onnxruntime loads for it (a path, bytes or the proto).
        out_proto / out_bytes: the compiled model and its serialization (None over 2 GiB).
        model: the compiled IR model (provenance for blame).
        rewrites: the pipeline's rewrite log (:class:`graft.compiler.engine.passes.RewriteRecord`).

    Raises:
        ValueError: ``example_inputs`` that do not fit the model.
        OutputDoesNotRun: the input model runs, the compiled one does not.
    """
    v = Verification("skipped", atol=atol, rtol=rtol, generated=example_inputs is None)
    if example_inputs is not None:
        feeds = make_feeds(ref_proto, example_inputs)  # the caller's inputs: errors are theirs
    else:
        try:
            feeds = make_feeds(ref_proto, None, dim_sizes, seed)
        except ValueError as e:
            v.reason = f"cannot generate inputs: {one_line(e)}"
            return v
    v.inputs = {k: tuple(a.shape) for k, a in feeds.items()}
    # onnxruntime builds a session mostly without the GIL: load the compiled model in a second
    # thread while this one loads and runs the input model. Over 2 GiB (a temporary file) the
    # sessions are built one after the other, so two copies of the weights are never held at once.
    out_build = _SessionThread(out_bytes) if out_bytes is not None else None
    try:
        sess = numeric._session(ref_src)
    except Exception as e:  # noqa: BLE001 — ORT raises several types; the input model is the one at fault
        v.reason = f"onnxruntime cannot load the input model: {one_line(e)}"
        if out_build is not None:
            out_build.join()
        return v
    names = [o.name for o in sess.get_outputs()]
    try:
        runs = [(feeds, dict(zip(names, sess.run(names, feeds))))]
    except Exception as e:  # noqa: BLE001
        shapes = ", ".join(f"{k}{list(s)}" for k, s in v.inputs.items())
        kind = "generated" if v.generated else "the given"
        v.reason = (f"onnxruntime cannot run the input model on {kind} inputs {shapes}: {one_line(e)} "
                    f"(set symbolic dim sizes with --dim name=size / dim_sizes, or pass example inputs)")
        if out_build is not None:
            out_build.join()
        return v
    flipped = _flip_bools(feeds) if v.generated else None
    if flipped is not None:
        # a generated bool input (an If condition, a Loop's keep-going flag) takes one value: run the other
        # too, so a rule that broke the branch not taken is caught. Skipped if the input model fails on it.
        try:
            runs.append((flipped, dict(zip(names, sess.run(names, flipped)))))
        except Exception:  # noqa: BLE001
            pass
    del sess
    try:
        if out_build is not None:
            out_sess = out_build.result()
            outs = [dict(zip(names, out_sess.run(names, f))) for f, _ in runs]
        else:
            with _runnable(out_proto, out_bytes) as src:
                out_sess = numeric._session(src)
                outs = [dict(zip(names, out_sess.run(names, f))) for f, _ in runs]
    except Exception as e:  # noqa: BLE001
        raise OutputDoesNotRun(one_line(e)) from None
    # half-precision outputs differ by a few roundoffs whenever arithmetic is reordered (a folded
    # BatchNormalization rounds once where the input model rounded twice)
    atol = v.atol = max(atol, *(_low_precision_atol(r.values()) for _, r in runs))
    failing = None
    for (f, ref_out), out in zip(runs, outs):
        agree = [numeric.agreement(ref_out[name], out.get(name, np.array(np.nan)), name) for name in ref_out]
        if not v.outputs:
            v.outputs = agree
        elif failing is None:  # keep the worse of the runs, per output
            v.outputs = [b if not b.within(atol, rtol) or not (b.max_abs <= a.max_abs) else a
                         for a, b in zip(v.outputs, agree)]
        if failing is None and not all(o.within(atol, rtol) for o in agree):
            failing = f
            v.outputs = agree
    if failing is None:
        v.status = "passed"
        return v
    v.status = "failed"
    try:
        v.blame = find_blame(ref_proto, model, out_proto, failing, rewrites, atol=max(atol, 1e-6))
    except Exception as e:  # noqa: BLE001 — e.g. a streamed model's weights are only in files ORT cannot see from bytes
        v.reason = f"{v.reason + '; ' if v.reason else ''}no rule could be blamed ({one_line(e)})"
    return v


def _flip_bools(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
    """``feeds`` with every bool input negated, or None when there is none."""
    if not any(a.dtype == np.bool_ for a in feeds.values()):
        return None
    return {k: np.asarray(np.logical_not(a)) if a.dtype == np.bool_ else a for k, a in feeds.items()}


def verify_torch(module, example_inputs, compiled_module, out_proto, model, *, atol: float = 1e-4,
                 rtol: float = 0.0) -> Verification:
    """Eager ``module`` against ``compiled_module`` (target torch) or ``out_proto`` in onnxruntime.

    Raises:
        UnloweredOps: the ONNX output still has ATen-domain nodes.
        OutputDoesNotRun: onnxruntime rejects the ONNX output.
    """
    import torch

    # a dict is keyword inputs (transformers models), anything else positional inputs
    kwargs = dict(example_inputs) if isinstance(example_inputs, dict) else {}
    args = () if kwargs else example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    # name inputs and outputs as the captured graph does (the user's forward() names), not by position
    in_names = [x.name for x in model.graph.inputs if x.const is None]
    out_names = [x.name for x in model.graph.outputs]
    named = kwargs or {in_names[i] if i < len(in_names) else f"arg{i}": a for i, a in enumerate(args)}
    v = Verification("skipped", atol=atol, rtol=rtol, generated=False,
                     inputs={k: tuple(a.shape) for k, a in named.items() if hasattr(a, "shape")})
    with torch.no_grad():
        ref = _flatten(module(*args, **kwargs))
        if compiled_module is not None:
            got = _flatten(compiled_module(*args, **kwargs))
        else:
            aten = sorted({n.op_type for n in model.all_nodes() if n.domain == "aten"})
            if aten:
                raise UnloweredOps(f"{len(aten)} ATen op type(s) have no ONNX lowering ({', '.join(aten[:5])}); "
                                   f"the ONNX output cannot run them (use target='torch', or add lowering rules)")
            inits = {t.name for t in out_proto.graph.initializer}
            names = [vi.name for vi in out_proto.graph.input if vi.name not in inits]
            try:
                feeds = {n: to_numpy(kwargs[n]) for n in names if n in kwargs} if kwargs else \
                    {n: to_numpy(a) for n, a in zip(names, args)}
                got = list(numeric.run(out_proto, feeds).values())
            except Exception as e:  # noqa: BLE001
                raise OutputDoesNotRun(one_line(e)) from None
    v.outputs = [numeric.agreement(to_numpy(a), to_numpy(b), out_names[i] if i < len(out_names) else f"output{i}")
                 for i, (a, b) in enumerate(zip(ref, got))]
    if len(ref) != len(got):
        v.status, v.reason = "failed", f"the torch model returns {len(ref)} outputs, the compiled one {len(got)}"
        return v
    v.atol = max(atol, _low_precision_atol(ref))
    v.status = "passed" if all(o.within(v.atol, rtol) for o in v.outputs) else "failed"
    return v


def _flatten(out) -> list:
    if isinstance(out, (tuple, list)):
        return [y for x in out for y in _flatten(x)]
    if isinstance(out, dict):
        return [y for x in out.values() for y in _flatten(x)]
    if hasattr(out, "to_tuple"):  # transformers ModelOutput
        return _flatten(out.to_tuple())
    return [out]
