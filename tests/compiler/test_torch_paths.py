"""The four paths on real architectures: torch→torch, torch→ONNX (ONNX→torch and ONNX→ONNX are in
tests/ir/test_torch_backend.py and the ONNX suites), through ``compiler.compile`` and ``graft compile``.

Models are built locally (no downloads): transformers BERT, ViT, CLIP vision and text towers from
small configs with random weights, all-MiniLM-L6-v2 with its real weights, and the ResNet-style and
MobileNetV3-style CNNs of examples/torch_models.py. Each is compiled once per target (module scope).
"""
from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest

import torch
import transformers
from click.testing import CliRunner  # noqa: E402

from graft import ir  # noqa: E402
from graft.compiler import CompileResult, compile  # noqa: E402
from graft.ir import zoo  # noqa: E402
from graft.compiler.techniques import numeric
from graft.compiler.driver.api import CompileError  # noqa: E402
from examples.torch_models import mobilenetv3_style, resnet_style  # noqa: E402
from graft.ir.torch_backend import load_module  # noqa: E402

warnings.filterwarnings("ignore", category=UserWarning)
SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)


def _ids(shape, hi, seed=0):
    return torch.randint(0, hi, shape, generator=torch.Generator().manual_seed(seed))


def bert():
    torch.manual_seed(0)
    m = transformers.BertModel(transformers.BertConfig(**SMALL, vocab_size=100, max_position_embeddings=64)).eval()
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 11:] = 0
    return m, {"input_ids": _ids((2, 16), 100), "attention_mask": mask}


def vit():
    torch.manual_seed(1)
    m = transformers.ViTModel(transformers.ViTConfig(**SMALL, image_size=32, patch_size=8)).eval()
    return m, {"pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))}


def clip_vision():
    torch.manual_seed(2)
    m = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**SMALL, image_size=32, patch_size=8)).eval()
    return m, {"pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))}


def clip_text():
    torch.manual_seed(3)
    cfg = transformers.CLIPTextConfig(**SMALL, vocab_size=100, max_position_embeddings=32, bos_token_id=0,
                                      eos_token_id=2)
    ids = _ids((2, 12), 100, seed=3)
    ids[:, -1] = 2  # the pooled output reads the eos position
    return transformers.CLIPTextModel(cfg).eval(), {"input_ids": ids}


def minilm():
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[0, 12:] = 0
    return zoo.minilm_torch(), {"input_ids": _ids((2, 16), 30000), "attention_mask": mask}


MODELS = {"bert": bert, "vit": vit, "clip_vision": clip_vision, "clip_text": clip_text, "minilm": minilm,
          "resnet": resnet_style, "mobilenetv3": mobilenetv3_style}
_CACHE: dict = {}


def compiled(name: str, target: str) -> tuple:
    """(module, example inputs, CompileResult) with the optimize pipeline, computed once."""
    if name not in _CACHE:
        _CACHE[name] = MODELS[name]()
    module, inputs = _CACHE[name]
    key = (name, target)
    if key not in _CACHE:
        _CACHE[key] = compile(module, inputs, pipeline="optimize", target=target)
    return module, inputs, _CACHE[key]


def _call(m, inputs):
    return m(**inputs) if isinstance(inputs, dict) else m(*inputs)


def _flat(out) -> list:
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, (tuple, list)):
        return [y for x in out for y in _flat(x)]
    return [out]


@pytest.mark.parametrize("name", list(MODELS))
def test_torch_to_torch_equals_eager(name):
    module, inputs, res = compiled(name, "torch")
    assert isinstance(res, CompileResult) and res.verification.status == "passed"
    gm = res.module
    assert isinstance(gm, torch.fx.GraphModule)
    with torch.no_grad():
        ref, got = _flat(_call(module, inputs)), _flat(_call(gm, inputs))
    assert len(ref) == len(got)
    for r, g in zip(ref, got):
        assert r.shape == g.shape
        torch.testing.assert_close(g, r, rtol=0, atol=1e-5)
    assert not any(n.domain == "aten" for n in res.model.graph)  # fully lowered to ONNX ops


