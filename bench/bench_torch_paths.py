"""Time the torch paths: capture (torch.export), ATen → ONNX lowering, the optimize pipeline, and the
two backends, on real architectures. Prints a table; asserts nothing.

    .venv/bin/python bench/bench_torch_paths.py            # small configs + MiniLM + CNNs
    .venv/bin/python bench/bench_torch_paths.py --base     # adds BERT-base and ViT-base (random weights)
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/ lives in the repository root

from graft import ir  # noqa: E402
from graft.compiler import compile  # noqa: E402
from graft.ir import zoo  # noqa: E402
from examples.torch_models import mobilenetv3_style, resnet_style  # noqa: E402
from graft.rules.lower_aten_pipeline import lower  # noqa: E402


def models(base: bool):
    g = torch.Generator().manual_seed(0)
    small = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    ids = torch.randint(0, 100, (2, 16), generator=g)
    yield "bert-small", transformers.BertModel(transformers.BertConfig(**small, vocab_size=100)).eval(), \
        {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    yield "minilm (real)", zoo.minilm_torch(), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    yield "resnet-style", *resnet_style()
    yield "mobilenetv3-style", *mobilenetv3_style()
    if base:
        ids = torch.randint(0, 30000, (1, 64), generator=g)
        yield "bert-base", transformers.BertModel(transformers.BertConfig()).eval(), \
            {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        yield "vit-base", transformers.ViTModel(transformers.ViTConfig()).eval(), \
            {"pixel_values": torch.randn(1, 3, 224, 224, generator=g)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", action="store_true", help="also base-size transformers")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    print(f"{'model':20} {'nodes':>6} {'capture':>8} {'lower':>7} {'to_torch':>9} {'compile onnx':>13} "
          f"{'compile torch':>14} {'max abs (onnx)':>15}")
    for name, module, inputs in models(args.base):
        t = time.perf_counter()
        model = ir.from_torch(module, inputs)
        capture = time.perf_counter() - t
        nodes = len(model.graph)
        t = time.perf_counter()
        lower(model)
        lowering = time.perf_counter() - t
        t = time.perf_counter()
        ir.to_torch(model)
        backend = time.perf_counter() - t
        t = time.perf_counter()
        res = compile(module, inputs, target="onnx")
        c_onnx = time.perf_counter() - t
        t = time.perf_counter()
        compile(module, inputs, target="torch")
        c_torch = time.perf_counter() - t
        err = max(o.max_abs for o in res.outputs)
        print(f"{name:20} {nodes:>6} {capture:>7.2f}s {lowering:>6.2f}s {backend:>8.2f}s {c_onnx:>12.2f}s "
              f"{c_torch:>13.2f}s {err:>15.2e}")


if __name__ == "__main__":
    main()
