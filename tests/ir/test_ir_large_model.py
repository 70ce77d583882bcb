"""A model over 2 GiB (protobuf's message limit): ir.load → ir.save must go through external data.

One float32 initializer of 540M elements (2.16 GB) feeds a Gather. The source
data file is sparse (only three marked regions hold non-zero bytes), so making
it costs no disk writes; the load, the checker's by-path run and the save do
move the full 2.16 GB. Files are deleted as soon as they are no longer needed.
"""
from __future__ import annotations

import gc
import os

import numpy as np
import onnx
from onnx import TensorProto, helper

from graft import ir
from graft.compiler.techniques import numeric
from graft.ir.onnx_io import PROTOBUF_LIMIT

N = 540_000_000  # float32 elements: 2_160_000_000 bytes > 2**31 - 1
MARKS = {0: 1.0, N // 2: 2.0, N - 16: 3.0}  # element offset -> fill value of a 16-element run


def _write_source(d) -> str:
    data = d / "big.bin"
    with open(data, "wb") as f:
        f.truncate(N * 4)  # sparse: zeros without writing them
        for start, val in MARKS.items():
            f.seek(start * 4)
            f.write((np.arange(16, dtype=np.float32) + val * 100).tobytes())
    t = TensorProto(name="big", data_type=TensorProto.FLOAT, dims=[N], data_location=TensorProto.EXTERNAL)
    for k, v in (("location", "big.bin"), ("offset", "0"), ("length", str(N * 4))):
        e = t.external_data.add()
        e.key, e.value = k, v
    g = helper.make_graph([helper.make_node("Gather", ["big", "idx"], ["y"], name="gather", axis=0)], "large",
                          [helper.make_tensor_value_info("idx", TensorProto.INT64, [None])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])], [t])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path = d / "large.onnx"
    onnx.save_model(m, str(path))
    return path


def test_model_over_2gib_saves_with_external_data(tmp_path):
    src_dir, out_dir = tmp_path / "src", tmp_path / "out"
    src_dir.mkdir()
    src = _write_source(src_dir)

    model = ir.load(src)  # checks the >2 GiB proto by path
    big = model.graph.initializers["big"]
    assert big.const.shape == (N,) and big.const.nbytes > PROTOBUF_LIMIT
    # the data stays in its file (memory-mapped when read), never copied into the process
    assert big.const.proto.data_location == TensorProto.EXTERNAL and not big.const.proto.HasField("raw_data")
    assert float(big.const.array[N // 2 + 5]) == 205.0
    out = out_dir / "large.onnx"
    ir.save(model, out)
    del model, big
    gc.collect()
    os.unlink(src_dir / "big.bin")

    data = out_dir / "large.onnx.data"
    assert sorted(p.name for p in out_dir.iterdir()) == ["large.onnx", "large.onnx.data"]
    assert data.stat().st_size >= N * 4
    assert out.stat().st_size < 1 << 20  # the header holds no tensor bytes
    header = onnx.load(str(out), load_external_data=False)
    t = header.graph.initializer[0]
    assert t.data_location == TensorProto.EXTERNAL
    assert {e.key: e.value for e in t.external_data}["location"] == "large.onnx.data"

    # reload in onnxruntime by path: the marked regions come back where they were
    idx = np.array([s + k for s in MARKS for k in (0, 5, 15)] + [1234, N // 3], dtype=np.int64)
    want = np.array([100 * v + k for v in MARKS.values() for k in (0, 5, 15)] + [0, 0], dtype=np.float32)
    got = numeric.run(str(out), {"idx": idx})["y"]
    assert np.array_equal(got, want)
    os.unlink(data)
