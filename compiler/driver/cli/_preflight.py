"""Checks of ``graft compile``'s arguments made before compiling, so that a bad ``-o OUT`` or
``--dim`` fails in a second, not after a long compile, and OUT never costs the user a file of
the input model."""
from __future__ import annotations

import os
from pathlib import Path

from graft.compiler.driver.cli._errors import fail


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def _header(src: Path):
    """``src`` parsed without its external data, or None (loading reports a bad file later, better)."""
    import onnx

    try:
        return onnx.load(str(src), load_external_data=False)
    except Exception:  # noqa: BLE001
        return None


def check_dims(src: Path, dim_sizes: dict[str, int]) -> None:
    """End the process (:func:`fail`) when ``--dim`` names a dim no graph input of ``src`` has."""
    from graft.compiler.driver.api import unknown_dims

    proto = _header(src) if dim_sizes else None
    bad = unknown_dims(proto, dim_sizes) if proto is not None else None
    if bad:
        fail(f"--dim: {bad} (check the spelling)")


def input_files(src: Path) -> list[Path]:
    """``src`` and the external data files its tensors point at (ONNX ``location``, relative to
    ``src``'s folder), main graph and subgraphs. Unreadable models give just ``[src]``: loading
    reports those later, with a better message."""
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    files = [src]
    proto = _header(src)
    if proto is None:
        return files
    seen = set()
    for t in _get_all_tensors(proto):
        if not uses_external_data(t):
            continue
        loc = next((e.value for e in t.external_data if e.key == "location"), None)
        if loc and loc not in seen:
            seen.add(loc)
            files.append(src.parent / loc)
    return files


def check_output_path(output: str, src: Path | None) -> None:
    """End the process with a one-line error (:func:`fail`) when ``output`` cannot or must not be written.

    Refused: the input model itself (also through a link), one of the input's external data
    files, or a path whose folder is a file or is not writable. A missing folder is fine
    (it is created when the result is saved).
    """
    if not output.strip() or Path(output).name in ("", ".", ".."):
        fail(f"-o {output!r}: give the path of the file to write, e.g. -o model.opt.onnx")
    out = Path(output)
    # only an existing file can be one of the input's files: parse the input's header only then
    if src is not None and (out.exists() or Path(str(out) + ".data").exists() or out.is_symlink()):
        files = input_files(src)
        if _same(out, files[0]):
            fail(f"{output}: is the input model; refusing to overwrite it (choose another -o path)")
        for f in files[1:]:
            if _same(out, f):
                fail(f"{output}: is the external data file of the input model {src}; refusing to overwrite it "
                     f"(choose another -o path)")
            if _same(Path(str(out) + ".data"), f):  # a large output writes its tensors to OUT.data
                fail(f"{output}: its tensor file {output}.data would overwrite the input model's external data "
                     f"{f}; choose another -o path")
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        fail(f"{output}: {parent} is a file, not a folder (choose another -o path)")
    if not os.access(parent, os.W_OK | os.X_OK):
        fail(f"{output}: folder {parent} is not writable (choose another -o path)")
