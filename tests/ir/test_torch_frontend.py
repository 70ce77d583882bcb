"""ir.from_torch: capture with torch.export into aten-domain IR, names, metadata, and errors."""
from __future__ import annotations

import collections
import warnings

import pytest

import torch
import transformers
from torch import nn  # noqa: E402

from graft import ir  # noqa: E402
from examples.torch_models import mobilenetv3_style, resnet_style  # noqa: E402
from graft.ir.torch_aten import DYNAMIC_ATTR, aten_args  # noqa: E402
from graft.ir.torch_frontend import ExampleInputError, TorchCaptureError, TorchImportError  # noqa: E402

warnings.filterwarnings("ignore", category=UserWarning)


@pytest.fixture(scope="module")
def resnet():
    return resnet_style()


@pytest.fixture(scope="module")
def resnet_ir(resnet):
    m, inp = resnet
    return ir.from_torch(m, inp)


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                  vocab_size=100, max_position_embeddings=64)
    m = transformers.BertModel(cfg).eval()
    inp = dict(input_ids=torch.randint(0, 100, (2, 16)), attention_mask=torch.ones(2, 16, dtype=torch.long))
    return m, inp


def test_resnet_nodes_are_aten_overloads_with_module_paths(resnet_ir):
    g = resnet_ir.graph
    ops = collections.Counter(n.op_type for n in g)
    assert all(n.domain == "aten" for n in g)
    assert ops["conv2d.default"] == 9 and ops["batch_norm.default"] == 9 and ops["relu.default"] == 7
    assert ops["add.Tensor"] == 3 and ops["linear.default"] == 1 and ops["max_pool2d.default"] == 1
    stem_conv = next(n for n in g if n.op_type == "conv2d.default")
    assert stem_conv.meta["torch.module"] == "stem.0.0"
    assert stem_conv.meta["torch.module_type"] == "Conv2d"
    assert stem_conv.meta["torch.target"] == "aten.conv2d.default"
    assert stem_conv.attrs == {"stride": [1, 1], "padding": [1, 1], "dilation": [1, 1], "groups": 1}
    assert stem_conv.outputs[0].dtype == ir.DataType.FLOAT and stem_conv.outputs[0].shape == (2, 16, 32, 32)
    shortcut = [n.meta["torch.module"] for n in g if n.op_type == "conv2d.default"]
    assert "layers.1.shortcut.0" in shortcut and "layers.2.conv2.0" in shortcut
    assert resnet_ir.opset_imports == {"": 18, "aten": 1}
    ir.verify(resnet_ir)


def test_parameters_and_buffers_become_initializers_by_fqn(resnet, resnet_ir):
    m, _ = resnet
    inits = resnet_ir.graph.initializers
    sd = m.state_dict()
    w = inits["stem.0.0.weight"]
    assert w.meta["torch.kind"] == "parameter" and w.shape == (16, 3, 3, 3)
    assert (w.const.array == sd["stem.0.0.weight"].detach().numpy()).all()
    assert inits["stem.0.1.running_var"].meta["torch.kind"] == "buffer"
    assert "stem.0.1.num_batches_tracked" not in inits  # unused by the eval graph
    assert set(inits) == {k for k in sd if not k.endswith("num_batches_tracked")}
    # a copy: training the module later does not change the captured IR
    with torch.no_grad():
        m.stem[0][0].weight.add_(1.0)
    assert not (w.const.array == m.stem[0][0].weight.detach().numpy()).all()
    with torch.no_grad():
        m.stem[0][0].weight.sub_(1.0)


def test_python_scalars_are_attributes_and_aten_args_reads_them_back():
    class M(nn.Module):
        def forward(self, x):
            return (x * 2.5).clamp(min=0.0) + 1

    model = ir.from_torch(M(), (torch.randn(3, 4),))
    mul, clamp, add = model.graph.nodes
    assert mul.op_type == "mul.Tensor" and mul.attrs == {"other": 2.5} and len(mul.inputs) == 1
    assert aten_args(mul) == {"self": mul.inputs[0], "other": 2.5}
    assert aten_args(clamp) == {"self": clamp.inputs[0], "min": 0.0, "max": None}
    assert aten_args(add)["alpha"] == 1 and [v.name for v in model.graph.outputs] == ["output"]


