"""Calibration: data sources and their validation, observers and range methods, the ORT and torch runners."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from graft import ir
from graft.compiler.techniques.calibration import (CalibrationData, CalibrationDataError, CalibrationTable, CalibrationWarning,
                                  Histogram, Observer, Request, calibrate)
from graft.ir.shapes import infer_shapes
import onnx.parser
from conftest import with_initializers

TOY = """
<ir_version: 8, opset_import: ["" : 17]>
toy (float[N, 2, 4, 4] x) => (float[N, 3, 4, 4] y) {
    c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
    y = Relu (c)
}
"""


@pytest.fixture(scope="module")
def toy():
    rng = np.random.default_rng(0)
    proto = with_initializers(onnx.parser.parse_model(TOY), w=rng.normal(size=(3, 2, 3, 3)).astype(np.float32),
                              b=np.array([0.1, -0.2, 0.3], np.float32))
    m = ir.from_onnx(proto)
    infer_shapes(m)
    return m


def _feeds(n=4, seed=0, batch=2):
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(size=(batch, 2, 4, 4)).astype(np.float32)} for _ in range(n)]


# ---------------------------------------------------------------- observers
def test_minmax_and_per_channel_absmax_across_batches():
    obs = Observer("t", channel_axis=-1)
    obs.update(np.array([[1.0, -2.0], [0.5, 3.0]], np.float32))
    obs.update(np.array([[-4.0, 1.0]], np.float32))
    assert (obs.min, obs.max) == (-4.0, 3.0)
    np.testing.assert_array_equal(obs.channel_absmax, [4.0, 3.0])
    assert obs.range("minmax") == (-4.0, 3.0)


def test_histogram_percentile_matches_numpy_within_a_bin():
    rng = np.random.default_rng(1)
    data = rng.normal(size=200_000).astype(np.float32)
    obs = Observer("t", histogram=True)
    for chunk in np.array_split(data, 7):      # growing range: bins merge as R doubles
        obs.update(chunk)
    lo, hi = obs.range("percentile", percentile=99.0)
    width = obs.hist.width
    assert abs(hi - np.percentile(data, 99.0)) <= 2 * width
    assert abs(lo - np.percentile(data, 1.0)) <= 2 * width
    assert obs.hist.total == data.size


def test_histogram_doubling_is_exact():
    rng = np.random.default_rng(2)
    small, big = rng.uniform(-1, 1, 1000), rng.uniform(-8, 8, 1000)
    a = Histogram(64)
    a.add(small)
    a.add(big)                                  # forces R: 1 → 8 (three doublings)
    b = Histogram(64)
    b.R = a.R
    b.add(np.concatenate([small, big]))
    # merged bins hold the same values as bins computed at the final range (up to values
    # rounding onto the other side of a bin edge)
    assert a.counts.sum() == b.counts.sum() == 2000
    assert np.abs(a.counts - b.counts).max() <= 1 and np.count_nonzero(a.counts != b.counts) <= 4


def test_entropy_clips_a_heavy_tail():
    rng = np.random.default_rng(3)
    data = np.concatenate([rng.normal(size=100_000), [60.0, -55.0]]).astype(np.float32)  # two far outliers
    obs = Observer("t", histogram=True)
    obs.update(data)
    lo_e, hi_e = obs.range("entropy", symmetric=True)
    assert 2 < hi_e < 20 and -20 < lo_e < -2            # far inside the outliers at ±60


def test_mse_range_is_near_the_best_clipping_for_the_data():
    rng = np.random.default_rng(5)
    data = rng.laplace(size=100_000).astype(np.float32)  # heavy tailed: the best 8-bit range clips
    obs = Observer("t", histogram=True)
    obs.update(data)

    def mse(lo, hi):
        s = (hi - lo) / 255
        z = np.round(-lo / s)
        q = (np.clip(np.round(data / s) + z, 0, 255) - z) * s
        return float(np.mean((q.astype(np.float64) - data) ** 2))

    lo_m, hi_m = obs.range("mse")
    brute = min(mse(obs.min * a, obs.max * a) for a in np.linspace(0.05, 1.0, 200))
    assert hi_m < obs.max and lo_m > obs.min                       # it clips
    assert mse(lo_m, hi_m) <= 1.05 * brute                          # and nearly as well as a search on the data
    assert mse(lo_m, hi_m) < 0.9 * mse(obs.min, obs.max)


def test_entropy_on_non_negative_data_keeps_zero_as_lower_bound():
    rng = np.random.default_rng(4)
    obs = Observer("t", histogram=True)
    obs.update(np.abs(rng.normal(size=50_000)).astype(np.float32))
    lo, hi = obs.range("entropy")
    assert lo == 0.0 and 1.0 < hi <= obs.max


def test_nonfinite_values_are_counted_and_ignored():
    obs = Observer("t", histogram=True, channel_axis=-1)
    obs.update(np.array([[1.0, np.inf], [np.nan, -2.0]], np.float32))
    assert obs.nonfinite == 2 and (obs.min, obs.max) == (-2.0, 1.0)
    assert np.all(np.isfinite(obs.channel_absmax))
    table = CalibrationTable({"t": obs})
    with pytest.warns(CalibrationWarning, match="2 inf/NaN"):
        assert table.range("t") == (-2.0, 1.0)


def test_never_finite_tensor_gets_zero_range_and_a_warning():
    obs = Observer("dead")
    obs.update(np.full((3,), np.nan, np.float32))
    table = CalibrationTable({"dead": obs})
    with pytest.warns(CalibrationWarning, match="no finite value"):
        assert table.range("dead") == (0.0, 0.0)


def test_unknown_method_is_rejected():
    with pytest.raises(ValueError, match="unknown calibration method 'kl'"):
        Observer("t").range("kl")


# ---------------------------------------------------------------- data sources
def test_npz_stacked_and_per_sample(tmp_path, toy):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "stacked.npz", x=rng.normal(size=(6, 2, 4, 4)).astype(np.float32))
    d = CalibrationData.from_npz(tmp_path / "stacked.npz", toy, batch_size=4).bind(toy)
    shapes = [f["x"].shape for f in d]
    assert shapes == [(4, 2, 4, 4), (2, 2, 4, 4)]
    np.savez(tmp_path / "ragged.npz", **{"x/0": np.zeros((1, 2, 4, 4), np.float32),
                                          "x/1": np.ones((3, 2, 4, 4), np.float32)})
    d = CalibrationData.from_npz(tmp_path / "ragged.npz", toy).bind(toy)
    assert [f["x"].shape[0] for f in d] == [1, 3]


def test_directory_of_npy(tmp_path, toy):
    for i in range(3):
        np.save(tmp_path / f"img{i}.npy", np.full((2, 4, 4), i, np.float32))  # one rank short: batch axis added
    d = CalibrationData.from_dir(tmp_path, toy).bind(toy)
    feeds = list(d)
    assert len(feeds) == 3 and feeds[2]["x"].shape == (1, 2, 4, 4) and feeds[2]["x"][0, 0, 0, 0] == 2


def test_iterable_of_dicts_tuples_and_arrays(toy):
    x = np.zeros((1, 2, 4, 4), np.float32)
    for item in ({"x": x}, (x,), x):
        assert list(CalibrationData.from_iterable([item]).bind(toy))[0]["x"].shape == (1, 2, 4, 4)


def test_generator_is_replayable(toy):
    gen = ({"x": np.full((1, 2, 4, 4), i, np.float32)} for i in range(3))
    d = CalibrationData.from_iterable(gen).bind(toy)
    assert [float(f["x"][0, 0, 0, 0]) for f in d] == [0, 1, 2]
    assert [float(f["x"][0, 0, 0, 0]) for f in d] == [0, 1, 2]


def test_wrong_dtype_names_input_and_expectation(toy):
    d = CalibrationData.from_iterable([{"x": np.zeros((1, 2, 4, 4), np.float64)}]).bind(toy)
    with pytest.raises(CalibrationDataError, match=r"input 'x' has dtype float64, the model expects float32 "
                                                   r"\[N, 2, 4, 4\]"):
        list(d)


def test_wrong_shape_names_the_dim(toy):
    d = CalibrationData.from_iterable([{"x": np.zeros((1, 3, 4, 4), np.float32)}]).bind(toy)
    with pytest.raises(CalibrationDataError, match=r"input 'x' has shape \[1, 3, 4, 4\].*dim 1 must be 2"):
        list(d)
    d = CalibrationData.from_iterable([{"x": np.zeros((4, 4), np.float32)}]).bind(toy)
    with pytest.raises(CalibrationDataError, match="rank 2.*rank 4"):
        list(d)


def test_missing_and_unknown_inputs(toy):
    with pytest.raises(CalibrationDataError, match="'image' is not an input of the model"):
        list(CalibrationData.from_iterable([{"image": np.zeros((1, 2, 4, 4), np.float32)}]).bind(toy))
    with pytest.raises(CalibrationDataError, match="no such calibration file"):
        CalibrationData.from_npz("/nonexistent/calib.npz")


def test_random_source_is_marked_synthetic(toy):
    d = CalibrationData.random(toy, n=3, dim_sizes={"N": 2})
    assert d.synthetic and "smoke test only" in d.source
    assert [f["x"].shape for f in d] == [(2, 2, 4, 4)] * 3


# ---------------------------------------------------------------- runners
def test_ort_runner_ranges_match_numpy(toy):
    feeds = _feeds()
    table = calibrate(toy, feeds, ["c", "y"], progress=False)
    import onnxruntime as ort

    proto = ir.to_onnx(toy)
    proto.graph.output.append(onnx.helper.make_tensor_value_info("c", onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    cs = np.concatenate([sess.run(["c"], f)[0].ravel() for f in feeds])
    np.testing.assert_allclose(table.range("c"), (cs.min(), cs.max()), rtol=1e-5)
    assert table.range("y")[0] == 0.0 and table.samples == 4 and not table.synthetic


def test_torch_runner_agrees_with_onnxruntime(toy):
    import torch  # noqa: F401  (a test dependency)
    feeds = _feeds()
    a = calibrate(toy, feeds, {"c": Request(channel_axis=1)}, progress=False)
    b = calibrate(toy, feeds, {"c": Request(channel_axis=1)}, progress=False, backend="torch")
    np.testing.assert_allclose(a.range("c"), b.range("c"), rtol=1e-5)
    np.testing.assert_allclose(a.channel_absmax("c"), b.channel_absmax("c"), rtol=1e-5)


def test_histogram_methods_through_the_runner(toy):
    table = calibrate(toy, _feeds(8), ["c"], method="percentile", percentile=99.0, progress=False)
    lo, hi = table.range("c")
    obs = table.observers["c"]
    assert obs.min < lo < hi < obs.max
    assert table.range("c", method="minmax") == (obs.min, obs.max)


def test_runner_reports_bad_sample_index(toy):
    feeds = _feeds(2) + [{"x": np.zeros((1, 2, 5, 4), np.float32)}]
    with pytest.raises(CalibrationDataError, match="sample 2: input 'x' has shape"):
        calibrate(toy, feeds, ["c"], progress=False)
