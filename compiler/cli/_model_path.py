"""Model arguments of ``graft diff`` / ``graft explain``: a file path or a zoo model name."""
from __future__ import annotations

from pathlib import Path

import sys

import click

# Width when stdout is not a terminal (a pipe, a file, a test runner): rich's default of 80
# folds node names mid-word in the tables.
PIPE_WIDTH = 120


def console():
    """A rich Console for command output: the terminal's width, or PIPE_WIDTH when piped."""
    from rich.console import Console

    return Console(highlight=False, soft_wrap=False, width=None if sys.stdout.isatty() else PIPE_WIDTH)


def resolve_model_arg(arg: str) -> Path:
    """``arg`` as an existing path, else as a :mod:`compiler.zoo` name.

    Raises:
        click.ClickException: neither an existing file nor a known zoo name, or a zoo
            model whose package is missing (one line, naming ``arg``).
    """
    from compiler import zoo

    path = Path(arg)
    if path.exists():
        return path
    if arg in zoo.NAMES:
        try:
            return zoo.resolve(arg)
        except zoo.ZooError as e:
            raise click.ClickException(str(e)) from None
    raise click.ClickException(f"{arg}: no such file (nor a zoo model name: {', '.join(zoo.NAMES)})")


def load_proto_arg(arg: str):
    """The ``onnx.ModelProto`` behind a model argument (not run through onnx.checker, so a broken
    model can still be inspected). Raises click.ClickException naming the file."""
    from ir.onnx_io import ModelLoadError, load_proto

    try:
        return load_proto(resolve_model_arg(arg), check=False)
    except ModelLoadError as e:
        raise click.ClickException(str(e)) from None
