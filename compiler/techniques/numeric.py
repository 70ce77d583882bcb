"""Numeric agreement between two ONNX models, run in onnxruntime.

Inputs are generated from the graph-input types (dynamic dims get small
concrete sizes) with a fixed seed, both models run on the same feeds, and each
output is compared by max abs error, max relative error and cosine similarity.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

# Concrete sizes for symbolic dims: batch-like dims 1..2, others moderate.
DEFAULT_DIM = 2


# Sizes for symbolic dims when the caller gives none: batch-like (axis 0) dims small,
# others large enough for strided convolutions and pooling (32 = 2^5).
BATCH_DIM = 2
OTHER_DIM = 32


@dataclass
class OutputAgreement:
    """Agreement of one output. Units: absolute values of the output's dtype."""

    name: str
    max_abs: float
    max_rel: float
    cosine: float
    shape: tuple

    def within(self, atol: float, rtol: float = 0.0) -> bool:
        return self.max_abs <= atol or self.max_rel <= rtol


def _session(model: onnx.ModelProto | str | bytes, threads: int = 1):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    # graft compares graphs as written: keep ORT's own rewrites out of the comparison
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    src = model if isinstance(model, (str, bytes)) else model.SerializeToString()
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def make_inputs(model: onnx.ModelProto, *, seed: int = 0, dim_sizes: dict[str, int] | None = None,
                default_dim: int = DEFAULT_DIM) -> dict[str, np.ndarray]:
    """Random feeds for every graph input that has no initializer.

    Floats are standard normal; integer inputs are drawn from [0, 10) (valid
    as token ids / indices for most models); bools are random.

    Args:
        dim_sizes: sizes for named symbolic dims (e.g. ``{"batch": 1, "seq": 16}``).
        default_dim: size for other unknown dims (also for ``-1`` dims).

    Raises:
        ValueError: an input whose type is not a tensor.
    """
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    dim_sizes = dim_sizes or {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            raise ValueError(f"input {vi.name!r} is not a tensor; pass feeds explicitly")
        shape = []
        for d in tt.shape.dim:
            if d.HasField("dim_value") and d.dim_value > 0:
                shape.append(d.dim_value)
            else:
                shape.append(dim_sizes.get(d.dim_param, default_dim))
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if np.issubdtype(dtype, np.floating):
            feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[vi.name] = rng.random(shape) > 0.5
        elif np.issubdtype(dtype, np.integer):
            feeds[vi.name] = rng.integers(0, 10, size=shape).astype(dtype)
        else:
            raise ValueError(f"input {vi.name!r} has dtype {dtype}; pass feeds explicitly")
    return feeds


def run(model: onnx.ModelProto | str | bytes, feeds: dict[str, np.ndarray], threads: int = 1) -> dict[str, np.ndarray]:
    """Run ``model`` (a ModelProto, a path, or serialized bytes) in onnxruntime CPU; returns output name → array."""
    sess = _session(model, threads)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def agreement(a: np.ndarray, b: np.ndarray, name: str = "") -> OutputAgreement:
    """Max abs / max rel error and cosine similarity of two arrays of one shape."""
    a64 = np.asarray(a, dtype=np.float64).ravel()
    b64 = np.asarray(b, dtype=np.float64).ravel()
    if a64.shape != b64.shape:
        return OutputAgreement(name, float("inf"), float("inf"), 0.0, tuple(np.shape(b)))
    if a64.size == 0:
        return OutputAgreement(name, 0.0, 0.0, 1.0, tuple(np.shape(a)))
    # inf - inf and the like are expected here (matching non-finite outputs are set to 0 below):
    # no RuntimeWarning on the user's terminal
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(a64 - b64)
        finite = np.isfinite(a64) & np.isfinite(b64)
        same_nonfinite = ~finite & ((a64 == b64) | (np.isnan(a64) & np.isnan(b64)))
        diff = np.where(same_nonfinite, 0.0, diff)
        max_abs = float(np.max(diff))
        max_rel = float(np.max(diff / np.maximum(np.abs(a64), 1e-12)))
        af, bf = a64[finite], b64[finite]
        na, nb = np.linalg.norm(af), np.linalg.norm(bf)
        cos = 1.0 if na == 0 and nb == 0 else float(np.dot(af, bf) / max(na * nb, 1e-300))
    return OutputAgreement(name, max_abs, max_rel, cos, tuple(np.shape(a)))


def compare(reference: onnx.ModelProto | str, candidate: onnx.ModelProto | str,
            feeds: dict[str, np.ndarray] | None = None, *, seed: int = 0,
            dim_sizes: dict[str, int] | None = None) -> list[OutputAgreement]:
    """Run both models on the same feeds and compare outputs by position.

    Returns:
        one :class:`OutputAgreement` per output of ``reference``.
    """
    if feeds is None:
        ref_proto = reference if isinstance(reference, onnx.ModelProto) else onnx.load(reference)
        feeds = make_inputs(ref_proto, seed=seed, dim_sizes=dim_sizes)
    ra = run(reference, feeds)
    rb = run(candidate, feeds)
    out = []
    for (na, a), (nb, b) in zip(ra.items(), rb.items()):
        out.append(agreement(a, b, na))
    return out


def symbolic_dims(proto: onnx.ModelProto) -> dict[str, list]:
    """Graph input (initializers excluded) → its dims: an int when fixed, the ``dim_param`` name
    when symbolic, ``"_"`` when unknown and unnamed."""
    inits = {t.name for t in proto.graph.initializer}
    out = {}
    for vi in proto.graph.input:
        if vi.name in inits or not vi.type.HasField("tensor_type"):
            continue
        out[vi.name] = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or "_")
                        for d in vi.type.tensor_type.shape.dim]
    return out


def default_dim_sizes(proto: onnx.ModelProto, dim_sizes: dict[str, int] | None = None) -> tuple[dict, int]:
    """(named dim → size, size for unnamed dims) for generated inputs.

    Named symbolic dims seen at axis 0 get :data:`BATCH_DIM`, others :data:`OTHER_DIM`;
    ``dim_sizes`` overrides. Unnamed unknown dims get BATCH_DIM when they only occur at
    axis 0, else OTHER_DIM.
    """
    given = dim_sizes or {}
    sizes = dict(given)
    unnamed_axes = set()
    inits = {t.name for t in proto.graph.initializer}
    for vi in proto.graph.input:
        if vi.name in inits or not vi.type.HasField("tensor_type"):
            continue
        for axis, d in enumerate(vi.type.tensor_type.shape.dim):
            if d.HasField("dim_value") and d.dim_value > 0:
                continue
            if d.dim_param:
                want = BATCH_DIM if axis == 0 else OTHER_DIM
                if d.dim_param not in given:
                    sizes[d.dim_param] = min(sizes.get(d.dim_param, want), want)
            else:
                unnamed_axes.add(axis)
    return sizes, BATCH_DIM if unnamed_axes <= {0} else OTHER_DIM


def to_numpy(x) -> np.ndarray:
    """A numpy array of ``x`` (numpy, or a torch tensor detached to CPU; bfloat16 widened to float32,
    which numpy lacks)."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        return x.numpy()
    return np.asarray(x)
