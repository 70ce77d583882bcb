"""Real transformer exports for the fusion rules: transformers models from small configs.

Every model is a ``transformers`` 5 model built from a config with random weights (no
downloads), exported to ONNX the way users export them:

- ``torch.onnx.export(dynamo=False, opset_version=17)`` (the TorchScript exporter) or
  ``dynamo=True`` (the torch.export-based exporter);
- ``attn_implementation="eager"`` (explicit MatMul / Softmax / MatMul) or ``"sdpa"``
  (``scaled_dot_product_attention``, which the TorchScript exporter decomposes with the
  scale split as ``sqrt(scale)`` on Q and on K);
- dynamic shapes (batch and sequence/image/audio axes symbolic) or static shapes.

Families (hidden 64 by default, 2 layers, 4 heads):

================  ===================  ===============================  ============================
name              model                inputs                           what it exercises
================  ===================  ===============================  ============================
``bert``          BertModel            input_ids, attention_mask int64  padding mask, erf Gelu
``vit``           ViTModel             pixel_values float32 (B,3,H,W)   no mask, pre-LN
``clip_text``     CLIPTextModel        input_ids, attention_mask int64  causal + padding mask,
                                                                        QuickGelu
``clip_vision``   CLIPVisionModel      pixel_values                     QuickGelu, pre-LN
``whisper_enc``   WhisperEncoder       input_features (B, mels, T)      no K bias, erf Gelu
``wav2vec2``      Wav2Vec2Model        input_values (B, samples)        conv feature encoder
================  ===================  ===============================  ============================

``size="test"`` uses short inputs (sequence 16, 32 px, 0.1 s of audio); ``size="bench"``
the issue's sizes (sequence 128, 224 px, 10 s of 16 kHz audio). Exports are cached per
directory (``export`` writes ``<dir>/<key>.onnx`` once).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FAMILIES = ("bert", "vit", "clip_text", "clip_vision", "whisper_enc", "wav2vec2")
HIDDEN, LAYERS, HEADS = 64, 2, 4


@dataclass(frozen=True)
class Variant:
    """One export: family, attention implementation, exporter and shapes."""

    family: str
    attn: str = "eager"          # "eager" | "sdpa"
    dynamic: bool = True
    dynamo: bool = False
    size: str = "test"           # "test" | "bench"
    hidden: int = HIDDEN
    heads: int = HEADS

    @property
    def key(self) -> str:
        shapes = "dyn" if self.dynamic else "static"
        exporter = "dynamo" if self.dynamo else "ts"
        extra = "" if (self.hidden, self.heads) == (HIDDEN, HEADS) else f"-h{self.hidden}x{self.heads}"
        return f"{self.family}-{self.attn}-{shapes}-{exporter}-{self.size}{extra}"

    @property
    def layers(self) -> int:
        return LAYERS


def variants(families=FAMILIES, attns=("eager", "sdpa"), dynamics=(True, False), size: str = "test"):
    """Every TorchScript-exporter combination of ``families`` × ``attns`` × ``dynamics``."""
    return [Variant(f, a, d, size=size) for f in families for a in attns for d in dynamics]


# --------------------------------------------------------------------------- models
def _sizes(size: str) -> dict:
    if size == "bench":
        return {"batch": 1, "seq": 128, "image": 224, "patch": 16, "audio_frames": 1000, "samples": 160000}
    return {"batch": 2, "seq": 16, "image": 32, "patch": 8, "audio_frames": 32, "samples": 4000}


def example_inputs(v: Variant, batch: int | None = None) -> tuple[dict, dict]:
    """The example inputs of ``v`` as torch tensors (padding in the last sequence of text inputs,
    so the mask matters), and the dynamic axes per input. ``batch`` overrides the batch size."""
    import torch

    s = _sizes(v.size)
    b = s["batch"] if batch is None else batch
    gen = torch.Generator().manual_seed(100 + FAMILIES.index(v.family) + 7 * b)
    seq = s["seq"]
    if v.family in ("bert", "clip_text"):
        lo = 3 if v.family == "clip_text" else 0
        ids = torch.randint(lo, 1000, (b, seq), generator=gen)
        if v.family == "clip_text":
            ids[:, -1] = 2  # eos
        mask = torch.ones(b, seq, dtype=torch.int64)
        mask[-1, seq * 3 // 4:] = 0
        axes = {0: "batch", 1: "seq"}
        return {"input_ids": ids, "attention_mask": mask}, {"input_ids": axes, "attention_mask": axes}
    if v.family in ("vit", "clip_vision"):
        return ({"pixel_values": torch.randn(b, 3, s["image"], s["image"], generator=gen)},
                {"pixel_values": {0: "batch"}})
    if v.family == "whisper_enc":
        # the encoder requires exactly 2 * max_source_positions frames: only the batch is dynamic
        return ({"input_features": torch.randn(b, 16, s["audio_frames"], generator=gen)},
                {"input_features": {0: "batch"}})
    if v.family == "wav2vec2":
        return ({"input_values": torch.randn(b, s["samples"], generator=gen)},
                {"input_values": {0: "batch", 1: "samples"}})
    raise ValueError(f"unknown family {v.family!r}; known: {', '.join(FAMILIES)}")


def build(v: Variant):
    """(torch module in eval mode, dict of example inputs, dynamic axes per input)."""
    import torch
    import transformers

    s = _sizes(v.size)
    common = dict(hidden_size=v.hidden, num_attention_heads=v.heads, num_hidden_layers=LAYERS,
                  intermediate_size=2 * v.hidden, attn_implementation=v.attn)
    gen = torch.Generator().manual_seed(FAMILIES.index(v.family))
    torch.manual_seed(FAMILIES.index(v.family))
    seq = s["seq"]
    inputs, axes = example_inputs(v)
    if v.family == "bert":
        cfg = transformers.BertConfig(vocab_size=1000, max_position_embeddings=max(seq, 64), **common)
        model = transformers.BertModel(cfg, add_pooling_layer=False)
    elif v.family == "vit":
        cfg = transformers.ViTConfig(image_size=s["image"], patch_size=s["patch"], **common)
        model = transformers.ViTModel(cfg, add_pooling_layer=False)
    elif v.family == "clip_vision":
        cfg = transformers.CLIPVisionConfig(image_size=s["image"], patch_size=s["patch"], **common)
        model = transformers.CLIPVisionModel(cfg)
    elif v.family == "clip_text":
        cfg = transformers.CLIPTextConfig(vocab_size=1000, max_position_embeddings=max(seq, 32), bos_token_id=0,
                                          eos_token_id=2, **common)
        model = transformers.CLIPTextModel(cfg)
    elif v.family == "whisper_enc":
        cfg = transformers.WhisperConfig(d_model=v.hidden, encoder_layers=LAYERS, encoder_attention_heads=v.heads,
                                         encoder_ffn_dim=2 * v.hidden, decoder_layers=1,
                                         decoder_attention_heads=v.heads, num_mel_bins=16,
                                         max_source_positions=s["audio_frames"] // 2, attn_implementation=v.attn)
        model = transformers.WhisperModel(cfg).get_encoder()
    else:  # wav2vec2 (example_inputs refused unknown families)
        cfg = transformers.Wav2Vec2Config(conv_dim=(32,) * 7, num_conv_pos_embeddings=16,
                                          num_conv_pos_embedding_groups=4, **common)
        model = transformers.Wav2Vec2Model(cfg)
    model.eval()
    # Random biases and LayerNorm affine parameters, so a fusion that drops one is caught; linear
    # weights of std 1.5/sqrt(fan_in) (transformers' default 0.02 leaves attention nearly uniform,
    # so a wrong scale or mask would change the outputs by less than the 1e-4 the tests allow).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name.lower():
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
            elif p.ndim == 2 and "embed" not in name:
                p.copy_(torch.randn(p.shape, generator=gen) * (1.5 / p.shape[1] ** 0.5))
    return model, inputs, axes


def _wrap(model, names):
    """``model`` as a module taking its inputs positionally (``forward(a)`` or ``forward(a, b)``: the
    dynamo exporter wants named parameters) and returning last_hidden_state."""
    import torch

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, a):
            return self.inner(**{names[0]: a}).last_hidden_state

    class Two(One):
        def forward(self, a, b):
            return self.inner(**{names[0]: a, names[1]: b}).last_hidden_state

    return (One if len(names) == 1 else Two)().eval()


def export(v: Variant, directory: str | os.PathLike) -> Path:
    """``v`` exported to ``<directory>/<v.key>.onnx`` (once; later calls return the file).

    Output ``last_hidden_state`` float32 (B, tokens, hidden).
    """
    import torch

    out = Path(directory) / f"{v.key}.onnx"
    if out.exists():
        return out
    model, inputs, axes = build(v)
    names = list(inputs)
    enc = _wrap(model, names)
    args = tuple(inputs.values())
    tmp = out.with_suffix(f".{os.getpid()}.tmp.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if v.dynamo:
            dyn = None
            if v.dynamic:
                dyn = {p: {k: torch.export.Dim.AUTO for k in axes[n]} for p, n in zip("ab", names)}
            torch.onnx.export(enc, args, str(tmp), input_names=names, output_names=["last_hidden_state"],
                              dynamic_shapes=dyn, opset_version=18, dynamo=True, optimize=True,
                              verbose=False)
        else:
            dyn = None
            if v.dynamic:
                dyn = {n: axes[n] for n in names}
                dyn["last_hidden_state"] = {0: "batch", 1: "tokens"}
            torch.onnx.export(enc, args, str(tmp), input_names=names, output_names=["last_hidden_state"],
                              dynamic_axes=dyn, opset_version=17, dynamo=False)
    import onnx

    proto = onnx.load(str(tmp), load_external_data=True)
    onnx.save(proto, str(out))  # one self-contained file (the dynamo exporter may write external data)
    for p in Path(directory).glob(f"{tmp.name}*"):
        p.unlink()
    return out


def feeds(v: Variant, batch: int | None = None) -> dict[str, np.ndarray]:
    """The example inputs of ``v`` as numpy arrays; ``batch`` picks another batch size (for
    dynamic exports)."""
    return {k: t.numpy() for k, t in example_inputs(v, batch)[0].items()}
