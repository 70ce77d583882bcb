"""The ``graft`` command line (click). One module per command in this folder.

Start-up stays lean: importing this package must not import torch (a torch model
path imports it on demand).
"""
from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="graft")
def main() -> None:
    """graft: a declarative graph-rewriting compiler for ONNX and torch models."""


def _register() -> None:
    # Each command lives in its own module; a missing module is a packaging bug, so fail loudly.
    from graft.compiler.driver.cli import compile_cmd, diff_cmd, explain_cmd, rules_cmd  # noqa: F401


_register()
