"""Structured pruning: graft side by side with Torch-Pruning (issue 5).

Models (random weights, seeded): the ResNet-style and MobileNetV3-style CNNs of
``examples/torch_models.py``; BERT (``BertForSequenceClassification``) and ViT
(``ViTForImageClassification``) built from transformers configs. Both tools prune
every coupled group at the same ratio with the same criterion (L2 magnitude of the
group): Torch-Pruning's ``MetaPruner`` with ``GroupMagnitudeImportance(p=2)``, heads
whole (``prune_num_heads=True, prune_head_dims=False``), the classifier ignored;
graft on the model exported to ONNX (``torch.onnx.export(dynamo=False)``) and, for
the torch path, captured with ``ir.from_torch``.

Per model and tool:

- MACs and parameters before → after, counted the same way for every row (graft's counter,
  ``graft.compiler.techniques.pruning.macs``, on the ONNX export — ``torch.onnx.export(dynamo=False)``, BatchNormalization
  folded by the exporter — of the pruned model, batch 1; for ``graft (torch)`` the pruned
  GraphModule is exported), plus each tool's own count for reference (``tool_macs`` in the JSON:
  Torch-Pruning's ``count_ops_and_params``, graft's report on the captured IR);
- whether the pruned model runs, and output deviation from the original;
- transformers: the head count the config / attention modules declare against the
  head count the projection shapes imply, whether the residual (hidden) dimension was
  pruned, and whether heads stayed whole;
- the spread of per-group ratios (``coupled layers keep the requested ratio``).

Usage::

    .venv/bin/python bench/bench_prune.py                  # ratio 0.5, all models
    .venv/bin/python bench/bench_prune.py --ratio 0.3 --models resnet bert --json out.json
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

warnings.filterwarnings("ignore")


@dataclass
class Row:
    model: str
    tool: str
    macs: tuple = (0, 0)
    params: tuple = (0, 0)
    tool_macs: tuple = ()
    runs: bool = False
    max_abs: float = float("nan")
    seconds: float = 0.0
    heads_declared: list = field(default_factory=list)
    heads_actual: list = field(default_factory=list)
    hidden_pruned: bool | None = None
    group_ratios: tuple = ()
    error: str = ""


# --------------------------------------------------------------------------- models
def models(names):
    import torch
    import transformers

    from examples.torch_models import mobilenetv3_style, resnet_style

    out = {}
    if "resnet" in names:
        out["resnet"] = (*resnet_style(batch=1, image=64), None)
    if "mobilenet" in names:
        out["mobilenet"] = (*mobilenetv3_style(batch=1, image=96), None)
    g = torch.Generator().manual_seed(0)
    if "bert" in names:
        torch.manual_seed(0)
        cfg = transformers.BertConfig(vocab_size=1000, hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                                      intermediate_size=1024, max_position_embeddings=128, num_labels=3)
        m = transformers.BertForSequenceClassification(cfg).eval()
        ids = torch.randint(0, 1000, (1, 64), generator=g)
        out["bert"] = (m, (ids, torch.ones(1, 64, dtype=torch.int64)), cfg)
    if "vit" in names:
        torch.manual_seed(0)
        cfg = transformers.ViTConfig(image_size=64, patch_size=8, hidden_size=192, num_hidden_layers=4,
                                     num_attention_heads=6, intermediate_size=768, num_labels=10)
        m = transformers.ViTForImageClassification(cfg).eval()
        out["vit"] = (m, (torch.randn(1, 3, 64, 64, generator=g),), cfg)
    return out


def _names(args):
    return ["input_ids", "attention_mask"] if len(args) == 2 else ["x"]


def export(module, args, path):
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), input_names=_names(args), output_names=["logits"],
                          opset_version=17, dynamo=False)
    return str(path)


def count(path) -> tuple[int, int]:
    from graft import ir
    from graft.compiler.techniques.pruning.macs import layer_costs, total_params

    m = ir.load(path)
    return sum(r.macs for r in layer_costs(m)), total_params(m)


def run_onnx(path, args):
    from graft.compiler.techniques import numeric

    return next(iter(numeric.run(path, {n: a.numpy() for n, a in zip(_names(args), args)}).values()))


def logits(module, args):
    import torch

    with torch.no_grad():
        out = module(*args)
    if isinstance(out, (tuple, list)):
        out = out[0]
    return (out.logits if hasattr(out, "logits") else out).numpy()


def attention_heads(module, cfg):
    """(declared heads per attention module, heads the q projection's width implies)."""
    declared, actual = [], []
    if cfg is None:
        return declared, actual
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    for m in module.modules():
        q = getattr(m, "query", None) or getattr(m, "q_proj", None)
        if q is None or not hasattr(q, "out_features"):
            continue
        declared.append(int(getattr(m, "num_attention_heads", getattr(m, "num_heads", cfg.num_attention_heads))))
        actual.append(q.out_features / head_dim)
    return declared, actual


# --------------------------------------------------------------------------- tools
def run_graft(name, module, args, cfg, ratio, tmp) -> list[Row]:
    import onnx

    from graft import ir
    from graft.compiler.techniques.pruning import PruneConfig, prune
    from graft.compiler.techniques.pruning.torch_path import prune_torch

    rows = []
    src = export(module, args, Path(tmp) / f"{name}.onnx")
    before = count(src)
    ref = logits(module, args)
    row = Row(name, "graft (ONNX)")
    try:
        t = time.perf_counter()
        m = ir.load(src)
        report = prune(m, PruneConfig(ratio=ratio, criterion="l2"))
        row.seconds = time.perf_counter() - t
        out = Path(tmp) / f"{name}.graft.onnx"
        ir.save(m, out)
        onnx.checker.check_model(str(out), full_check=True)
        row.macs, row.params = (before[0], count(out)[0]), (before[1], count(out)[1])
        row.max_abs = float(np.max(np.abs(run_onnx(str(out), args) - ref)))
        row.runs = True
        _group_facts(row, report)
        if cfg is not None:
            heads = [g for g in report.groups if g.kind == "heads"]
            declared = report.config_updates.get("num_attention_heads", cfg.num_attention_heads)
            row.heads_declared = [declared] * len(heads)
            row.heads_actual = [g.kept for g in heads]
    except Exception as e:  # noqa: BLE001 - the bench reports failures, it does not stop on them
        row.error = f"{type(e).__name__}: {str(e)[:200]}"
    rows.append(row)
    row = Row(name, "graft (torch)")
    try:
        t = time.perf_counter()
        gm, report = prune_torch(module, args, PruneConfig(ratio=ratio, criterion="l2"))
        row.seconds = time.perf_counter() - t
        # the same counter as the other rows: the pruned GraphModule exported to ONNX like the source model
        out = export(gm, args, Path(tmp) / f"{name}.graft_torch.onnx")
        row.macs, row.params = (before[0], count(out)[0]), (before[1], count(out)[1])
        row.tool_macs = (report.macs_before, report.macs_after)  # graft's own count on the captured IR
        row.max_abs = float(np.max(np.abs(logits(gm, args) - ref)))
        row.runs = True
        _group_facts(row, report)
        if cfg is not None:
            heads = [g for g in report.groups if g.kind == "heads"]
            row.heads_declared = [gm.config.num_attention_heads] * len(heads)
            row.heads_actual = [g.kept for g in heads]
    except Exception as e:  # noqa: BLE001
        row.error = f"{type(e).__name__}: {str(e)[:200]}"
    rows.append(row)
    return rows


def _group_facts(row: Row, report) -> None:
    ratios = [g.actual for g in report.groups if g.removed or (g.size and g.blocked < g.size)]
    row.group_ratios = (round(min(ratios), 3), round(max(ratios), 3)) if ratios else ()
    hidden = [g for g in report.groups if g.kind == "hidden"]
    row.hidden_pruned = bool(hidden and hidden[0].removed) if hidden else None


def run_torch_pruning(name, module, args, cfg, ratio, tmp) -> Row:
    import torch
    import torch_pruning as tp

    row = Row(name, "torch-pruning")
    module = copy.deepcopy(module)
    src = export(module, args, Path(tmp) / f"{name}.tp_src.onnx")
    before = count(src)
    ref = logits(module, args)
    ex = args if len(args) > 1 else args[0]
    try:
        m0 = tp.utils.count_ops_and_params(module, ex)
        ignored = [m for m in module.modules() if isinstance(m, torch.nn.Linear) and
                   m.out_features == (cfg.num_labels if cfg is not None else 10)]
        kw = {}
        widths = {}
        if cfg is not None:
            heads = {}
            for m in module.modules():
                q = getattr(m, "query", None) or getattr(m, "q_proj", None)
                if q is not None and hasattr(q, "out_features"):
                    k = getattr(m, "key", None) or getattr(m, "k_proj")
                    v = getattr(m, "value", None) or getattr(m, "v_proj")
                    heads.update({q: cfg.num_attention_heads, k: cfg.num_attention_heads, v: cfg.num_attention_heads})
            kw = dict(num_heads=heads, prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=ratio)
        widths = _widths(module, ignored)
        t = time.perf_counter()
        pruner = tp.pruner.MetaPruner(module, ex, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                      pruning_ratio=ratio, ignored_layers=ignored, **kw)
        pruner.step()
        row.seconds = time.perf_counter() - t
        m1 = tp.utils.count_ops_and_params(module, ex)
        row.tool_macs = (int(m0[0]), int(m1[0]))
        after = _widths(module, ignored)
        ratios = [1 - after[n] / widths[n] for n in after if widths[n] > 1]
        row.group_ratios = (round(min(ratios), 3), round(max(ratios), 3)) if ratios else ()
        if cfg is not None:
            row.heads_declared, row.heads_actual = attention_heads(module, cfg)
            emb = [p for n, p in module.named_parameters() if "embeddings" in n and p.ndim >= 2]
            row.hidden_pruned = bool(emb) and emb[0].shape[-1] < cfg.hidden_size
        out = Path(tmp) / f"{name}.tp.onnx"
        export(module, args, out)
        row.macs, row.params = (before[0], count(out)[0]), (before[1], count(out)[1])
        got = logits(module, args)
        row.max_abs = float(np.max(np.abs(got - ref)))
        row.runs = True
        if cfg is not None and any(d != a for d, a in zip(row.heads_declared, row.heads_actual)):
            # the forward still runs (transformers reshapes q/k/v with -1 heads of the unchanged head size),
            # but the attention modules' attributes and the config describe the unpruned model
            row.error = (f"stale head count: attention modules still declare {row.heads_declared} heads, the "
                         f"projections hold {row.heads_actual} (the forward runs; config/attributes not updated)")
    except Exception as e:  # noqa: BLE001
        row.error = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        row.error += " @ " + traceback.format_exc().strip().splitlines()[-3].strip()[:120]
    return row


def _widths(module, ignored) -> dict:
    """Output width of every prunable layer (Conv/Linear outputs, embedding and norm widths)."""
    import torch

    out = {}
    for n, m in module.named_modules():
        if m in ignored:
            continue
        if isinstance(m, torch.nn.Conv2d):
            out[n] = m.out_channels
        elif isinstance(m, torch.nn.Linear):
            out[n] = m.out_features
        elif isinstance(m, torch.nn.Embedding):
            out[n] = m.embedding_dim
        elif isinstance(m, (torch.nn.LayerNorm, torch.nn.BatchNorm2d)):
            out[n] = m.weight.shape[0]
    return out


# --------------------------------------------------------------------------- main
def _fmt(n):
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--models", nargs="+", default=["resnet", "mobilenet", "bert", "vit"])
    ap.add_argument("--json", help="write the rows as JSON here")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    rows = []
    with tempfile.TemporaryDirectory(prefix="graft-bench-prune-") as tmp:
        for name, (module, ex, cfg) in models(args.models).items():
            rows.extend(run_graft(name, module, ex, cfg, args.ratio, tmp))
            rows.append(run_torch_pruning(name, module, ex, cfg, args.ratio, tmp))
    print(f"pruning ratio {args.ratio} (L2 group magnitude); MACs/params by graft's counter on the ONNX export, "
          f"batch 1; 'own count': MACs by the tool's own counter")
    hdr = f"{'model':10} {'tool':15} {'MACs before → after':>24} {'cut':>6} {'params before → after':>24} " \
          f"{'own count':>20} {'runs':>5} {'max|Δ|':>8} {'group ratio':>12} {'hidden':>6} {'heads decl/actual':>18} " \
          f"{'s':>6}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        cut = f"{1 - r.macs[1] / r.macs[0]:.1%}" if r.macs[0] else "-"
        heads = (f"{r.heads_declared[0]}/{r.heads_actual[0]:g}" if r.heads_declared else "-")
        ratio = f"{r.group_ratios[0]:.2f}-{r.group_ratios[1]:.2f}" if r.group_ratios else "-"
        hidden = "-" if r.hidden_pruned is None else ("yes" if r.hidden_pruned else "no")
        own = _fmt(r.tool_macs[0]) + ' → ' + _fmt(r.tool_macs[1]) if r.tool_macs else "-"
        print(f"{r.model:10} {r.tool:15} {_fmt(r.macs[0]) + ' → ' + _fmt(r.macs[1]):>24} {cut:>6} "
              f"{_fmt(r.params[0]) + ' → ' + _fmt(r.params[1]):>24} {own:>20} {str(r.runs):>5} {r.max_abs:8.3g} "
              f"{ratio:>12} {hidden:>6} {heads:>18} {r.seconds:6.2f}")
        if r.error:
            print(f"{'':27}! {r.error}")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
