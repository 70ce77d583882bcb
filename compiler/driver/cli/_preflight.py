"""Checks of ``graft compile``'s arguments made before compiling, so that a bad ``-o OUT`` or
``--dim`` fails in a second, not after a long compile, and OUT never costs the user a file of
the input model."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

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
    from onnx.external_data_helper import uses_external_data

    from graft.ir.tensor_proto import model_tensors

    files = [src]
    proto = _header(src)
    if proto is None:
        return files
    seen = set()
    for t in model_tensors(proto):
        if not uses_external_data(t):
            continue
        loc = next((e.value for e in t.external_data if e.key == "location"), None)
        if loc and loc not in seen:
            seen.add(loc)
            files.append(src.parent / loc)
    return files


def _files_of(path: Path) -> list[Path]:
    """``path`` itself, or for a folder (a calibration directory) the ``.npy`` files it holds."""
    if path.is_dir():
        return sorted(path.glob("*.npy"))
    return [path]


def check_output_path(output: str, src: Path | None, reads: Sequence[tuple[str, str | Path]] = ()) -> None:
    """End the process with a one-line error (:func:`fail`) when ``output`` cannot or must not be written.

    Refused: any file the command reads — the input model (also through a symbolic or hard
    link), its external data files, and each ``(what, path)`` of ``reads`` (``--rules`` files,
    ``--calibration`` data, the ``--torch`` module; for a folder, the ``.npy`` files in it) —
    or whose ``OUT.data`` tensor file (written beside a model over 2 GiB) is one of them; a
    path whose folder is a file or is not writable. A missing folder is fine (it is created
    when the result is saved). Runs before any work: nothing is loaded or compiled yet.
    """
    if not output.strip() or Path(output).name in ("", ".", ".."):
        fail(f"-o {output!r}: give the path of the file to write, e.g. -o model.opt.onnx")
    out = Path(output)
    data = Path(str(out) + ".data")  # a large output writes its tensors to OUT.data
    # only an existing file can be one of the inputs: parse the input's header only then. The
    # resolved path counts too: `sub/../m.onnx` with no `sub` does not exist for the kernel yet,
    # but the save creates `sub` and then writes m.onnx.
    if any(p.exists() for p in (out, data, out.resolve(), data.resolve())) or out.is_symlink():
        protected: list[tuple[str, Path]] = []
        if src is not None:
            files = input_files(src)
            protected.append(("the input model", files[0]))
            protected += [(f"the external data file of the input model {src}", f) for f in files[1:]]
        for what, p in reads:
            protected += [(f"the {what} file" if Path(p).is_file() else f"a {what} file", f)
                          for f in _files_of(Path(p))]
        for what, f in protected:
            if _same(out, f):
                fail(f"{output}: is {what} ({f}); refusing to overwrite a file graft reads (choose another -o path)")
            if _same(data, f):
                fail(f"{output}: its tensor file {data} would overwrite {what} ({f}); choose another -o path")
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        fail(f"{output}: {parent} is a file, not a folder (choose another -o path)")
    if not os.access(parent, os.W_OK | os.X_OK):
        fail(f"{output}: folder {parent} is not writable (choose another -o path)")
