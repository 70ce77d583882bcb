"""Train a small CNN on scikit-learn's digits, export it to ONNX, quantize it to int8, compare accuracy.

    python examples/digits_cnn.py            # trains in a few seconds on a CPU

scikit-learn ships the digits dataset (1797 8×8 grey images, 10 classes) inside the package,
so nothing is downloaded. The split is stratified 70/30 with a fixed seed; the quantized
model is calibrated on training images only and evaluated on the held-out 30%.
"""
from __future__ import annotations

import os
import sys
import tempfile
import warnings

import numpy as np


def load_digits_split(seed: int = 0):
    """(x_train, y_train, x_test, y_test): float32 images (N, 1, 8, 8) scaled to [0, 1], int64 labels."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    y = d.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, random_state=seed, stratify=y)
    return x_tr, y_tr, x_te, y_te


def build_cnn():
    import torch.nn as nn

    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))


def train(x_tr, y_tr, *, epochs: int = 30, seed: int = 0):
    """Adam, minibatches of 64; returns the model in eval mode."""
    import torch

    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches: more threads only contend
    model = build_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
    torch.set_num_threads(threads)
    return model.eval()


def export_onnx(model, path: str) -> str:
    """TorchScript ONNX export (opset 17, dynamic batch) — input ``image`` (N, 1, 8, 8), output ``logits``."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 1, 8, 8),), path, input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17,
                          dynamo=False)
    return path


def accuracy(model_path_or_proto, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy in percent, onnxruntime CPU."""
    import onnxruntime as ort

    src = model_path_or_proto if isinstance(model_path_or_proto, (str, bytes)) else \
        model_path_or_proto.SerializeToString()
    sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    logits = sess.run(None, {"image": x})[0]
    return float((logits.argmax(1) == y).mean() * 100.0)


def make_digits_model(directory: str, seed: int = 0, epochs: int = 30):
    """Train and export; returns (onnx path, x_train, y_train, x_test, y_test)."""
    x_tr, y_tr, x_te, y_te = load_digits_split(seed)
    path = export_onnx(train(x_tr, y_tr, epochs=epochs, seed=seed), os.path.join(directory, "digits_cnn.onnx"))
    return path, x_tr, y_tr, x_te, y_te


def main() -> int:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from graft.compiler.techniques.quantization import quantize

    with tempfile.TemporaryDirectory() as d:
        path, x_tr, y_tr, x_te, y_te = make_digits_model(d)
        calib = [{"image": x_tr[i:i + 32]} for i in range(0, 256, 32)]       # 256 training images
        held_out = [{"image": x_te[i:i + 64]} for i in range(0, len(x_te), 64)]
        res = quantize(path, "static", calibration=calib, eval_data=held_out, calib_method="percentile")
        out = os.path.join(d, "digits_cnn.int8.onnx")
        res.save(out)
        f_acc, q_acc = accuracy(path, x_te, y_te), accuracy(out, x_te, y_te)
        print(res.summary())
        print(f"held-out accuracy on {len(y_te)} images: float {f_acc:.2f}%  int8 {q_acc:.2f}%  "
              f"(difference {q_acc - f_acc:+.2f} points)")
        print(f"size: float {os.path.getsize(path) / 1e3:.1f} kB  int8 {os.path.getsize(out) / 1e3:.1f} kB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