@pytest.mark.parametrize("name", list(MODELS))
def test_torch_to_onnx_runs_in_onnxruntime(name):
    module, inputs, res = compiled(name, "onnx")
    proto = res.proto
    onnx.checker.check_model(proto, full_check=True)
    assert {o.domain for o in proto.opset_import} == {""} and proto.opset_import[0].version == 18
    with torch.no_grad():
        ref = _flat(_call(module, inputs))
    feeds = {k: v.numpy() for k, v in inputs.items()} if isinstance(inputs, dict) else \
        {i.name: t.numpy() for i, t in zip(proto.graph.input, inputs)}
    got = list(numeric.run(proto, feeds).values())
    assert len(got) == len(ref)
    for r, g in zip(ref, got):
        np.testing.assert_allclose(g, r.numpy(), rtol=0, atol=1e-4)
    # node metadata names the user's modules, so diffs read like the model
    mods = {p.value for n in proto.graph.node for p in n.metadata_props if p.key == "torch.module"}
    assert len(mods) > 3


@pytest.mark.parametrize("name", list(MODELS))
def test_one_optimizer_step_changes_the_emitted_parameters(name):
    module, inputs, res = compiled(name, "torch")
    gm = res.module
    params = dict(gm.named_parameters())
    assert params and all(p.requires_grad for p in params.values())
    before = {k: v.detach().clone() for k, v in params.items()}
    opt = torch.optim.SGD(gm.parameters(), lr=0.01)
    out = _flat(_call(gm, inputs))[0]
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    opt.step()
    changed = [k for k, v in params.items() if not torch.equal(before[k], v)]
    assert len(changed) >= 0.5 * len(params), f"only {len(changed)} of {len(params)} parameters changed"
    # the eager model is untouched
    with torch.no_grad():
        assert torch.equal(_flat(_call(module, inputs))[0], _flat(_call(module, inputs))[0])


@pytest.mark.parametrize("name", ["resnet", "mobilenetv3"])
def test_optimize_folds_batchnorm_in_both_outputs(name):
    module, _, onnx_res = compiled(name, "onnx")
    _, _, torch_res = compiled(name, "torch")
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in module.modules())
    n_conv = sum(isinstance(m, torch.nn.Conv2d) for m in module.modules())
    assert onnx_res.counts["fold_batchnorm_into_conv"] == n_bn
    ops = [n.op_type for n in onnx_res.proto.graph.node]
    assert "BatchNormalization" not in ops and ops.count("Conv") == n_conv
    from graft.ir import torch_ops_nn

    targets = [n.target for n in torch_res.module.graph.nodes if n.op == "call_function"]
    assert torch_ops_nn.BatchNormalization not in targets and targets.count(torch_ops_nn.Conv) == n_conv
    assert not any("running_mean" in k for k in torch_res.module.state_dict())


def test_report_lists_lowering_rules_and_agreement():
    _, _, res = compiled("bert", "onnx")
    text = res.report(width=120)
    assert "lower_aten_linear" in text and "lower_aten_scaled_dot_product_attention" in text
    assert "BertModel" in text and "input_ids" in text and "verified" in text


def test_dynamic_shapes_bert_runs_at_other_sizes():
    module, _ = bert()
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq", max=64)}
    from graft.rules.lower_aten_pipeline import lower

    inputs = {"input_ids": _ids((2, 16), 100), "attention_mask": torch.ones(2, 16, dtype=torch.long)}
    model = ir.from_torch(module, inputs, dynamic_shapes={"input_ids": dims, "attention_mask": dims})
    lower(model)
    proto = ir.to_onnx(model)
    onnx.checker.check_model(proto, full_check=True)
    assert [d.dim_param for d in proto.graph.input[0].type.tensor_type.shape.dim] == ["batch", "seq"]
    gm = ir.to_torch(model)
    for b, s in [(1, 5), (3, 23)]:
        feeds = {"input_ids": _ids((b, s), 100, seed=b), "attention_mask": torch.ones(b, s, dtype=torch.long)}
        with torch.no_grad():
            ref = _flat(module(**feeds))
            back = gm(**feeds)
        got = list(numeric.run(proto, {k: v.numpy() for k, v in feeds.items()}).values())
        for r, g, t in zip(ref, got, back):
            np.testing.assert_allclose(g, r.numpy(), atol=1e-4)
            torch.testing.assert_close(t, r, rtol=0, atol=1e-5)


def test_compile_passes_dynamic_shapes_to_the_frontend():
    module, inputs = bert()
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq", max=64)}
    res = compile(module, inputs, dynamic_shapes={"input_ids": dims, "attention_mask": dims})
    assert res.verification.status == "passed"
    shape = res.proto.graph.output[0].type.tensor_type.shape
    assert [d.dim_param or d.dim_value for d in shape.dim] == ["batch", "seq", 64]
    with pytest.raises(CompileError, match="dynamic_shapes applies to torch models"):
        compile("ppocr-cls", dynamic_shapes={"x": {0: "batch"}})


