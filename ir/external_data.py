"""Tensors left in their external data file: memory-mapped on first use, copied file to file on save.

ONNX external data (https://onnx.ai/onnx/repo-docs/ExternalData.html): a ``TensorProto`` with
``data_location = EXTERNAL`` names its bytes by ``location`` (a path relative to the model's
folder), ``offset`` and ``length``. :func:`graft.ir.onnx_io.load_proto` with ``lazy=True``
leaves such tensors where they are and adds one more entry, :data:`BASE_KEY`, holding the
absolute folder the location is relative to. That makes each proto self-describing (a
``to_onnx`` → ``from_onnx`` round trip keeps it readable), at the price that the proto is not
valid ONNX as it stands: onnx and onnxruntime reject unknown keys. Every writer in graft
removes the key (:func:`graft.ir.onnx_io.save`, :func:`graft.ir.onnx_io.save_proto`, and
:func:`graft.ir.onnx_io.to_onnx`, which reads the bytes back in unless asked to keep references).

Reading: :func:`array` maps the byte range read-only (``numpy.memmap``), so an unmodified weight
costs page cache, never a private copy, and :func:`drop_pages` hands its pages back once a rule
is done with it. Writing: :func:`copy_range` moves bytes file to file in the kernel
(``os.copy_file_range``), never through Python memory.
"""
from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np
import onnx

BASE_KEY = "graft.base_dir"
_EXTERNAL = onnx.TensorProto.EXTERNAL
_COPY_CHUNK = 1 << 26  # 64 MiB per copy_file_range / read call


class ExternalDataError(ValueError):
    """An external tensor whose file is missing, outside the model's folder, or too short."""


def entries(t: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def is_lazy(t: onnx.TensorProto) -> bool:
    """True for a tensor whose bytes are still in an external file graft knows the folder of."""
    if t.data_location != _EXTERNAL:
        return False
    for e in t.external_data:
        if e.key == BASE_KEY:
            return True
    return False


def resolve(base_dir: str | os.PathLike, location: str, tensor: str) -> Path:
    """The data file of a tensor: ``location`` under ``base_dir``, as the ONNX spec requires it.

    Raises:
        ExternalDataError: an absolute location, one that leaves ``base_dir`` (``..``), a symbolic
            link, or no regular file there (the rules onnx and onnxruntime apply when they load).
    """
    if not location:
        raise ExternalDataError(f"tensor {tensor!r} has external data without a 'location'")
    if os.path.isabs(location) or Path(location).drive:
        raise ExternalDataError(f"tensor {tensor!r}: external data location {location!r} is absolute; ONNX "
                                f"requires a path relative to the model's folder")
    base = Path(base_dir).resolve()
    path = base / location
    real = path.resolve()
    if real != base and base not in real.parents:
        raise ExternalDataError(f"tensor {tensor!r}: external data location {location!r} leaves the model's "
                                f"folder {base}")
    if path.is_symlink():
        raise ExternalDataError(f"tensor {tensor!r}: external data file {path} is a symbolic link (onnx and "
                                f"onnxruntime refuse those); copy the file there instead")
    if not path.is_file():
        raise ExternalDataError(f"tensor {tensor!r}: external data file {path} does not exist or is not a "
                                f"regular file")
    return path


def byte_range(t: onnx.TensorProto) -> tuple[Path, int, int | None]:
    """(data file, offset, length or None) of a lazy tensor (see :func:`attach`)."""
    info = entries(t)
    path = Path(info[BASE_KEY]) / info["location"]
    length = info.get("length")
    return path, int(info.get("offset", 0) or 0), int(length) if length not in (None, "") else None


def attach(t: onnx.TensorProto, base_dir: str | os.PathLike) -> None:
    """Mark external tensor ``t`` as lazy, its location relative to ``base_dir`` (made absolute)."""
    for e in t.external_data:
        if e.key == BASE_KEY:
            e.value = str(Path(base_dir).resolve())
            return
    e = t.external_data.add()
    e.key, e.value = BASE_KEY, str(Path(base_dir).resolve())


def detach(t: onnx.TensorProto) -> None:
    """Remove :data:`BASE_KEY` from ``t`` (what a written file must not hold)."""
    keep = [(e.key, e.value) for e in t.external_data if e.key != BASE_KEY]
    if len(keep) != len(t.external_data):
        del t.external_data[:]
        for k, v in keep:
            e = t.external_data.add()
            e.key, e.value = k, v


def point_at(t: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    """Make ``t`` an external tensor at ``location``/``offset``/``length`` (no :data:`BASE_KEY`, no bytes)."""
    t.ClearField("raw_data")
    del t.external_data[:]
    t.data_location = _EXTERNAL
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        e = t.external_data.add()
        e.key, e.value = k, v


def array(t: onnx.TensorProto, shape: tuple, dtype: np.dtype) -> np.ndarray:
    """A read-only memory map of lazy tensor ``t`` as ``dtype`` and ``shape`` (one element per
    ``dtype.itemsize`` bytes, little-endian: the caller checks the element type allows it)."""
    path, offset, _ = byte_range(t)
    if 0 in shape:
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


def read_bytes(t: onnx.TensorProto, nbytes: int | None = None) -> bytes:
    """The bytes of lazy tensor ``t`` (``length`` of them, or ``nbytes``, or to the end of the file)."""
    path, offset, length = byte_range(t)
    n = nbytes if nbytes is not None else length
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read() if n is None else f.read(n)


def copy_range(t: onnx.TensorProto, dst, nbytes: int) -> None:
    """Append ``nbytes`` of lazy tensor ``t`` to open binary file ``dst``, in the kernel where it can."""
    path, offset, _ = byte_range(t)
    dst.flush()
    with open(path, "rb") as src:
        left, pos = nbytes, offset
        out = dst.fileno()
        while left:
            try:
                n = os.copy_file_range(src.fileno(), out, min(left, _COPY_CHUNK), pos)
            except (OSError, AttributeError):  # another filesystem or OS: plain reads, bounded
                src.seek(pos)
                buf = src.read(min(left, _COPY_CHUNK))
                n = os.write(out, buf) if buf else 0
            if n == 0:
                raise ExternalDataError(f"tensor {t.name!r}: {path} ended {left} bytes early while it was copied")
            left -= n
            pos += n
    dst.seek(0, os.SEEK_END)


def drop_pages(arr: np.ndarray | None) -> None:
    """Hand the pages of a memory-mapped array back to the kernel (``madvise(MADV_DONTNEED)``).

    The file is unchanged and still mapped: the next read faults the pages in again from the
    page cache. Call it when a rule is done with a large weight, so the process keeps at most
    the weights it is working on. A no-op for arrays that are not memory maps.
    """
    m = arr
    for _ in range(32):  # a memmap's base is its mmap; a view's base is the memmap, and so on
        if m is None or isinstance(m, mmap.mmap):
            break
        m = getattr(m, "base", None)
    if m is None or not hasattr(m, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return
    try:
        m.madvise(mmap.MADV_DONTNEED)
    except (OSError, ValueError):  # a closed map, an OS without it: nothing to hand back
        pass