def test_bert_dynamic_shapes_keep_dim_names_and_symbolic_sizes(bert):
    m, inp = bert
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq", max=64)}
    model = ir.from_torch(m, inp, dynamic_shapes={"input_ids": dims, "attention_mask": dims})
    g = model.graph
    assert [(v.name, v.shape) for v in g.inputs] == [("input_ids", ("batch", "seq")), ("attention_mask", ("batch", "seq"))]
    assert [v.name for v in g.outputs] == ["last_hidden_state", "pooler_output"]
    assert g.outputs[0].shape == ("batch", "seq", 64)
    sizes = [n for n in g if n.op_type == "sym_size.int"]
    assert sizes and all(n.outputs[0].dtype == ir.DataType.INT64 and n.outputs[0].shape == () for n in sizes)
    view = next(n for n in g if n.op_type == "view.default")
    assert view.attrs[DYNAMIC_ATTR] == ["size"]
    size = aten_args(view)["size"]
    assert isinstance(size, ir.Value) and size.producer.op_type == "Concat" and size.shape == (4,)
    linear = next(n for n in g if n.op_type == "linear.default")
    assert linear.meta["torch.module"] == "encoder.layer.0.attention.self.query"
    assert "encoder.layer.0.attention.self.query.weight" in g.initializers
    ir.verify(model)


def test_graph_module_and_exported_program_are_accepted(resnet):
    m, inp = resnet
    gm = torch.fx.symbolic_trace(m)
    model = ir.from_torch(gm, inp)
    assert sum(n.op_type == "conv2d.default" for n in model.graph) == 9
    assert any(n.meta.get("torch.module") == "layers.0.conv1.0" for n in model.graph)
    ep = torch.export.export(m, inp)
    model2 = ir.from_torch(ep)
    assert [n.op_type for n in model2.graph] == [n.op_type for n in model.graph]


def test_decompose_gives_core_aten_ops():
    m, inp = mobilenetv3_style(batch=1, image=32)
    model = ir.from_torch(m, inp, decompose=True)
    ops = {n.op_type for n in model.graph}
    assert {"convolution.default", "_native_batch_norm_legit_no_training.default", "addmm.default"} <= ops
    assert "conv2d.default" not in ops and "hardswish.default" not in ops


def test_capture_is_in_eval_mode_and_restores_the_training_flag():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5)).train()
    model = ir.from_torch(m, (torch.randn(1, 3, 5, 5),))
    assert m.training and all(s.training for s in m)
    bn = next(n for n in model.graph if n.op_type == "batch_norm.default")
    drop = next(n for n in model.graph if n.op_type == "dropout.default")
    assert bn.attrs["training"] is False and drop.attrs["train"] is False


# ----------------------------------------------------------------------------- errors
def test_wrong_channels_name_the_input_layer_and_expected_shape(resnet):
    m, _ = resnet
    with pytest.raises(ExampleInputError) as e:
        ir.from_torch(m, (torch.randn(2, 4, 32, 32),))
    msg = str(e.value)
    assert "module 'stem.0.0' (Conv2d)" in msg and "example input 'x' (2x4x32x32 float32)" in msg
    assert "[N, 3, H, W]" in msg


def test_wrong_input_count_and_missing_inputs(resnet):
    m, _ = resnet
    with pytest.raises(ExampleInputError, match=r"do not fit ResNetStyle.forward\(x\).*2 positional"):
        ir.from_torch(m, (torch.randn(2, 3, 8, 8), torch.randn(1)))
    with pytest.raises(ExampleInputError, match=r"forward needs inputs \(x\)"):
        ir.from_torch(m, None)


def test_wrong_dtype_and_unknown_keyword_for_bert(bert):
    m, _ = bert
    with pytest.raises(ExampleInputError) as e:
        ir.from_torch(m, {"input_ids": torch.randn(2, 16)})
    assert "'embeddings.word_embeddings' (Embedding)" in str(e.value) and "integer indices in [0, 100)" in str(e.value)
    with pytest.raises(ExampleInputError, match="'input_idz' are not parameters of forward"):
        ir.from_torch(m, {"input_idz": torch.randint(0, 100, (2, 16))})


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x - 1


@pytest.mark.parametrize("strict", [False, True])
def test_data_dependent_branch_names_the_line_and_what_to_try(strict, capfd):
    with pytest.raises(TorchCaptureError) as e:
        ir.from_torch(DataDependent(), (torch.randn(3),), strict=strict)
    msg = str(e.value)
    assert "data-dependent control flow" in msg and "if x.sum() > 0:" in msg and "test_torch_frontend.py:" in msg
    assert ("strict=False" in msg) == strict
    assert "torch.cond" in msg
    assert "def forward" not in capfd.readouterr().err  # torch's partial-graph dump is kept out of the way


def test_dynamic_dim_that_code_specializes():
    class Fixed(nn.Module):
        def forward(self, x):
            return x.reshape(4, -1) if x.shape[0] == 4 else x

    with pytest.raises(TorchCaptureError, match=r"(?s)specialized it to be a constant \(4\).*what to try: relax dynamic"):
        ir.from_torch(Fixed(), (torch.randn(4, 3),), dynamic_shapes=({0: torch.export.Dim("batch")},))