def test_exported_program_and_graph_module_inputs_compile():
    module, inputs = resnet_style(batch=1, image=16)
    ep = torch.export.export(module, inputs)
    res = compile(ep, inputs, target="onnx")
    assert res.verification.status == "passed" and res.counts["fold_batchnorm_into_conv"] == 9
    res2 = compile(torch.fx.symbolic_trace(module), inputs, target="torch")
    with torch.no_grad():
        torch.testing.assert_close(res2.module(*inputs), module(*inputs), rtol=0, atol=1e-5)


class Odd(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)
        self.special = torch.nn.Sequential(torch.nn.Identity())

    def forward(self, x):
        return torch.special.bessel_j0(self.proj(x))


def test_unlowered_ops_refuse_onnx_and_run_in_torch():
    module, x = Odd().eval(), torch.randn(3, 4)
    with pytest.raises(CompileError) as e:
        compile(module, (x,), target="onnx")
    assert "aten::special_bessel_j0.default" in str(e.value) and "target='torch'" in str(e.value)
    res = compile(module, (x,), target="torch")
    assert res.verification.status == "passed"
    assert [n.op_type for n in res.model.graph if n.domain == "aten"] == ["special_bessel_j0.default"]


def test_inplace_ops_are_functionalized():
    class Residual(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
            self.act = torch.nn.ReLU(inplace=True)

        def forward(self, x):
            y = self.conv(x)
            y += x
            return self.act(y)

    module, x = Residual().eval(), torch.randn(1, 3, 6, 6)
    res = compile(module, (x,), target="onnx")
    assert [n.op_type for n in res.proto.graph.node] == ["Conv", "Add", "Relu"]


def test_base_size_bert_to_onnx():
    torch.manual_seed(0)
    module = transformers.BertModel(transformers.BertConfig()).eval()  # bert-base: 12 layers, hidden 768
    inputs = {"input_ids": _ids((1, 8), 30000), "attention_mask": torch.ones(1, 8, dtype=torch.long)}
    res = compile(module, inputs, target="onnx")
    assert res.verification.status == "passed"
    assert max(o.max_abs for o in res.outputs) <= 1e-4
    assert res.counts["lower_aten_linear"] == 12 * 6 + 1


# ----------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def cli():
    from graft.compiler.driver.cli import main

    runner = CliRunner()
    return lambda *args: runner.invoke(main, list(args), catch_exceptions=False)


def test_cli_compiles_a_torch_factory_to_onnx_and_torch(cli, tmp_path):
    out = tmp_path / "r.onnx"
    r = cli("compile", "--torch", "examples.torch_models:resnet_style", "--input-shape", "2x3x32x32", "-o", str(out))
    assert r.exit_code == 0, r.output
    assert "fold_batchnorm_into_conv" in r.output and "lower_aten_conv2d" in r.output
    module, (x,) = resnet_style()
    got = list(numeric.run(str(out), {"x": x.numpy()}).values())[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, module(x).numpy(), atol=1e-4)
    pt = tmp_path / "m.pt2"
    r = cli("compile", "--torch", "examples.torch_models:mobilenetv3_style", "--target", "torch", "-o", str(pt))
    assert r.exit_code == 0, r.output
    assert "m.pt2: torch.export program" in r.output  # the summary says which format was written
    gm = load_module(pt)
    module, (x,) = mobilenetv3_style()
    with torch.no_grad():
        torch.testing.assert_close(gm(x), module(x), rtol=0, atol=1e-5)


def test_cli_torch_errors_are_one_line(cli, tmp_path):
    out = tmp_path / "bad.onnx"
    r = cli("compile", "--torch", "examples.torch_models:resnet_style", "--input-shape", "2x4x32x32", "-o", str(out))
    assert r.exit_code == 1
    line = r.output.strip()
    assert "\n" not in line and "module 'stem.0.0' (Conv2d) rejects example input 'x'" in line
    assert "[N, 3, H, W]" in line and not out.exists()
    r = cli("compile", "--torch", "examples.torch_models:nope", "-o", str(out))
    assert r.exit_code == 1 and "has no callable 'nope'" in r.output
    r = cli("compile", "--torch", "examples.torch_models:resnet_style", "--input-shape", "2by3", "-o", str(out))
    assert r.exit_code == 1 and "--input-shape 2by3" in r.output


def test_graft_diff_reads_like_the_torch_model(cli, tmp_path):
    a, b = tmp_path / "captured.onnx", tmp_path / "optimized.onnx"
    spec = ["--torch", "examples.torch_models:resnet_style", "--input-shape", "1x3x16x16"]
    assert cli("compile", *spec, "--pipeline", "none", "-o", str(a)).exit_code == 0
    assert cli("compile", *spec, "-o", str(b)).exit_code == 0
    r = cli("diff", str(a), str(b))
    assert r.exit_code == 0, r.output
    assert "fold_batchnorm_into_conv" in r.output
    assert "conv2d/Conv" in r.output or "batch_norm/BatchNormalization" in r.output


# ----------------------------------------------------------------------------- found by trying to break it
def test_emitted_transformer_keeps_linear_weights_under_their_source_names():
    module, _, res = compiled("bert", "torch")
    params = dict(res.module.named_parameters())
    src = dict(module.named_parameters())
    linear = [k for k, v in src.items() if k.endswith(".weight") and v.dim() == 2 and "embeddings" not in k]
    assert len(linear) == 2 * 6 + 1  # q, k, v, attention out, intermediate, output per layer; pooler
    inits = res.model.graph.initializers
    for k in linear:  # same name and [out, in] layout (the cached module may have taken an optimizer step)
        assert k in params and params[k].shape == src[k].shape, k
        cos = torch.nn.functional.cosine_similarity(params[k].detach().flatten(), src[k].detach().flatten(), dim=0)
        assert cos > 0.99, (k, float(cos))
        if k != "pooler.dense.weight":  # the pooler's Linear is on 2-D input: Gemm(transB=1) reads W itself
            np.testing.assert_array_equal(inits[f"{k}_T"].const.array, src[k].detach().numpy().T)
    assert not any(k.endswith("_T") or k.startswith("Transpose") for k in params)


def test_train_mode_module_is_captured_and_verified_in_eval_mode():
    from examples.torch_models import ResNetStyle

    torch.manual_seed(0)
    m = ResNetStyle(width=8, blocks=(1, 1))  # a fresh module is in training mode
    m.layers[0].eval()  # one submodule in its own mode
    res = compile(m, (torch.randn(2, 3, 16, 16),), target="torch")
    assert res.verification.status == "passed"
    assert any("training mode" in n and "eval mode" in n for n in res.notes)
    assert m.training and m.stem.training and not m.layers[0].training and not m.layers[0].conv1[1].training


def gpt2_lm():
    torch.manual_seed(4)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=64, bos_token_id=0,
                                  eos_token_id=0)

    class LM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gpt = transformers.GPT2LMHeadModel(cfg)

        def forward(self, input_ids):
            return self.gpt(input_ids=input_ids, use_cache=False).logits

    return LM().eval()


