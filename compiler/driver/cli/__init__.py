"""The ``graft`` command line (click). One module per command in this folder.

Each command module defines a plain ``click.command`` and imports nothing from this
package's ``__init__``; the group below collects them.

Start-up stays lean: importing this package must not import torch (a torch model
path imports it on demand).
"""
from __future__ import annotations

import click

from graft.compiler.driver.cli import compile_cmd, diff_cmd, explain_cmd, rules_cmd


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="graft")
def main() -> None:
    """graft: a declarative graph-rewriting compiler for ONNX and torch models."""


main.add_command(compile_cmd.compile_cmd)
main.add_command(diff_cmd.diff_cmd)
main.add_command(explain_cmd.explain_cmd)
main.add_command(rules_cmd.rules_cmd)