def test_control_flow_and_buffer_updates_are_refused_with_the_node():
    class Cond(nn.Module):
        def forward(self, x):
            return torch.cond(x.sum() > 0, lambda t: t + 1, lambda t: t - 1, (x,))

    with pytest.raises(TorchImportError, match="control flow"):
        ir.from_torch(Cond(), (torch.randn(3),))

    class Counter(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("calls", torch.zeros(1))

        def forward(self, x):
            self.calls.add_(1)
            return x + 1

    with pytest.raises(TorchImportError, match="updates buffer 'calls' in place"):
        ir.from_torch(Counter(), (torch.randn(3),))


# ----------------------------------------------------------------------------- found by trying to break it
def test_capture_restores_each_submodules_own_training_flag():
    """An eval-mode model wrapped in a train-mode module stays in eval mode (module.train(flag) would flip it)."""
    inner = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))
    outer = nn.Sequential(inner, nn.ReLU()).train()
    inner.eval()
    ir.from_torch(outer, (torch.randn(2, 4),))
    assert outer.training and outer[1].training
    assert not inner.training and not inner[1].training


def test_wrong_dtype_that_fake_tensors_accept_names_the_input_and_layer():
    """torch.export captures a float Linear fed int64 (the fake kernels skip the dtype check); eager does not."""
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(5, 3)

        def forward(self, x):
            return self.fc(x)

    with pytest.raises(ExampleInputError) as e:
        ir.from_torch(Head(), (torch.ones(2, 5, dtype=torch.int64),))
    msg = str(e.value)
    assert "module 'fc' (Linear) rejects example input 'x' (2x5 int64)" in msg and "[..., 5] (float)" in msg


def test_dynamic_shapes_mistakes_name_the_input_and_dim():
    lin = nn.Linear(5, 3)
    Dim = torch.export.Dim
    with pytest.raises(ExampleInputError, match=r"dynamic_shapes names 'z', not among the example inputs given to "
                                                r"Linear.forward \(input\)"):
        ir.from_torch(lin, (torch.randn(2, 5),), dynamic_shapes={"z": {0: Dim("b")}})
    with pytest.raises(ExampleInputError, match=r"example input 'input' has size 2 at dim 0, outside the range "
                                                r"\[4, inf\] of Dim 'b'"):
        ir.from_torch(lin, (torch.randn(2, 5),), dynamic_shapes=({0: Dim("b", min=4)},))
    with pytest.raises(ExampleInputError, match=r"size 1 at dim 0, marked dynamic as Dim 'b'.*0/1 specialization"):
        ir.from_torch(lin, (torch.randn(1, 5),), dynamic_shapes=({0: Dim("b")},))


def test_numpy_in_forward_says_it_needs_real_data():
    class Np(nn.Module):
        def forward(self, x):
            return torch.from_numpy(x.numpy() * 2)

    with pytest.raises(TorchCaptureError, match=r"(?s)needs real tensor data.*x\.numpy\(\) \* 2.*torch ops"):
        ir.from_torch(Np(), (torch.randn(3),))


def test_a_none_output_is_refused_with_what_to_do():
    class WithNone(nn.Module):
        def forward(self, x):
            return x * 2, None  # as nn.MultiheadAttention(need_weights=False) returns

    with pytest.raises(TorchImportError, match=r"output 1 \(output_1\) of the model is None.*returns just its tensor"):
        ir.from_torch(WithNone(), (torch.randn(3),))


def test_uninitialized_lazy_module_says_to_run_it_once():
    lazy = nn.Sequential(nn.LazyLinear(4), nn.ReLU())
    with pytest.raises(TorchCaptureError, match=r"(?s)a lazy module .*run the model once on an example input"):
        ir.from_torch(lazy, (torch.randn(2, 5),))
    lazy(torch.randn(2, 5))
    assert ir.from_torch(lazy, (torch.randn(2, 5),)).graph.initializers["0.weight"].shape == (4, 5)


def test_op_with_two_tensor_lists_round_trips_through_the_backend():
    """lstm.input takes two Tensor[] arguments (hx, params): the node records both lengths."""
    torch.manual_seed(0)
    lstm = nn.LSTM(4, 6, num_layers=2, batch_first=True, bidirectional=True).eval()
    x = torch.randn(2, 5, 4)
    model = ir.from_torch(lstm, (x,))
    node = next(n for n in model.graph if n.op_type == "lstm.input")
    a = aten_args(node)
    assert len(a["hx"]) == 2 and len(a["params"]) == 16 and a["bidirectional"] is True
    gm = ir.to_torch(model)
    with torch.no_grad():
        for got, ref in zip(gm(x), lstm(x)[:1] + lstm(x)[1]):
            torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
