"""Helpers of ``graft diff`` / ``graft explain``: model arguments (a file path or a zoo model
name) and the rich console they print to."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from graft.compiler.driver.cli._errors import fail

# Width when stdout is not a terminal (a pipe, a file, a test runner): rich's default of 80
# folds node names mid-word in the tables.
PIPE_WIDTH = 120


def console():
    """A rich Console for command output: ``$COLUMNS``, else the terminal's width, else PIPE_WIDTH."""
    from rich.console import Console

    piped = not sys.stdout.isatty() and "COLUMNS" not in os.environ  # rich reads COLUMNS itself
    return Console(highlight=False, soft_wrap=False, width=PIPE_WIDTH if piped else None)


def resolve_model_arg(arg: str) -> Path:
    """``arg`` as an existing path, else as a :mod:`graft.ir.zoo` name.

    Neither an existing file nor a known zoo name, or a zoo model whose package is
    missing, ends the process with a one-line error naming ``arg`` (:func:`fail`).
    """
    from graft.ir import zoo

    path = Path(arg)
    if path.exists():
        return path
    if arg in zoo.NAMES:
        try:
            return zoo.resolve(arg)
        except zoo.ZooError as e:
            fail(str(e))
    fail(f"{arg}: no such file (nor a zoo model name: {', '.join(zoo.NAMES)})")


def load_proto_arg(arg: str):
    """The ``onnx.ModelProto`` behind a model argument (not run through onnx.checker, so a broken
    model can still be inspected). An unreadable file ends the process with a one-line error."""
    from graft.ir.onnx_io import ModelLoadError, load_proto

    try:
        return load_proto(resolve_model_arg(arg), check=False)
    except ModelLoadError as e:
        fail(str(e))
