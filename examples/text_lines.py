"""Text-line images rendered locally with PIL, preprocessed like rapidocr's direction classifier.

Used to calibrate and evaluate the PP-OCR mobile text-direction classifier (``ppocr-cls``):
each image is one line of English text (from ``examples/data/sentences.txt``) in a DejaVu
font when the system has one (else Pillow's bundled font), random size, ink and paper
shade and a little noise; half the lines are rotated by 180°. Preprocessing follows
``rapidocr_onnxruntime/ch_ppocr_cls/text_cls.py`` (``resize_norm_img``): resize to height
48 keeping the aspect ratio (width at most 192), scale to [-1, 1], zero-pad on the right
to (3, 48, 192).
"""
from __future__ import annotations

import glob
import math
import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPE = (3, 48, 192)


def sentences() -> list[str]:
    """The sentences of ``examples/data/sentences.txt`` (comments skipped)."""
    with open(os.path.join(HERE, "data", "sentences.txt"), encoding="utf-8") as f:
        return [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]


def _fonts() -> list[str]:
    pats = ["/usr/share/fonts/truetype/dejavu/DejaVu*.ttf", "/usr/share/fonts/**/*.ttf", "/Library/Fonts/*.ttf",
            "C:/Windows/Fonts/*.ttf"]
    for p in pats:
        found = sorted(f for f in glob.glob(p, recursive=True) if "Symbol" not in f)
        if found:
            return found[:12]
    return []


def render_line(text: str, rng: np.random.Generator, fonts: list[str]):
    """One RGB PIL image of ``text`` on a plain background."""
    from PIL import Image, ImageDraw, ImageFont

    size = int(rng.integers(18, 34))
    if fonts:
        font = ImageFont.truetype(fonts[int(rng.integers(len(fonts)))], size)
    else:
        font = ImageFont.load_default(size=size)
    paper = int(rng.integers(200, 256))
    ink = int(rng.integers(0, 90))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left, top, right, bottom = probe.textbbox((0, 0), text, font=font)
    pad = int(rng.integers(2, 8))
    img = Image.new("RGB", (right - left + 2 * pad, bottom - top + 2 * pad), (paper,) * 3)
    ImageDraw.Draw(img).text((pad - left, pad - top), text, fill=(ink,) * 3, font=font)
    return img


def preprocess(img) -> np.ndarray:
    """rapidocr's ``resize_norm_img`` for the classifier: (3, 48, 192) float32 in [-1, 1], zero-padded."""
    from PIL import Image

    c, h, w = SHAPE
    ratio = img.width / float(img.height)
    rw = w if math.ceil(h * ratio) > w else int(math.ceil(h * ratio))
    arr = np.asarray(img.resize((rw, h), Image.BILINEAR), dtype=np.float32).transpose(2, 0, 1) / 255.0
    arr = (arr - 0.5) / 0.5
    out = np.zeros(SHAPE, dtype=np.float32)
    out[:, :, :rw] = arr
    return out


def render_text_lines(n: int, seed: int = 0, max_chars: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """``n`` preprocessed lines (n, 3, 48, 192) and their true direction (0 upright, 1 rotated 180°)."""
    rng = np.random.default_rng(seed)
    texts = sentences()
    fonts = _fonts()
    images, labels = [], []
    for i in range(n):
        words = texts[int(rng.integers(len(texts)))].split()
        start = int(rng.integers(0, max(1, len(words) - 2)))
        text = " ".join(words[start:start + int(rng.integers(2, 9))])[:max_chars]
        img = render_line(text, rng, fonts)
        arr = np.asarray(img, dtype=np.float32)
        arr = np.clip(arr + rng.normal(0, 4.0, arr.shape), 0, 255).astype(np.uint8)
        from PIL import Image

        img = Image.fromarray(arr)
        flip = int(rng.integers(2))
        if flip:
            img = img.rotate(180)
        images.append(preprocess(img))
        labels.append(flip)
    return np.stack(images), np.array(labels, dtype=np.int64)


if __name__ == "__main__":
    x, y = render_text_lines(8)
    print(x.shape, x.dtype, float(x.min()), float(x.max()), y.tolist())