def test_gpt2_lm_with_tied_head_compiles_to_onnx_with_dynamic_sizes_and_to_torch():
    """GPT-2's causal mask code uses aten.diff; its LM head shares the token embedding."""
    m = gpt2_lm()
    ids = _ids((2, 7), 100)
    dims = {"input_ids": {0: torch.export.Dim("batch", max=8), 1: torch.export.Dim("seq", max=64)}}
    res = compile(m, (ids,), target="onnx", dynamic_shapes=dims)
    assert res.verification.status == "passed" and res.counts["lower_aten_diff"] == 1
    ids2 = _ids((3, 11), 100, seed=1)
    got = list(numeric.run(res.proto, {"input_ids": ids2.numpy()}).values())[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, m(ids2).numpy(), rtol=0, atol=1e-4)
    gm = compile(m, (ids,), target="torch").module
    params = dict(gm.named_parameters())
    tied = [k for k in params if k in ("gpt.lm_head.weight", "gpt.transformer.wte.weight")]
    assert len(tied) == 1 and not any(k.endswith("_T") for k in params)


def test_cli_refuses_an_output_name_that_contradicts_the_target(cli, tmp_path):
    spec = ["--torch", "examples.torch_models:resnet_style", "--input-shape", "1x3x16x16"]
    r = cli("compile", *spec, "-o", str(tmp_path / "m.pt"))
    assert r.exit_code == 1 and "--target onnx writes an ONNX model" in r.output and "add --target torch" in r.output
    r = cli("compile", *spec, "--target", "torch", "-o", str(tmp_path / "m.onnx"))
    assert r.exit_code == 1 and "--target torch writes a torch module (.pt2)" in r.output
    assert list(tmp_path.iterdir()) == []
