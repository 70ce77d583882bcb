"""One-line errors for ``graft compile`` / ``graft rules``.

Every failure ends the process with exit status 1 and a single line on stderr::

    graft: error: <file>: <what> (<what to do>)

``GRAFT_DEBUG=1`` also prints the traceback.
"""
from __future__ import annotations

import os
import sys
import traceback
from typing import NoReturn

import click

EXIT_ERROR = 1


def one_line(msg: str) -> str:
    return " ".join(str(msg).split())


def debug() -> bool:
    return os.environ.get("GRAFT_DEBUG", "") not in ("", "0")


def fail(msg: str) -> NoReturn:
    """Print ``graft: error: msg`` (one line) to stderr and exit 1; with GRAFT_DEBUG the traceback first."""
    if debug() and sys.exc_info()[0] is not None:
        traceback.print_exc()
    click.echo(f"graft: error: {one_line(msg)}", err=True)
    raise SystemExit(EXIT_ERROR)


def parse_dims(pairs) -> dict[str, int]:
    """``("batch=1", "seq=128")`` → ``{"batch": 1, "seq": 128}``; bad entries end the process via :func:`fail`."""
    out = {}
    for p in pairs:
        name, sep, size = p.partition("=")
        if not sep or not name or not size.isdigit() or int(size) < 1:
            fail(f"--dim {p}: expected NAME=SIZE with a positive integer size (e.g. --dim batch=1)")
        out[name] = int(size)
    return out
