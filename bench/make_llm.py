"""A decoder-only transformer (Llama architecture) in ONNX, weights streamed to external data.

::

    .venv/bin/python bench/make_llm.py out/tinyllama.onnx                      # TinyLlama-1.1B shapes, 4.4 GB
    .venv/bin/python bench/make_llm.py out/llm6.onnx --layers 6                 # ~1.6 GB
    .venv/bin/python bench/make_llm.py out/tiny.onnx --hidden 64 --layers 2 --heads 4 --kv-heads 2 \\
        --intermediate 128 --vocab 256                                          # a test model

The graph is one prefill pass without a KV cache: ``input_ids int64[batch, seq]`` →
``logits float32[batch, seq, vocab]``. Per layer (Touvron et al. 2023, "LLaMA", §2.2; shapes of
the Hugging Face ``LlamaForCausalLM``):

- RMSNorm (Zhang & Sennrich 2019): ``x / sqrt(mean(x², -1) + eps) * g``;
- rotary position embedding (Su et al. 2021, RoFormer eq. 34, the "rotate half" form):
  ``q' = q cos + rotate_half(q) sin`` with ``θ_i = base^(-2i/d)``;
- grouped-query attention (Ainslie et al. 2023): ``kv_heads`` K/V heads, each shared by
  ``heads / kv_heads`` query heads; causal mask; softmax(q kᵀ / sqrt(head_dim)) v;
- SwiGLU MLP (Shazeer 2020): ``down(silu(gate(x)) * up(x))``.

Every linear layer is ``MatMul(x, W)`` with ``W`` of shape (in, out) = (K, N). The LM head
is its own matrix (``--untied``, the default for TinyLlama) or the embedding table read
transposed (``--tied``: ``MatMul(x, Transpose(embed))``).

Weights are N(0, 0.02) (the initializer range of Llama's config), norms' gains 1. Each
tensor is generated and written in chunks straight to ``<out>.data`` at 4 KiB-aligned
offsets (the ONNX external data convention: ``location``/``offset``/``length``), so peak
memory is one chunk, whatever the model size. The ``.onnx`` file itself holds only the graph
and the small tensors (rotary tables, shape constants).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ALIGN = 4096
CHUNK_ELEMENTS = 1 << 22  # 16 MiB of float32 per generation step


@dataclass(frozen=True)
class LlmConfig:
    """Shapes of a Llama-style decoder. Default: TinyLlama-1.1B
    (``TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T`` config.json)."""

    hidden: int = 2048
    layers: int = 22
    heads: int = 32
    kv_heads: int = 4
    intermediate: int = 5632
    vocab: int = 32000
    max_positions: int = 2048
    rope_base: float = 10000.0
    rms_eps: float = 1e-5
    tied: bool = False
    std: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def check(self) -> "LlmConfig":
        if self.hidden % self.heads:
            raise ValueError(f"hidden {self.hidden} is not a multiple of heads {self.heads}")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads {self.heads} is not a multiple of kv_heads {self.kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embedding")
        return self

    def parameters(self) -> int:
        """Weight elements (embedding, layers, final norm, LM head unless tied)."""
        h, kv = self.hidden, self.kv_heads * self.head_dim
        layer = 2 * h * h + 2 * h * kv + 3 * h * self.intermediate + 2 * h
        return self.vocab * h * (1 if self.tied else 2) + self.layers * layer + h


TINYLLAMA = LlmConfig()


class ExternalWriter:
    """Appends tensors to one external data file and returns their ``TensorProto`` stubs."""

    def __init__(self, data_path: Path, location: str, seed: int):
        self.f = open(data_path, "wb")
        self.location = location
        self.rng = np.random.default_rng(seed)
        self.bytes = 0

    def _stub(self, name: str, dims, offset: int, length: int) -> TensorProto:
        t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(dims),
                        data_location=TensorProto.EXTERNAL)
        for k, v in (("location", self.location), ("offset", str(offset)), ("length", str(length))):
            e = t.external_data.add()
            e.key, e.value = k, v
        return t

    def _align(self) -> int:
        off = self.f.tell()
        if off % ALIGN:
            self.f.write(b"\0" * (ALIGN - off % ALIGN))
        return self.f.tell()

    def normal(self, name: str, dims, std: float) -> TensorProto:
        """A float32 tensor of N(0, std²) entries, written chunk by chunk."""
        offset = self._align()
        n = math.prod(dims)
        left = n
        while left:
            k = min(left, CHUNK_ELEMENTS)
            chunk = self.rng.standard_normal(k, dtype=np.float32)
            chunk *= np.float32(std)
            self.f.write(chunk.tobytes())
            left -= k
        self.bytes += 4 * n
        return self._stub(name, dims, offset, 4 * n)

    def constant(self, name: str, dims, value: float) -> TensorProto:
        offset = self._align()
        self.f.write(np.full(dims, value, np.float32).tobytes())
        n = 4 * math.prod(dims)
        self.bytes += n
        return self._stub(name, dims, offset, n)

    def close(self) -> None:
        self.f.close()


class _Graph:
    """Node and initializer lists with unique names."""

    def __init__(self):
        self.nodes: list = []
        self.inits: list = []
        self._n = 0

    def op(self, op_type: str, inputs, name: str, n_out: int = 1, **attrs):
        outs = [f"{name}_out" if n_out == 1 else f"{name}_out{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=name, **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, name: str, array) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name


def _rms_norm(g: _Graph, x: str, gain: str, eps: str, name: str) -> str:
    sq = g.op("Mul", [x, x], f"{name}_sq")
    mean = g.op("ReduceMean", [sq, "axes_last"], f"{name}_mean", keepdims=1)
    var = g.op("Add", [mean, eps], f"{name}_add_eps")
    rstd = g.op("Sqrt", [var], f"{name}_sqrt")
    normed = g.op("Div", [x, rstd], f"{name}_div")
    return g.op("Mul", [normed, gain], f"{name}_scale")


def _rotary(g: _Graph, x: str, cos: str, sin: str, half: int, name: str) -> str:
    """x: [B, heads, S, D]; cos/sin: [1, 1, S, D]."""
    x1 = g.op("Slice", [x, "rope_zero", "rope_half", "axes_last"], f"{name}_x1")
    x2 = g.op("Slice", [x, "rope_half", "rope_end", "axes_last"], f"{name}_x2")
    neg = g.op("Neg", [x2], f"{name}_neg")
    rot = g.op("Concat", [neg, x1], f"{name}_rot", axis=-1)
    a = g.op("Mul", [x, cos], f"{name}_cos")
    b = g.op("Mul", [rot, sin], f"{name}_sin")
    return g.op("Add", [a, b], f"{name}_out")


def build(path: str | os.PathLike, cfg: LlmConfig = TINYLLAMA, *, seed: int = 0, opset: int = 21) -> Path:
    """Write the model to ``path`` and its weights to ``<path>.data``; returns ``path``.

    The data file is written first, then the ``.onnx`` file (a model file never points at
    missing data). Memory: one chunk of ``CHUNK_ELEMENTS`` floats plus the graph.
    """
    cfg.check()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    location = path.name + ".data"
    w = ExternalWriter(path.parent / location, location, seed)
    g = _Graph()
    h, hd, nh, nkv = cfg.hidden, cfg.head_dim, cfg.heads, cfg.kv_heads
    rep = nh // nkv
    try:
        # constants: small, inline
        g.const("axes_last", np.array([-1], np.int64))
        g.const("axes_0", np.array([0], np.int64))
        g.const("axes_2", np.array([2], np.int64))
        g.const("eps", np.array(cfg.rms_eps, np.float32))
        g.const("rope_zero", np.array([0], np.int64))
        g.const("rope_half", np.array([hd // 2], np.int64))
        g.const("rope_end", np.array([hd], np.int64))
        g.const("one_i64", np.array(1, np.int64))
        g.const("zero_i64", np.array(0, np.int64))
        g.const("neg_big", np.array(-1e9, np.float32))
        g.const("scale", np.array(1.0 / math.sqrt(hd), np.float32))
        g.const("shape_q", np.array([0, 0, nh, hd], np.int64))
        g.const("shape_kv", np.array([0, 0, nkv, hd], np.int64))
        g.const("shape_h", np.array([0, 0, h], np.int64))
        inv = cfg.rope_base ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
        ang = np.arange(cfg.max_positions, dtype=np.float64)[:, None] * inv[None, :]
        ang = np.concatenate([ang, ang], axis=1)
        g.const("rope_cos", np.cos(ang).astype(np.float32))
        g.const("rope_sin", np.sin(ang).astype(np.float32))

        embed = w.normal("model.embed_tokens.weight", (cfg.vocab, h), cfg.std)
        g.inits.append(embed)
        x = g.op("Gather", [embed.name, "input_ids"], "embed", axis=0)
        # positions 0..S-1 → cos/sin [1, 1, S, hd]
        shape = g.op("Shape", ["input_ids"], "ids_shape")
        seq = g.op("Gather", [shape, "one_i64"], "seq_len", axis=0)
        pos = g.op("Range", ["zero_i64", seq, "one_i64"], "positions")
        cos = g.op("Gather", ["rope_cos", pos], "cos_gather", axis=0)
        sin = g.op("Gather", ["rope_sin", pos], "sin_gather", axis=0)
        cos = g.op("Unsqueeze", [cos, g.const("axes_01", np.array([0, 1], np.int64))], "cos_4d")
        sin = g.op("Unsqueeze", [sin, "axes_01"], "sin_4d")
        # causal mask [S, S]: -1e9 above the diagonal
        seq1 = g.op("Unsqueeze", [seq, "axes_0"], "seq_1d")
        sq_shape = g.op("Concat", [seq1, seq1], "mask_shape", axis=0)
        ones = g.op("ConstantOfShape", [sq_shape], "mask_ones",
                    value=helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0]))
        upper = g.op("Trilu", [ones, "one_i64"], "mask_upper", upper=1)
        mask = g.op("Mul", [upper, "neg_big"], "causal_mask")

        for i in range(cfg.layers):
            p = f"model.layers.{i}"
            ln1 = w.constant(f"{p}.input_layernorm.weight", (h,), 1.0)
            ln2 = w.constant(f"{p}.post_attention_layernorm.weight", (h,), 1.0)
            wq = w.normal(f"{p}.self_attn.q_proj.weight", (h, nh * hd), cfg.std)
            wk = w.normal(f"{p}.self_attn.k_proj.weight", (h, nkv * hd), cfg.std)
            wv = w.normal(f"{p}.self_attn.v_proj.weight", (h, nkv * hd), cfg.std)
            wo = w.normal(f"{p}.self_attn.o_proj.weight", (nh * hd, h), cfg.std)
            wg = w.normal(f"{p}.mlp.gate_proj.weight", (h, cfg.intermediate), cfg.std)
            wu = w.normal(f"{p}.mlp.up_proj.weight", (h, cfg.intermediate), cfg.std)
            wd = w.normal(f"{p}.mlp.down_proj.weight", (cfg.intermediate, h), cfg.std)
            g.inits += [ln1, ln2, wq, wk, wv, wo, wg, wu, wd]
            n = f"l{i}"
            hn = _rms_norm(g, x, ln1.name, "eps", f"{n}_ln1")
            q = g.op("MatMul", [hn, wq.name], f"{n}_q_proj")
            k = g.op("MatMul", [hn, wk.name], f"{n}_k_proj")
            v = g.op("MatMul", [hn, wv.name], f"{n}_v_proj")
            q = g.op("Transpose", [g.op("Reshape", [q, "shape_q"], f"{n}_q_reshape")], f"{n}_q_t", perm=[0, 2, 1, 3])
            k = g.op("Transpose", [g.op("Reshape", [k, "shape_kv"], f"{n}_k_reshape")], f"{n}_k_t", perm=[0, 2, 1, 3])
            v = g.op("Transpose", [g.op("Reshape", [v, "shape_kv"], f"{n}_v_reshape")], f"{n}_v_t", perm=[0, 2, 1, 3])
            q = _rotary(g, q, cos, sin, hd // 2, f"{n}_q_rope")
            k = _rotary(g, k, cos, sin, hd // 2, f"{n}_k_rope")
            if rep > 1:  # [B, kv, S, D] → [B, kv, rep, S, D] → [B, heads, S, D]
                kv_shape = g.op("Shape", [k], f"{n}_kv_shape")
                b_dim = g.op("Slice", [kv_shape, "rope_zero", g.const(f"{n}_c1", np.array([1], np.int64))],
                             f"{n}_b_dim")
                s_dim = g.op("Slice", [kv_shape, g.const(f"{n}_c2", np.array([2], np.int64)),
                                       g.const(f"{n}_c3", np.array([3], np.int64))], f"{n}_s_dim")
                exp_shape = g.op("Concat", [b_dim, g.const(f"{n}_kvrep", np.array([nkv, rep], np.int64)), s_dim,
                                            g.const(f"{n}_hd", np.array([hd], np.int64))], f"{n}_exp_shape", axis=0)
                flat_shape = g.op("Concat", [b_dim, g.const(f"{n}_nh", np.array([nh], np.int64)), s_dim,
                                             f"{n}_hd"], f"{n}_flat_shape", axis=0)
                k = g.op("Reshape", [g.op("Expand", [g.op("Unsqueeze", [k, "axes_2"], f"{n}_k_unsq"), exp_shape],
                                          f"{n}_k_expand"), flat_shape], f"{n}_k_rep")
                v = g.op("Reshape", [g.op("Expand", [g.op("Unsqueeze", [v, "axes_2"], f"{n}_v_unsq"), exp_shape],
                                          f"{n}_v_expand"), flat_shape], f"{n}_v_rep")
            kt = g.op("Transpose", [k], f"{n}_k_transpose", perm=[0, 1, 3, 2])
            s = g.op("Mul", [g.op("MatMul", [q, kt], f"{n}_qk"), "scale"], f"{n}_qk_scaled")
            s = g.op("Add", [s, mask], f"{n}_masked")
            a = g.op("MatMul", [g.op("Softmax", [s], f"{n}_softmax", axis=-1), v], f"{n}_attn_v")
            a = g.op("Reshape", [g.op("Transpose", [a], f"{n}_attn_t", perm=[0, 2, 1, 3]), "shape_h"],
                     f"{n}_attn_merge")
            x = g.op("Add", [x, g.op("MatMul", [a, wo.name], f"{n}_o_proj")], f"{n}_attn_residual")
            hn = _rms_norm(g, x, ln2.name, "eps", f"{n}_ln2")
            gate = g.op("MatMul", [hn, wg.name], f"{n}_gate_proj")
            up = g.op("MatMul", [hn, wu.name], f"{n}_up_proj")
            act = g.op("Mul", [gate, g.op("Sigmoid", [gate], f"{n}_sigmoid")], f"{n}_silu")
            down = g.op("MatMul", [g.op("Mul", [act, up], f"{n}_swiglu"), wd.name], f"{n}_down_proj")
            x = g.op("Add", [x, down], f"{n}_mlp_residual")

        fn = w.constant("model.norm.weight", (h,), 1.0)
        g.inits.append(fn)
        x = _rms_norm(g, x, fn.name, "eps", "final_norm")
        if cfg.tied:
            head = g.op("Transpose", [embed.name], "lm_head_transpose", perm=[1, 0])
        else:
            lm = w.normal("lm_head.weight", (h, cfg.vocab), cfg.std)
            g.inits.append(lm)
            head = lm.name
        g.nodes.append(helper.make_node("MatMul", [x, head], ["logits"], name="lm_head"))
    finally:
        w.close()
    graph = helper.make_graph(
        g.nodes, "llm", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", cfg.vocab])], g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10,
                              producer_name="graft-bench-make_llm")
    model.doc_string = (f"Llama-style decoder: hidden {h}, {cfg.layers} layers, {nh} heads / {nkv} KV heads, "
                        f"intermediate {cfg.intermediate}, vocab {cfg.vocab}, {'tied' if cfg.tied else 'untied'} "
                        f"LM head; random N(0, {cfg.std}) weights (seed {seed})")
    onnx.save_model(model, str(path))
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="the .onnx file to write (its weights go to OUT.data)")
    d = TINYLLAMA
    ap.add_argument("--hidden", type=int, default=d.hidden)
    ap.add_argument("--layers", type=int, default=d.layers)
    ap.add_argument("--heads", type=int, default=None, help=f"default: {d.heads} (hidden / 64 if --hidden is given)")
    ap.add_argument("--kv-heads", type=int, default=None, help=f"default: {d.kv_heads} (heads / 8 if smaller)")
    ap.add_argument("--intermediate", type=int, default=None, help="default: 2.75 × hidden (TinyLlama's ratio)")
    ap.add_argument("--vocab", type=int, default=d.vocab)
    ap.add_argument("--max-positions", type=int, default=d.max_positions)
    ap.add_argument("--tied", action="store_true", help="LM head reads the embedding table transposed")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--opset", type=int, default=21)
    a = ap.parse_args(argv)
    heads = a.heads if a.heads is not None else (d.heads if a.hidden == d.hidden else max(1, a.hidden // 64))
    kv = a.kv_heads if a.kv_heads is not None else max(1, heads // 8)
    inter = a.intermediate if a.intermediate is not None else int(round(a.hidden * 2.75 / 64)) * 64
    cfg = replace(d, hidden=a.hidden, layers=a.layers, heads=heads, kv_heads=kv, intermediate=inter,
                  vocab=a.vocab, max_positions=a.max_positions, tied=a.tied)
    try:
        cfg.check()
    except ValueError as e:
        print(f"make_llm: {e}", file=sys.stderr)
        return 2
    p = build(a.out, cfg, seed=a.seed, opset=a.opset)
    size = (p.parent / (p.name + ".data")).stat().st_size
    print(f"wrote {p} (+ {p.name}.data, {size / 2**30:.2f} GiB): {cfg.parameters() / 1e6:.0f}M parameters, {cfg}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
